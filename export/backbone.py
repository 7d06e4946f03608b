"""Backbone construction through timm ``features_only``, with layers chosen by name.

Weights come from timm's pretrained download, a local state-dict file, or a seeded
random init (tests and the offline demo).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from patchline.runtime.artifact import sha256_file


class BackboneError(ValueError):
    """A backbone, layer or weights file that cannot be used."""


def layer_indices(name: str, layers: list[str]) -> list[int]:
    """timm ``out_indices`` for the named layers, or an error listing the layers that exist."""
    probe = timm.create_model(name, pretrained=False, features_only=True)
    names = probe.feature_info.module_name()
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise BackboneError(f"backbone {name!r} has no feature layer(s) {missing}; extractable layers: {names}")
    return [names.index(layer) for layer in layers]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {path} does not hold a state dict")
    return state


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a full-model state dict into a features-only model.

    Keys of layers the feature model dropped (fc, layer4 …) are ignored; a key missing
    for a used layer, an unknown key inside a used layer, or a shape mismatch is an error.
    """
    state = _read_state_dict(path)
    own = model.state_dict()
    used_prefixes = {key.split(".")[0] for key in own}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if k.split(".")[0] in used_prefixes)
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label} key(s), e.g. {keys[:3]}")
    if problems:
        raise BackboneError(f"weights file {path} does not fit the used layers: " + "; ".join(problems))
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def create_backbone(name: str, layers: list[str], weights: str, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A timm features-only model returning ``layers`` (in timm order) and a description of its weights."""
    indices = layer_indices(name, layers)
    kwargs = dict(features_only=True, out_indices=sorted(indices), exportable=True)
    if weights == "pretrained":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # network, hub and cache errors all mean the same to the user
            raise BackboneError(
                f"could not load timm's pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
                "Offline? Put the weights in a local file and set model.weights: /path/to/weights.safetensors"
            ) from exc
        source = "pretrained (timm)"
    else:
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **kwargs)
        if weights == "random":
            source = f"random (seed {seed})"
        else:
            path = Path(weights)
            _load_weights(model, path)
            source = f"{path.name} sha256:{sha256_file(path)}"
    return model.eval(), source
