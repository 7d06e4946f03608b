import json
import shutil

import numpy as np
import pytest

from patchline.runtime.artifact import ArtifactError, load_artifact, read_manifest, write_manifest
from patchline.runtime.engines import EngineSettings, create_engine
from patchline.runtime.inspector import Inspector


@pytest.fixture()
def artifact(small_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(small_artifact, copy)
    return copy


def _edit_manifest(folder, edit):
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def test_valid_artifact_loads(artifact):
    loaded = load_artifact(artifact)
    assert loaded.bank.shape == tuple(loaded.manifest.memory_bank.shape)
    assert loaded.bank.dtype == np.float32
    assert len(loaded.checksum()) == 64


def test_checksum_names_the_model_file_that_runs_and_ignores_added_files(artifact):
    onnx = pytest.importorskip("onnx")  # the export extra: not in the runtime-only venv
    before = load_artifact(artifact).checksum()
    (artifact / "notes.txt").write_text("added after export")
    model = onnx.load(str(artifact / "model.onnx"))
    model.doc_string = "another model file"
    onnx.save(model, str(artifact / "model.int8.onnx"))
    manifest = read_manifest(artifact)
    write_manifest(artifact, manifest.model_copy(update={"extra_files": {**manifest.extra_files, "notes": "notes.txt",
                                                                          "int8_model": "model.int8.onnx"}}))
    loaded = load_artifact(artifact)
    assert loaded.checksum() == loaded.checksum("model.onnx") == before
    assert loaded.checksum("model.int8.onnx") != before
    with pytest.raises(ArtifactError, match="other.onnx is not a file the manifest checksums"):
        loaded.checksum("other.onnx")
    assert Inspector(loaded, device="cpu", precision="int8").checksum == loaded.checksum("model.int8.onnx")


def test_write_manifest_replaces_the_file_whole(artifact):
    """A reader that opened the manifest before a rewrite still reads the complete old one, never a truncated file."""
    manifest = read_manifest(artifact)
    with open(artifact / "manifest.json") as reader:
        write_manifest(artifact, manifest.model_copy(update={"model_id": "rewritten"}))
        assert json.loads(reader.read())["model_id"] == manifest.model_id
    assert read_manifest(artifact).model_id == "rewritten"
    assert sorted(p.name for p in artifact.iterdir() if "manifest" in p.name) == ["manifest.json"]


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="missing manifest.json"):
        load_artifact(tmp_path)


def test_missing_file(artifact):
    (artifact / "memory_bank.npy").unlink()
    with pytest.raises(ArtifactError, match="missing file memory_bank.npy"):
        load_artifact(artifact)


def test_checksum_mismatch_is_refused(artifact):
    with open(artifact / "model.onnx", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=r"model.onnx: checksum mismatch"):
        load_artifact(artifact)


@pytest.mark.parametrize("edit,message", [
    ({"schema_version": 99}, "unknown schema_version 99"),
    ({"surprise": 1}, "invalid manifest: surprise: Extra inputs are not permitted"),
])
def test_manifest_content_is_validated(artifact, edit, message):
    _edit_manifest(artifact, lambda d: d.update(edit))
    with pytest.raises(ArtifactError, match=message):
        load_artifact(artifact)


def test_not_json(artifact):
    (artifact / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(artifact)


def test_bank_shape_disagreeing_with_manifest(artifact):
    bank = np.load(artifact / "memory_bank.npy")
    np.save(artifact / "memory_bank.npy", bank[:-1])
    manifest = read_manifest(artifact)
    write_manifest(artifact, manifest)  # checksums fine, shape now wrong
    with pytest.raises(ArtifactError, match="manifest says float32"):
        load_artifact(artifact)


def test_embedding_dim_disagreeing_with_bank(artifact):
    manifest = read_manifest(artifact)
    bad = manifest.model_copy(update={"model": manifest.model.model_copy(update={"embedding_dim": 7})})
    write_manifest(artifact, bad)
    with pytest.raises(ArtifactError, match="embedding_dim is 7"):
        load_artifact(artifact)


def test_onnx_graph_disagreeing_with_manifest(artifact):
    manifest = read_manifest(artifact)
    grid = manifest.model.patch_grid
    bad = manifest.model_copy(update={"model": manifest.model.model_copy(update={"patch_grid": (grid[0] + 1, grid[1])})})
    write_manifest(artifact, bad)
    with pytest.raises(ArtifactError, match="disagrees with manifest"):
        create_engine("onnxruntime", load_artifact(artifact), EngineSettings(device="cpu"))


def test_manifest_records_what_the_runtime_needs(small_artifact):
    manifest = read_manifest(small_artifact)
    assert manifest.backbone.name == "resnet18"
    assert manifest.backbone.layers == ["layer1", "layer2"]
    assert manifest.backbone.weights == "random (seed 0)"
    assert manifest.model.embedding_dim == 64 + 128
    assert manifest.model.patch_grid == (32, 32)
    assert manifest.model.opset >= 17
    assert manifest.model.onnx_max_abs_diff < 1e-3
    assert manifest.memory_bank.shape == (2048, 192)  # 20 images × 1024 patches × 0.1
    assert manifest.calibration is None
    assert set(manifest.sha256) == {"model.onnx", "memory_bank.npy", "bank_projection.npz", "bank_knn.npy", "self_test.npz"}
    assert {"torch", "onnxruntime", "timm"} <= set(manifest.tool_versions)
