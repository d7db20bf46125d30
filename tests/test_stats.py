"""trainer/stats.py: the t distribution against printed tables, CR2 against its matrix form in float64,
the fixed-effects slope against a least-squares solve, and what the intervals promise."""

import math
import random

import numpy as np
import pytest
from hypothesis import given, strategies as st

from trainer import stats


@pytest.mark.parametrize("df, q975, q80", [(1, 12.7062, 1.3764), (2, 4.3027, 1.0607), (4, 2.7764, 0.9410),
                                            (16, 2.1199, 0.8647), (24, 2.0639, 0.8569), (math.inf, 1.9600, 0.8416)])
def test_t_quantiles_are_the_printed_tables(df, q975, q80):
    assert stats.t_quantile(0.975, df) == pytest.approx(q975, abs=1e-4)
    assert stats.t_quantile(0.8, df) == pytest.approx(q80, abs=1e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-q975, abs=1e-4)


def naive_cr2(values, clusters):
    """CR2 by its definition: V = (X'X)⁻¹ Σ_g X_g' A_g e_g e_g' A_g X_g (X'X)⁻¹, A_g = (I − H_gg)^(−1/2),
    for the intercept-only regression X = 1."""
    y = np.asarray(values, dtype=np.float64)
    x = np.ones((len(y), 1))
    bread = np.linalg.inv(x.T @ x)
    e = y - x @ (bread @ x.T @ y)
    meat = np.zeros((1, 1))
    for g in set(clusters):
        rows = [i for i, c in enumerate(clusters) if c == g]
        xg = x[rows]
        w, v = np.linalg.eigh(np.eye(len(rows)) - xg @ bread @ xg.T)
        a = v @ np.diag(w ** -0.5) @ v.T
        u = xg.T @ a @ e[rows]
        meat += np.outer(u, u)
    return math.sqrt((bread @ meat @ bread)[0, 0])


CLUSTERED = st.integers(2, 6).flatmap(lambda g: st.lists(
    st.tuples(st.floats(-1, 1, allow_nan=False), st.integers(0, g - 1)), min_size=g + 1, max_size=30)
    .filter(lambda rows: len({c for _, c in rows}) >= 2))


@given(CLUSTERED)
def test_cr2_equals_its_matrix_definition_in_float64(rows):
    values, clusters = [v for v, _ in rows], [c for _, c in rows]
    mean, se, df = stats.clustered_mean(values, clusters)
    assert mean == pytest.approx(float(np.mean(values)))
    assert se == pytest.approx(naive_cr2(values, clusters), rel=1e-9, abs=1e-12)
    assert df == len(set(clusters)) - 1


def test_one_problem_per_cluster_gives_the_usual_standard_error():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    mean, se, df = stats.clustered_mean(values, list(range(len(values))))
    assert se == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert df == len(values) - 1


def test_correlated_problems_widen_the_interval_and_reduce_the_degrees_of_freedom():
    """Ten templates of ten problems each, all alike within a template: as informative as ten problems."""
    rng = random.Random(0)
    template_outcome = [rng.random() < 0.5 for _ in range(10)]
    values = [float(template_outcome[t]) for t in range(10) for _ in range(10)]
    clusters = [t for t in range(10) for _ in range(10)]
    _, clustered, df = stats.clustered_mean(values, clusters)
    _, independent, _ = stats.clustered_mean(values, list(range(100)))
    assert df == 9 and clustered > 2.5 * independent


def test_the_clustered_interval_covers_the_truth_at_about_its_level():
    """Simulated paired differences with a template effect: the 95% interval covers the true mean 0 in
    about 95% of 400 replications (binomial spread: 0.92-0.98)."""
    rng = random.Random(1)
    covered = 0
    for _ in range(400):
        effects = [rng.gauss(0, 0.3) for _ in range(12)]
        values = [effects[t] + rng.gauss(0, 0.5) for t in range(12) for _ in range(8)]
        mean, se, df = stats.clustered_mean(values, [t for t in range(12) for _ in range(8)])
        low, high = stats.interval(mean, se, df)
        covered += low <= 0 <= high  # the templates' effects are drawn around 0
    assert 0.92 <= covered / 400 <= 0.98


def test_a_single_cluster_is_refused_naming_it():
    with pytest.raises(ValueError, match="clusters"):
        stats.clustered_mean([0.0, 1.0], ["a", "a"])


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=12, max_size=12), st.integers(1, 3))
def test_the_fixed_effects_slope_is_the_least_squares_solution(noise, runs):
    points = [(x, 0.1 * x + r + noise[(x + 4 * r) % 12], r) for r in range(runs) for x in range(4)]
    design = np.array([[x] + [float(r == k) for k in range(runs)] for x, _, r in points])
    y = np.array([y for _, y, _ in points])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    df = len(points) - runs - 1
    covariance = residual @ residual / df * np.linalg.inv(design.T @ design)
    b, se, got_df = stats.slope(points)
    assert b == pytest.approx(coef[0], abs=1e-9)
    assert se == pytest.approx(math.sqrt(covariance[0, 0]), rel=1e-7, abs=1e-12)
    assert got_df == df


def test_seed_interval_is_the_t_interval_and_unknown_for_one_seed():
    mean, low, high = stats.seed_interval([0.20, 0.25, 0.30])
    assert mean == pytest.approx(0.25)
    assert high - mean == pytest.approx(4.3027 * 0.05 / math.sqrt(3), abs=1e-4)
    assert math.isnan(stats.seed_interval([0.3])[1])


def test_the_detectable_difference_is_found_with_the_stated_power():
    """With a true difference of `detectable`, the t statistic (estimated standard error, df degrees of
    freedom) passes the 95% critical value in about 80% of draws."""
    se, df = 0.05, 16
    shift = stats.detectable(se, df) / se
    critical = stats.t_quantile(0.975, df)
    rng = random.Random(2)
    found = sum(abs((shift + rng.gauss(0, 1)) / math.sqrt(rng.gammavariate(df / 2, 2) / df)) > critical
                for _ in range(4000))
    assert 0.77 <= found / 4000 <= 0.83
