"""The statistics of `--compare`, made for what these runs are: a few hundred held-out problems drawn from a
few templates, a handful of seeds, one reward per step.

- Problems of one template succeed and fail together, so a mean over problems is treated as a mean over
  templates: `clustered_mean` gives the cluster-robust standard error CR2 (Bell and McCaffrey, 2002) with
  their degrees of freedom, the small-sample correction meant for few clusters: G − 1 for G templates of
  one size, fewer where sizes differ (t(G − 1) would then be too narrow); with one problem per cluster it is
  the usual s/√n on n − 1. A difference between runs is taken per problem first (paired), then averaged.
- Seeds: `seed_interval` is the t interval of a few values (one per seed). `with_seed_spread` adds the
  spread between seeds to a clustered difference: a seed's luck moves every problem alike, which no
  clustering by problem can see (a side of one seed is given the spread of the other's).
- `slope` is the least-squares slope of y on x with its classical t interval for one run; for several runs
  (seeds) the mean of their slopes with the t interval across them, since seeds' slopes differ by more
  than the noise around each fit.
- `detectable` is the smallest true difference that a design with this standard error finds at the 95%
  level (or a stricter one, for several comparisons) with 80% power (the usual approximation; below).

Pure Python (math only): no SciPy. `t_quantile` inverts the t distribution's CDF, written with the
regularised incomplete beta function (a continued fraction, as in Numerical Recipes §6.4).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for 0 ≤ x ≤ 1."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the continued fraction converges fast below this point
        return 1 - _incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):  # Lentz's method: even and odd steps of the continued fraction
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * result


def t_cdf(x: float, df: float) -> float:
    """P(T ≤ x) for Student's t with `df` degrees of freedom (df = inf: the normal distribution)."""
    if math.isinf(df):
        return 0.5 * math.erfc(-x / math.sqrt(2))
    tail = 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + x * x))
    return 1 - tail if x >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """x with P(T ≤ x) = p, by bisection (to 1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"p: expected in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df: expected > 0, got {df}")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > p:
        low *= 2
    while t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-12 * max(1.0, abs(high)):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


class Clustered(NamedTuple):
    """A mean with its standard error and degrees of freedom, and what it rests on: `clusters` templates
    (G), `n` problems, and the seeds of each side whose spread `with_seed_spread` added (() where none)."""
    mean: float
    se: float
    df: float
    clusters: int
    n: int
    seeds: tuple = ()


def clustered_mean(values: list[float], clusters: list) -> Clustered:
    """The mean of `values`, whose entries with the same cluster label are correlated, with its CR2 standard
    error. For the mean alone (an intercept-only regression) CR2 reduces to

        Var = Σ_g (Σ_{i in g} e_i)² / (n² (1 − n_g / n)),   e_i = x_i − mean,

    and its degrees of freedom (Bell and McCaffrey's Satterthwaite approximation, as Imbens and Kolesár
    (2016) recommend with few clusters) to (tr B)² / Σ B² = 1 / (n² Σ B²), with the G × G matrix
    B = diag(n_g k_g²) / n² − u uᵀ / n³, k_g = 1 / √(1 − n_g / n), u_g = n_g k_g: G − 1 for clusters of one
    size, fewer for unequal ones. A standard error within rounding of 0 is returned as exactly 0: every
    cluster's mean is then the same, and no interval can be had. Needs at least two clusters (one cluster
    carries no information about its own spread)."""
    if len(values) != len(clusters) or not values:
        raise ValueError(f"values, clusters: expected two non-empty lists of one length, got {len(values)} and {len(clusters)}")
    n = len(values)
    mean = math.fsum(values) / n
    sums, sizes = defaultdict(float), defaultdict(int)
    for x, g in zip(values, clusters):
        sums[g] += x - mean
        sizes[g] += 1
    if len(sums) < 2:
        raise ValueError(f"clusters: expected at least two different clusters, got {len(sums)}")
    variance = sum(sums[g] ** 2 / (1 - sizes[g] / n) for g in sums) / n**2
    # Rounding: the sums of e_i are all 0 (tested before the leverage 1 / (1 − n_g / n), which can reach n)
    if math.sqrt(sum(x * x for x in sums.values())) / n <= 1e-12 * max(abs(x) for x in values):
        variance = 0.0
    k2 = [1 / (1 - size / n) for size in sizes.values()]
    diagonal = [size * k / n**2 for size, k in zip(sizes.values(), k2)]
    u2 = [size**2 * k for size, k in zip(sizes.values(), k2)]
    squares = sum(d * d - 2 * d * u / n**3 for d, u in zip(diagonal, u2)) + (sum(u2) / n**3) ** 2  # Σ B², in O(G)
    return Clustered(mean, math.sqrt(variance), min(len(sums) - 1, 1 / (n**2 * squares)), len(sums), n)


def with_seed_spread(result: Clustered, samples: list[list[float]]) -> Clustered:
    """`result` (a clustered difference a − b of settings' per-problem means over seeds) widened by the spread
    between seeds. `samples`: one list of per-seed means (over the same problems) for each independent side:
    [a's seeds, b's seeds] for two settings, or [each seed's change] for one setting against its own start.
    The variances add, Var = se² + Σ s²_k / n_k, on Welch–Satterthwaite degrees of freedom. A side of one seed
    has no spread of its own: where any side has one, every side takes the variance pooled over the sides
    with two or more, s²_pool · Σ 1 / n_k on Σ (n_k − 1) degrees of freedom (the seeds of both settings
    assumed to vary alike). A seed's noise on single problems counts in both parts, so this errs wide. At
    least one sample needs two or more seeds."""
    if not samples or any(len(s) < 1 for s in samples) or all(len(s) < 2 for s in samples):
        raise ValueError(f"samples: expected non-empty lists of per-seed values, one with two or more, got sizes "
                         f"{[len(s) for s in samples]}")
    spread = [(sum((x - math.fsum(s) / len(s)) ** 2 for x in s), len(s) - 1) for s in samples]  # (Σ (x − mean)², n − 1)
    parts = [(result.se**2, result.df)]
    if all(len(s) > 1 for s in samples):
        parts += [(squares / df / (df + 1), df) for squares, df in spread]
    else:
        pooled_df = sum(df for _, df in spread)
        pooled = sum(squares for squares, _ in spread) / pooled_df
        parts.append((pooled * sum(1 / len(s) for s in samples), pooled_df))
    total = sum(v for v, _ in parts)
    df = total**2 / sum(v * v / d for v, d in parts if v > 0) if total > 0 else result.df
    return result._replace(se=math.sqrt(total), df=df, seeds=tuple(len(s) for s in samples))


def interval(mean: float, se: float, df: float, level: float = 0.95) -> tuple[float, float]:
    half = t_quantile(0.5 + level / 2, df) * se
    return mean - half, mean + half


def detectable(se: float, df: float, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true difference found (two-sided, at `level`; for one of m comparisons under Holm's
    adjustment, 1 − 0.05 / m: its first step) with probability `power`: the usual (t_{1−α/2} + t_{power})·se.
    With the standard error itself estimated, its power is about `power` from about 8 degrees of freedom on,
    and less below (at 80%: about 78% on 3, 77% on 2, 73% on 1)."""
    return (t_quantile(0.5 + level / 2, df) + t_quantile(power, df)) * se


def seed_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a few values, one per seed: the t interval with n − 1 degrees of freedom; with
    one value the interval is unknown (NaN)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    se = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1) / n)
    return (mean, *interval(mean, se, n - 1, level))


def slope(points: list[tuple[float, float, object]]) -> tuple[float, float, int]:
    """(slope, standard error, degrees of freedom) of y on x from (x, y, run) points. One run: the least-squares
    slope with its classical error on n − 2 degrees of freedom. Several runs (seeds of one setting): the mean of
    each run's slope with the standard error across runs on runs − 1 (a pooled fit would describe these runs
    alone, not the setting: seeds' slopes differ by more than the noise around each fit). A run with fewer than
    two different x has no slope and is left out."""
    by_run = defaultdict(list)
    for x, y, run in points:
        by_run[run].append((x, y))
    fits = [_fit(rows) for rows in by_run.values() if len({x for x, _ in rows}) > 1]
    if len(fits) > 1:
        slopes = [b for b, _, _ in fits]
        mean = math.fsum(slopes) / len(slopes)
        return mean, math.sqrt(sum((b - mean) ** 2 for b in slopes) / (len(slopes) - 1) / len(slopes)), len(slopes) - 1
    if not fits or fits[0][2] < 1:
        raise ValueError(f"points: expected a run of at least 3 points with two different x, or two runs of 2, got {len(points)} "
                         f"point(s) in {len(by_run)} run(s)")
    return fits[0]


def _fit(rows: list[tuple[float, float]]) -> tuple[float, float, int]:
    """The least-squares slope of one run's (x, y) rows, its classical standard error (NaN with two rows) and
    n − 2 degrees of freedom."""
    mx, my = sum(x for x, _ in rows) / len(rows), sum(y for _, y in rows) / len(rows)
    sxx = sum((x - mx) ** 2 for x, _ in rows)
    b = sum((x - mx) * (y - my) for x, y in rows) / sxx
    df = len(rows) - 2
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in rows) / df if df else math.nan
    return b, math.sqrt(residual / sxx), df
