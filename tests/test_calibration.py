"""End to end on the synthetic set: calibrate → quantise → eval, through the CLI, with the real runtime."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("sklearn")  # the calibration extra: not in the runtime-only venv
from sklearn.metrics import roc_auc_score

from patchline.calibration.dataset import defect_samples, good_samples
from patchline.calibration.metrics import au_pro
from patchline.calibration.thresholds import f1_threshold
from patchline.export.synthetic import generate
from patchline.runtime.artifact import (
    INT8_KEY,
    ArtifactError,
    load_artifact,
    read_manifest,
    sha256_file,
    write_manifest,
)
from patchline.runtime.cli import main
from patchline.runtime.decision import decide
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import list_images, read_image

# INT8 tolerance on the small test model: |int8 − fp32| per image at most 5 % of the fp32 score
# (measured here: at most 2.2 %, mean 0.8 %; the demo model's figures are in the README).
INT8_REL_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> Path:
    """A held-out validation set: other seed than sample_data, 10 good and 6 defect images with masks."""
    return generate(tmp_path_factory.mktemp("val"), train=0, test_good=10, per_defect=2, size=128, seed=2)


@pytest.fixture(scope="module")
def calibrated(small_artifact, val_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calibrated") / "artifact"
    shutil.copytree(small_artifact, folder)
    main(["calibrate", "--artifact", str(folder), "--val", str(val_data), "--defects", str(val_data),
          "--save-scores", str(folder.parent / "val_scores.npz"), "--device", "cpu"])
    return folder


@pytest.fixture(scope="module")
def quantized(calibrated, sample_data, val_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quantized") / "artifact"
    shutil.copytree(calibrated, folder)
    main(["quantize", "--artifact", str(folder), "--images", str(sample_data), "--val", str(val_data)])
    return folder


def independent_scores(artifact: Path, paths: list[Path], precision: str = "fp32") -> np.ndarray:
    inspector = Inspector(artifact, device="cpu", precision=precision)
    return np.array([inspector.inspect(read_image(p)).score for p in paths])


def test_calibrate_writes_thresholds_into_a_rechecksummed_manifest(calibrated, small_artifact, val_data):
    artifact = load_artifact(calibrated)  # validates every checksum
    calibration = artifact.manifest.calibration
    assert calibration is not None and calibration.details["chosen"] == "f1"
    for name, digest in artifact.manifest.sha256.items():
        assert sha256_file(calibrated / name) == digest
    assert artifact.manifest.sha256 == read_manifest(small_artifact).sha256  # model and bank untouched

    samples = good_samples(val_data) + defect_samples(val_data)
    assert len(samples) == 16
    scores = independent_scores(calibrated, [s.path for s in samples])
    labels = np.array([s.label for s in samples])
    assert calibration.image_threshold == pytest.approx(f1_threshold(labels, scores))
    assert (calibration.score_min, calibration.score_max) == pytest.approx((scores.min(), scores.max()))
    assert calibration.pixel_threshold is not None and calibration.details["pixel"]["images"] == 16
    assert calibration.details["validation"]["per_class"] == {"good": 10, "scratch": 2, "spot": 2, "missing_print": 2}


def test_calibrate_from_saved_scores_and_refuse_another_artifacts(calibrated, tmp_path, capsys):
    copy = tmp_path / "same"
    shutil.copytree(calibrated, copy)
    main(["calibrate", "--artifact", str(copy), "--scores", str(calibrated.parent / "val_scores.npz"),
          "--max-false-reject", "10%"])
    out = capsys.readouterr().out
    assert "max_false_reject" in out and "← used" in out
    again = read_manifest(copy).calibration
    assert again.details["chosen"] == "max_false_reject"
    assert again.details["points"]["f1"]["threshold"] == read_manifest(calibrated).calibration.image_threshold

    other = tmp_path / "other"
    shutil.copytree(calibrated, other)
    manifest = read_manifest(other)
    np.save(other / manifest.memory_bank.file, np.load(other / manifest.memory_bank.file) * 1.01)
    write_manifest(other, manifest)
    with pytest.raises(SystemExit, match="scores were produced by model .* not by .*other"):
        main(["calibrate", "--artifact", str(other), "--scores", str(calibrated.parent / "val_scores.npz")])


def test_calibrate_refuses_small_and_one_class_sets(calibrated, val_data, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for path in list_images(val_data / "test" / "good")[:3]:
        shutil.copy(path, few / path.name)
    with pytest.raises(SystemExit, match="validation set too small: 3 good images, at least 10"):
        main(["calibrate", "--artifact", str(calibrated), "--val", str(few)])
    empty = tmp_path / "no_defects" / "scratch"
    empty.mkdir(parents=True)
    with pytest.raises(SystemExit, match="all one class: the defect folder holds no defect images"):
        main(["calibrate", "--artifact", str(calibrated), "--val", str(val_data), "--defects", str(empty.parent)])
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    with pytest.raises(SystemExit, match="not a patchline scores file"):
        main(["calibrate", "--artifact", str(calibrated), "--scores", str(tmp_path / "junk.npz")])
    assert read_manifest(calibrated).calibration.details["chosen"] == "f1"  # refusals wrote nothing


def test_quantize_records_a_checksummed_int8_model_close_to_fp32(quantized, sample_data, small_artifact):
    manifest = load_artifact(quantized).manifest
    assert manifest.extra_files[INT8_KEY] == "model.int8.onnx"
    assert manifest.sha256["model.int8.onnx"] == sha256_file(quantized / "model.int8.onnx")
    info = json.loads((quantized / "quantization.json").read_text())
    assert info["calibration_images"] == 32 and info["source_sha256"] == manifest.sha256["model.onnx"]
    # 32: the default --limit, below the 20 train + validation images on offer.
    assert manifest.calibration is not None  # quantising keeps the calibration

    paths = list_images(sample_data / "test")
    fp32 = independent_scores(quantized, paths)
    int8 = independent_scores(quantized, paths, "int8")
    assert np.all(np.abs(int8 - fp32) <= INT8_REL_TOLERANCE * fp32), np.abs(int8 - fp32) / fp32

    tampered = quantized.parent / "tampered"
    shutil.copytree(quantized, tampered)
    with open(tampered / "model.int8.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="model.int8.onnx: checksum mismatch"):
        load_artifact(tampered)
    with pytest.raises(ArtifactError, match="no INT8 model"):
        Inspector(small_artifact, precision="int8")


def test_eval_report_holds_the_numbers_recomputed_here(quantized, sample_data, tmp_path, capsys):
    report_dir = tmp_path / "report"
    main(["eval", "--artifact", str(quantized), "--data", str(sample_data), "--report", str(report_dir),
          "--device", "cpu"])
    out = capsys.readouterr().out
    for name in ("report.json", "histogram.png", "roc.png", "worst_cases.png", "index.html"):
        assert (report_dir / name).is_file(), name
    for png in ("histogram.png", "roc.png", "worst_cases.png"):
        assert cv2.imread(str(report_dir / png)) is not None
        assert f'src="{png}"' in (report_dir / "index.html").read_text()
    report = json.loads((report_dir / "report.json").read_text())

    paths = list_images(sample_data / "test")
    assert [Path(i["path"]) for i in report["images"]] == paths
    labels = np.array([p.parent.name != "good" for p in paths])
    scores = independent_scores(quantized, paths)
    np.testing.assert_allclose([i["score"] for i in report["images"]], scores, rtol=1e-5)
    overall = report["overall"]
    assert overall["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))

    calibration = load_artifact(quantized).manifest.calibration
    verdicts = [decide(s, calibration).verdict for s in scores]
    assert [i["verdict"] for i in report["images"]] == verdicts
    caught = sum(v == "NG" and bad for v, bad in zip(verdicts, labels))
    false_rejects = sum(v == "NG" and not bad for v, bad in zip(verdicts, labels))
    assert overall["confusion"]["true_ng"] == caught and overall["confusion"]["false_ng"] == false_rejects
    assert overall["f1"] == pytest.approx(2 * caught / (2 * caught + false_rejects + labels.sum() - caught))
    for path, verdict in zip(paths, verdicts):  # the printed table carries every verdict
        assert any(str(path.relative_to(sample_data)) in line and f" {verdict} " in line for line in out.splitlines())

    # pixel metrics from the runtime's anomaly maps and the masks, read here independently
    inspector = Inspector(quantized, device="cpu")
    maps, masks = [], []
    for path in paths:
        maps.append(inspector.inspect(read_image(path)).anomaly_map)
        mask_file = sample_data / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE) if mask_file.exists() else np.zeros((128, 128), np.uint8)
        masks.append(cv2.resize(mask, maps[-1].shape[::-1], interpolation=cv2.INTER_NEAREST) > 0)
    maps, masks = np.stack(maps), np.stack(masks)
    assert overall["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
    assert overall["pro"] == pytest.approx(au_pro(maps, masks), abs=1e-6)
    spot = np.array([p.parent.name in ("good", "spot") for p in paths])
    assert report["per_defect"]["spot"]["image_auroc"] == pytest.approx(roc_auc_score(labels[spot], scores[spot]))

    q = report["int8"]
    int8 = independent_scores(quantized, paths, "int8")
    np.testing.assert_allclose(q["int8_scores"], int8, rtol=1e-5)
    assert q["image_auroc"]["int8"] == pytest.approx(roc_auc_score(labels, int8))
    assert q["score_drift"]["max_abs"] == pytest.approx(np.abs(int8 - scores).max(), rel=1e-4)
    assert q["latency_ms"]["fp32"]["n"] == q["latency_ms"]["int8"]["n"] == len(paths)
    assert q["latency_ms"]["int8"]["median"] > 0
