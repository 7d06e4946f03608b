"""`patchline bench`: per-stage latency of the CPU path, against the machine's arithmetic floor.

One run measures, on the same frames: decode, preprocess, backbone, distance, reweight,
map (and a QoS-1 MQTT publish when a broker is given) for each asked-for variant of the
runtime, the machine's sgemm rate, and — with ``compare`` — the eager-torch baseline
(export/torch_baseline.py, imported only then). Variants run interleaved, frame by
frame, so load from other processes spreads over all of them alike; the baseline takes
turns of a few frames with the default variant. Results go to
``bench/results/cpu-<host>-<UTC time>.json`` and a table on stdout.

``summarise``, ``machine_facts`` and ``write_result`` are shared by every benchmark here
(bench_gpu, bench/*.py, calibration's INT8 comparison).

Variant names: ``exact`` (the default runtime path: the nearest-row search the artifact's
measurement chose, pruned or plain, and the k-NN graph for the reweighting), ``pruned``
(the projection-pruned search whatever the measurement said, k-NN graph), ``projected``
(pruned search, bank-wide reweighting), ``plain`` (no bank index: the blocked GEMM search
and a bank-wide search for the reweighting, as an artifact exported without the index gets),
``approximate`` (opt-in). ``NAME:DIMS`` projects on DIMS directions instead of the
default; ``NAME@FILE`` runs it with another model file of the artifact, e.g.
``exact@model.int8.onnx``.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np

from patchline.runtime.artifact import Artifact, load_artifact
from patchline.runtime.inspector import Inspection, Inspector
from patchline.runtime.preprocess import decode_image, evaluation_root, list_images
from patchline.runtime.score import MemoryBank
from patchline.runtime.search.bank_index import BankIndex, build_index, index_for_this_machine
from patchline.runtime.search.distance import available_cores, cpu_model

STAGES = ("decode", "preprocess", "backbone", "distance", "reweight", "map", "publish")
SEARCHES = ("exact", "pruned", "projected", "plain", "approximate")
COMPARE_TURN = 5  # frames each side runs in a row in the torch comparison
# A latency benchmark's client process (bench/*_latency.py) gives up waiting for its messages after this long: long
# enough for bench/protocols_e2e.py, whose verdicts come at the model's pace.
CLIENT_TIMEOUT_S = 600.0


@dataclass
class BenchOptions:
    artifact: Path
    images: Path | None = None  # frames to score (a folder or MVTec category); None: noise frames
    frames: int = 30
    warmup: int = 3
    threads: int | None = None
    variants: list[str] = field(default_factory=lambda: ["exact"])  # NAME[:DIMS][@MODEL_FILE] (parse_variant)
    model_file: str | None = None  # model file of the artifact for every variant that names none
    dims: int | None = None  # projected dims of the pruned searches (default: the measured choice's)
    bank_size: int | None = None  # subsample the artifact's bank to this many rows
    random_bank: bool = False  # Gaussian rows with the bank's per-dimension mean/std instead of its rows
    graph_optimization: str = "all"
    compare: bool = False  # run the eager-torch baseline on the same frames
    baseline_weights: str | None = None
    publish: str | None = None  # HOST:PORT of an MQTT broker
    accuracy: Path | None = None  # MVTec-layout folder: AUROC and score drift of every variant
    out_dir: Path = Path("bench/results")
    seed: int = 0


@dataclass(frozen=True)
class VariantSpec:
    """A ``NAME[:DIMS][@MODEL_FILE]`` variant: the bank search, its projected dims, another model file."""

    search: str
    dims: int | None = None
    model_file: str | None = None

    @property
    def name(self) -> str:
        return self.search + (f":{self.dims}" if self.dims else "") + (f"@{self.model_file}" if self.model_file else "")


def parse_variant(spec: str, model_file: str | None = None) -> VariantSpec:
    """Parse ``NAME[:DIMS][@MODEL_FILE]``; ``model_file`` is used where the spec names none."""
    search, _, own_file = spec.partition("@")
    search, _, dims = search.partition(":")
    if search not in SEARCHES or (dims and not dims.isdigit()) or dims == "0" or (own_file == "" and "@" in spec):
        raise ValueError(f"unknown bench variant {spec!r}; searches: {', '.join(SEARCHES)} (NAME[:DIMS][@MODEL_FILE])")
    return VariantSpec(search, int(dims) if dims else None, own_file or model_file)


@dataclass
class Variant:
    name: str
    model_file: str | None
    inspector: Inspector
    timings: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in (*STAGES, "total")})
    scores: list[float] = field(default_factory=list)
    pruning: list[float] = field(default_factory=list)  # per frame, when the pruned search ran

    @property
    def search(self) -> str:
        """The nearest-row search this variant runs."""
        search = self.inspector.bank.search
        return "plain" if search is None else "approximate" if search.approximate else "pruned"


def summarise(values_ms: list[float] | np.ndarray, percentiles: tuple[int, ...] = (50, 95), digits: int = 3,
              unit: str = "_ms") -> dict[str, float]:
    """Latency statistics: the percentiles (50 is ``median``, others ``pNN``), mean, min, max, and the count ``n``.

    Keys end in ``unit`` (milliseconds; "" where the caller's context names the unit).
    """
    values = np.asarray(values_ms, np.float64)
    if values.size == 0:
        raise ValueError("no latencies to summarise: nothing was measured")
    stats = {("median" if q == 50 else f"p{q}") + unit: round(float(np.percentile(values, q)), digits)
             for q in percentiles}
    stats.update({f"mean{unit}": round(float(values.mean()), digits), f"min{unit}": round(float(values.min()), digits),
                  f"max{unit}": round(float(values.max()), digits), "n": int(values.size)})
    return stats


def latency_ms(values_s: list[float] | np.ndarray) -> dict[str, float]:
    """Seconds → the protocol benchmarks' latency summary (bench/*_latency.py): milliseconds at p50, p90, p99."""
    return summarise(np.asarray(values_s, np.float64) * 1000.0, (50, 90, 99))


def paced(count: int, rate: float, publish: Callable[[int], object]) -> tuple[dict[int, float], list[float]]:
    """``publish(seq)`` for seq 1..``count``, ``rate`` per second, so that a benchmark measures latency, not queueing:
    when each call began (time.monotonic(), by seq) and how long each took (s)."""
    sent: dict[int, float] = {}
    calls: list[float] = []
    interval = 1.0 / rate
    start = time.monotonic()
    for seq in range(1, count + 1):
        while time.monotonic() < start + (seq - 1) * interval:
            time.sleep(min(interval / 4, 0.001))
        t0 = time.monotonic()
        publish(seq)
        calls.append(time.monotonic() - t0)
        sent[seq] = t0
    return sent, calls


def first_receipts(pairs: Iterable[tuple[int | str, float]]) -> dict[int, float]:
    """A client's (seq, receipt time) pairs → the first receipt of each seq (a redelivery repeats one)."""
    first: dict[int, float] = {}
    for seq, at in pairs:
        first.setdefault(int(seq), at)
    return first


def load_avg(before: float) -> dict[str, float]:
    """The 1-minute load average at a benchmark's start (``before``, from os.getloadavg()) and now: other work on
    the machine shows up in the tail latencies."""
    return {"before": round(before, 2), "after": round(os.getloadavg()[0], 2)}


def machine_facts() -> dict[str, object]:
    """The machine a benchmark ran on: host, CPU model, the cores this process may use, Python and numpy."""
    return {"host": socket.gethostname(), "cpu_model": cpu_model(), "cores": available_cores(),
            "python": platform.python_version(), "numpy": np.__version__}


def write_result(name: str, data: dict, out_dir: str | Path) -> Path:
    """Write a benchmark's result to ``out_dir/<name>-<host>-<UTC time>.json`` with the time and ``machine_facts()``
    (which a ``machine`` entry of ``data`` extends)."""
    now = datetime.now(timezone.utc)
    record = {"created": now.isoformat(timespec="seconds"), **data,
              "machine": {**machine_facts(), **data.get("machine", {})}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{socket.gethostname()}-{now:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def report(name: str, result: dict, out_dir: str | Path) -> Path:
    """``write_result``, and the result and where it went on standard output."""
    path = write_result(name, result, out_dir)
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return path


def sgemm_gflops(repeats: int = 5) -> tuple[float, str]:
    """This machine's float32 GEMM rate (best of ``repeats``) on the distance GEMM's shape."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((784, 1536), dtype=np.float32)
    b = rng.standard_normal((4096, 1536), dtype=np.float32)
    a @ b.T
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2.0 * a.shape[0] * b.shape[0] * a.shape[1] / best / 1e9, "784×4096×1536"


def model_gflop(path: Path) -> float | None:
    """Multiply-add FLOPs of one image through an ONNX model's Conv/MatMul/Gemm nodes; None without ``onnx``."""
    try:
        import onnx
        from onnx import shape_inference
    except ModuleNotFoundError:
        return None
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.value_info, *graph.output)
    }
    weights = {init.name: list(init.dims) for init in graph.initializer}
    for node in graph.node:  # weights reach nodes through Identity (shared) or DequantizeLinear (QDQ)
        if node.op_type in ("Identity", "DequantizeLinear") and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    # Quantised operator-format nodes keep their weight at another input position.
    weight_input = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "MatMul": 1, "Gemm": 1, "MatMulInteger": 1}
    flops = 0.0
    for node in graph.node:
        position = weight_input.get(node.op_type)
        if position is None or node.input[position] not in weights or node.output[0] not in shapes:
            continue
        out, w = shapes[node.output[0]], weights[node.input[position]]
        if node.op_type.endswith("Conv") or node.op_type == "ConvInteger":
            flops += 2.0 * float(np.prod(out[1:])) * float(np.prod(w[1:]))
        else:
            flops += 2.0 * float(np.prod(out[1:-1] or [1])) * float(np.prod(w))
    return flops / 1e9


def _replace_bank(artifact: Artifact, options: BenchOptions) -> np.ndarray:
    bank = artifact.bank
    rng = np.random.default_rng(options.seed)
    size = options.bank_size or bank.shape[0]
    if options.random_bank:
        mean, std = bank.mean(axis=0), bank.std(axis=0)
        return (rng.standard_normal((size, bank.shape[1]), dtype=np.float32) * std + mean).astype(np.float32)
    if size > bank.shape[0]:
        raise ValueError(f"--bank-size {size} is larger than the artifact's bank ({bank.shape[0]} rows); "
                         "use --random-bank for a bigger one")
    return bank[np.sort(rng.choice(bank.shape[0], size, replace=False))] if size < bank.shape[0] else bank


Frame = tuple[str, bytes]  # where the frame came from (for errors) and its encoded bytes


def _frames(options: BenchOptions, size: tuple[int, int]) -> list[Frame]:
    """Encoded frames, so every variant pays the same decode."""
    if options.images is None:
        rng = np.random.default_rng(options.seed)
        images = [rng.integers(0, 256, (*size, 3), np.uint8) for _ in range(4)]
        return [(f"<noise frame {i}>", cv2.imencode(".png", image)[1].tobytes()) for i, image in enumerate(images)]
    paths = list_images(evaluation_root(options.images))
    if not paths:
        raise FileNotFoundError(f"{options.images}: no images to benchmark with")
    step = max(1, len(paths) // options.frames)  # spread over the classes of a sorted test set
    return [(str(p), p.read_bytes()) for p in paths[::step][: options.frames]]


class Publisher:
    """QoS-1 publishes to a broker; each is timed until the broker's PUBACK."""

    def __init__(self, address: str) -> None:
        import paho.mqtt.client as mqtt

        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--publish {address!r}: expected HOST:PORT")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"patchline-bench-{socket.gethostname()}")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def __call__(self, result: Inspection) -> float:
        payload = json.dumps({"score": result.score, "location": result.location, "latency_ms": result.timings_ms})
        t0 = time.perf_counter()
        self.client.publish("patchline/bench/verdict", payload, qos=1).wait_for_publish(5)
        return (time.perf_counter() - t0) * 1000.0

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _make_variants(options: BenchOptions, artifact: Artifact, bank: np.ndarray, index: BankIndex) -> list[Variant]:
    inspectors: dict[str | None, Inspector] = {}
    variants = []
    for spec in (parse_variant(v, options.model_file) for v in options.variants):
        search, key = spec.search, spec.model_file
        if key not in inspectors:
            inspectors[key] = Inspector(artifact, device="cpu", threads=options.threads, model_file=key,
                                        graph_optimization=options.graph_optimization)
        inspector = inspectors[key]
        variant_index = BankIndex() if search == "plain" else replace(index, knn=None) if search == "projected" else index
        own = copy.copy(inspector)  # same engine and preprocessing, its own bank: searched on the CPU, reweighted
        own.bank = own.distance = MemoryBank(bank, variant_index, spec.dims or options.dims, search == "approximate",
                                             options.threads, search="auto" if search in ("exact", "plain") else "pruned")
        variants.append(Variant(spec.name, key, own))
    return variants


def _run_frame(variant: Variant, frame: Frame, publisher: Publisher | None, record: bool) -> None:
    t0 = time.perf_counter()
    rgb = decode_image(frame[1], frame[0])
    decode_ms = (time.perf_counter() - t0) * 1000.0
    result = variant.inspector.inspect(rgb)
    publish_ms = publisher(result) if publisher else None
    if record:
        stages = {"decode": decode_ms, **result.timings_ms, "publish": publish_ms}
        for stage in STAGES:
            if stages.get(stage) is not None:
                variant.timings[stage].append(stages[stage])
        variant.timings["total"].append(decode_ms + result.timings_ms["total"] + (publish_ms or 0.0))
        variant.scores.append(result.score)
        if variant.inspector.bank.search is not None:
            variant.pruning.append(variant.inspector.bank.search.stats.pruning_rate)


def _reference(variants: list[Variant]) -> Variant:
    """The default runtime path when it is among the variants, else the first."""
    return next((v for v in variants if v.name == "exact"), variants[0])


def _accuracy(variants: list[Variant], data: Path) -> dict[str, dict[str, float]]:
    """Image AUROC of every variant on DATA's MVTec test set, and its score drift from the reference variant."""
    try:
        from patchline.calibration.dataset import mvtec_test_set
        from patchline.calibration.metrics import image_auroc
        from patchline.calibration.scoring import score_samples
    except ModuleNotFoundError as exc:
        raise SystemExit(f"patchline: --accuracy needs the 'calibration' extra ({exc.name} is not installed)") from exc
    samples = mvtec_test_set(data)
    reference = _reference(variants)
    results, reference_scores = {}, None
    for variant in [reference, *(v for v in variants if v is not reference)]:
        scored = score_samples(variant.inspector, samples)
        labels = np.array([s.label for s in scored.samples])
        if reference_scores is None:
            reference_scores = scored.scores
        drift = np.abs(scored.scores - reference_scores) / np.maximum(np.abs(reference_scores), 1e-12)
        results[variant.name] = {
            "images": len(scored.scores),
            "image_auroc": round(image_auroc(labels, scored.scores), 6),
            "drift_from": reference.name,
            "max_rel_score_drift": float(drift.max()),
            "median_rel_score_drift": float(np.median(drift)),
        }
    return results


def run_bench(options: BenchOptions) -> dict:
    """Run the benchmark, write its JSON and return it."""
    load_before = list(np.round(os.getloadavg(), 2))
    artifact = load_artifact(options.artifact)
    manifest = artifact.manifest
    bank = _replace_bank(artifact, options)
    t0 = time.perf_counter()
    index = index_for_this_machine(artifact) if bank is artifact.bank else build_index(bank, manifest.num_neighbors)
    index_s = time.perf_counter() - t0
    if any(parse_variant(v).search != "plain" for v in options.variants) and index.basis is None:
        raise ValueError(f"{options.artifact}: no bank projection in the artifact; only the 'plain' variant can run "
                         "(re-export, or `patchline index` it)")
    variants = _make_variants(options, artifact, bank, index)
    frames = _frames(options, tuple(manifest.preprocess.image_size))
    publisher = Publisher(options.publish) if options.publish else None
    rate, shape = sgemm_gflops()

    # Warm-up, then frames round-robin over the variants.
    for i in range(options.warmup):
        for variant in variants:
            _run_frame(variant, frames[i % len(frames)], publisher, record=False)
    for i in range(options.frames):
        for variant in variants:
            _run_frame(variant, frames[i % len(frames)], publisher, record=True)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if publisher:
        publisher.close()

    rows, dim = bank.shape
    grid_h, grid_w = manifest.model.patch_grid
    queries = grid_h * grid_w
    model_files = {v.model_file or manifest.model.file for v in variants}
    backbone_gflop = {name: model_gflop(artifact.file(name)) for name in sorted(model_files)}
    floors = {
        "distance": 2.0 * queries * rows * dim / rate / 1e6,  # the full fp32 search's GEMM
        "reweight": 2.0 * rows * dim / rate / 1e6,  # one bank-wide search for m*'s neighbours
    }
    results = {
        "machine": {**machine_facts(), "load_avg_before": load_before, "onnxruntime": version("onnxruntime")},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.__dict__.items()},
        "artifact": {
            "model_id": manifest.model_id,
            "backbone": manifest.backbone.name,
            "layers": manifest.backbone.layers,
            "image_size": list(manifest.preprocess.image_size),
            "patch_grid": [grid_h, grid_w],
            "bank_rows": rows,
            "embedding_dim": dim,
            "bank": "random" if options.random_bank else ("subsampled" if rows < artifact.bank.shape[0] else "artifact"),
            "index_build_s": round(index_s, 3) if bank is not artifact.bank else None,
            "num_neighbors": manifest.num_neighbors,
            "search": index.choice.model_dump() if index.choice else None,  # measured on this bank (rebuilt: here)
        },
        "sgemm_gflops": round(rate, 2),
        "sgemm_shape": shape,
        "backbone_gflop": {k: (round(v, 3) if v else None) for k, v in backbone_gflop.items()},
        "floors_ms": {k: round(v, 3) for k, v in floors.items()},
        "peak_rss_mb": round(peak_rss_mb, 1),
        "variants": {},
    }
    for variant in variants:
        model = variant.model_file or manifest.model.file
        stage_floors = {**floors, "backbone": (backbone_gflop[model] or 0) * 1e3 / rate or None}
        stats = {}
        for stage, values in variant.timings.items():
            if not values:
                continue
            stats[stage] = summarise(values)
            if stage_floors.get(stage):
                stats[stage]["floor_ms"] = round(stage_floors[stage], 3)
                stats[stage]["x_floor"] = round(stats[stage]["median_ms"] / stage_floors[stage], 3)
        results["variants"][variant.name] = {
            "model_file": model,
            "search": variant.search,
            "pruning_rate_median": round(float(np.median(variant.pruning)), 4) if variant.pruning else None,
            "stages": stats,
            "frames_per_s": round(1000.0 / stats["total"]["median_ms"], 2),
            "mean_score": float(np.mean(variant.scores)),
        }
    if options.compare:
        baseline = results["baseline"] = _compare(options, artifact, bank, frames, _reference(variants))
        # Every variant against the baseline: its median from the interleaved run, the baseline's from its turns.
        theirs = baseline["stages"]["total"]["median_ms"]
        baseline["speedup_by_variant"] = {name: round(theirs / v["stages"]["total"]["median_ms"], 3)
                                          for name, v in results["variants"].items()}
    if options.accuracy:
        results["accuracy"] = _accuracy(variants, options.accuracy)
    results["machine"]["load_avg_after"] = list(np.round(os.getloadavg(), 2))
    results["path"] = str(write_result("cpu", results, options.out_dir))
    return results


def _compare(options: BenchOptions, artifact: Artifact, bank: np.ndarray, frames: list[Frame], ours: Variant) -> dict:
    """The eager-torch baseline and ``ours`` again on the same frames, taking turns: per-stage times and the ratio.

    The baseline is anomalib's own PatchcoreModel where anomalib is installed and can hold the
    model, else the in-project re-implementation; the result says which, and why. Each side
    runs COMPARE_TURN frames in a row, so that neither pays on every frame for the other's
    thread pool (OpenMP, ONNX Runtime) still spinning after its last call.
    """
    try:
        from patchline.export.torch_baseline import AnomalibPatchcore, TorchPatchcore
    except ModuleNotFoundError as exc:
        raise SystemExit(f"patchline: --compare needs the 'export' extra ({exc.name} is not installed)") from exc
    try:
        baseline = AnomalibPatchcore(artifact, bank, options.baseline_weights, options.threads)
        why = None
    except (ModuleNotFoundError, ValueError) as exc:
        why = f"anomalib not installed ({exc.name})" if isinstance(exc, ModuleNotFoundError) else str(exc)
        baseline = TorchPatchcore(artifact, bank, options.baseline_weights, options.threads)
    preprocess = ours.inspector.preprocess

    def torch_frame(frame: Frame) -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        rgb = decode_image(frame[1], frame[0])
        t1 = time.perf_counter()
        batch = preprocess([rgb])
        t2 = time.perf_counter()
        scores, _, times = baseline.forward(batch)
        return float(scores[0]), {"decode": (t1 - t0) * 1000.0, "preprocess": (t2 - t1) * 1000.0, **times}

    def our_frame(frame: Frame) -> tuple[float, float]:
        t0 = time.perf_counter()
        rgb = decode_image(frame[1], frame[0])
        decode_ms = (time.perf_counter() - t0) * 1000.0
        result = ours.inspector.inspect(rgb)
        return result.score, decode_ms + result.timings_ms["total"]

    for i in range(options.warmup):
        torch_frame(frames[i % len(frames)])
        our_frame(frames[i % len(frames)])
    stages: dict[str, list[float]] = {}
    mine: list[float] = []
    score_diff = []
    for start in range(0, options.frames, COMPARE_TURN):
        turn = [frames[i % len(frames)] for i in range(start, min(start + COMPARE_TURN, options.frames))]
        theirs = [torch_frame(frame) for frame in turn]
        for (their_score, times), frame in zip(theirs, turn):
            for stage, value in {**times, "total": sum(times.values())}.items():
                stages.setdefault(stage, []).append(value)
            score, total = our_frame(frame)
            mine.append(total)
            score_diff.append(abs(their_score - score) / max(abs(their_score), 1e-12))
    ratio = float(np.median(stages["total"]) / np.median(mine))
    return {
        "implementation": baseline.label,
        "not_anomalib_because": why,
        "against": ours.name,
        "torch_threads": _torch_threads(),
        "stages": {stage: summarise(values) for stage, values in stages.items()},
        "ours_total": summarise(mine),
        "speedup_median": round(ratio, 3),
        "max_rel_score_diff": float(np.max(score_diff)),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def format_table(results: dict) -> str:
    """The results as a table: one row per stage, median / p95 ms per variant, and ×floor where there is one."""
    art = results["artifact"]
    lines = [
        f"patchline bench: {art['backbone']} {'+'.join(art['layers'])} {art['image_size'][0]}×{art['image_size'][1]}, "
        f"bank {art['bank_rows']}×{art['embedding_dim']} ({art['bank']}), grid {art['patch_grid'][0]}×"
        f"{art['patch_grid'][1]}, {results['options']['frames']} frames, threads {results['options']['threads'] or 'all'}",
        f"machine: {results['machine']['cpu_model']}, {results['machine']['cores']} cores, load "
        f"{results['machine']['load_avg_before'][0]} → {results['machine']['load_avg_after'][0]}; "
        f"sgemm {results['sgemm_gflops']} GFLOP/s ({results['sgemm_shape']}); peak RSS {results['peak_rss_mb']} MB",
    ]
    choice = art.get("search")
    if choice:
        lines.append(f"measured default search for this bank: {choice['method']} (pruned {choice['pruned_ms']:.1f} ms vs "
                     f"plain {choice['plain_ms']:.1f} ms per {choice['queries']}-row frame, pruning rate "
                     f"{choice['pruning_rate']:.3f}, on {choice['held_out']}, {choice['cpu']})")
    columns = {name: v["stages"] for name, v in results["variants"].items()}
    baseline = results.get("baseline")
    if baseline:
        columns["anomalib" if baseline["implementation"].startswith("anomalib") else "torch eager"] = baseline["stages"]
    header = f"{'stage':<11}{'floor ms':>10}" + "".join(f"{name[:24]:>26}" for name in columns)
    lines += [header, "-" * len(header)]
    searches = [v["search"] + (f" ({v['pruning_rate_median']:.1%} pruned)" if v["pruning_rate_median"] is not None
                               else "") for v in results["variants"].values()]
    lines.append(f"{'search':<21}" + "".join(f"{cell:>26}" for cell in searches))
    for stage in (*STAGES, "forward", "total"):
        if stage == "forward" and not (baseline and "forward" in baseline["stages"]):
            continue
        floor = next((c[stage].get("floor_ms") for c in columns.values() if stage in c and "floor_ms" in c[stage]), None)
        row = f"{stage:<11}{(f'{floor:.1f}' if floor else '-'):>10}"
        for stats in columns.values():
            if stage not in stats:
                cell = "not measured" if stage == "publish" else "-"
            else:
                cell = f"{stats[stage]['median_ms']:.1f} / {stats[stage]['p95_ms']:.1f}"
                if "x_floor" in stats[stage]:
                    cell += f" ({stats[stage]['x_floor']:.2f}×)"
            row += f"{cell:>26}"
        lines.append(row)
    fps = "".join(f"{v['frames_per_s']:>26.2f}" for v in results["variants"].values())
    if "baseline" in results:
        fps += f"{1000.0 / results['baseline']['stages']['total']['median_ms']:>26.2f}"
    lines.append(f"{'frames/s':<21}{fps}")
    lines.append("cells: median / p95 ms (× the stage's fp32 arithmetic floor at the measured sgemm rate)")
    if "publish" not in next(iter(columns.values())):
        lines.append("publish: not measured here (give --publish HOST:PORT; the daemon's benchmark measures it end to end)")
    if baseline:
        b = baseline
        lines.append(f"baseline: {b['implementation']}" + (f" (not anomalib's own: {b['not_anomalib_because']})"
                                                           if b["not_anomalib_because"] else ""))
        lines.append(f"speed-up vs the baseline (same frames, in turns): {b['speedup_median']:.2f}× per frame "
                     f"({b['against']}: {b['ours_total']['median_ms']:.1f} ms vs {b['stages']['total']['median_ms']:.1f} ms); "
                     f"max relative score difference {b['max_rel_score_diff']:.2e}")
        lines.append("speed-up vs the baseline by variant (its median in the interleaved run): " + ", ".join(
            f"{name} {ratio:.2f}×" for name, ratio in b["speedup_by_variant"].items()))
    for name, acc in results.get("accuracy", {}).items():
        lines.append(f"accuracy {name}: image AUROC {acc['image_auroc']:.4f} on {acc['images']} images, "
                     f"score drift vs {acc['drift_from']} max {acc['max_rel_score_drift']:.2e} median {acc['median_rel_score_drift']:.2e}")
    lines.append(f"written: {results['path']}")
    return "\n".join(lines)
