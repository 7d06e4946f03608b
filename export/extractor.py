"""Feature maps of modules named by path — the layer names PatchCore users write (``layer2``,
``features.denseblock2``, ``blocks.6``) — for any timm or torchvision model.

The model is traced once with torch.fx, the requested modules kept whole as leaves of the trace (and
timm's untraceable helpers, as timm registers them), and cut after the last of them: nothing past it is
computed, each output is exactly what the module returns — what a forward hook on it would see — and the
graph is a plain module that exports to ONNX.

Outputs are brought to (N, C, h, w): a transformer's token sequence loses its class/distillation tokens
(whatever precedes the patch tokens) and is folded onto the patch grid; channels-last outputs of models
that declare ``output_fmt = "NHWC"`` (timm's Swin) are permuted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
from timm.layers import get_notrace_functions, get_notrace_modules

from patchline.export.backbone import BackboneError


@dataclass(frozen=True)
class Layout:
    """How one module's output becomes an (N, C, h, w) map."""

    kind: str  # "nchw", "nhwc" or "tokens"
    channels: int
    grid: tuple[int, int]
    prefix_tokens: int = 0  # tokens before the patch tokens (class, distillation), dropped


def layout_of(model: torch.nn.Module, layer: str, shape: tuple[int, ...]) -> Layout:
    """The layout of ``layer``'s output of shape ``shape``; BackboneError when it is no spatial map."""
    if len(shape) == 3:  # (N, tokens, C)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        prefix = shape[1] - grid[0] * grid[1] if grid else -1
        if prefix < 0:
            raise BackboneError(f"layer {layer!r} outputs {shape[1]} tokens that do not fold onto the patch grid {grid}")
        return Layout("tokens", shape[2], tuple(grid), prefix)
    if len(shape) == 4:
        channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        if channels_last and not isinstance(model.get_submodule(layer), torch.nn.Conv2d):
            return Layout("nhwc", shape[3], (shape[1], shape[2]))
        return Layout("nchw", shape[1], (shape[2], shape[3]))
    raise BackboneError(f"layer {layer!r} outputs shape {tuple(shape)}: not a feature map")


def to_map(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.kind == "tokens":
        return x[:, layout.prefix_tokens :].reshape(-1, *layout.grid, layout.channels).permute(0, 3, 1, 2)
    if layout.kind == "nhwc":
        return x.permute(0, 3, 1, 2)
    return x


def layer_order(backbone: torch.nn.Module, layers: list[str]) -> list[int]:
    """Positions of ``layers`` in the backbone's outputs (timm's features_only returns them in network order)."""
    produced = backbone.feature_info.module_name()
    return [produced.index(layer) for layer in layers]


class LayerInfo:
    """What a LayerExtractor returns, described the way timm's ``feature_info`` describes features_only models."""

    def __init__(self, layers: list[str], layouts: list[Layout]) -> None:
        self._layers = list(layers)
        self._layouts = list(layouts)

    def module_name(self) -> list[str]:
        return list(self._layers)

    def channels(self) -> list[int]:
        return [layout.channels for layout in self._layouts]


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(get_notrace_functions()))
        self.leaves = leaves
        self.notrace = tuple(get_notrace_modules())

    def is_leaf_module(self, module: torch.nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or isinstance(module, self.notrace) or super().is_leaf_module(module, qualname)


def truncated_graph(model: torch.nn.Module, layers: list[str]) -> torch.fx.GraphModule:
    """``model`` as an FX graph returning ``{layer: output}`` and nothing computed past the last layer."""
    tracer = _LeafTracer(set(layers))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # FX's failures are as varied as the models it traces
        raise BackboneError(f"{type(model).__name__} cannot be traced for layers {layers}: {exc}") from exc
    calls = {layer: [n for n in graph.nodes if n.op == "call_module" and n.target == layer] for layer in layers}
    unusable = {layer: len(nodes) for layer, nodes in calls.items() if len(nodes) != 1}
    if unusable:
        raise BackboneError(f"{type(model).__name__}: layer(s) not called exactly once in forward: {unusable}")
    last = None
    for node in list(graph.nodes):
        if node.op == "output":
            graph.erase_node(node)
        else:
            last = node
    with graph.inserting_after(last):
        graph.output({layer: nodes[0] for layer, nodes in calls.items()})
    module = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()
    return module


class LayerExtractor(torch.nn.Module):
    """``model`` cut after the named modules; returns their outputs as (N, C, h, w) maps, in ``layers`` order."""

    def __init__(self, model: torch.nn.Module, layers: list[str], image_size: tuple[int, int]) -> None:
        super().__init__()
        known = dict(model.named_modules())
        missing = [layer for layer in layers if layer not in known]
        if missing:
            raise BackboneError(
                f"{type(model).__name__} has no module(s) {missing}; `patchline backbones NAME --layers` lists them"
            )
        self.graph = truncated_graph(model.eval(), layers)
        self.layers = list(layers)
        device = next(model.parameters()).device
        with torch.no_grad():
            shapes = self.graph(torch.zeros(1, 3, *image_size, device=device))
        self.layouts = [layout_of(model, layer, tuple(shapes[layer].shape)) for layer in self.layers]
        self.feature_info = LayerInfo(self.layers, self.layouts)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = self.graph(images)
        return [to_map(out[layer], layout) for layer, layout in zip(self.layers, self.layouts)]


def module_layouts(model: torch.nn.Module, image_size: tuple[int, int], depth: int = 2) -> dict[str, Layout]:
    """Every module up to ``depth`` path components deep whose output is a feature map, with its layout.

    One forward of ``model`` with hooks; on a meta-device model it costs no compute.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def record(_module, _inputs, output) -> None:
            if torch.is_tensor(output):
                shapes[name] = tuple(output.shape)

        return record

    handles = [
        module.register_forward_hook(recorder(name))
        for name, module in model.named_modules()
        if name and name.count(".") < depth
    ]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    layouts = {}
    for name, shape in shapes.items():
        try:
            layouts[name] = layout_of(model, name, shape)
        except BackboneError:
            continue  # heads, pooled vectors: not feature maps
    return layouts
