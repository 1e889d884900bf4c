"""The files of a stored run: ChunkedArray reads rows as numpy indexes the whole array."""

from __future__ import annotations

import numpy as np
import pytest

from lm_probe.consumers.store_shards import ChunkedArray

FULL = np.random.default_rng(0).normal(size=(23, 4)).astype(np.float32)
MASK = np.isin(np.arange(23), [3, 10, 22])
KEYS = [-1, 0, 7, np.int64(-3), slice(None), slice(2, 19, 3), slice(None, None, -2), MASK, np.array([-1, 0, 5, 5]),
        [4, -2], np.array([[1, 2], [3, 4]]), (slice(None), 0), (np.array([0, 1]), np.array([2, 3])),
        (3, slice(1, 3)), Ellipsis, (Ellipsis, 1), np.array([], int)]


@pytest.mark.parametrize("key", KEYS, ids=[repr(k)[:40] for k in KEYS])
def test_chunked_array_indexes_as_numpy_indexes_the_full_array(key):
    arr = ChunkedArray([FULL[:5], FULL[5:5], FULL[5:17], FULL[17:]])  # an empty part too
    got, want = arr[key], FULL[key]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("key", [23, -24, np.array([0, 23]), np.zeros(22, bool)])
def test_chunked_array_refuses_what_numpy_refuses(key):
    with pytest.raises(IndexError):
        ChunkedArray([FULL[:5], FULL[5:]])[key]
