import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")  # the export extra: not in the runtime-only venv
from safetensors.torch import save_file

from patchline.export.backbone import BackboneError, create_backbone
from patchline.export.embedding import build_embedding

LAYERS = ["layer2", "layer3"]


@pytest.fixture(scope="module")
def full_state():
    import timm

    torch.manual_seed(5)
    return timm.create_model("resnet18", pretrained=False).state_dict()


def _embed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 3, 64, 64))


def test_random_weights_are_seeded():
    a, source = build_embedding("resnet18", LAYERS, "random", seed=3)
    b, _ = build_embedding("resnet18", LAYERS, "random", seed=3)
    c, _ = build_embedding("resnet18", LAYERS, "random", seed=4)
    assert source == "random (seed 3)"
    torch.testing.assert_close(_embed(a), _embed(b))
    assert not torch.allclose(_embed(a), _embed(c))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded(tmp_path, full_state, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in full_state.items()}, str(path))
    else:
        torch.save({"state_dict": full_state}, path)
    model, source = create_backbone("resnet18", LAYERS, str(path))
    assert source.startswith(f"w{suffix} sha256:")
    torch.testing.assert_close(model.state_dict()["layer3.0.conv1.weight"], full_state["layer3.0.conv1.weight"])


def test_missing_key_for_a_used_layer_is_an_error(tmp_path, full_state):
    state = dict(full_state)
    del state["layer2.0.bn1.weight"]
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError, match=r"1 missing key\(s\).*layer2.0.bn1.weight"):
        create_backbone("resnet18", LAYERS, str(path))


def test_unexpected_key_in_a_used_layer_is_an_error_unused_layers_ignored(tmp_path, full_state):
    state = dict(full_state, **{"layer3.0.extra": torch.zeros(1)})
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError, match=r"unexpected key.*layer3.0.extra"):
        create_backbone("resnet18", LAYERS, str(path))
    # fc.* and layer4.* belong to layers the feature model does not use: fine.
    assert "fc.weight" in full_state and "layer4.0.conv1.weight" in full_state


def test_wrong_shape_is_an_error(tmp_path, full_state):
    state = dict(full_state, **{"layer2.0.conv1.weight": torch.zeros(1, 1, 1, 1)})
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError, match="wrong shape"):
        create_backbone("resnet18", LAYERS, str(path))


def test_missing_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("resnet18", LAYERS, str(tmp_path / "nope.safetensors"))


def test_unknown_layer_lists_the_real_ones():
    with pytest.raises(BackboneError, match=r"no feature layer\(s\) \['layer9'\].*layer2"):
        create_backbone("resnet18", ["layer9"], "random")


def test_pretrained_offline_gives_a_clear_error(tmp_path):
    # A box without access to the model hub. huggingface_hub reads HF_HUB_OFFLINE at import,
    # so the check runs in a fresh interpreter.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), TORCH_HOME=str(tmp_path))
    code = "from patchline.export.backbone import create_backbone; create_backbone('resnet18', ['layer2'], 'pretrained')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "BackboneError: could not load timm's pretrained weights for 'resnet18'" in result.stderr
    assert "Offline? Put the weights in a local file" in result.stderr


def test_layer_order_is_concatenation_order():
    forward, _ = build_embedding("resnet18", ["layer2", "layer3"], "random")
    backward, _ = build_embedding("resnet18", ["layer3", "layer2"], "random")
    a, b = _embed(forward), _embed(backward)
    assert a.shape[-1] == b.shape[-1] == 384
    assert a.shape[1:3] == (8, 8) and b.shape[1:3] == (4, 4)  # the first layer sets the grid
