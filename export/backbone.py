"""Backbone construction through timm ``features_only``, with layers chosen by name.

Weights come from timm's pretrained download, a local state-dict file, or a seeded
random init (tests and the offline demo).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch

from patchline.runtime.artifact import sha256_file


class BackboneError(ValueError):
    """A backbone, layer or weights file that cannot be used."""


def feature_layers(name: str) -> list[str]:
    """The layers timm's ``features_only`` mode offers for ``name`` (built on the meta device: no init, no memory)."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, features_only=True).feature_info.module_name()


def layer_indices(name: str, layers: list[str]) -> list[int]:
    """timm ``out_indices`` for the named layers, or an error listing the layers that exist."""
    names = feature_layers(name)
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise BackboneError(f"backbone {name!r} has no feature layer(s) {missing}; extractable layers: {names}")
    return [names.index(layer) for layer in layers]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a full-model state dict into a (possibly truncated) model; ``origin`` names it in errors.

    Keys of layers the feature model dropped (fc, layer4 …) are ignored; a key missing
    for a used layer, an unknown key inside a used layer, or a shape mismatch is an error.
    """
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
        raise BackboneError(f"{origin} does not fit the used layers: " + "; ".join(problems))
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def create_backbone(name: str, layers: list[str], weights: str, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A timm features-only model returning ``layers`` (in timm order) and a description of its weights."""
    indices = layer_indices(name, layers)
    model, source = build_with_weights(
        lambda pretrained: timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=sorted(indices), exportable=True
        ),
        name,
        weights,
        seed,
    )
    return model.eval(), source


def build_with_weights(
    build: Callable[[bool], torch.nn.Module], name: str, weights: str, seed: int, hub: str = "timm"
) -> tuple[torch.nn.Module, str]:
    """``build(pretrained)`` with the weights a config names, and a description of them for the manifest."""
    if weights == "pretrained":
        try:
            model = build(True)
        except Exception as exc:  # network, hub and cache errors all mean the same to the user
            raise BackboneError(
                f"could not load {hub}'s pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
                "Offline? Put the weights in a local file and set model.weights: /path/to/weights.safetensors"
            ) from exc
        return model, f"pretrained ({hub})"
    torch.manual_seed(seed)
    model = build(False)
    if weights == "random":
        return model, f"random (seed {seed})"
    path = Path(weights)
    load_state(model, read_state_dict(path), f"weights file {path}")
    return model, f"{path.name} sha256:{sha256_file(path)}"
