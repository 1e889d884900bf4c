import numpy as np

from lm_probe.functional.stats import comoment_update, welford_merge, welford_update


def test_welford_matches_numpy_float64():
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(503, 7)) * 1000 + 1e4).astype(np.float32)
    n, mean, m2 = 0, np.zeros(7), np.zeros(7)
    for start in range(0, len(data), 37):
        n, mean, m2 = welford_update(n, mean, m2, data[start:start + 37])
    ref = data.astype(np.float64)
    assert n == 503
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m2 / (n - 1), ref.var(0, ddof=1), rtol=1e-10)


def test_merge_of_halves_equals_one_pass():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(200, 3))
    a = welford_update(0, np.zeros(3), np.zeros(3), data[:71])
    b = welford_update(0, np.zeros(3), np.zeros(3), data[71:])
    n, mean, m2 = welford_merge(*a, *b)
    one = welford_update(0, np.zeros(3), np.zeros(3), data)
    assert n == one[0]
    np.testing.assert_allclose(mean, one[1], rtol=1e-12)
    np.testing.assert_allclose(m2, one[2], rtol=1e-10)


def test_empty_batch_changes_nothing():
    state = welford_update(0, np.zeros(2), np.zeros(2), np.ones((3, 2)))
    assert welford_update(*state, np.zeros((0, 2)))[0] == 3


def test_comoment_update_matches_numpy_float64():
    """Batches folded in place equal the co-moment of all rows at once (large means, x and y
    of different widths, a one-row and an empty batch, a C that BLAS cannot update in place)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 6)) * 3 + 400.0  # massive activations: means far from 0
    y = x[:, :4] @ rng.normal(size=(4, 5)) + rng.normal(size=(70, 5)) - 50.0
    reference = (x - x.mean(0)).T @ (y - y.mean(0))  # numpy float64, two-pass
    for C in (np.zeros((6, 5)), np.zeros((5, 6)).T):  # C order (in-place dgemm), and Fortran order
        state = (0, np.zeros(6), np.zeros(5), C)
        for lo, hi in ((0, 16), (16, 17), (17, 17), (17, 50), (50, 70)):
            state = comoment_update(*state, x[lo:hi], y[lo:hi])
        n, mx, my, out = state
        assert n == 70 and out is C
        np.testing.assert_allclose(mx, x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(my, y.mean(0), rtol=1e-13)
        np.testing.assert_allclose(out, reference, rtol=1e-10, atol=1e-9)
