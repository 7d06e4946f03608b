import subprocess
import sys

import numpy as np
import pytest

from patchline.runtime.search.distance import euclidean_dist, nearest


def _reference(x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))


@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (17, 33, 64), (100, 257, 384)])
def test_euclidean_dist_matches_float64(n, m, d):
    rng = np.random.default_rng(n + m)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.standard_normal((m, d)).astype(np.float32)
    got = euclidean_dist(x, y)
    assert got.dtype == np.float32 and got.shape == (n, m)
    np.testing.assert_allclose(got, _reference(x, y), rtol=1e-5, atol=1e-4)


def test_euclidean_dist_is_zero_on_identical_rows_not_nan():
    x = np.full((4, 128), 3.0, np.float32)
    got = euclidean_dist(x, x)
    assert np.isfinite(got).all() and (got >= 0).all()
    assert got.max() < 1e-2


@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("block", [7, 64, 4096])
def test_nearest_matches_full_search_for_any_block_size(k, block):
    rng = np.random.default_rng(k * block)
    x = rng.standard_normal((50, 32)).astype(np.float32)
    bank = rng.standard_normal((301, 32)).astype(np.float32)
    dist, idx = nearest(x, bank, k, block=block)
    full = _reference(x, bank)
    want_idx = np.argsort(full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, np.take_along_axis(full, want_idx, 1), rtol=1e-5, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_nearest_rejects_k_larger_than_bank():
    with pytest.raises(ValueError, match="bank size"):
        nearest(np.zeros((1, 4), np.float32), np.zeros((3, 4), np.float32), k=4)



def test_search_workers_follow_cpu_affinity_not_the_machine():
    """A service pinned to one core (taskset, systemd CPUAffinity) gets one search worker and one ORT thread."""
    code = ("import os\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "from patchline.runtime.search import distance\n"
            "print(distance.available_cores(), distance._WORKERS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]


def test_searches_hold_blas_to_one_thread_then_restore_it_with_one_controller():
    from threadpoolctl import threadpool_info

    from patchline.runtime.search import distance

    def blas_threads(_chunk=None):
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    before = blas_threads()
    during = distance.in_row_chunks(blas_threads, np.zeros((8, 4), np.float32), threads=2)
    controller = distance._blas_controller
    distance.in_row_chunks(blas_threads, np.zeros((8, 4), np.float32))
    assert all(threads == [1] * len(before) for threads in during)
    assert blas_threads() == before
    assert controller is not None and distance._blas_controller is controller
