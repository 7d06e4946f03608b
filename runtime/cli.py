"""The ``patchline`` command: one entry point, a subcommand per job.

Build-time subcommands (export, eval, sample-data) import torch/scikit-learn lazily so
the edge install (``pip install 'patchline[cpu]'``) can still run ``score`` and ``run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from patchline.runtime.artifact import PRECISIONS, ArtifactError
from patchline.runtime.config import CameraConfig, ConfigError, TensorRtConfig, load_any_config
from patchline.runtime.engines import ENGINES
from patchline.runtime.engines.onnxruntime import DEVICES, GRAPH_OPTIMIZATION
from patchline.runtime.image_header import DEFAULT_MAX_PIXELS
from patchline.runtime.preprocess import IMAGE_SUFFIXES, ImageError, iter_images, list_images
from patchline.runtime.search import DISTANCES
from patchline.runtime.search.cuda_device import GpuUnavailable
from patchline.runtime.search.distance import NonFiniteError

log = logging.getLogger("patchline")


@contextmanager
def _needs_extra(extra: str) -> Iterator[None]:
    """Around the lazy imports of a command that needs an optional extra: a module missing from it ends the
    command with the pip install that brings it, instead of a traceback on an edge box without it."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise SystemExit(f"patchline: this command needs the '{extra}' extra ({exc.name} is not installed): "
                         f"pip install 'patchline[{extra}]'") from exc


def cmd_export(args: argparse.Namespace) -> None:
    from patchline.export.config import load_export_config  # pydantic only: a bad config is named before torch

    config = load_export_config(args.config, args.set)
    with _needs_extra("export"):
        from patchline.export.fit import export_artifact
    manifest = export_artifact(config, args.images, args.out, progress=not args.quiet)
    engine = _prepare_engine(args.out, config.tensorrt, args.device) if args.engine == "trt" else None
    print(json.dumps({
        "artifact": str(args.out),
        "model_id": manifest.model_id,
        "bank": list(manifest.memory_bank.shape),
        "images_used": manifest.training.images_used,
        "images_skipped": manifest.training.images_skipped,
        "timings_s": manifest.training.timings_s,
        "onnx_max_abs_diff": manifest.model.onnx_max_abs_diff,
        **({"tensorrt": engine} if engine else {}),
    }))


# Options of score, eval and engine that a run config also sets, with their defaults otherwise.
SCORE_OPTIONS = {"artifact": None, "engine": "onnxruntime", "device": "auto", "distance": "cpu", "threads": None,
                 "precision": "fp32"}
ENGINE_OPTIONS = {"artifact": None, "device": "cuda"}


def _settings(args: argparse.Namespace, options: dict[str, object]) -> tuple[TensorRtConfig, CameraConfig | None]:
    """--config's tensorrt section with --set applied, and the camera's settings when --config is a run config.

    A run config (`patchline run`'s, e.g. /etc/patchline/<line>.yaml; --camera names one of a line's) also gives
    ``options`` their values where the command line does not, and puts engines in the service's cache: the
    engine is the camera's."""
    config = load_any_config(args.config, args.set, args.camera)
    run = config if isinstance(config, CameraConfig) else None
    for name, default in options.items():
        if getattr(args, name) is None:
            setattr(args, name, getattr(run, name) if run else default)
    if args.artifact is None:
        raise SystemExit(f"patchline {args.command}: give --artifact, or a run config as --config")
    args.artifact = Path(args.artifact)
    return config.tensorrt, run


def _prepare_engine(artifact_dir: Path, settings: TensorRtConfig, device: str) -> dict[str, object]:
    """Build (or check) the TensorRT engine for an artifact on this machine's GPU."""
    from patchline.runtime.artifact import load_artifact
    from patchline.runtime.engines.trt_build import prepare_engine
    from patchline.runtime.search.cuda_device import CudaDevice

    artifact = load_artifact(artifact_dir)
    gpu = CudaDevice(device)  # engines are built on the GPU that will run them
    path, built = prepare_engine(artifact, settings, gpu)
    return {"engine": str(path), "built": built, "precision": settings.precision,
            "batch_profile": list(settings.batch_profile), "gpu": gpu.name}


def cmd_engine(args: argparse.Namespace) -> None:
    settings, run = _settings(args, ENGINE_OPTIONS)
    if run is not None and run.engine != "tensorrt":
        raise ConfigError(f"{args.config}: camera {run.camera} runs engine {run.engine!r}, which loads no engine of "
                          "`patchline engine`; set `engine: tensorrt` in it to run one")
    if args.check:
        settings = settings.model_copy(update={"build": False})
    if args.calibrate:
        from patchline.calibration.tensorrt_calibrator import calibrate_engine

        path, built = calibrate_engine(args.artifact, args.calibrate, settings, args.device)
        print(json.dumps({"engine": str(path), "built": built, "calibration_cache": settings.calibration_cache}))
        return
    print(json.dumps(_prepare_engine(args.artifact, settings, args.device)))


def cmd_bench_gpu(args: argparse.Namespace) -> None:
    from patchline.runtime.tools.bench_gpu import run_benchmark, write_results
    from patchline.runtime.config import ToolConfig, load_config

    settings = load_config(args.config, args.set, ToolConfig).tensorrt
    results = run_benchmark(args.artifact, args.repeats, args.batch, args.bank_rows, settings)
    path = write_results(results, args.out)
    print(json.dumps(results, indent=2))
    print(f"results written to {path}", file=sys.stderr)


def cmd_gpu_check(args: argparse.Namespace) -> None:
    from patchline.runtime.tools.gpu_check import run_check, summary

    report, path = run_check(args.artifact, args.images, args.out, args.repeats, args.max_images)
    print(summary(report))
    print(f"report written to {path}", file=sys.stderr)
    if not report["passed"]:
        sys.exit(1)


def _expand(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(image, its path relative to the argument it came from): names outputs uniquely below a folder."""
    found = []
    for path in paths:
        if path.is_dir():
            found.extend((image, image.relative_to(path)) for image in list_images(path))
        elif path.suffix.lower() in IMAGE_SUFFIXES or path.exists():
            found.append((path, Path(path.name)))
        else:
            raise SystemExit(f"patchline: {path}: no such image or folder")
    return found


def cmd_score(args: argparse.Namespace) -> None:
    from patchline.runtime.inspector import Inspector
    from patchline.runtime.overlay import heatmap_overlay, write_rgb

    settings, _ = _settings(args, SCORE_OPTIONS)
    inspector = Inspector(args.artifact, engine=args.engine, distance=args.distance, device=args.device,
                          threads=args.threads, precision=args.precision, tensorrt=settings)
    inspector.warm_up()
    failures = 0
    images = _expand(args.images)
    for (path, relative), (_, rgb) in zip(images, iter_images((path for path, _ in images), args.max_pixels)):
        if isinstance(rgb, ImageError):
            failures += 1
            print(json.dumps({"path": str(path), "error": rgb.reason}), flush=True)
            continue
        try:
            result = inspector.inspect(rgb)
        except NonFiniteError as exc:  # fail closed, but score the other images
            failures += 1
            print(json.dumps({"path": str(path), "error": str(exc)}), flush=True)
            continue
        line = {
            "path": str(path),
            "score": round(result.score, 6),
            "max_patch_xy": list(result.location),
            "latency_ms": result.timings_ms,
        }
        if args.heatmap_dir:
            # good/000.png and crack/000.png must not overwrite each other: keep the subfolders
            out = Path(args.heatmap_dir) / relative.with_name(f"{relative.stem}_heatmap.png")
            write_rgb(out, heatmap_overlay(rgb, result.anomaly_map))
            line["heatmap"] = str(out)
        print(json.dumps(line), flush=True)
    inspector.close()
    if failures:
        sys.exit(1)


def cmd_eval(args: argparse.Namespace) -> None:
    with _needs_extra("calibration"):
        from patchline.calibration.evaluate import evaluate_artifact

    settings, _ = _settings(args, SCORE_OPTIONS)
    report_dir = args.report or args.artifact.parent / f"{args.artifact.name}-eval"
    report = evaluate_artifact(args.artifact, args.data, report_dir, args.precision, not args.no_int8,
                               engine=args.engine, distance=args.distance, device=args.device, threads=args.threads,
                               tensorrt=settings)
    calibrated = "threshold" in report
    print(f"{'image':<40} {'class':<15} {'score':>9} {'norm':>6} {'verdict':>7} {'ms':>8}")
    for item in report["images"]:
        name = str(Path(item["path"]).relative_to(args.data))
        norm, verdict = (f"{item['normalised']:6.3f}", item["verdict"]) if calibrated else ("-", "-")
        print(f"{name:<40} {item['defect']:<15} {item['score']:9.4f} {norm:>6} {verdict:>7} {item['latency_ms']:8.1f}")
    overall = report["overall"]
    pixel = {k: "n/a" if overall[k] is None else f"{overall[k]:.4f}" for k in ("pixel_auroc", "pro")}
    print(f"image AUROC {overall['image_auroc']:.4f}  pixel AUROC {pixel['pixel_auroc']}  PRO(30% FPR) {pixel['pro']}  "
          f"({overall['defective']} defective, {overall['good']} good)")
    if calibrated:
        c = overall["confusion"]
        print(f"at threshold {report['threshold']:.4f}: F1 {overall['f1']:.3f}; NG {c['true_ng']} caught, "
              f"{c['false_ok']} missed (false accepts); {c['false_ng']} good rejected (false rejects), {c['true_ok']} passed")
        if report["calibrated_on"] != report["model_file"]:
            print(f"note: thresholds were calibrated on {report['calibrated_on']} scores, this ran {report['model_file']}")
    else:
        print("not calibrated: no verdicts (run `patchline calibrate`)")
    for defect, m in report["per_defect"].items():
        print(f"  {defect:<15} AUROC {m['image_auroc']:.4f}" + (f"  caught {m['detected']:.0%}" if calibrated else ""))
    if "int8" in report:
        q = report["int8"]
        print(f"int8 vs fp32: AUROC {q['image_auroc']['int8']:.4f} vs {q['image_auroc']['fp32']:.4f}; score drift max "
              f"{q['score_drift']['max_abs']:.4g} mean {q['score_drift']['mean_abs']:.4g}; latency per frame median "
              f"{q['latency_ms']['int8']['median']:.1f} ms vs {q['latency_ms']['fp32']['median']:.1f} ms")
    print(f"report: {report_dir / 'index.html'}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    with _needs_extra("calibration"):
        from patchline.calibration.calibrate import (calibrate_scores, parse_rate, summary_lines,
                                                     validation_scores, write_calibration)
    from patchline.runtime.artifact import load_artifact

    artifact = load_artifact(args.artifact)
    scores = validation_scores(artifact, args.val, args.defects, args.scores, args.precision,
                               device=args.device, threads=args.threads)
    if args.save_scores:
        scores.save(args.save_scores)
    options = {name: getattr(args, name) for name in ("quantile", "margin", "min_good", "min_defective")
               if getattr(args, name) is not None}
    if args.max_false_reject:
        options["max_false_reject"] = parse_rate(args.max_false_reject)
    calibration = calibrate_scores(scores, expect_defects=args.defects is not None, **options)
    write_calibration(artifact, calibration)
    print("\n".join(summary_lines(calibration)))
    print(f"calibration written to {args.artifact / 'manifest.json'}")


def cmd_quantize(args: argparse.Namespace) -> None:
    with _needs_extra("calibration"):
        from patchline.calibration.quantize import quantize_int8

    out = quantize_int8(args.artifact, args.images, args.val, limit=args.limit, batch_size=args.batch_size,
                        method=args.method, per_channel=not args.per_tensor)
    print(f"INT8 model written to {out}; run it with --precision int8, compare with `patchline eval`")


def cmd_sample_data(args: argparse.Namespace) -> None:
    if args.real:
        from patchline.export.real_photos import DEFAULT_PHOTOS, generate_real

        try:
            root = generate_real(args.out, args.photos.split(",") if args.photos else DEFAULT_PHOTOS, args.train,
                                 args.test_good, args.per_defect, args.size, args.seed)
        except (ModuleNotFoundError, ValueError) as exc:
            raise SystemExit(f"patchline: {exc}") from exc
    else:
        from patchline.export.synthetic import generate

        root = generate(args.out, args.train, args.test_good, args.per_defect, args.size, args.seed)
    print(f"sample data written to {root}")


def cmd_backbones(args: argparse.Namespace) -> None:
    with _needs_extra("export"):
        from patchline.export.catalogue import CATALOGUE, Entry, extractable_layers, parameter_count, resolve

    def row(entry: Entry) -> str:
        if not entry.supported:
            return f"{entry.name:<20} {'unsupported':<12} {entry.note}"
        params = f"{parameter_count(entry) / 1e6:.1f}M"
        return (f"{entry.name:<20} {entry.source:<12} {entry.model:<50} {', '.join(entry.layers):<42} {params:>8}"
                + (f"  ({entry.note})" if entry.note else ""))

    if args.layers and not args.name:
        raise SystemExit("patchline: backbones --layers needs a NAME")
    if args.name and args.layers:
        size = (args.image_size, args.image_size)
        layers = extractable_layers(args.name, size)
        print(f"{args.name} at {size[0]}x{size[1]}: layers (any deeper module path works too)")
        print(f"{'layer':<28} {'channels':>8} {'grid':>9}  output")
        for name, layout in layers.items():
            print(f"{name:<28} {layout.channels:>8} {layout.grid[0]:>4}x{layout.grid[1]:<4}  {layout.kind}")
        return
    entries = [CATALOGUE.get(args.name) or resolve(args.name)] if args.name else CATALOGUE.values()
    print(f"{'name':<20} {'source':<12} {'model':<50} {'default layers':<42} {'params':>8}")
    for entry in entries:
        print(row(entry))


def cmd_import_anomalib(args: argparse.Namespace) -> None:
    with _needs_extra("export"):
        from patchline.export.anomalib_import import import_anomalib
    manifest = import_anomalib(args.checkpoint, args.out, args.opset)
    print(json.dumps({
        "artifact": str(args.out),
        "model_id": manifest.model_id,
        "backbone": manifest.backbone.name,
        "layers": manifest.backbone.layers,
        "bank": list(manifest.memory_bank.shape),
        "calibrated": manifest.calibration is not None,
        "onnx_max_abs_diff": manifest.model.onnx_max_abs_diff,
    }))


def cmd_bench(args: argparse.Namespace) -> None:
    from patchline.runtime.tools.bench import BenchOptions, format_table, run_bench

    options = BenchOptions(
        artifact=args.artifact, images=args.images, frames=args.frames, warmup=args.warmup, threads=args.threads,
        variants=[v for v in args.variants.split(",") if v], model_file=args.model_file, dims=args.dims, bank_size=args.bank_size,
        random_bank=args.random_bank, graph_optimization=args.graph_opt, compare=args.compare,
        baseline_weights=args.baseline_weights, publish=args.publish, accuracy=args.accuracy, out_dir=args.out,
    )
    print(format_table(run_bench(options)))


def cmd_index(args: argparse.Namespace) -> None:
    from patchline.runtime.search.bank_index import add_index, held_out_frames

    held_out = held_out_frames(args.artifact, args.images) if args.images else None
    index = add_index(args.artifact, held_out)
    print(json.dumps({"artifact": str(args.artifact), "projection_dims": index.basis.shape[1],
                      "knn": list(index.knn.shape) if index.knn is not None else None,
                      "search": index.choice.model_dump() if index.choice else None}))


def cmd_self_test(args: argparse.Namespace) -> None:
    from patchline.runtime.self_test import IMAGES, add_self_test

    images = [rgb for _, rgb in iter_images(list_images(args.images)) if not isinstance(rgb, ImageError)]
    if not images:
        raise ValueError(f"{args.images}: no readable images")
    step = max(1, len(images) // IMAGES)
    scores = add_self_test(args.artifact, images[::step][:IMAGES])
    print(json.dumps({"artifact": str(args.artifact), "self_test_scores": scores.round(6).tolist()}))


def cmd_run(args: argparse.Namespace) -> None:
    import signal

    from patchline.runtime.config import load_line_config
    from patchline.runtime.daemon import EXIT_CONFIG, Daemon
    from patchline.runtime.sources.base import SourceConfigError

    # What is refused here is a configuration problem that a restart cannot fix: EX_CONFIG, no restart loop.
    # That includes the GPU: no driver or device, TensorRT that cannot start on this driver, the kernel not
    # compiling, the model not fitting in (device) memory.
    daemon = None
    try:
        daemon = Daemon(load_line_config(args.config, args.set))
        signal.signal(signal.SIGTERM, daemon.request_stop)
        signal.signal(signal.SIGINT, daemon.request_stop)
        signal.signal(signal.SIGHUP, daemon.updates.request_reload)
        daemon.start()
    except (ConfigError, ArtifactError, SourceConfigError, OSError, ValueError, GpuUnavailable, MemoryError) as exc:
        if daemon is not None:
            daemon.shutdown()
        log.error("cannot start: %s", str(exc) or type(exc).__name__)
        sys.exit(EXIT_CONFIG)
    sys.exit(daemon.run())


def _add_config_options(p: argparse.ArgumentParser, run_config_does: str) -> None:
    """--config, --set and --camera of the commands that use a camera's engine (``_settings`` reads them)."""
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config whose tensorrt section is used; a run config (/etc/patchline/<name>.yaml) "
                        + run_config_does)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set tensorrt.precision=fp32 (repeatable)")
    p.add_argument("--camera", help="the camera of a line's run config (cameras:) whose settings to use")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchline", description="PatchCore visual inspection for production lines")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="fit PatchCore on good images and write an artifact")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--images", type=Path, required=True, help="folder of good images or an MVTec category")
    p.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.backbone=resnet18 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--engine", choices=["none", "trt"], default="none",
                   help="trt: also build the TensorRT engine for this machine's GPU (the config's tensorrt section)")
    p.add_argument("--device", default="cuda", help="GPU for --engine trt: cuda or cuda:N")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("engine", help="build or check the TensorRT engine for an artifact on this machine's GPU")
    p.add_argument("--artifact", type=Path, help="artifact folder (default: the run config's)")
    _add_config_options(p, "builds the engine that camera's service loads, in its cache")
    p.add_argument("--device", help="cuda or cuda:N (default: the run config's, else cuda)")
    p.add_argument("--check", action="store_true", help="only check the cached engine; fail if missing or stale")
    p.add_argument("--calibrate", type=Path, metavar="IMAGES",
                   help="INT8: calibrate from these images, write tensorrt.calibration_cache, build the engine")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("bench-gpu", help="GPU benchmark: engine, distance kernel vs cuBLAS, end to end")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--config", type=Path, default=None, help="YAML config whose tensorrt section is used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="batch for the batched measurements")
    p.add_argument("--bank-rows", type=int, default=None,
                   help="also time the kernel on a random bank of this many rows (e.g. a full-size model's)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the results JSON")
    p.set_defaults(func=cmd_bench_gpu)

    p = sub.add_parser("gpu-check", help="verify the GPU paths on this box against the CPU runtime; one JSON report")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="test images (folder, searched recursively)")
    p.add_argument("--max-images", type=int, default=24)
    p.add_argument("--repeats", type=int, default=20, help="repeats of each bench-gpu measurement")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the report and engines")
    p.set_defaults(func=cmd_gpu_check)

    for name, func, help_text in (("score", cmd_score, "score images with an artifact (JSON line per image)"),
                                  ("eval", cmd_eval, "score an MVTec-layout test set and report AUROC")):
        p = sub.add_parser(name, help=help_text)
        # Defaults are applied by _settings: a run config as --config fills what is not given here.
        _add_config_options(p, "also sets the options below that are not given, as that camera runs")
        p.add_argument("--artifact", type=Path, help="artifact folder (default: the run config's)")
        p.add_argument("--device", choices=DEVICES,
                       help="onnxruntime: its provider (tensorrt = ONNX Runtime's TensorRT provider); default auto")
        p.add_argument("--engine", choices=ENGINES.names,
                       help="tensorrt: the cached TensorRT engine, built on first use (a gpu extra); default onnxruntime")
        p.add_argument("--distance", choices=DISTANCES.names,
                       help="where patches meet the memory bank: numpy, or the CUDA kernel; default cpu")
        p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
        p.add_argument("--precision", choices=PRECISIONS,
                       help="run the fp32 model (default) or its INT8 quantisation (patchline quantize)")
        p.set_defaults(func=func)
        if name == "score":
            p.add_argument("images", type=Path, nargs="+", help="image files or folders")
            p.add_argument("--heatmap-dir", type=Path, help="write a heatmap overlay PNG per image here")
            p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                           help="refuse (as an error line) images whose header declares more pixels than this "
                                f"(default {DEFAULT_MAX_PIXELS})")
        else:
            p.add_argument("--data", type=Path, required=True, help="MVTec-AD category folder")
            p.add_argument("--report", type=Path, default=None,
                           help="report folder (default: ARTIFACT-eval beside the artifact)")
            p.add_argument("--no-int8", action="store_true", help="skip the INT8 vs fp32 comparison")

    p = sub.add_parser("calibrate", help="set thresholds from validation images and write them into the manifest")
    p.add_argument("--artifact", type=Path, required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--val", type=Path, help="good validation images: a folder, or an MVTec category (test/good)")
    source.add_argument("--scores", type=Path, help="validation scores saved earlier with --save-scores")
    p.add_argument("--defects", type=Path, help="labelled defects: an MVTec category (test/<defect>, ground_truth) "
                                                "or one subfolder per defect class")
    p.add_argument("--save-scores", type=Path, help="also save the validation scores here (.npz) for re-use")
    p.add_argument("--max-false-reject", metavar="RATE",
                   help="operating point: reject at most this share of good parts, e.g. 0.5%% (default: F1-optimal "
                        "with defects, else the quantile rule)")
    p.add_argument("--quantile", type=float, help="good-only rule: this quantile of good scores … (default 0.995)")
    p.add_argument("--margin", type=float, help="… times this margin (default 1.1)")
    p.add_argument("--min-good", type=int, help="refuse with fewer good validation images (default 10)")
    p.add_argument("--min-defective", type=int, help="refuse with fewer defect images, with --defects (default 5)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="the model the line will run")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("quantize", help="INT8 static quantisation (ONNX Runtime, QDQ) of the artifact's model")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="training images: MVTec category (train/good) or folder")
    p.add_argument("--val", type=Path, help="validation images incl. defects: MVTec category (test/) or folder")
    p.add_argument("--limit", type=int, default=32, help="calibration images at most, spread evenly")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("sample-data", help="generate the synthetic demo data set, or a real-photo one (MVTec layout)")
    p.add_argument("out", type=Path)
    p.add_argument("--real", action="store_true",
                   help="crops of real photographs (scikit-image's bundled ones) instead of the synthetic part")
    p.add_argument("--photos", help="with --real: the photographs, comma separated (default: the 13 listed in "
                                    "export/real_photos.py; brick, gravel and grass are refused)")
    p.add_argument("--train", type=int, default=40)
    p.add_argument("--test-good", type=int, default=10)
    p.add_argument("--per-defect", type=int, default=6)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample_data)

    p = sub.add_parser("backbones", help="list PatchCore's backbone catalogue, one backbone, or its layers")
    p.add_argument("name", nargs="?", help="a catalogue or timm name: show its entry (with --layers: its layers)")
    p.add_argument("--layers", action="store_true", help="list NAME's extractable layers with channels and grid")
    p.add_argument("--image-size", type=int, default=224, help="input size for the layers' grids (default 224)")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("import-anomalib", help="turn an anomalib PatchCore checkpoint into an artifact")
    p.add_argument("checkpoint", type=Path, help="Lightning .ckpt or anomalib's exported torch .pt")
    p.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_import_anomalib)

    p = sub.add_parser("bench", help="per-stage CPU latency vs the arithmetic floor (and vs eager torch)")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--images", type=Path, help="frames: an image folder or MVTec category (default: noise frames)")
    p.add_argument("--frames", type=int, default=30, help="timed frames per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime and torch intra-op threads")
    p.add_argument("--variants", default="exact",
                   help="comma list of exact (the artifact's default search), pruned, projected, plain, approximate; "
                        "NAME:DIMS for other projected dims, "
                        "NAME@MODEL_FILE for another model file")
    p.add_argument("--model-file", help="model file of the artifact for every variant, e.g. model.int8.onnx")
    p.add_argument("--dims", type=int, default=None,
                   help="projected dimensions of the pruned searches (default: the artifact's measured choice)")
    p.add_argument("--bank-size", type=int, help="subsample the bank to this many rows (or size of --random-bank)")
    p.add_argument("--random-bank", action="store_true", help="Gaussian bank rows with the bank's mean/std")
    p.add_argument("--graph-opt", choices=list(GRAPH_OPTIMIZATION), default="all",
                   help="ONNX Runtime graph optimisation level")
    p.add_argument("--compare", action="store_true", help="also run the eager-torch baseline (needs the export extra)")
    p.add_argument("--baseline-weights", help="weights file for the baseline when the manifest's cannot be rebuilt")
    p.add_argument("--publish", metavar="HOST:PORT", help="time a QoS-1 MQTT publish per frame to this broker")
    p.add_argument("--accuracy", type=Path, metavar="DATA", help="MVTec-layout folder: AUROC and score drift per variant")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("self-test", help="store a few good images and their scores in an artifact: what a model "
                       "loaded into a running daemon (hot swap) must score the same before it is used")
    p.add_argument("artifact", type=Path)
    p.add_argument("--images", type=Path, required=True, help="good images (the first few, spread, are kept)")
    p.set_defaults(func=cmd_self_test)

    p = sub.add_parser("index", help="(re)build the bank search index and measure the default search on this machine")
    p.add_argument("artifact", type=Path)
    p.add_argument("--images", type=Path,
                   help="good images the model was not trained on, to measure with (default: held-out bank rows)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("run", help="the edge daemon: inspect a camera's frames and publish verdicts over MQTT")
    p.add_argument("--config", type=Path, required=True, help="run config, e.g. configs/line.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set mqtt.port=1884 (repeatable)")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except (ConfigError, ArtifactError, ImageError, FileNotFoundError, ValueError, GpuUnavailable) as exc:
        log.debug("%s failed", args.command, exc_info=True)  # the traceback, with -v
        raise SystemExit(f"patchline: {exc}") from None


if __name__ == "__main__":
    main()
