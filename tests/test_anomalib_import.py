"""import-anomalib on hand-written files: the layouts and settings the anomalib oracle test does not train
(earlier anomalib 2.x checkpoints, disabled or unusual pre-/post-processors, files that are not models).
Scores are proven against the real anomalib in test_anomalib_oracle.py."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the export extra: not in the runtime-only venv
import torchvision.transforms.v2 as T
from anomalib.data.transforms import ExportableCenterCrop, SquarePad
from anomalib.models import Patchcore
from anomalib.pre_processing import PreProcessor

from patchline.export.anomalib_import import AnomalibImportError, read_anomalib
from patchline.runtime.preprocess import Preprocessor, antialias_resize

IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
POST_STATE = {"post_processor._image_threshold": 2.0, "post_processor.image_min": 1.0, "post_processor.image_max": 5.0}


def _checkpoint(path: Path, hyper_parameters: dict | None = None, **top) -> Path:
    """A Lightning checkpoint with a (tiny) fitted bank, the post-processor's statistics and ``top``'s keys."""
    state = OrderedDict({"model.memory_bank": torch.ones(4, 128), **{k: torch.tensor(v) for k, v in POST_STATE.items()}})
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": "resnet18", "layers": ("layer2",),
                                                          **(hyper_parameters or {})}, **top}, path)
    return path


def _v27(path: Path, pre_processor: PreProcessor, **post) -> Path:
    """anomalib 2.7's layout: the processors' configuration as plain data (AnomalibModule.on_save_checkpoint)."""
    return _checkpoint(path, anomalib_components_enabled={"pre_processor": True, "post_processor": True},
                       anomalib_pre_processor_config=pre_processor.checkpoint_config(),
                       anomalib_post_processor_config={"enable_normalization": True, "image_sensitivity": 0.5, **post})


def test_anomalib_27_checkpoint_layout(tmp_path):
    crop = Patchcore.configure_pre_processor(image_size=(300, 280), center_crop_size=(256, 240))
    model = read_anomalib(_v27(tmp_path / "crop.ckpt", crop, image_sensitivity=0.75))
    assert model.layers == ["layer2"] and model.num_neighbors == 9
    assert model.preprocess == dict(image_size=(300, 280), resize="antialias", center_crop=(256, 240),
                                    mean=tuple(IMAGENET["mean"]), std=tuple(IMAGENET["std"]))
    # NG above normalised 1 − 0.75: raw 2 + (0.5 − 0.75)·(5 − 1) = 1; normalisation spans min..max
    assert (model.calibration.image_threshold, model.calibration.span) == (1.0, 4.0)
    assert model.calibration.details["anomalib_image_threshold"] == 2.0
    # anomalib's ONNX-friendly crop crops at torchvision's offsets; bilinear without antialiasing
    plain = PreProcessor(T.Compose([T.Resize((64, 64), antialias=False), ExportableCenterCrop(32), T.Normalize(**IMAGENET)]))
    model = read_anomalib(_v27(tmp_path / "plain.ckpt", plain))
    assert (model.preprocess["resize"], model.preprocess["center_crop"]) == ("bilinear", (32, 32))


@pytest.mark.parametrize(("pre_processor", "message"), [
    (PreProcessor(T.Compose([T.Resize(256), T.Normalize(**IMAGENET)])), r"Resize size \[256\] keeps the aspect ratio"),
    (PreProcessor(T.Compose([SquarePad(), T.Resize((256, 256))])), "step anomalib.data.transforms.SquarePad has no patchline equivalent"),
    (PreProcessor(T.Compose([T.CenterCrop(200), T.Resize((256, 256))])), "crops before it resizes"),
    (PreProcessor(T.Compose([T.Resize((512, 512)), T.Resize((256, 256))])), "more than one Resize"),
    (PreProcessor(T.Resize((256, 256), interpolation=T.InterpolationMode.NEAREST)), "Resize with nearest interpolation"),
    (PreProcessor(T.Normalize(**IMAGENET)), "does not resize"),
    (PreProcessor(T.RandomHorizontalFlip()), "transform is not recorded"),  # anomalib cannot serialise it
    (PreProcessor(None), "transform is not recorded"),
])
def test_pre_processing_patchline_cannot_reproduce_is_refused(tmp_path, pre_processor, message):
    with pytest.raises(AnomalibImportError, match=f"model.ckpt: .*{message}"):
        read_anomalib(_v27(tmp_path / "model.ckpt", pre_processor))


def test_earlier_anomalib_checkpoints(tmp_path, monkeypatch):
    """Before 2.7 the processors were pickled into hyper_parameters: read without anomalib, and
    ``pre_processor=True`` (the writing release's default, which changed) refused rather than guessed."""
    pickled = Patchcore.configure_pre_processor(image_size=(224, 224))
    _checkpoint(tmp_path / "pickled.ckpt", {"pre_processor": pickled, "post_processor": True})
    _checkpoint(tmp_path / "default.ckpt", {"pre_processor": True, "post_processor": True})
    for name in [n for n in sys.modules if n == "anomalib" or n.startswith("anomalib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing anything of anomalib now fails
    model = read_anomalib(tmp_path / "pickled.ckpt")
    assert model.preprocess["image_size"] == (224, 224) and model.preprocess["center_crop"] is None
    assert model.calibration.image_threshold == 2.0
    with pytest.raises(AnomalibImportError, match=r"default.ckpt: the checkpoint does not record its pre-processing .*ExportType.TORCH"):
        read_anomalib(tmp_path / "default.ckpt")


def test_disabled_processors(tmp_path, caplog):
    enabled = {"pre_processor": True, "post_processor": False}
    model = read_anomalib(_checkpoint(tmp_path / "nopost.ckpt", anomalib_components_enabled=enabled,
                                      anomalib_pre_processor_config=Patchcore.configure_pre_processor().checkpoint_config()))
    assert model.calibration is None and "no post-processor: run `patchline calibrate`" in caplog.text
    with pytest.raises(AnomalibImportError, match="nopre.ckpt: the model has no pre-processor"):
        read_anomalib(_checkpoint(tmp_path / "nopre.ckpt", anomalib_components_enabled={"pre_processor": False}))


@pytest.mark.parametrize("sensitivity", [0.0, 1.5, "0.5"])
def test_sensitivity_without_a_threshold_equivalent_is_refused(tmp_path, sensitivity):
    with pytest.raises(AnomalibImportError, match=f"image_sensitivity {sensitivity!r}: .* in \\(0, 1\\]"):
        read_anomalib(_v27(tmp_path / "model.ckpt", Patchcore.configure_pre_processor(), image_sensitivity=sensitivity))


def test_unusable_files_say_why(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(AnomalibImportError, match="junk.ckpt: not a torch checkpoint"):
        read_anomalib(tmp_path / "junk.ckpt")
    torch.save({"state_dict": OrderedDict(), "hyper_parameters": {"backbone": "resnet18", "layers": ["layer2"]}}, tmp_path / "empty.ckpt")
    with pytest.raises(AnomalibImportError, match="no fitted memory bank at model.memory_bank"):
        read_anomalib(tmp_path / "empty.ckpt")


@pytest.mark.parametrize("shape", [(300, 457), (100, 80), (256, 300), (255, 256), (512, 512)])
def test_antialias_resize_is_torchs(shape):
    """Down by non-integer factors, up, one axis only, non-square: as torch's antialiased bilinear."""
    image = np.random.default_rng(shape[1]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    size = (224, 224) if shape == (512, 512) else (256, 256)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size, mode="bilinear", antialias=True, align_corners=False
    )[0].permute(1, 2, 0)
    got = antialias_resize(image, size)
    assert got.dtype == np.float32 and got.shape == (*size, 3)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)
    pre = Preprocessor(size, "antialias", (0.0,) * 3, (1.0 / 255,) * 3)  # normalisation off: pixel values
    np.testing.assert_allclose(pre([image])[0], want.permute(2, 0, 1).numpy(), rtol=0, atol=1e-4)


def test_center_crop_is_torchvisions():
    image = np.random.default_rng(0).integers(0, 256, (255, 301, 3), dtype=np.uint8)
    pre = Preprocessor((255, 301), "area", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), center_crop=(224, 200))
    want = T.functional.center_crop(torch.from_numpy(image).permute(2, 0, 1), [224, 200]).float() / 255
    torch.testing.assert_close(torch.from_numpy(pre([image])[0]), want)  # odd margins round as torchvision's
    with pytest.raises(ValueError, match=r"centre crop \(300, 200\) does not fit"):
        Preprocessor((255, 301), "area", (0.0,) * 3, (1.0,) * 3, center_crop=(300, 200))
