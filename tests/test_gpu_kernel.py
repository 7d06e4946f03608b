"""The CUDA distance + top-k kernel against the CPU's ``distance.nearest``.

Three levels, each skipping with its reason where it cannot run:
- nvcc/ptxas compile the source for Jetson Orin (sm_87) and H100 (sm_90) and report no register spills;
- the kernel source runs on the CPU under tests/cuda_emulation.cpp, driven by GpuNearest's launch plan;
- on a real GPU (pycuda + a device), GpuNearest itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from patchline.runtime.search.distance import nearest
from patchline.runtime.search.gpu_distance import KERNEL_FILE, MAX_K, compile_options, geometry, plan_queries
from tests import cuda_emulator

# (queries, bank rows, dims): tile-aligned and not; bank rows not divisible by the 64-row tile;
# dims not divisible by the 32-dim chunk, and odd (FP16 pads a column); 2 dims, where nearest rows are
# close next to the rows' norms (what the relative tolerance the README once stated could not hold).
SHAPES = [(64, 128, 64), (70, 150, 40), (1, 65, 33), (130, 97, 96), (100, 500, 2)]
UNIT = {"fp32": 2.0**-24, "fp16": 2.0**-11}  # unit roundoff: FP16 keeps 11 significant bits


def rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.standard_normal((n, d), dtype=np.float32)


def tolerance(x: np.ndarray, bank: np.ndarray, got_d: np.ndarray, want_d: np.ndarray, precision: str) -> np.ndarray:
    """How far each of the kernel's distances may be from the CPU's, from the arithmetic (the README's claim).

    Both compute |x|² − 2x·y + |y|² in float32: squared distances may differ by about 2·(dims + 4)·2⁻²⁴·s²,
    s = ‖x‖ + ‖y‖ (a dot product's worst-case rounding, on each side), so a distance by that over (d + d'),
    and never by more than its square root. FP16 first rounds every input to 11 significant bits (and to
    2⁻²⁵ near zero), which moves a distance by up to 2⁻¹¹·s: an absolute bound, large next to a small
    distance. A list sorted by distance moves by no more than its largest element, so s takes the bank's
    largest norm."""
    dims = x.shape[1]
    s = np.linalg.norm(x.astype(np.float64), axis=1)[:, None] + np.linalg.norm(bank.astype(np.float64), axis=1).max()
    squared = 2 * (dims + 4) * UNIT["fp32"] * s**2
    arithmetic = np.minimum(squared / np.maximum(got_d + want_d, 1e-30), np.sqrt(squared))
    rounding = UNIT["fp16"] * s + 2.0**-25 * np.sqrt(dims) * 2 if precision == "fp16" else 0.0
    return arithmetic + rounding + 4 * UNIT["fp32"] * want_d  # and the two square roots


def assert_same_neighbours(x: np.ndarray, bank: np.ndarray, got_d: np.ndarray, got_i: np.ndarray, k: int,
                           precision: str) -> None:
    """Distances match the CPU within the tolerance, and indices match except where two bank rows are as
    near as the tolerance can tell apart (ties): there the GPU's row must truly be that near."""
    want_d, want_i = nearest(x, bank, k)
    assert got_d.shape == got_i.shape == (x.shape[0], k)
    allowed = tolerance(x, bank, got_d, want_d, precision)
    assert (np.abs(got_d - want_d) <= allowed).all(), np.max(np.abs(got_d - want_d) / allowed)
    exact = np.linalg.norm(x[:, None, :].astype(np.float64) - bank[got_i].astype(np.float64), axis=2)
    assert (np.abs(exact - want_d) <= 2 * allowed).all(), np.max(np.abs(exact - want_d) / allowed)
    assert (got_i == want_i).mean() > 0.95
    assert all(len(set(r)) == k for r in got_i)


def test_launch_plan_covers_every_tile_once() -> None:
    g = geometry()
    for n, m, sms in [(1, 10, 132), (784, 16384, 132), (6272, 16384, 16), (64, 64, 1), (300, 100_000, 8)]:
        plan = plan_queries(n, m, 384, 9, "fp32", sms)
        topk = plan.launches[1]
        query_blocks, slices = topk.grid
        per_slice = topk.args[7]
        tiles = -(-m // g["TILE"])
        assert query_blocks * g["TILE"] >= n > (query_blocks - 1) * g["TILE"]
        assert (slices - 1) * per_slice < tiles <= slices * per_slice  # no empty slice, none missing
        assert plan.buffers["part_d"][0] == (slices * g["LANES"] * 9, n)
        merge = plan.launches[2]
        assert merge.args[3] == slices * g["LANES"]
        assert merge.grid[0] * g["MERGE_ROWS"] >= n > (merge.grid[0] - 1) * g["MERGE_ROWS"]  # one block per 16 rows


NO_NVCC = "nvcc not installed: the kernel source is not compiled on this machine"
ENTRIES = {"euclidean_topk_f32", "euclidean_topk_f16", "merge_topk", "sq_norms_f32", "sq_norms_f16", "to_half"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason=NO_NVCC)
def test_kernel_compiles_without_spills(tmp_path) -> None:
    """For Jetson Orin (sm_87) and H100 (sm_90), up to MAX_K: ptxas keeps the top-k lists and the
    tile accumulators in registers (no stack frame, no spills)."""

    def compile_k(k: int) -> str:
        result = subprocess.run(
            ["nvcc", "-fatbin", "-gencode", "arch=compute_87,code=sm_87", "-gencode", "arch=compute_90,code=sm_90",
             "-Xptxas", "-v", *compile_options(k), "-o", str(tmp_path / f"k{k}.fatbin"), str(KERNEL_FILE)],
            capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stderr

    with ThreadPoolExecutor(2) as pool:
        for report in pool.map(compile_k, (9, MAX_K)):
            for arch in ("sm_87", "sm_90"):
                compiled = set(re.findall(rf"Compiling entry function '(\w+)' for '{arch}'", report))
                assert compiled == ENTRIES, report
            entries = 2 * len(ENTRIES)  # each entry for both architectures
            assert re.findall(r"(\d+) bytes spill stores", report) == ["0"] * entries, report
            assert re.findall(r"(\d+) bytes stack frame", report) == ["0"] * entries, report


@pytest.mark.skipif(shutil.which("nvcc") is None, reason=NO_NVCC)
def test_kernel_compiles_to_ptx(tmp_path) -> None:
    out = tmp_path / "k.ptx"
    subprocess.run(["nvcc", "-ptx", "-arch=sm_87", *compile_options(9), "-o", str(out), str(KERNEL_FILE)], check=True)
    assert set(re.findall(r"\.entry (\w+)\(", out.read_text())) == ENTRIES


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The kernel compiled for the CPU, for k = 1, 9 and the largest (built in parallel)."""
    reason = cuda_emulator.unavailable_reason()
    if reason:
        pytest.skip(f"kernel emulation unavailable: {reason}")
    workdir = tmp_path_factory.mktemp("emulation")
    ks = (1, 9, MAX_K)
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(ks, pool.map(lambda k: cuda_emulator.EmulatedKernels(k, workdir), ks)))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("k", [1, 9, MAX_K])
def test_emulated_kernel_matches_cpu(emulated, precision: str, k: int) -> None:
    rng = np.random.default_rng(k)
    for shape, sm_count in zip(SHAPES, (1, 32, 32, 1, 4)):
        # Few multiprocessors: one slice per query block; many: the bank split into slices.
        n, m, d = shape
        x, bank = rows(rng, n, d), rows(rng, m, d)
        got_d, got_i = emulated[k].nearest(x, bank, precision, sm_count)
        assert_same_neighbours(x, bank, got_d, got_i, k, precision)


def test_emulated_kernel_breaks_ties_by_index(emulated) -> None:
    """Duplicate bank rows are exact ties: the lower index wins, as on the CPU. Rows 8, 5 and 3 are
    folded by lanes 0, 1 and 3, so the merge meets them in the order 8, 5, 3; row 70 is in another slice."""
    rng = np.random.default_rng(5)
    bank = rows(rng, 100, 24)
    bank[[5, 8, 70]] = bank[3]
    x = bank[[3]] + 0.01
    got_d, got_i = emulated[9].nearest(x, bank, "fp32", 4)
    assert list(got_i[0, :4]) == [3, 5, 8, 70]
    assert len(set(got_d[0, :4])) == 1


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_emulated_kernel_never_makes_a_non_finite_query_near(emulated, precision: str) -> None:
    """fmaxf(NaN, 0) is 0: a NaN query row came out as a perfect match (distance 0). NaN, ±inf and a value whose
    square overflows give +inf distances (with real bank rows, so indexing by them is safe); other rows are as before."""
    x, bank, bad = non_finite_queries(precision)
    for k in (1, 9):
        got_d, got_i = emulated[k].nearest(x, bank, precision, 32)  # FP16: 7e4 rounds to inf in to_half
        assert_fail_closed(x, bank, bad, got_d, got_i, k, precision)


def non_finite_queries(precision: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Queries with NaN, ±inf and a value whose square overflows in some rows (returned as ``bad``)."""
    rng = np.random.default_rng(11)
    x, bank = rows(rng, 70, 40), rows(rng, 150, 40)
    overflow = 1e20 if precision == "fp32" else 7e4  # |x|² beyond float32; beyond FP16 (cast to inf)
    bad = [3, 10, 20, 33]
    x[bad, 5] = [np.nan, np.inf, -np.inf, overflow]
    return x, bank, bad


def assert_fail_closed(x: np.ndarray, bank: np.ndarray, bad: list[int], got_d: np.ndarray, got_i: np.ndarray, k: int,
                       precision: str) -> None:
    assert np.isposinf(got_d[bad]).all(), got_d[bad]
    assert ((0 <= got_i[bad]) & (got_i[bad] < len(bank))).all()
    good = np.setdiff1d(np.arange(len(x)), bad)
    assert_same_neighbours(x[good], bank, got_d[good], got_i[good], k, precision)


def test_fp16_bank_range_is_checked_before_upload() -> None:
    """Cast to FP16, a bank value of 7e4 would become inf: refused on the host, naming what and how large.
    (Queries are rounded on the GPU, where such a value makes its row infinitely far: the test above.)"""
    from patchline.runtime.search.distance import NonFiniteError
    from patchline.runtime.search.gpu_distance import FP16_MAX, check_range

    x = np.ones((4, 8), np.float32)
    x[2, 3] = -FP16_MAX
    check_range(x, "fp16", "the memory bank")  # the largest half is fine
    for value, shown in ((7e4, "70000"), (np.nan, "nan"), (np.inf, "inf")):
        x[1, 1] = value
        with pytest.raises(NonFiniteError, match=f"the memory bank: largest magnitude {shown} is beyond FP16"):
            check_range(x, "fp16", "the memory bank")
        check_range(x, "fp32", "the memory bank")  # FP32 uploads as is; the kernel makes such rows infinitely far


def test_query_checks() -> None:
    from patchline.runtime.search.gpu_distance import check_query

    with pytest.raises(ValueError, match="do not match the bank's 8 dims"):
        check_query(np.zeros((3, 7), np.float32), (10, 8), 1)
    with pytest.raises(ValueError, match=f"at most {MAX_K}"):
        check_query(np.zeros((3, 8), np.float32), (100, 8), MAX_K + 1)


def _gpu_reason() -> str | None:
    from patchline.runtime.search.cuda_device import gpu_unavailable_reason

    return gpu_unavailable_reason()


@pytest.fixture(scope="module")
def gpu():
    reason = _gpu_reason()
    if reason:
        pytest.skip(f"no GPU here: {reason}")
    from patchline.runtime.search.cuda_device import CudaDevice

    return CudaDevice()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_kernel_matches_cpu(gpu, tmp_path, precision: str) -> None:
    from patchline.runtime.search.gpu_distance import GpuNearest

    rng = np.random.default_rng(7)
    for n, m, d in [*SHAPES, (784, 4100, 384), (1, 20000, 1536)]:
        x, bank = rows(rng, n, d), rows(rng, m, d)
        gpu_nearest = GpuNearest(bank, precision, gpu, cache_dir=tmp_path)
        for k in (1, 9):
            got_d, got_i = gpu_nearest.nearest(x, k)
            assert_same_neighbours(x, bank, got_d, got_i, k, precision)
    assert any((tmp_path / "kernels").iterdir()), "compiled modules are cached on disk"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_kernel_never_makes_a_non_finite_query_near(gpu, tmp_path, precision: str) -> None:
    """The emulated test's twin on the real GPU."""
    from patchline.runtime.search.gpu_distance import GpuNearest

    x, bank, bad = non_finite_queries(precision)
    gpu_nearest = GpuNearest(bank, precision, gpu, cache_dir=tmp_path)
    for k in (1, 9):
        assert_fail_closed(x, bank, bad, *gpu_nearest.nearest(x, k), k, precision)


def test_gpu_memory_is_freed_by_close_on_another_thread(gpu, tmp_path) -> None:
    """pycuda frees only where its context is current: close() makes it so, on whichever thread calls it."""
    import pycuda.driver as cuda

    from patchline.runtime.search.gpu_distance import GpuNearest

    rng = np.random.default_rng(9)
    with gpu.active():
        free_before = cuda.mem_get_info()[0]
    gpu_nearest = GpuNearest(rows(rng, 40000, 384), "fp32", gpu, cache_dir=tmp_path)  # a 61 MB bank
    gpu_nearest.nearest(rows(rng, 784, 384), 9)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(gpu_nearest.close).result()
    with gpu.active():
        assert cuda.mem_get_info()[0] >= free_before - (8 << 20)


def test_gpu_kernel_timing(gpu, tmp_path) -> None:
    from patchline.runtime.search.gpu_distance import GpuNearest

    rng = np.random.default_rng(8)
    gpu_nearest = GpuNearest(rows(rng, 2000, 384), "fp32", gpu, cache_dir=tmp_path)
    times = gpu_nearest.time_kernels(rows(rng, 784, 384), 1, 5)
    assert len(times) == 5 and all(t > 0 for t in times)
