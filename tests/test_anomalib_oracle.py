"""The real anomalib package as the oracle for `patchline import-anomalib`.

A PatchCore is trained with anomalib's own Engine on a small MVTec-layout folder, saved as a Lightning
checkpoint and as anomalib's ExportType.TORCH model, and both files are imported. For every image of a
second folder the artifact must give anomalib's raw score (PatchcoreModel on the pre-processor's
transform), its anomaly map, and its post-processor's OK/NG label and normalised score. (Not the
validation images: anomalib's F1 threshold is one of their scores, and a score equal to the threshold
is OK to anomalib and either side of it to any other float32 rounding.)

The reference is ``model.model(pre_processor.transform(x))``: the transform the memory bank was fitted
with, the one anomalib's Engine applies in fit, validation, test and predict. (Calling the pre-processor
module itself runs its ``export_transform``, which turns antialiasing off: other pixels than the bank's.)
anomalib's float32 distances (|x|² − 2x·y + |y|², then a square root) lose digits on near patches; the
same model in float64 shows how much of the difference is that rounding, and patchline must be far closer
to it. The backbone has seeded random weights (nothing can be downloaded here); nothing reaches the network.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the export extra: not in the runtime-only venv
from anomalib.data import InferenceBatch, MVTecAD
from anomalib.data.utils import read_image as read_image_tensor
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.models import Patchcore
from lightning.pytorch import seed_everything

from patchline.export.anomalib_import import read_anomalib
from patchline.export.synthetic import generate
from patchline.runtime.artifact import load_artifact
from patchline.runtime.cli import main
from patchline.runtime.decision import decide
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import read_image

# Patchcore.configure_pre_processor arguments; None = the model's own default (pre_processor=True).
VARIANTS = {
    "default": None,  # Resize((256, 256), antialias=True) + Normalize, no crop
    "image_size": dict(image_size=(160, 192)),
    "center_crop": dict(image_size=(192, 192), center_crop_size=(150, 170)),  # odd margins, a non-integer patch grid
}
RTOL = 1e-4  # the bound, against anomalib's float32 forward
RTOL_FLOAT64 = 1e-5  # against the same model in float64 (patchline measures ~5e-7)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 288 px: every variant downsizes, so the antialiased resize is exercised, not skipped.
    root = tmp_path_factory.mktemp("mvtec")
    generate(root / "part", train=3, test_good=2, per_defect=1, size=288, seed=5)  # anomalib's train and validation
    generate(root / "check", train=0, test_good=3, per_defect=1, size=288, seed=6)  # the images compared
    return root


def _train(root: Path, work: Path, variant: str) -> tuple[Patchcore, Engine]:
    seed_everything(0, verbose=False)  # the random backbone and the coreset's random projection
    arguments = VARIANTS[variant]
    pre_processor = True if arguments is None else Patchcore.configure_pre_processor(**arguments)
    model = Patchcore(backbone="resnet18", pre_trained=False, coreset_sampling_ratio=0.05,
                      pre_processor=pre_processor, evaluator=False, visualizer=False)
    # The validation split is the test split: the post-processor's threshold and min-max come from it.
    datamodule = MVTecAD(root=root, category="part", train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = Engine(default_root_dir=work / "results", accelerator="cpu", enable_progress_bar=False,
                    enable_model_summary=False)
    engine.fit(model=model, datamodule=datamodule)
    return model.eval(), engine


def _anomalib_predictions(model: Patchcore, paths: list[Path]):
    """For the images (read by anomalib's reader): the float32 and float64 forwards (raw scores and anomaly
    maps), and the post-processed float32 forward (normalised scores and labels)."""
    batch = model.pre_processor.transform(torch.stack([read_image_tensor(path, as_tensor=True) for path in paths]))
    with torch.no_grad():
        raw = model.model(batch)
        raw64 = copy.deepcopy(model.model).double()(batch.double())
        post = model.post_processor(raw)
    return raw, raw64, post


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_anomalib_model_scores_as_anomalib(variant, parts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # timm and huggingface_hub stay offline (pre_trained=False anyway)
    model, engine = _train(parts, tmp_path, variant)
    checkpoint = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    exported = engine.export(model=model, export_type=ExportType.TORCH, export_root=tmp_path / "export")
    paths = sorted((parts / "check" / "test").glob("*/*.png"))
    raw, raw64, post = _anomalib_predictions(model, paths)
    assert len(paths) == 6 and bool(post.pred_label.any()) and not bool(post.pred_label.all())  # both labels occur
    own_rounding = _differences(raw.pred_score.numpy(), raw.anomaly_map[:, 0].numpy(), raw64)

    steps = model.pre_processor.transform.transforms
    (height, width), crop = steps[0].size, (steps[1].size if variant == "center_crop" else None)
    for name, source in (("ckpt", checkpoint), ("pt", exported)):
        out = tmp_path / f"artifact-{name}"
        main(["import-anomalib", str(source), "--out", str(out)])
        calibration = load_artifact(out).manifest.calibration
        inspector = Inspector(out, device="cpu")
        results = [inspector.inspect(read_image(path)) for path in paths]
        got, maps = np.array([result.score for result in results]), np.stack([result.anomaly_map for result in results])
        assert maps.shape[1:] == (height, width)
        if crop:  # anomalib's map covers the crop, placed as torchvision's CenterCrop places it; the margin is 0
            top, left = int(round((height - crop[0]) / 2)), int(round((width - crop[1]) / 2))
            inside = np.zeros(maps.shape[1:], bool)
            inside[top : top + crop[0], left : left + crop[1]] = True
            assert not maps[:, ~inside].any()
            maps = maps[:, top : top + crop[0], left : left + crop[1]]
        score_diff, map_diff = _differences(got, maps, raw)
        score_diff64, map_diff64 = _differences(got, maps, raw64)
        decisions = [decide(score, calibration) for score in got]
        flips = sum((d.verdict == "NG") != bool(label) for d, label in zip(decisions, post.pred_label))
        # The normalisation itself, on the same scores: anomalib's post-processor on patchline's.
        normalised = model.post_processor(InferenceBatch(pred_score=torch.from_numpy(got))).pred_score
        norm_diff = max(abs(d.normalised - float(n)) for d, n in zip(decisions, normalised))
        # The parity figures, for the record: `pytest tests/test_anomalib_oracle.py -s | grep oracle`.
        print(f"[anomalib oracle] {variant} .{name}: max relative difference from anomalib: score {score_diff:.1e}, "
              f"map {map_diff:.1e}; from anomalib in float64: {score_diff64:.1e}, {map_diff64:.1e} (anomalib's own "
              f"float32 vs float64: {own_rounding[0]:.1e}, {own_rounding[1]:.1e}); normalisation {norm_diff:.1e}; "
              f"label flips {flips}/{len(paths)}")
        assert score_diff <= RTOL and map_diff <= RTOL
        assert score_diff64 <= RTOL_FLOAT64 and map_diff64 <= RTOL_FLOAT64
        assert flips == 0 and norm_diff <= 1e-6

    if variant == "default":
        _check_sensitivity(model, engine, tmp_path / "sensitive.ckpt", got, raw.pred_score)


def _differences(scores: np.ndarray, maps: np.ndarray, reference) -> tuple[float, float]:
    """Largest relative score difference, and largest map difference relative to that map's maximum."""
    want_maps = reference.anomaly_map[:, 0].double().numpy()
    score = np.abs(scores / reference.pred_score.double().numpy() - 1).max()
    amap = (np.abs(maps - want_maps).max(axis=(1, 2)) / np.abs(want_maps).max(axis=(1, 2))).max()
    return float(score), float(amap)


def _check_sensitivity(model: Patchcore, engine: Engine, checkpoint: Path, got: np.ndarray, scores: torch.Tensor):
    """anomalib labels NG above normalised 1 − sensitivity. With the line in each gap between the images'
    scores in turn, the threshold imported from the checkpoint must give anomalib's labels."""
    post = model.post_processor
    threshold, span = float(post.image_threshold), float(post.image_max - post.image_min)
    ordered = np.sort(scores.numpy())
    sensitivities = [0.5 - ((low + high) / 2 - threshold) / span for low, high in zip(ordered, ordered[1:])]
    sensitivities = [float(value) for value in sensitivities if 0 < value < 1]
    assert len(sensitivities) >= 2
    for sensitivity in sensitivities:
        post.image_sensitivity = sensitivity
        engine.trainer.save_checkpoint(checkpoint)
        labels = post(InferenceBatch(pred_score=scores)).pred_label.tolist()
        calibration = read_anomalib(checkpoint).calibration
        assert calibration.details["image_sensitivity"] == pytest.approx(sensitivity)
        assert [decide(score, calibration).verdict == "NG" for score in got] == labels
