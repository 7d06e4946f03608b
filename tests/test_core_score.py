"""The anomaly map's nearest upsampling: torch's 'nearest' exactly, with index arrays made once per grid and size."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the export extra: not in the runtime-only venv

from patchline.runtime.score import _nearest_indices, anomaly_map


@pytest.mark.parametrize("grid,size", [((16, 16), (128, 128)), ((7, 5), (100, 33)), ((28, 28), (224, 200))])
def test_nearest_upsampling_is_torchs_and_its_indices_are_cached_read_only(grid, size):
    scores = np.random.default_rng(0).random(grid).astype(np.float32)
    rows, cols = _nearest_indices(*grid, *size)
    want = torch.nn.functional.interpolate(torch.from_numpy(scores)[None, None], size=size, mode="nearest")[0, 0]
    np.testing.assert_array_equal(scores[np.ix_(rows, cols)], want.numpy())
    assert _nearest_indices(*grid, *size)[0] is rows
    with pytest.raises(ValueError, match="read-only"):
        rows[0] = 1
    first = anomaly_map(scores, size)
    np.testing.assert_array_equal(anomaly_map(scores, size), first)
