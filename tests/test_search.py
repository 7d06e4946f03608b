"""The projected (pruned) nearest-row search is exact; the k-NN graph reweighting equals the bank-wide one;
artifacts without the index still load and score."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from patchline.runtime.artifact import ArtifactError, load_artifact, write_manifest, read_manifest
from patchline.runtime.cli import main
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import list_images, read_image
from patchline.runtime.score import MemoryBank, reweight
from patchline.runtime.search.bank_index import (
    KNN_KEY,
    PROJECTION_KEY,
    PRUNED_MAX_RATIO,
    SEARCH_DIMS,
    BankIndex,
    add_index,
    held_out_bank_rows,
    index_for_this_machine,
    measure_search,
    principal_directions,
    read_index,
)
from patchline.runtime.search.distance import DIRECT_PAIRS, ProjectedSearch, cpu_model, euclidean_dist, nearest, squared_norms


def reference_nearest(x: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The full euclidean_dist search, in float64 so its own rounding (~1e-3 relative in float32 for
    close pairs: |x|² − 2x·y + |y|² cancels) does not hide an error of the search under test."""
    d = euclidean_dist(x.astype(np.float64), bank.astype(np.float64))
    index = d.argmin(axis=1)
    return d[np.arange(len(x)), index], index


def structured(rng, rows: int, dim: int, rank: int) -> np.ndarray:
    """Rows with a decaying spectrum, like CNN embeddings: a low-rank part plus small isotropic noise."""
    scales = 3.0 / (1.0 + np.arange(rank))
    return (rng.standard_normal((rows, rank)) * scales @ rng.standard_normal((rank, dim)) / np.sqrt(rank)
            + 0.05 * rng.standard_normal((rows, dim)) + 1.5).astype(np.float32)


def search_for(bank: np.ndarray, dims: int, approximate: bool = False) -> ProjectedSearch:
    mean, basis = principal_directions(bank, dims)
    return ProjectedSearch(bank, squared_norms(bank), mean, basis, approximate)


def assert_exact(dist, index, bank, queries):
    want_d, want_i = reference_nearest(queries, bank)
    tied = np.isclose(np.linalg.norm(queries - bank[index], axis=1), want_d, rtol=1e-6, atol=0)
    assert np.all((index == want_i) | tied), f"{np.sum(index != want_i)} rows differ from the full search"
    # atol: even in float64 the matrix form leaves ~1e-7 on identical rows (sqrt of a cancelled |x|²).
    np.testing.assert_allclose(dist, want_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,queries,dims", [(1001, 150, 16), (4099, 70, 32), (7, 9, 4)])
def test_projected_search_is_exact_on_structured_data(rows, queries, dims):
    rng = np.random.default_rng(rows)
    data = structured(rng, rows + queries, 96, rank=12)
    bank, x = data[:rows], data[rows:]
    dist, index = search_for(bank, dims).nearest(x)
    assert_exact(dist, index, bank, x)


def test_projected_search_is_exact_on_flat_spectrum_and_outliers():
    """Gaussian rows give weak bounds and far outliers have many candidates (the crowded fallback)."""
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((2053, 64), dtype=np.float32)
    x = np.concatenate([rng.standard_normal((40, 64), dtype=np.float32), 25 * rng.standard_normal((5, 64), dtype=np.float32)])
    dist, index = search_for(bank, 8).nearest(x, block=16)
    assert_exact(dist, index, bank, x)


def test_projected_search_ties_pick_the_lowest_row():
    rng = np.random.default_rng(2)
    base = structured(rng, 300, 48, rank=6)
    bank = np.concatenate([base, base[:50]])  # rows 300..349 duplicate rows 0..49
    x = np.concatenate([bank[310:320], base[5:8] + 1e-3])
    dist, index = search_for(bank, 8).nearest(x)
    assert np.all(index[:10] == np.arange(10, 20))  # exact copies of rows 10..19 and 310..319: the lower wins
    assert np.all(dist[:10] == 0.0)
    assert_exact(dist, index, bank, x)


def test_many_candidates_are_checked_cluster_by_cluster_and_stay_exact():
    """Few directions for a rank-60 bank: hundreds of candidates per query, so whole clusters are checked by GEMM."""
    rng = np.random.default_rng(60)
    data = structured(rng, 3200, 96, rank=60)
    bank, x = data[:3000], data[3000:]
    search = search_for(bank, 6)
    dist, index = search.nearest(x)
    assert_exact(dist, index, bank, x)
    stats = search.stats
    assert stats.queries == 200 and stats.bank_rows == 3000
    assert stats.rows_checked > 200 * DIRECT_PAIRS  # not the pair-by-pair path
    assert stats.queries_unpruned < 20 and 0.5 < stats.pruning_rate < 0.99


def test_a_frame_the_bounds_cannot_prune_gets_the_plain_search():
    """Gaussian rows: no bound prunes, so after the first query block the rest skips the bounds (GIVE_UP_FRACTION)."""
    rng = np.random.default_rng(5)
    bank, x = rng.standard_normal((2053, 64), dtype=np.float32), rng.standard_normal((300, 64), dtype=np.float32)
    search = search_for(bank, 8)
    dist, index = search.nearest(x, block=32)
    want_d, want_i = nearest(x, bank, 1)
    np.testing.assert_array_equal(index, want_i[:, 0])
    np.testing.assert_allclose(dist, want_d[:, 0], rtol=1e-6)
    assert search.stats.queries_unpruned == 300 and search.stats.pruning_rate == 0.0


def test_fused_blocked_min_equals_full_matrix():
    rng = np.random.default_rng(3)
    bank, x = rng.standard_normal((1000, 40), dtype=np.float32), rng.standard_normal((33, 40), dtype=np.float32)
    dist, index = nearest(x, bank, 1, block=96)
    full = euclidean_dist(x, bank)
    np.testing.assert_array_equal(index[:, 0], full.argmin(axis=1))
    np.testing.assert_allclose(dist[:, 0], full.min(axis=1), rtol=1e-5)


def test_approximate_search_never_reports_below_exact():
    rng = np.random.default_rng(4)
    data = structured(rng, 2100, 96, rank=20)
    bank, x = data[:2000], data[2000:]
    exact, _ = search_for(bank, 32).nearest(x)
    approx, index = search_for(bank, 4, approximate=True).nearest(x)
    np.testing.assert_allclose(approx, np.linalg.norm(x - bank[index], axis=1), rtol=1e-5)
    assert np.all(approx >= exact * (1 - 1e-6))


@pytest.fixture(scope="module")
def real_patches(small_artifact, sample_data):
    inspector = Inspector(small_artifact, device="cpu")
    images = list_images(sample_data / "test")
    embeddings = [inspector.engine(inspector.preprocess([read_image(p)]))[0] for p in images]
    return np.concatenate([e.reshape(-1, e.shape[-1]) for e in embeddings])


def test_small_artifact_has_the_index_and_its_search_is_exact(small_artifact, real_patches):
    artifact = load_artifact(small_artifact)
    assert {PROJECTION_KEY, KNN_KEY} <= set(artifact.manifest.extra_files)
    bank = MemoryBank(artifact.bank, read_index(artifact), search="pruned")
    assert bank.search is not None and bank.knn is not None
    dist, index = bank.nearest(real_patches)
    assert_exact(dist[:, 0], index[:, 0], artifact.bank, real_patches)


def test_search_dims_beyond_the_projection_are_refused(small_artifact):
    artifact = load_artifact(small_artifact)
    index = read_index(artifact)
    directions = index.basis.shape[1]
    assert MemoryBank(artifact.bank, index, dims=directions, search="pruned").search.dims == directions
    for dims in (0, directions + 1):
        with pytest.raises(ValueError, match=f"search dims {dims}: the bank projection has {directions} directions"):
            MemoryBank(artifact.bank, index, dims=dims, search="pruned")


def test_knn_graph_reweighting_equals_bank_wide(small_artifact, real_patches):
    artifact = load_artifact(small_artifact)
    index = read_index(artifact)
    with_graph = MemoryBank(artifact.bank, index, search="pruned")
    without = MemoryBank(artifact.bank, index.__class__(index.mean, index.basis, None), search="pruned")
    k = artifact.manifest.num_neighbors
    assert index.knn.shape == (len(artifact.bank), k) and np.all(index.knn[:, 0] == np.arange(len(artifact.bank)))
    dist, rows = with_graph.nearest(real_patches)
    for p in np.linspace(0, len(real_patches) - 1, 60).astype(int):
        args = (real_patches[p], float(dist[p, 0]), int(rows[p, 0]), k)
        assert reweight(with_graph, *args) == reweight(without, *args)


def strip_index(folder):
    manifest = read_manifest(folder)
    for name in manifest.extra_files.values():
        (folder / name).unlink()
    write_manifest(folder, manifest.model_copy(update={"extra_files": {}, "search": None}))


def test_artifact_without_index_still_scores_and_can_be_indexed(small_artifact, sample_data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(small_artifact, old)
    strip_index(old)
    images = [read_image(p) for p in list_images(sample_data / "test")[::3]]
    plain = Inspector(old, device="cpu")
    assert plain.bank.search is None and plain.bank.knn is None
    with pytest.raises(ValueError, match=re.escape(f"add it with `patchline index {old}`")):
        Inspector(old, device="cpu", approximate=True)
    indexed = Inspector(small_artifact, device="cpu")
    for rgb in images:
        got, want = plain.inspect(rgb), indexed.inspect(rgb)
        # The plain search's float32 matrix form is the only difference: ~1e-4 relative at most here.
        assert got.score == pytest.approx(want.score, rel=1e-3)
    add_index(old)
    assert load_artifact(old).manifest.search.held_out == "bank rows"  # no training images here: bank rows held out
    for search in ("pruned", "plain"):
        got = Inspector(old, device="cpu", search=search).inspect(images[0]).score
        assert got == Inspector(small_artifact, device="cpu", search=search).inspect(images[0]).score


def test_damaged_index_is_refused_with_the_file_named(small_artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_artifact, broken)
    manifest = read_manifest(broken)
    np.savez(broken / manifest.extra_files[PROJECTION_KEY], mean=np.zeros(3, np.float32), basis=np.zeros((3, 1), np.float32))
    write_manifest(broken, manifest)  # checksums match: the shape check must catch it
    with pytest.raises(ArtifactError, match="bank_projection.npz"):
        Inspector(broken, device="cpu")
    (broken / manifest.extra_files[KNN_KEY]).write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(broken)


def test_export_measures_the_default_search_on_held_out_training_images(small_artifact):
    manifest = load_artifact(small_artifact).manifest
    choice = manifest.search
    grid = manifest.model.patch_grid
    assert choice.held_out == "training images" and choice.frames == 4 and choice.queries == grid[0] * grid[1]
    assert choice.dims == SEARCH_DIMS and 0.0 <= choice.pruning_rate <= 1.0 and choice.cpu == cpu_model()
    # The rule, whatever the timings were: pruned only when clearly faster than plain.
    assert (choice.method == "pruned") == (choice.pruned_ms <= PRUNED_MAX_RATIO * choice.plain_ms)
    # The runtime runs what the measurement chose, and either can be asked for.
    assert (Inspector(small_artifact).bank.search is None) == (choice.method == "plain")
    assert Inspector(small_artifact, search="pruned").bank.search is not None
    assert Inspector(small_artifact, search="plain").bank.search is None


def test_measured_pruning_rate_follows_the_bank():
    rng = np.random.default_rng(7)
    structured_bank = structured(rng, 3000, 96, rank=8)
    gaussian_bank = rng.standard_normal((3000, 96), dtype=np.float32)
    rates = {}
    for name, bank in (("structured", structured_bank), ("gaussian", gaussian_bank)):
        mean, basis = principal_directions(bank, 32)
        choice = measure_search(bank, BankIndex(mean, basis), held_out_bank_rows(bank), dims=32, rounds=1)
        assert choice.held_out == "bank rows" and choice.queries == 3000 // 8 and choice.frames == 1
        rates[name] = choice.pruning_rate
    assert rates["structured"] > 0.9 and rates["gaussian"] < 0.1


def test_patchline_index_measures_again_on_given_images(small_artifact, sample_data, tmp_path, capsys):
    folder = tmp_path / "art"
    shutil.copytree(small_artifact, folder)
    main(["index", str(folder), "--images", str(sample_data / "test" / "good")])
    printed = json.loads(capsys.readouterr().out)
    choice = load_artifact(folder).manifest.search
    assert printed["search"] == choice.model_dump() and choice.held_out == "given images" and choice.frames == 4


def test_another_machine_measures_the_search_again_at_load(small_artifact, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(small_artifact, folder)
    assert index_for_this_machine(load_artifact(folder)).choice == load_artifact(folder).manifest.search
    data = json.loads((folder / "manifest.json").read_text())
    data["search"].update(cpu="a processor measured elsewhere", threads=64)
    (folder / "manifest.json").write_text(json.dumps(data))
    choice = index_for_this_machine(load_artifact(folder)).choice
    assert choice.cpu == cpu_model() and choice.threads == len(os.sched_getaffinity(0))
    assert choice.held_out == "bank rows"
    assert load_artifact(folder).manifest.search.cpu == "a processor measured elsewhere"  # measured in memory only


@pytest.mark.parametrize("change, message", [
    ({"method": "fastest"}, "search.method: Input should be 'pruned' or 'plain'"),
    ({"pruning_rate": 1.5}, "search.pruning_rate: Input should be less than or equal to 1"),
    ({"method": "pruned", "dims": 999}, "search 'pruned' on 999 directions needs a bank projection with as many; "
                                        "the artifact has 128"),
])
def test_a_bad_search_choice_is_refused_naming_it(small_artifact, tmp_path, change, message):
    folder = tmp_path / "art"
    shutil.copytree(small_artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["search"].update(change)
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=re.escape(message)):
        Inspector(folder)
