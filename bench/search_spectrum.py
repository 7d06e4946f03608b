"""The nearest-row searches on banks whose spectrum is flattened step by step: where pruning stops paying.

    python bench/search_spectrum.py --artifact bench/cache/real-256 --images bench/cache/real-data \
        [--alphas 0,0.3,0.5,0.8] [--random] [--frames 4] [--rounds 2]

A seeded random-weight backbone puts most of a bank's variance in a few directions (the projection
bounds then prune nearly everything); pretrained features spread it wider. To see the searches on
such banks without pretrained weights, the artifact's bank and the frames' patch embeddings are
mapped by the same linear map, which scales the bank's principal components by λ^(−α/2): α = 0
leaves them, α = 1 would whiten them (the rows keep their neighbourhood structure, the spectrum
flattens). ``--random`` adds Gaussian rows with the bank's per-dimension mean and spread (nothing
prunes). Per bank: the plain blocked GEMM and the pruned search on the same frames, in turns (wall
and CPU time, the pruning rate), and the default that ``measure_search`` picks there, with its time
against plain's.

Writes bench/results/search-spectrum-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from patchline.runtime.artifact import load_artifact
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import evaluation_root, list_images, read_image
from patchline.runtime.search.bank_index import BankIndex, held_out_bank_rows, measure_search, principal_directions
from patchline.runtime.search.distance import ProjectedSearch, nearest, squared_norms
from patchline.runtime.tools.bench import summarise, write_result

ROOT = Path(__file__).resolve().parents[1]


def flattening(bank: np.ndarray, alpha: float):
    """The map x ↦ μ + V diag(λ^(−α/2)) Vᵀ (x − μ), scaled to keep the bank's mean squared spread."""
    mean = bank.mean(axis=0, dtype=np.float64)
    centred = bank.astype(np.float64) - mean
    eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / len(bank))
    scale = np.maximum(eigenvalues, eigenvalues.max() * 1e-6) ** (-alpha / 2)
    matrix = (vectors * scale) @ vectors.T
    matrix *= np.sqrt(np.square(centred).sum() / np.square(centred @ matrix).sum())
    return lambda x: ((x.astype(np.float64) - mean) @ matrix + mean).astype(np.float32)


def time_searches(bank: np.ndarray, frames: list[np.ndarray], rounds: int) -> dict:
    bank_sq = squared_norms(bank)
    mean, basis = principal_directions(bank)
    pruned = ProjectedSearch(bank, bank_sq, mean, basis[:, :64])
    searches = {"plain": lambda f: nearest(f, bank, 1, bank_sq), "pruned": pruned.nearest}
    wall = {name: [] for name in searches}
    cpu = {name: [] for name in searches}
    rates = []
    for search in searches.values():
        search(frames[0])
    for round_ in range(rounds):
        for frame in frames:
            for name in sorted(searches, reverse=round_ % 2 == 1):
                wall0, cpu0 = time.perf_counter(), time.process_time()
                searches[name](frame)
                wall[name].append((time.perf_counter() - wall0) * 1000.0)
                cpu[name].append((time.process_time() - cpu0) * 1000.0)
            rates.append(pruned.stats.pruning_rate)
    choice = measure_search(bank, BankIndex(mean, basis), held_out_bank_rows(bank))
    result = {name: {"wall": summarise(wall[name]), "cpu": summarise(cpu[name])} for name in searches}
    result["pruning_rate_median"] = round(float(np.median(rates)), 4)
    result["pruned_over_plain_wall"] = round(result["pruned"]["wall"]["median_ms"] / result["plain"]["wall"]["median_ms"], 3)
    result["pruned_over_plain_cpu"] = round(result["pruned"]["cpu"]["median_ms"] / result["plain"]["cpu"]["median_ms"], 3)
    result["default"] = choice.model_dump()
    # The default runs the pruned search only when its measurement chose it; otherwise it is the plain search.
    result["default_over_plain_cpu"] = result["pruned_over_plain_cpu"] if choice.method == "pruned" else 1.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="frames: an image folder or MVTec category")
    parser.add_argument("--alphas", default="0,0.3,0.5,0.8")
    parser.add_argument("--random", action="store_true", help="also a Gaussian bank")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    artifact = load_artifact(args.artifact)
    inspector = Inspector(artifact, search="plain")
    paths = list_images(evaluation_root(args.images))
    paths = paths[:: max(1, len(paths) // args.frames)][: args.frames]
    embeddings = [inspector.engine(inspector.preprocess([read_image(p)]))[0] for p in paths]
    frames = [e.reshape(-1, e.shape[-1]) for e in embeddings]
    banks = {}
    for alpha in (float(a) for a in args.alphas.split(",")):
        mapped = flattening(artifact.bank, alpha)
        banks[f"alpha {alpha}"] = (mapped(artifact.bank), [mapped(f) for f in frames])
    if args.random:
        rng = np.random.default_rng(0)
        bank = artifact.bank
        gaussian = rng.standard_normal(bank.shape, dtype=np.float32) * bank.std(axis=0) + bank.mean(axis=0)
        banks["gaussian"] = (gaussian.astype(np.float32), frames)
    results = {"artifact": str(args.artifact), "bank_rows": int(artifact.bank.shape[0]), "frames": len(frames),
               "queries_per_frame": int(frames[0].shape[0]), "banks": {}}
    for name, (bank, bank_frames) in banks.items():
        result = results["banks"][name] = time_searches(bank, bank_frames, args.rounds)
        print(f"{name}: plain {result['plain']['wall']['median_ms']:.1f} ms, pruned {result['pruned']['wall']['median_ms']:.1f}"
              f" ms (wall {result['pruned_over_plain_wall']:.2f}×, CPU {result['pruned_over_plain_cpu']:.2f}× plain), "
              f"pruning rate {result['pruning_rate_median']:.3f}; default: {result['default']['method']} "
              f"({result['default_over_plain_cpu']:.2f}× plain)", flush=True)
    print(f"written to {write_result('search-spectrum', results, args.out)}")


if __name__ == "__main__":
    main()
