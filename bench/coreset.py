"""Time the greedy coreset at PatchCore's real scale: 200 images × 32×32 patches × 1536 dims ≈ 205k rows.

    python bench/coreset.py [--rows 204800] [--dims 1536] [--ratio 0.1]

Writes bench/results/coreset-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from patchline.export.coreset import greedy_coreset
from patchline.runtime.tools.bench import write_result

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200 * 32 * 32)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    rows = np.random.default_rng(0).standard_normal((args.rows, args.dims), dtype=np.float32)
    start = time.perf_counter()
    selected = greedy_coreset(rows, args.ratio, args.projection_dim, progress=True)
    seconds = time.perf_counter() - start
    result = {
        "rows": args.rows,
        "dims": args.dims,
        "ratio": args.ratio,
        "projection_dim": args.projection_dim,
        "selected": int(len(selected)),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    path = write_result("coreset", result, args.out)
    print(json.dumps(result))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
