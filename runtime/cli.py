"""The ``patchline`` command: one entry point, a subcommand per job.

Build-time subcommands (export, eval, sample-data) import torch/scikit-learn lazily so
the edge install (``pip install patchline``) can still run ``score`` and ``run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from patchline.runtime.artifact import ArtifactError
from patchline.runtime.config import ConfigError
from patchline.runtime.cuda_device import GpuUnavailable
from patchline.runtime.preprocess import IMAGE_SUFFIXES, ImageError, list_images

log = logging.getLogger("patchline")


def _missing_extra(exc: ModuleNotFoundError, extra: str) -> SystemExit:
    return SystemExit(f"patchline: this command needs the '{extra}' extra ({exc.name} is not installed): "
                      f"pip install 'patchline[{extra}]'")


def cmd_export(args: argparse.Namespace) -> None:
    from patchline.runtime.config import load_config

    config = load_config(args.config, args.set)
    try:
        from patchline.export.fit import export_artifact
    except ModuleNotFoundError as exc:
        raise _missing_extra(exc, "export") from exc
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


def _prepare_engine(artifact_dir: Path, settings, device: str) -> dict[str, object]:  # noqa: ANN001 - TensorRtConfig
    """Build (or check) the TensorRT engine for an artifact on this machine's GPU."""
    from patchline.runtime.artifact import load_artifact
    from patchline.runtime.cuda_device import CudaDevice
    from patchline.runtime.trt_build import prepare_engine

    artifact = load_artifact(artifact_dir)
    gpu = CudaDevice(device)  # engines are built on the GPU that will run them
    path, built = prepare_engine(artifact, settings, gpu)
    return {"engine": str(path), "built": built, "precision": settings.precision,
            "batch_profile": list(settings.batch_profile), "gpu": gpu.name}


def cmd_engine(args: argparse.Namespace) -> None:
    from patchline.runtime.config import load_config

    settings = load_config(args.config, args.set).tensorrt
    if args.check:
        settings = settings.model_copy(update={"build": False})
    print(json.dumps(_prepare_engine(args.artifact, settings, args.device)))


def cmd_bench_gpu(args: argparse.Namespace) -> None:
    from patchline.runtime.bench_gpu import run_benchmark, write_results
    from patchline.runtime.config import load_config

    settings = load_config(args.config, args.set).tensorrt
    results = run_benchmark(args.artifact, args.repeats, args.batch, args.bank_rows, settings)
    path = write_results(results, args.out)
    print(json.dumps(results, indent=2))
    print(f"results written to {path}", file=sys.stderr)


def _expand(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        if path.is_dir():
            found.extend(list_images(path))
        elif path.suffix.lower() in IMAGE_SUFFIXES or path.exists():
            found.append(path)
        else:
            raise SystemExit(f"patchline: {path}: no such image or folder")
    return found


def cmd_score(args: argparse.Namespace) -> None:
    from patchline.runtime.inspector import Inspector
    from patchline.runtime.overlay import heatmap_overlay, write_rgb
    from patchline.runtime.preprocess import read_image

    inspector = Inspector(args.artifact, engine=args.engine, distance=args.distance, device=args.device,
                          threads=args.threads)
    inspector.warm_up()
    failures = 0
    for path in _expand(args.images):
        try:
            rgb = read_image(path)
        except ImageError as exc:
            failures += 1
            print(json.dumps({"path": str(path), "error": exc.reason}), flush=True)
            continue
        result = inspector.inspect(rgb)
        line = {
            "path": str(path),
            "score": round(result.score, 6),
            "max_patch_xy": list(result.location),
            "latency_ms": result.timings_ms,
        }
        if args.heatmap_dir:
            out = Path(args.heatmap_dir) / f"{path.stem}_heatmap.png"
            write_rgb(out, heatmap_overlay(rgb, result.anomaly_map))
            line["heatmap"] = str(out)
        print(json.dumps(line), flush=True)
    if failures:
        sys.exit(1)


def cmd_eval(args: argparse.Namespace) -> None:
    try:
        import numpy as np

        from patchline.calibration.evaluate import image_auroc, score_test_set
    except ModuleNotFoundError as exc:
        raise _missing_extra(exc, "calibration") from exc
    from patchline.runtime.inspector import Inspector

    inspector = Inspector(args.artifact, engine=args.engine, distance=args.distance, device=args.device,
                          threads=args.threads)
    scored = score_test_set(inspector, args.data)
    print(f"{'image':<40} {'class':<15} {'score':>9} {'ms':>8}")
    for item in scored:
        name = str(item.path.relative_to(Path(args.data)))
        print(f"{name:<40} {item.defect:<15} {item.inspection.score:9.4f} {item.inspection.timings_ms['total']:8.1f}")
    labels = np.array([s.label for s in scored])
    scores = np.array([s.inspection.score for s in scored])
    print(f"image AUROC: {image_auroc(labels, scores):.4f}  ({labels.sum()} defective, {(labels == 0).sum()} good)")


def cmd_sample_data(args: argparse.Namespace) -> None:
    from patchline.export.synthetic import generate

    root = generate(args.out, args.train, args.test_good, args.per_defect, args.size, args.seed)
    print(f"sample data written to {root}")


def cmd_run(args: argparse.Namespace) -> None:
    import signal

    from patchline.runtime.config import RunConfig, load_config
    from patchline.runtime.daemon import EXIT_CONFIG, Daemon
    from patchline.runtime.mqtt import MqttError
    from patchline.runtime.sources import SourceConfigError

    # What is refused here is a configuration problem that a restart cannot fix: EX_CONFIG, no restart loop.
    daemon = None
    try:
        daemon = Daemon(load_config(args.config, args.set, model=RunConfig))
        signal.signal(signal.SIGTERM, daemon.request_stop)
        signal.signal(signal.SIGINT, daemon.request_stop)
        daemon.start()
    except (ConfigError, ArtifactError, SourceConfigError, MqttError, OSError, ValueError) as exc:
        if daemon is not None:
            daemon.shutdown()
        log.error("cannot start: %s", exc)
        sys.exit(EXIT_CONFIG)
    try:
        code = daemon.run()
    except SourceConfigError as exc:  # e.g. the ROI does not fit the first frame
        log.error("source: %s", exc)
        code = EXIT_CONFIG
    sys.exit(code)


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
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--config", type=Path, default=None, help="YAML config whose tensorrt section is used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set tensorrt.precision=fp32 (repeatable)")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N")
    p.add_argument("--check", action="store_true", help="only check the cached engine; fail if missing or stale")
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

    for name, func, help_text in (("score", cmd_score, "score images with an artifact (JSON line per image)"),
                                  ("eval", cmd_eval, "score an MVTec-layout test set and report AUROC")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--artifact", type=Path, required=True)
        p.add_argument("--device", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                       help="onnxruntime: its provider (tensorrt = ONNX Runtime's TensorRT provider)")
        p.add_argument("--engine", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                       help="tensorrt: the cached TensorRT engine, built on first use (needs the 'gpu' extra)")
        p.add_argument("--distance", choices=["cpu", "cuda", "cuda-fp16"], default="cpu",
                       help="where patches meet the memory bank: numpy, or the CUDA kernel")
        p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
        p.set_defaults(func=func)
        if name == "score":
            p.add_argument("images", type=Path, nargs="+", help="image files or folders")
            p.add_argument("--heatmap-dir", type=Path, help="write a heatmap overlay PNG per image here")
        else:
            p.add_argument("--data", type=Path, required=True, help="MVTec-AD category folder")

    p = sub.add_parser("sample-data", help="generate the synthetic demo data set (MVTec layout)")
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=40)
    p.add_argument("--test-good", type=int, default=10)
    p.add_argument("--per-defect", type=int, default=6)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample_data)

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
        raise SystemExit(f"patchline: {exc}") from None


if __name__ == "__main__":
    main()
