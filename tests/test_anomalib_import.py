"""import-anomalib on files this test writes in anomalib 2.x's layout (anomalib is not installed):
the imported artifact must score as plain-torch PatchCore does with the same weights and bank."""

from __future__ import annotations

import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the export extra: not in the runtime-only venv
import timm
import torchvision.transforms.v2 as T
from PIL import Image

from patchline.export.anomalib_import import AnomalibImportError, import_anomalib, read_anomalib
from patchline.export.backbone import feature_layers
from patchline.export.synthetic import generate
from patchline.runtime.artifact import load_artifact
from patchline.runtime.cli import main
from patchline.runtime.decision import decide
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import Preprocessor, antialias_resize, list_images, read_image
from tests import plain_patchcore

IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def _anomalib_classes(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Modules named as anomalib's, so that pickling records anomalib's class paths (registered only
    while the test writes files: reading must not need them)."""

    def define(module: str, name: str, init) -> type:
        cls = type(name, (torch.nn.Module,), {"__init__": init, "__module__": module, "__qualname__": name})
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):  # pickle imports the package chain
            package = ".".join(parts[:depth])
            if package not in sys.modules:
                monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
        setattr(sys.modules[module], name, cls)
        return cls

    def extractor_init(self, backbone, layers, timm_model):
        torch.nn.Module.__init__(self)
        self.backbone, self.layers, self.feature_extractor = backbone, list(layers), timm_model

    def model_init(self, extractor, bank, num_neighbors):
        torch.nn.Module.__init__(self)
        self.backbone, self.layers, self.num_neighbors = extractor.backbone, extractor.layers, num_neighbors
        self.feature_extractor = extractor
        self.feature_pooler = torch.nn.AvgPool2d(3, 1, 1)
        self.register_buffer("memory_bank", bank)

    def pre_init(self, transform):
        torch.nn.Module.__init__(self)
        self.transform = transform

    def post_init(self, buffers, image_sensitivity=0.5):
        torch.nn.Module.__init__(self)
        self.enable_thresholding = self.enable_normalization = self.enable_threshold_matching = True
        self.image_sensitivity = self.pixel_sensitivity = image_sensitivity
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(float(value)))

    def lightning_init(self, model, pre_processor, post_processor):
        torch.nn.Module.__init__(self)
        self.model, self.pre_processor, self.post_processor = model, pre_processor, post_processor
        self.coreset_sampling_ratio = 0.1
        self.register_buffer("_is_fitted", torch.tensor(True))  # MemoryBankMixin

    base = "anomalib.models"
    return types.SimpleNamespace(
        TimmFeatureExtractor=define(f"{base}.components.feature_extractors.timm", "TimmFeatureExtractor", extractor_init),
        PatchcoreModel=define(f"{base}.image.patchcore.torch_model", "PatchcoreModel", model_init),
        Patchcore=define(f"{base}.image.patchcore.lightning_model", "Patchcore", lightning_init),
        PreProcessor=define("anomalib.pre_processing.pre_processor", "PreProcessor", pre_init),
        PostProcessor=define("anomalib.post_processing.post_processor", "PostProcessor", post_init),
    )


def _anomalib_forward(timm_model, transform, paths, bank, num_neighbors):
    """anomalib's pipeline in plain torch: PIL → float tensor → transforms → PatchcoreModel."""
    images = torch.stack([T.functional.to_dtype(T.functional.to_image(Image.open(p).convert("RGB")), torch.float32, scale=True) for p in paths])
    batch = transform(images)
    with torch.no_grad():
        embedding = plain_patchcore.anomalib_embedding(timm_model(batch)).permute(0, 2, 3, 1)
        if bank is None:
            return embedding
        scores, patch_scores = plain_patchcore.score(embedding, bank, num_neighbors)
        return scores, plain_patchcore.anomaly_map(patch_scores, tuple(batch.shape[-2:]))


def _trained(tmp_path: Path, classes, layers, transform, data: Path, sensitivity=0.5):
    """An anomalib Patchcore module tree 'trained' on the good images, thresholds set from the test images."""
    torch.manual_seed(7)
    indices = [feature_layers("resnet18").index(layer) for layer in layers]  # TimmFeatureExtractor._map_layer_to_idx
    timm_model = timm.create_model("resnet18", pretrained=False, features_only=True, exportable=True, out_indices=indices)
    timm_model.eval()
    embedding = _anomalib_forward(timm_model, transform, list_images(data / "train" / "good"), None, 9)
    rows = embedding.reshape(-1, embedding.shape[-1])
    bank = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[: len(rows) // 4]].contiguous()
    scores, maps = _anomalib_forward(timm_model, transform, list_images(data / "test"), bank, 9)
    post = dict(
        _image_threshold=float(scores.median()), _pixel_threshold=float(maps.median()),
        image_min=float(scores.min()), image_max=float(scores.max()),
        pixel_min=float(maps.min()), pixel_max=float(maps.max()),
    )
    extractor = classes.TimmFeatureExtractor("resnet18", layers, timm_model)
    model = classes.PatchcoreModel(extractor, bank, 9)
    return classes.Patchcore(model, classes.PreProcessor(transform), classes.PostProcessor(post, sensitivity)), timm_model


@pytest.fixture(scope="module")
def data_256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # anomalib's default resize is to 256×256: images of that size are resized identically by both sides.
    return generate(tmp_path_factory.mktemp("data256"), train=3, test_good=2, per_defect=1, size=256, seed=2)


@pytest.fixture(scope="module")
def data_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Larger than the resize size: scores match only if patchline resizes as torchvision does.
    return generate(tmp_path_factory.mktemp("data300"), train=3, test_good=2, per_defect=1, size=300, seed=3)


def test_lightning_checkpoint_with_default_preprocessing_scores_as_anomalib(tmp_path, monkeypatch, data_256):
    classes = _anomalib_classes(monkeypatch)
    default = T.Compose([T.Resize((256, 256), antialias=True), T.CenterCrop((224, 224)), T.Normalize(**IMAGENET)])
    lightning, timm_model = _trained(tmp_path, classes, ["layer2", "layer3"], default, data_256)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({
        "epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.5.0",
        "state_dict": lightning.state_dict(),
        # Patchcore's save_hyperparameters(); True = the default pre-/post-processor.
        "hyper_parameters": {
            "backbone": "resnet18", "layers": ["layer2", "layer3"], "pre_trained": True,
            "coreset_sampling_ratio": 0.1, "num_neighbors": 9,
            "pre_processor": True, "post_processor": True, "evaluator": True, "visualizer": True,
        },
    }, checkpoint)
    for name in [n for n in sys.modules if n.startswith("anomalib")]:
        monkeypatch.delitem(sys.modules, name)  # reading needs no anomalib

    main(["import-anomalib", str(checkpoint), "--out", str(tmp_path / "artifact")])
    manifest = load_artifact(tmp_path / "artifact").manifest
    assert (manifest.preprocess.image_size, manifest.preprocess.input_size) == ((256, 256), (224, 224))
    assert manifest.model.patch_grid == (28, 28) and manifest.num_neighbors == 9
    assert manifest.extra_files  # the bank index: the runtime scores with its default search

    paths = list_images(data_256 / "test")
    bank = lightning.model.memory_bank
    want, want_maps = _anomalib_forward(timm_model, default, paths, bank, 9)
    inspector = Inspector(tmp_path / "artifact", device="cpu")
    results = [inspector.inspect(read_image(p)) for p in paths]
    np.testing.assert_allclose([r.score for r in results], want.numpy(), rtol=1e-4)
    embedding = _anomalib_forward(timm_model, default, paths, None, 9)
    _, patch_scores = plain_patchcore.score(embedding, bank, 9)
    for result, amap, patches in zip(results, want_maps, patch_scores):
        # anomalib's map covers the 224 crop, 16 px into the 256 image; the margin was not inspected.
        np.testing.assert_allclose(result.anomaly_map[16:240, 16:240], amap.numpy(), rtol=1e-4, atol=1e-4)
        assert not result.anomaly_map[:16].any() and not result.anomaly_map[:, 240:].any()
        row, col = divmod(int(patches.argmax()), 28)  # 8-px patches of the crop
        assert result.location == (16 + col * 8 + 4, 16 + row * 8 + 4)

    post = lightning.post_processor
    for result in results:
        decision = decide(result.score, manifest.calibration)
        anomalib_normalised = float(((result.score - post._image_threshold) / (post.image_max - post.image_min) + 0.5).clamp(0, 1))
        assert decision.normalised == pytest.approx(anomalib_normalised, abs=1e-6)
        assert (decision.verdict == "NG") == (anomalib_normalised > 0.5)


def test_exported_torch_model_with_custom_preprocessing(tmp_path, monkeypatch, data_300):
    classes = _anomalib_classes(monkeypatch)
    transform = T.Compose([T.Resize((256, 256), antialias=True), T.Normalize(mean=[0.5] * 3, std=[0.25] * 3)])
    # Layers named out of network order: anomalib still concatenates in network order.
    lightning, timm_model = _trained(tmp_path, classes, ["layer3", "layer2"], transform, data_300, sensitivity=0.6)
    exported = tmp_path / "model.pt"
    torch.save({"model": lightning}, exported)  # anomalib's ExportMixin.to_torch
    for name in [n for n in sys.modules if n.startswith("anomalib")]:
        monkeypatch.delitem(sys.modules, name)

    parsed = read_anomalib(exported)
    assert parsed.layers == ["layer2", "layer3"]
    assert parsed.preprocess == dict(image_size=(256, 256), resize="antialias", mean=(0.5,) * 3, std=(0.25,) * 3, center_crop=None)
    assert parsed.calibration.details["image_sensitivity"] == 0.6
    import_anomalib(exported, tmp_path / "artifact")
    inspector = Inspector(tmp_path / "artifact", device="cpu")
    paths = list_images(data_300 / "test")
    want, _ = _anomalib_forward(timm_model, transform, paths, lightning.model.memory_bank, 9)
    np.testing.assert_allclose([inspector.inspect(read_image(p)).score for p in paths], want.numpy(), rtol=1e-4)


def test_unusable_files_say_why(tmp_path, monkeypatch):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(AnomalibImportError, match="junk.ckpt: not a torch checkpoint"):
        read_anomalib(tmp_path / "junk.ckpt")
    torch.save({"state_dict": OrderedDict(), "hyper_parameters": {"backbone": "resnet18", "layers": ["layer2"]}}, tmp_path / "empty.ckpt")
    with pytest.raises(AnomalibImportError, match="no fitted memory bank at model.memory_bank"):
        read_anomalib(tmp_path / "empty.ckpt")
    state = OrderedDict({"model.memory_bank": torch.ones(4, 128)})
    crop = T.Compose([T.Resize(256), T.Normalize(**IMAGENET)])
    classes = _anomalib_classes(monkeypatch)
    torch.save({"state_dict": state, "hyper_parameters": {
        "backbone": "resnet18", "layers": ["layer2"], "pre_processor": classes.PreProcessor(crop)}}, tmp_path / "aspect.ckpt")
    with pytest.raises(AnomalibImportError, match=r"Resize size \[256\] keeps the aspect ratio"):
        read_anomalib(tmp_path / "aspect.ckpt")


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
