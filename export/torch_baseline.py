"""The "what users would run otherwise" baselines: anomalib's PatchcoreModel forward in eager torch.

``AnomalibPatchcore`` is anomalib's own ``PatchcoreModel`` (the installed package) with the
artifact's backbone weights and memory bank: what an anomalib user runs. ``TorchPatchcore``
re-implements it here, for machines without anomalib and for what anomalib's model cannot
hold (ensembles, the original PatchCore's embedding): the embedding rebuilt from the manifest
as export builds it, then anomalib's scoring verbatim in torch: the full ``euclidean_dist``
matrix, ``min``, a second bank-wide search for the reweighting, and the nearest-upsampled,
Gaussian-blurred map. The benchmark imports this lazily, only when a comparison is asked
for; the runtime never does.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from patchline.export.embedding import build_from_config
from patchline.runtime.artifact import Artifact
from patchline.export.config import ModelConfig
from patchline.runtime.score import MAP_KERNEL, MAP_SIGMA


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """anomalib's PatchcoreModel.euclidean_dist: the matrix form, clamped, square-rooted."""
    x_norm = x.pow(2).sum(dim=-1, keepdim=True)
    y_norm = y.pow(2).sum(dim=-1, keepdim=True)
    res = x_norm - 2 * torch.matmul(x, y.transpose(-2, -1)) + y_norm.transpose(-2, -1)
    return res.clamp_min_(0).sqrt_()


def _gaussian_kernel() -> torch.Tensor:
    half = MAP_KERNEL // 2
    grid = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-(grid**2) / (2 * MAP_SIGMA**2))
    return kernel / kernel.sum()


def model_config(artifact: Artifact, weights: str | None = None) -> ModelConfig:
    """The model config an artifact was exported with, as far as its manifest tells; ``weights`` replaces
    weights the manifest only names (a file's name and digest, an anomalib checkpoint)."""
    info = artifact.manifest.backbone
    names = info.name.split("+")
    sources = info.weights.split("; ")  # one per backbone, as build_from_config describes them
    seed = 0
    if weights is not None:
        if len(names) > 1:
            raise ValueError(f"{artifact.folder}: one baseline weights file cannot serve the ensemble {info.name}")
        kinds = [weights]
    elif len(sources) != len(names):
        raise ValueError(f"{artifact.folder}: backbone weights {info.weights!r} do not name one source per backbone "
                         f"of {info.name}")
    else:
        kinds = []
        for source in sources:
            random = re.fullmatch(r"random \(seed (\d+)\)", source)
            if random:
                kinds.append("random")
                seed = int(random.group(1))
            elif source.startswith("pretrained"):
                kinds.append("pretrained")
            else:
                raise ValueError(f"{artifact.folder}: backbone weights {source!r} cannot be rebuilt from the manifest; "
                                 "pass the weights file for the baseline")
    return ModelConfig(backbone=names[0] if len(names) == 1 else names, layers=info.layers,
                       weights=kinds[0] if len(kinds) == 1 else kinds, seed=seed,
                       pretrain_embed_dimension=info.pretrain_embed_dimension,
                       target_embed_dimension=info.target_embed_dimension)


class TorchPatchcore:
    """Eager-torch PatchCore on an artifact's bank; ``forward`` times its stages like the runtime does."""

    label = "in-project torch PatchcoreModel (export/torch_baseline.py)"

    def __init__(self, artifact: Artifact, bank: np.ndarray, weights: str | None = None, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.module, _ = build_from_config(model_config(artifact, weights), artifact.manifest.preprocess.input_size)
        self.memory_bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
        self.num_neighbors = artifact.manifest.num_neighbors
        self.kernel = _gaussian_kernel()

    def nearest_neighbors(self, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
        distances = euclidean_dist(embedding, self.memory_bank)
        if n_neighbors == 1:
            return distances.min(1)
        return distances.topk(k=n_neighbors, largest=False, dim=1)

    def compute_anomaly_score(self, patch_scores: torch.Tensor, locations: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if self.num_neighbors == 1:
            return patch_scores.amax(1)
        batch_size, num_patches = patch_scores.shape
        rows = torch.arange(batch_size)
        max_patches = torch.argmax(patch_scores, dim=1)
        max_features = embedding.reshape(batch_size, num_patches, -1)[rows, max_patches]
        score = patch_scores[rows, max_patches]
        nn_sample = self.memory_bank[locations[rows, max_patches], :]
        _, support = self.nearest_neighbors(nn_sample, n_neighbors=min(self.num_neighbors, self.memory_bank.shape[0]))
        distances = euclidean_dist(max_features.unsqueeze(1), self.memory_bank[support])
        weights = (1 - F.softmax(distances.squeeze(1), 1))[..., 0]
        return weights * score

    def anomaly_map(self, patch_scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        upsampled = F.interpolate(patch_scores, size=size)
        pad = MAP_KERNEL // 2
        padded = F.pad(upsampled, (pad, pad, pad, pad), mode="reflect")
        blurred = F.conv2d(padded, self.kernel.view(1, 1, 1, -1))
        return F.conv2d(blurred, self.kernel.view(1, 1, -1, 1))

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Scores (N,), maps (N, H, W) and per-stage milliseconds for a preprocessed batch (N, 3, H, W)."""
        clock = time.perf_counter
        t0 = clock()
        images = torch.from_numpy(batch)
        embedding = self.module(images)  # (N, h, w, D): anomalib's reshape_embedding order
        batch_size, height, width, dim = embedding.shape
        embedding = embedding.reshape(-1, dim)
        t1 = clock()
        patch_scores, locations = self.nearest_neighbors(embedding, n_neighbors=1)
        patch_scores, locations = patch_scores.reshape(batch_size, -1), locations.reshape(batch_size, -1)
        t2 = clock()
        scores = self.compute_anomaly_score(patch_scores, locations, embedding)
        t3 = clock()
        maps = self.anomaly_map(patch_scores.reshape(batch_size, 1, height, width), tuple(images.shape[-2:]))
        t4 = clock()
        stages = {"backbone": t1 - t0, "distance": t2 - t1, "reweight": t3 - t2, "map": t4 - t3}
        return scores.numpy(), maps[:, 0].numpy(), {k: v * 1000.0 for k, v in stages.items()}


class AnomalibPatchcore:
    """anomalib's own ``PatchcoreModel`` with an artifact's backbone weights and bank; ``forward`` is one timed call.

    Raises ValueError for what anomalib's model cannot hold (an ensemble, the original PatchCore's
    embedding) and ModuleNotFoundError without anomalib.
    """

    def __init__(self, artifact: Artifact, bank: np.ndarray, weights: str | None = None, threads: int | None = None) -> None:
        from importlib.metadata import version

        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        info = artifact.manifest.backbone
        if "+" in info.name or info.pretrain_embed_dimension or info.target_embed_dimension:
            raise ValueError(f"anomalib's PatchcoreModel holds one backbone with its own embedding, not {info.name} "
                             "with the original PatchCore's")
        if threads:
            torch.set_num_threads(threads)
        ours, _ = build_from_config(model_config(artifact, weights), artifact.manifest.preprocess.input_size)
        self.model = PatchcoreModel(layers=info.layers, backbone=info.name, pre_trained=False,
                                    num_neighbors=artifact.manifest.num_neighbors)
        self.model.feature_extractor.feature_extractor.load_state_dict(ours.backbone.state_dict())
        self.model.memory_bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
        self.model.eval()
        self.label = f"anomalib {version('anomalib')} PatchcoreModel"

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Scores (N,), maps (N, H, W) and the milliseconds of the one forward call (backbone to map)."""
        start = time.perf_counter()
        result = self.model(torch.from_numpy(batch))
        elapsed = (time.perf_counter() - start) * 1000.0
        return result.pred_score.numpy(), result.anomaly_map[:, 0].numpy(), {"forward": elapsed}
