import numpy as np

from lm_probe.functional.stats import welford_merge, welford_update


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
