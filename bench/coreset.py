"""Time the greedy coreset at PatchCore's real scale: 200 images × 32×32 patches × 1536 dims ≈ 205k rows.

    python bench/coreset.py [--rows 204800] [--dims 1536] [--ratio 0.1]

Writes bench/results/coreset-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np

from patchline.export.coreset import greedy_coreset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200 * 32 * 32)
    parser.add_argument("--dims", type=int, default=1536)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=128)
    args = parser.parse_args()
    rows = np.random.default_rng(0).standard_normal((args.rows, args.dims), dtype=np.float32)
    start = time.perf_counter()
    selected = greedy_coreset(rows, args.ratio, args.projection_dim, progress=True)
    seconds = time.perf_counter() - start
    result = {
        "host": platform.node(),
        "cpu_count": __import__("os").cpu_count(),
        "rows": args.rows,
        "dims": args.dims,
        "ratio": args.ratio,
        "projection_dim": args.projection_dim,
        "selected": int(len(selected)),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    out = Path("bench/results") / f"coreset-{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
