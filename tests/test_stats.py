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


# scipy 1.17.1's stats.t.cdf (scipy is no dependency: computed once and written here); near 0 at large df, where the
# continued fraction of I_x converges slowly unless it switches to 1 − I_{1−x}(b, a), and in the tails down to 1e-6
@pytest.mark.parametrize("x, df, expected", [(0.05, 100, 0.5198889391290129), (-0.05, 200, 0.48008614343663325),
                                             (0.5, 3, 0.6742760175759245), (-2.5, 10, 0.01572342211830441),
                                             (-4.911206936813671, 182.8224, 9.999999999999961e-07),
                                             (-12.7062, 1, 0.0250000092803552), (1.3, 1.5, 0.8209853043992096),
                                             (-6.0, 2.5, 0.0076408649427614495)])
def test_t_cdf_is_scipys_to_1e_9_near_0_and_in_the_tails(x, df, expected):
    assert stats.t_cdf(x, df) == pytest.approx(expected, rel=1e-9)
    assert 1 - stats.t_cdf(-x, df) == pytest.approx(expected, rel=1e-9)


# scipy 1.17.1's stats.t.ppf, as above: the bisection stops at 1e-12, far inside 1e-9
@pytest.mark.parametrize("p, df, expected", [(1e-6, 1, -318309.8861827435), (1e-6, 200, -4.897302102826782),
                                             (0.025, 1.5, -6.016663104427933), (0.2, 3, -0.9784723123633038),
                                             (0.45, 30, -0.12672961313207354), (0.975, 200, 1.9718962236339088),
                                             (1 - 1e-6, 4, 41.5778541501515), (0.8, 7.3, 0.8936713571802273)])
def test_t_quantile_is_scipys_to_1e_9_down_to_tails_of_1e_6(p, df, expected):
    assert stats.t_quantile(p, df) == pytest.approx(expected, rel=1e-9)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-expected, rel=1e-9)


def naive_cr2(values, clusters):
    """CR2 by its definition, V = (X'X)⁻¹ Σ_g X_g' A_g e_g e_g' A_g X_g (X'X)⁻¹, A_g = (I − H_gg)^(−1/2), for
    the intercept-only regression X = 1; and Bell and McCaffrey's degrees of freedom by theirs: V = y' Ω y
    with Ω = (I − H) C (I − H), C = Σ_g c_g c_g', c_g = (X'X)⁻¹ X_g' A_g on cluster g's rows, so that
    df = tr(Ω)² / tr(Ω²) (the errors independent and of one variance). Returns (se, df)."""
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    x = np.ones((n, 1))
    bread = np.linalg.inv(x.T @ x)
    hat = x @ bread @ x.T
    e = y - hat @ y
    meat, c = np.zeros((1, 1)), np.zeros((n, n))
    for g in set(clusters):
        rows = [i for i, k in enumerate(clusters) if k == g]
        xg = x[rows]
        w, v = np.linalg.eigh(np.eye(len(rows)) - xg @ bread @ xg.T)
        a = v @ np.diag(w ** -0.5) @ v.T
        u = xg.T @ a @ e[rows]
        meat += np.outer(u, u)
        cg = np.zeros(n)
        cg[rows] = (bread @ xg.T @ a)[0]
        c += np.outer(cg, cg)
    omega = (np.eye(n) - hat) @ c @ (np.eye(n) - hat)
    return math.sqrt((bread @ meat @ bread)[0, 0]), np.trace(omega) ** 2 / np.trace(omega @ omega)


CLUSTERED = st.integers(2, 6).flatmap(lambda g: st.lists(
    st.tuples(st.floats(-1, 1, allow_nan=False), st.integers(0, g - 1)), min_size=g + 1, max_size=30)
    .filter(lambda rows: len({c for _, c in rows}) >= 2))


@given(CLUSTERED)
def test_cr2_and_its_degrees_of_freedom_equal_their_matrix_definitions_in_float64(rows):
    values, clusters = [v for v, _ in rows], [c for _, c in rows]
    result = stats.clustered_mean(values, clusters)
    se, df = naive_cr2(values, clusters)
    assert result.mean == pytest.approx(float(np.mean(values)))
    assert result.se == pytest.approx(se, rel=1e-9, abs=1e-12)
    assert result.df == pytest.approx(df, rel=1e-9) and result.df <= len(set(clusters)) - 1
    assert (result.clusters, result.n, result.seeds) == (len(set(clusters)), len(values), ())


def test_clusters_of_one_size_give_g_minus_1_and_unequal_ones_fewer():
    values = [float(i % 3 == 0) for i in range(24)]
    assert stats.clustered_mean(values, [i // 6 for i in range(24)]).df == pytest.approx(3)  # 4 templates of 6
    one_large = stats.clustered_mean(values, [min(i, 5) for i in range(24)])  # five problems alone, 19 in one
    assert one_large.df == pytest.approx(naive_cr2(values, [min(i, 5) for i in range(24)])[1]) and one_large.df < 1.5


def test_one_problem_per_cluster_gives_the_usual_standard_error():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    result = stats.clustered_mean(values, list(range(len(values))))
    assert result.se == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert result.df == pytest.approx(len(values) - 1)


def test_correlated_problems_widen_the_interval_and_reduce_the_degrees_of_freedom():
    """Ten templates of ten problems each, all alike within a template: as informative as ten problems."""
    rng = random.Random(0)
    template_outcome = [rng.random() < 0.5 for _ in range(10)]
    values = [float(template_outcome[t]) for t in range(10) for _ in range(10)]
    clustered = stats.clustered_mean(values, [t for t in range(10) for _ in range(10)])
    independent = stats.clustered_mean(values, list(range(100)))
    assert clustered.df == pytest.approx(9) and clustered.se > 2.5 * independent.se


@pytest.mark.parametrize("values, clusters", [([0.1] * 10, [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]),
                                              ([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0], [i // 4 for i in range(8)])])
def test_no_spread_between_clusters_gives_a_standard_error_of_exactly_0(values, clusters):
    """Every cluster's mean the same (0.1 up to rounding; or two templates of 4 problems that gain half each
    although single problems differ): exactly 0, not a rounding residue that a t test would read as p = 0."""
    assert stats.clustered_mean(values, clusters).se == 0.0


def test_no_spread_is_exactly_0_also_where_the_mean_is_0_or_one_template_holds_nearly_every_problem():
    """Each template's differences sum to 0 up to rounding, so the mean is a rounding residue (~1e-17) too: the
    threshold is relative to the values, not to their mean. And one problem beside 1,499 in one template: that
    template's leverage 1 / (1 − n_g / n) of about n must not lift its rounding residue past the threshold."""
    assert stats.clustered_mean([0.1, 0.2, -0.3, 0.3, -0.1, -0.2], [0, 0, 0, 1, 1, 1]).se == 0.0
    assert stats.clustered_mean([0.1] * 1500, [0] + [1] * 1499).se == 0.0


def test_the_clustered_interval_covers_the_truth_at_about_its_level():
    """Simulated paired differences with a template effect: the 95% interval covers the true mean 0 in
    about 95% of 400 replications (binomial spread: 0.92-0.98)."""
    rng = random.Random(1)
    covered = 0
    for _ in range(400):
        effects = [rng.gauss(0, 0.3) for _ in range(12)]
        values = [effects[t] + rng.gauss(0, 0.5) for t in range(12) for _ in range(8)]
        result = stats.clustered_mean(values, [t for t in range(12) for _ in range(8)])
        low, high = stats.interval(result.mean, result.se, result.df)
        covered += low <= 0 <= high  # the templates' effects are drawn around 0
    assert 0.92 <= covered / 400 <= 0.98


def test_unequal_templates_keep_the_interval_at_its_level_where_g_minus_1_would_not():
    """Five problems alone and 40 in one template, no template effect: t(G − 1) = t(5), as an earlier version
    of this module had it, covers the truth far less than 95%; Bell and McCaffrey's degrees of freedom (1.2
    here) cover it at least that often (they err wide with such unequal clusters)."""
    rng = random.Random(4)
    clusters = [min(i, 5) for i in range(45)]
    covered = {"bell-mccaffrey": 0, "g - 1": 0}
    for _ in range(1000):
        result = stats.clustered_mean([rng.gauss(0, 1) for _ in clusters], clusters)
        for name, df in (("bell-mccaffrey", result.df), ("g - 1", result.clusters - 1)):
            low, high = stats.interval(result.mean, result.se, df)
            covered[name] += low <= 0 <= high
    assert covered["g - 1"] / 1000 < 0.9 and covered["bell-mccaffrey"] / 1000 >= 0.94


def test_the_spread_between_seeds_adds_its_variance_on_welch_satterthwaite_degrees_of_freedom():
    clustered = stats.clustered_mean([0.1, 0.3, 0.0, 0.2, 0.4, 0.1], [0, 0, 1, 1, 2, 2])
    a, b = [0.30, 0.36, 0.27], [0.20, 0.22]
    result = stats.with_seed_spread(clustered, [a, b])
    parts = [(clustered.se ** 2, clustered.df), (np.var(a, ddof=1) / 3, 2), (np.var(b, ddof=1) / 2, 1)]
    total = sum(v for v, _ in parts)
    assert result.se == pytest.approx(math.sqrt(total))
    assert result.df == pytest.approx(total ** 2 / sum(v * v / d for v, d in parts))
    assert (result.mean, result.clusters, result.n, result.seeds) == (clustered.mean, 3, 6, (3, 2))
    with pytest.raises(ValueError, match="samples"):
        stats.with_seed_spread(clustered, [a, []])


@pytest.mark.parametrize("seeds_b", [3, 1])
def test_a_seed_shift_that_moves_every_problem_alike_is_in_the_interval_with_seeds(seeds_b):
    """Two settings of one method (no true difference), 3 seeds against 3 or 1; a seed's luck (sd 4 points)
    moves all of its problems. Clustering by problem alone says "excludes 0" far more often than 5%; with the
    spread between seeds added (against one seed: the other setting's, pooled) it is near 5% or below."""
    rng = random.Random(5)
    templates = [t for t in range(17) for _ in range(8)]
    outside = {"templates only": 0, "with seeds": 0}
    for _ in range(300):
        effect = [rng.gauss(0, 0.15) for _ in range(17)]

        def setting(n):  # (per-problem means over n seeds, per-seed means over problems)
            seeds = [[effect[t] + shift + rng.gauss(0, 0.3) for t in templates] for shift in (rng.gauss(0, 0.04) for _ in range(n))]
            return [sum(s[i] for s in seeds) / n for i in range(len(templates))], [sum(s) / len(s) for s in seeds]

        (a, seeds_a), (b, seeds_b_means) = setting(3), setting(seeds_b)
        clustered = stats.clustered_mean([x - y for x, y in zip(a, b)], templates)
        with_seeds = stats.with_seed_spread(clustered, [seeds_a, seeds_b_means])
        for name, result in (("templates only", clustered), ("with seeds", with_seeds)):
            low, high = stats.interval(result.mean, result.se, result.df)
            outside[name] += not low <= 0 <= high
    assert outside["templates only"] / 300 > 0.15 and outside["with seeds"] / 300 <= 0.07, outside


def test_a_side_of_one_seed_takes_the_spread_pooled_over_the_others():
    clustered = stats.clustered_mean([0.1, 0.3, 0.0, 0.2, 0.4, 0.1], [0, 0, 1, 1, 2, 2])
    a, b, c = [0.30, 0.36, 0.27], [0.20, 0.22], [0.25]
    result = stats.with_seed_spread(clustered, [a, c])
    assert result.seeds == (3, 1)
    parts = [(clustered.se ** 2, clustered.df), (np.var(a, ddof=1) * (1 / 3 + 1), 2)]
    total = sum(v for v, _ in parts)
    assert result.se == pytest.approx(math.sqrt(total)) and result.df == pytest.approx(total ** 2 / sum(v * v / d for v, d in parts))
    pooled = (np.var(a, ddof=1) * 2 + np.var(b, ddof=1) * 1) / 3  # three sides, one of one seed: pooled over two
    three = stats.with_seed_spread(clustered, [a, b, c])
    assert three.se == pytest.approx(math.sqrt(clustered.se ** 2 + pooled * (1 / 3 + 1 / 2 + 1)))
    with pytest.raises(ValueError, match="samples"):
        stats.with_seed_spread(clustered, [[0.3], [0.2]])


def test_a_single_cluster_is_refused_naming_it():
    with pytest.raises(ValueError, match="clusters"):
        stats.clustered_mean([0.0, 1.0], ["a", "a"])


def least_squares_slope(points):
    """numpy's least-squares slope of one run's (x, y) points and its classical standard error."""
    design = np.array([[x, 1.0] for x, _ in points])
    y = np.array([y for _, y in points])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    return coef[0], math.sqrt(residual @ residual / (len(points) - 2) * np.linalg.inv(design.T @ design)[0, 0])


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=12, max_size=12), st.integers(1, 3))
def test_the_slope_is_the_least_squares_one_for_a_run_and_the_mean_across_seeds(noise, runs):
    points = [(x, 0.1 * x + r + noise[(x + 4 * r) % 12], r) for r in range(runs) for x in range(4)]
    fits = [least_squares_slope([(x, y) for x, y, run in points if run == r]) for r in range(runs)]
    b, se, df = stats.slope(points)
    if runs == 1:
        assert (b, se, df) == pytest.approx((*fits[0], 2), rel=1e-7, abs=1e-9)
    else:
        slopes = [slope for slope, _ in fits]
        assert (b, se, df) == pytest.approx((np.mean(slopes), np.std(slopes, ddof=1) / math.sqrt(runs), runs - 1), rel=1e-7, abs=1e-9)


def test_a_slope_needs_a_run_of_three_points_or_two_runs_and_a_run_at_one_x_is_left_out():
    with pytest.raises(ValueError, match="points"):
        stats.slope([(0, 0.1, "a"), (1, 0.3, "a")])  # two points: nothing left to estimate its error from
    with pytest.raises(ValueError, match="points"):
        stats.slope([(2, 0.1, "a"), (2, 0.3, "a"), (2, 0.2, "a")])  # one x: no slope
    # two runs of two points: slopes 0.2 and 0.1, their mean and its error across the runs; run c has one x
    assert stats.slope([(0, 0.1, "a"), (1, 0.3, "a"), (0, 0.2, "b"), (1, 0.3, "b"), (5, 9.0, "c")]) == pytest.approx((0.15, 0.05, 1))


def test_the_slope_of_seeds_whose_slopes_differ_covers_the_settings_mean_slope():
    """3 seeds × 100 steps whose true slopes scatter (sd 0.0005 about 0.002) around noise of 0.01: the interval
    across seeds covers the mean slope at about its level; a fit pooled over the seeds, on 296 degrees of
    freedom, describes these three runs only and misses it far more often."""
    rng = random.Random(3)
    covered = {"across seeds": 0, "pooled": 0}
    for _ in range(300):
        points = [(x, slope * x + rng.gauss(0, 0.01), run) for run, slope in enumerate(rng.gauss(0.002, 0.0005) for _ in range(3))
                  for x in range(1, 101)]
        b, se, df = stats.slope(points)
        low, high = stats.interval(b, se, df)
        covered["across seeds"] += low <= 0.002 <= high
        means = {run: np.mean([y for _, y, r in points if r == run]) for run in range(3)}
        centred = [(x - 50.5, y - means[run]) for x, y, run in points]
        pooled = sum(x * y for x, y in centred) / sum(x * x for x, _ in centred)
        residual = sum((y - pooled * x) ** 2 for x, y in centred) / (len(points) - 4)
        low, high = stats.interval(pooled, math.sqrt(residual / sum(x * x for x, _ in centred)), len(points) - 4)
        covered["pooled"] += low <= 0.002 <= high
    assert covered["across seeds"] / 300 >= 0.92 and covered["pooled"] / 300 < 0.7, covered


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
