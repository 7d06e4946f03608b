"""The calibration batches shared by the ONNX Runtime quantiser and the TensorRT calibrator."""

import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")  # the calibration extra: not in the runtime-only venv

from patchline.calibration.quantize import CalibrationBatches, calibration_images, ort_reader
from patchline.runtime.artifact import load_artifact
from patchline.runtime.config import TensorRtConfig
from patchline.runtime.preprocess import list_images, read_image


def test_calibration_images_take_train_good_and_validation_test_spread_evenly(sample_data, tmp_path):
    train = list_images(sample_data / "train" / "good")
    test = list_images(sample_data / "test")
    assert calibration_images(sample_data) == train  # a category alone: its train/good, never its test set
    both = calibration_images(sample_data, sample_data)
    assert both == train + test
    picked = calibration_images(sample_data, sample_data, limit=5)
    assert len(picked) == 5 and picked[0] == both[0] and picked[-1] == both[-1]
    with pytest.raises(ValueError, match="no images to calibrate"):
        calibration_images(tmp_path)


def test_batches_are_the_runtime_preprocessing_and_skip_bad_images(small_artifact, sample_data, tmp_path):
    for path in list_images(sample_data / "train" / "good"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "zz_broken.png").write_bytes(b"\x89PNG not really")
    preprocess = load_artifact(small_artifact).manifest.preprocess.preprocessor()
    batches = CalibrationBatches(preprocess, list_images(tmp_path), batch_size=3)

    got = list(batches)
    readable = len(list_images(sample_data / "train" / "good"))
    full, rest = divmod(readable, 3)
    assert rest and [len(b) for b in got] == [3] * full + [rest]  # the short last batch is kept
    assert len(batches.skipped) == 1 and "zz_broken.png" in batches.skipped[0]
    expected = preprocess([read_image(p) for p in list_images(sample_data / "train" / "good")])
    np.testing.assert_array_equal(np.concatenate(got), expected)
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in got)
    again = list(batches)  # iterable again, for calibrators that pass over the data twice
    np.testing.assert_array_equal(np.concatenate(again), expected)
    assert len(batches.skipped) == 1


def test_ort_reader_feeds_batches_by_input_name_and_rewinds(small_artifact, sample_data):
    manifest = load_artifact(small_artifact).manifest
    batches = CalibrationBatches(manifest.preprocess.preprocessor(), list_images(sample_data / "train" / "good"), 4)
    reader = ort_reader(batches, manifest.preprocess.input_name)
    count = -(-len(list_images(sample_data / "train" / "good")) // 4)
    first = [reader.get_next() for _ in range(count + 1)]
    assert first[-1] is None and all(set(f) == {manifest.preprocess.input_name} for f in first[:-1])
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()[manifest.preprocess.input_name], first[0][manifest.preprocess.input_name])


def test_tensorrt_calibration_builds_an_int8_engine_and_writes_its_cache(small_artifact, sample_data, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU boxes only: pip install 'patchline[gpu]')")
    from patchline.runtime.search.cuda_device import gpu_unavailable_reason

    if reason := gpu_unavailable_reason():
        pytest.skip(f"no GPU here: {reason}")
    from patchline.calibration.tensorrt_calibrator import calibrate_engine
    from patchline.runtime.engines import EngineSettings
    from patchline.runtime.engines.tensorrt import TensorRtEngine

    cache = tmp_path / "int8.calib"
    settings = TensorRtConfig(precision="int8", batch_profile=(1, 2, 4), cache_dir=str(tmp_path / "engines"),
                              calibration_cache=str(cache))
    path, built = calibrate_engine(small_artifact, sample_data, settings, limit=8)
    assert built and path.is_file() and cache.stat().st_size > 0
    engine = TensorRtEngine(load_artifact(small_artifact), EngineSettings(tensorrt=settings, warm_up=False))
    assert engine.engine_file == path and not engine.built  # the engine key found the calibrated engine


def test_tensorrt_calibration_needs_int8_and_a_cache_file(small_artifact, sample_data):
    from patchline.calibration.tensorrt_calibrator import calibrate_engine

    for settings in (TensorRtConfig(precision="fp16"), TensorRtConfig(precision="int8")):
        with pytest.raises(ValueError, match="tensorrt.precision: int8 with tensorrt.calibration_cache set"):
            calibrate_engine(small_artifact, sample_data, settings)
