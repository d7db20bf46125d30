"""Read-only views of a run, kept out of train_min.py so that the script stays the algorithm.

- `token_html(...)`: a self-contained HTML page (no scripts, no external styles) of a few rollouts, each
  token coloured by its final weight Â (hue: the sign, blue pushed up, red pushed down; darkness: its own
  factor w·ω), with the teacher entropy H, the lookahead-normalised Ĥ^CL, the gate ω, the magnitude w, Â
  and the regime on hover.
- `regime_stats(...)`: what the gate did this step, per token regime (the metrics of train_min.py);
  `dump_tokens(...)` writes the token view of a step's first rollouts.
- `compare_table(run_dirs)`: the accuracy–length table of several runs from their metrics.jsonl and
  config.json alone (`python train_min.py --compare runs/a runs/b`), without loading any model: seeds of
  one setting pooled, differences paired by problem with intervals clustered by template.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass

import egrsd
from trainer import run_io, stats
from trainer.config import with_every_flag
from trainer.tasks import BUILT_IN, load_problems


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, decoded by prefix so that the pieces join back into the whole text. A
    character whose UTF-8 bytes span several tokens goes to the token that completes it (an unfinished one
    decodes as U+FFFD, which the next token may still change), so a token before it adds "": the page draws
    such a token as a small empty box that still shows its signals on hover. (A U+FFFD that no later token
    changes, an invalid byte's or the replacement character's own token, goes to the token after it.)"""
    pieces, emitted = [], ""
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i])
        stable = text if i == len(ids) else text.rstrip("\ufffd")
        pieces.append(stable[len(emitted):] if stable.startswith(emitted) else "")
        emitted = stable if stable.startswith(emitted) else emitted
    return pieces


def _colour(advantage: float, factor: float, low: float, high: float) -> str:
    """The token's style. Hue: the sign of Â (blue +, red −, grey 0); darkness: its factor w·ω within [low,
    high]. A non-finite Â or factor (a skipped step's) has no colour, a dashed outline."""
    if not (math.isfinite(advantage) and math.isfinite(factor)):
        return "outline:1px dashed #000"
    strength = (factor - low) / (high - low) if high > low else 0.5
    hue, saturation = (215, 80) if advantage > 0 else (0, 80) if advantage < 0 else (0, 0)
    return f"background:hsl({hue}, {saturation}%, {92 - 50 * strength:.0f}%)"


def token_html(step: int, rollouts: list[dict], skipped: bool = False) -> str:
    """One page. Each rollout dict: "title" (str), "ids" and "tokens" (each token's id and text), and
    per-token lists "entropy", "entropy_cl", "gate", "magnitude", "advantage", "regime" (names). `skipped`:
    the step was skipped (non-finite, or undone), which the page says first."""
    factors = [w * g for r in rollouts for w, g in zip(r["magnitude"], r["gate"]) if math.isfinite(w * g)]
    low, high = min(factors, default=0.0), max(factors, default=1.0)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>EGRSD tokens, step {step}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "pre{white-space:pre-wrap;font-size:14px;line-height:1.6}span.t{border-radius:2px}"
             "span.t:empty{display:inline-block;min-width:.4em;height:1em;vertical-align:text-bottom}"
             "h3{font-size:15px;margin-top:2em}</style></head><body>",
             f"<h2>Step {step}: token weights Â = A·w·ω</h2>"]
    if skipped:
        parts.append("<p><b>This step was skipped (its loss or gradient was not finite, or its update blew up the "
                     "weights, which were put back): no update was applied.</b></p>")
    parts.append(f"<p>Blue: Â &gt; 0 (a rewarded rollout, reinforced), red: Â &lt; 0 (penalised), grey: A = 0, "
                 f"a dashed outline: not finite. The darker the token, the larger its own factor w·ω (palest "
                 f"{low:.3f}, darkest {high:.3f} on this page). Hover a token for its signals; an empty box is a "
                 f"token that adds no character of its own (part of one that a later token completes).</p>")
    for rollout in rollouts:
        parts.append(f"<h3>{html.escape(rollout['title'])}</h3><pre>")
        for i, text in enumerate(rollout["tokens"]):
            tip = (f"H={rollout['entropy'][i]:.3f} nats, Ĥ_CL={rollout['entropy_cl'][i]:.3f}, "
                   f"ω={rollout['gate'][i]:.3f}, w={rollout['magnitude'][i]:.3f}, Â={rollout['advantage'][i]:+.4f}, "
                   f"{rollout['regime'][i]}")
            colour = _colour(rollout["advantage"][i], rollout["magnitude"][i] * rollout["gate"][i], low, high)
            parts.append(f"<span class='t' data-id='{rollout['ids'][i]}' style='{colour}' "
                         f"title='{html.escape(tip, quote=True)}'>{html.escape(text)}</span>")
        parts.append("</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def _mean(x, chosen):
    return x[chosen].mean().item() if chosen.any() else None


def regime_stats(scores, weights, mask, gates: egrsd.Gates) -> dict:
    """Per step: the means of the signals, and per regime (lock, mid, pivot, fork) its share of the
    tokens, its mean gate (the gate the method applied: 1 without one), and restored_*, the weight the
    lookahead gives back, ω(W) − ω(0) at this γ and W: applied by cl-egrsd, what it would give back for
    the other methods. `gates`: this step's, as computed once (egrsd.GateSettings.gates)."""
    entropy, gate, regimes = scores.teacher_entropy, weights.gate, gates.regimes
    restored = gates.lookahead - gates.plain
    stats = {"gate_mean": _mean(gate, mask), "gate_min": gate[mask].min().item() if mask.any() else None,
             "magnitude_mean": _mean(weights.magnitude, mask), "teacher_entropy_mean": _mean(entropy, mask)}
    for code, name in enumerate(egrsd.REGIMES, start=1):
        chosen = regimes == code
        stats |= {f"share_{name}": (chosen.sum() / mask.sum().clamp(min=1)).item(),
                  f"gate_{name}": _mean(gate, chosen), f"restored_{name}": _mean(restored, chosen)}
    return stats


def dump_tokens(path: str, step: int, tokenizer, batch, scores, weights, rewards, correct, gates: egrsd.Gates,
                skipped: bool = False, count: int = 4) -> None:
    """The token view of the first `count` rollouts of this step (train_min's Rollouts, Scores, TokenWeights,
    and the step's egrsd.Gates), written as UTF-8 whatever the locale; `skipped`: the step was skipped."""
    entropy, mask = scores.teacher_entropy, batch.mask
    entropy_cl, regimes = gates.normalised, gates.regimes
    shown = []
    for b in range(min(count, len(mask))):
        m, ids = mask[b], batch.completion[b][mask[b]].tolist()
        shown.append({"title": f"rollout {b}: reward {rewards[b]:.3f}, {'correct' if correct[b] else 'wrong'}, {int(m.sum())} tokens",
                      "ids": ids, "tokens": token_texts(tokenizer, ids),
                      "entropy": entropy[b][m].tolist(), "entropy_cl": entropy_cl[b][m].tolist(),
                      **{k: getattr(weights, k)[b][m].tolist() for k in ("gate", "magnitude", "advantage")},
                      "regime": [egrsd.REGIMES[c - 1] for c in regimes[b][m].tolist()]})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(token_html(step, shown, skipped))


def step_line(row: dict, steps: int) -> str:
    """A training row in a line: what the rollouts earned, the loss, whether the update reached the sampler, speed."""
    return (f"step {row['step']}/{steps} | reward {row['reward']:.3f} | acc {row['accuracy']:.2f} | "
            f"len {row['length_mean']:.0f} | loss {row['loss']:.4f} | gnorm {row['grad_norm']:.3f} | "
            f"Δθ/θ {row['update_rel']:.1e} | sampler Δ {100 * row['sampler_changed']:.1f}% | "
            f"{row['rollout_tokens_per_s']:.0f} tok/s | gen {row['generate_s']:.1f}s score {row['score_s']:.1f}s "
            f"update {row['update_s']:.1f}s{' | SKIPPED (non-finite or blown up)' if row['skipped'] else ''}")


def evaluation_line(row: dict) -> str:
    """An evaluation row in a line: greedy accuracy, avg@K, and the length and Acc/(length/1000) of the
    greedy completions (of the sampled ones under --no-eval-greedy)."""
    parts = [f"accuracy {row['eval_accuracy']:.3f}"] if "eval_accuracy" in row else []
    if "eval_sampled_accuracy" in row:
        parts.append(f"avg@{row.get('eval_samples')} {row['eval_sampled_accuracy']:.3f}")
    prefix = "eval_" if "eval_accuracy" in row else "eval_sampled_"
    return ", ".join(parts + [f"length {row[prefix + 'length']:.0f}", f"acc/(len/1000) {row[prefix + 'acc_per_1k_tokens']:.3f}"])


def read_rows(run_dir: str) -> list[dict]:
    """The train and eval rows of a run's metrics.jsonl (torn lines skipped, run_io.read_rows) that its final
    trajectory kept: a step that appears twice (run again after a resume) keeps its last row, and a resume from
    the checkpoint of step N drops the rows before it of steps past N (a run that was resumed with fewer steps,
    or evaluated at other steps, did not keep them)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"expected a run directory holding metrics.jsonl, got {run_dir!r}")
    rows = {}
    for row in run_io.read_rows(path):
        if row["kind"] == "resume":
            rows = {key: kept for key, kept in rows.items() if kept["step"] <= row["step"]}
        else:
            rows[(row["kind"], row["step"])] = row
    return sorted(rows.values(), key=lambda r: (r["step"], r.get("kind") != "eval"))


# ----------------------------------------------------------------------------------------------------
# --compare: runs of one setting (they differ only in --seed) are pooled into one row; every difference is
# paired by problem and its interval clustered by template (trainer/stats.py).

# Flags that change neither what is trained nor how it is evaluated: runs that differ only in these (and
# in --seed) are seeds of one setting.
NOT_A_SETTING = {"seed", "output_dir", "resume", "initial_eval", "time_budget", "save_model", "save_every",
                 "eval_every", "dump_tokens", "micro_batch_size", "eval_batch_size", "chunk_size", "rollout",
                 "gradient_checkpointing", "max_bad_steps"}


@dataclass
class Run:
    name: str
    config: dict
    train: list[dict]
    evals: list[dict]
    folder: str = ""  # the folder that holds the run's folder (to tell apart settings of one name)
    label: str = ""  # its setting's name in the tables, where `label` would give two settings one name
    path: str = ""  # the run's folder


def load_run(run_dir: str) -> Run:
    config_path = os.path.join(run_dir, "config.json")
    config = run_io.read_json_file(config_path, "a run's settings") if os.path.isfile(config_path) else {}
    rows = read_rows(run_dir)
    evals = [r for r in rows if r.get("kind") == "eval"]
    for row in evals:
        if "eval_ids" not in row and "eval_correct" in row:
            row |= problem_labels(config, len(row["eval_correct"]))
    return Run(os.path.basename(os.path.normpath(run_dir)), config, [r for r in rows if r.get("kind") == "train"], evals,
               os.path.basename(os.path.dirname(os.path.normpath(run_dir))), path=run_dir)


def problem_labels(config: dict, n: int) -> dict:
    """The ids and templates of a run's held-out problems, for rows written before evaluations recorded
    them: the first n problems of the file it held out (--eval-data; else the first of --data, which the
    held-out problems were split off; else the built-in held-out file), or, failing that, positions and no
    templates."""
    path = config.get("eval_data") or config.get("data") or BUILT_IN["eval"]
    for candidate in (path, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)):
        if path and os.path.isfile(candidate):
            problems = load_problems(candidate, numeric=False)[:n]
            if len(problems) == n:
                return {"eval_ids": [p.id for p in problems], "eval_templates": [p.template for p in problems]}
    return {"eval_ids": list(range(n)), "eval_templates": [None] * n}


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs of one setting, in the order given: the same config but for NOT_A_SETTING, a flag that a run predates
    taken as it ran (`config.with_every_flag`), the same evaluation cap however given, the device's type alone
    (cuda:0 and cuda:1 alike) and no sampling settings of an evaluation that sampled nothing (without a
    config.json, a run is a setting of its own)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = json.dumps(setting_of(run), sort_keys=True) if run.config else run.path or run.name
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def setting_of(run: Run) -> dict:
    """What makes a run's setting (`group_runs`): its config as it ran, without what is no setting."""
    return run_io.as_compared(run_io.with_eval_cap({k: v for k, v in with_every_flag(run.config).items() if k not in NOT_A_SETTING}))


def evaluated_settings(run_dirs: list[str]) -> tuple[list[list[Run]], list[str]]:
    """(the runs grouped by setting, each with an evaluation before and after training; the names of the
    runs without one yet). A folder named twice counts once; two folders of one setting and seed are refused
    (pooled, they would count that seed twice and narrow the interval across seeds)."""
    runs = [load_run(d) for d in dict.fromkeys(os.path.realpath(d) for d in run_dirs)]
    groups = [g for g in ([r for r in g if len(r.evals) > 1] for g in group_runs(runs)) if g]
    for group in groups:
        first = {}
        for run in group:
            if (other := first.setdefault(seed := run.config.get("seed"), run)) is not run:
                raise SystemExit(f"--compare: {other.path} and {run.path} are runs of one setting with the same --seed "
                                 f"{seed}: a seed counts once, so name one of them (tools/run_arms.py sets the run folder "
                                 "of an earlier call aside as .NAME.earlier-TIME)")
    names = [label(g) for g in groups]
    for name in {n for n in names if names.count(n) > 1}:  # two settings, one name: tell them apart
        clash = [g for g, n in zip(groups, names) if n == name]
        for group, new in zip(clash, distinct_labels(name, clash)):
            for run in group:
                run.label = new
    return groups, [r.name for r in runs if len(r.evals) < 2]


def distinct_labels(name: str, clash: list[list[Run]]) -> list[str]:
    """Names for settings that `label` names alike: by their parent folders where those differ (a/egrsd and
    b/egrsd), else by the settings in which they differ (egrsd gamma=0.3 and egrsd gamma=1.0: two of them, or
    as many as it takes), else by a run's folder name."""
    parents = [g[0].folder for g in clash]
    if len(set(parents)) == len(clash):
        return [f"{parent}/{name}" for parent in parents]
    if all(g[0].config for g in clash):
        settings = [setting_of(g[0]) for g in clash]
        keys = [k for k in sorted(set().union(*settings)) if len({json.dumps(s.get(k)) for s in settings}) > 1]
        for n in range(2, len(keys) + 2):  # two of the keys they differ in, or as many as it takes to tell them apart
            names = [name + " " + " ".join(f"{k}={s.get(k)}" for k in keys[:n]) for s in settings]
            if len(set(names)) == len(names):
                return names
    return [g[0].name for g in clash]


def _evaluated(runs: list[Run], which: int, key: str) -> list[dict]:
    """The evaluation `which` of each run that recorded `key` in it."""
    return [r.evals[which] for r in runs if key in r.evals[which]]


def per_problem(runs: list[Run], which: int, key: str) -> dict:
    """{problem id: (template, mean over the runs of `key` at evaluation `which`)} over the problems that
    every run evaluated."""
    tables = [{i: (t, x) for i, t, x in zip(e["eval_ids"], e["eval_templates"], e[key])} for e in _evaluated(runs, which, key)]
    if not tables:
        return {}
    common = set.intersection(*(set(t) for t in tables))
    return {i: (tables[0][i][0], sum(t[i][1] for t in tables) / len(tables)) for i in common}


def per_seed(runs: list[Run], which: int, key: str, ids) -> list[float]:
    """Each run's mean of `key` at evaluation `which` over the problems `ids`, in the order of `runs`."""
    out = []
    for e in _evaluated(runs, which, key):
        table = dict(zip(e["eval_ids"], e[key]))
        out.append(sum(table[i] for i in ids) / len(ids))
    return out


def paired(a: dict, b: dict) -> stats.Clustered | str:
    """a − b over their common problems (`per_problem` tables), CR2 clustered by template (a problem without a
    template is its own cluster); where there is none, the reason, as a string."""
    common = sorted(set(a) & set(b), key=str)
    if not common:
        return "no held-out problem in common"
    clusters = [a[i][0] if a[i][0] is not None else f"problem {i}" for i in common]
    if len(set(clusters)) < 2:
        return "fewer than two templates"
    return stats.clustered_mean([a[i][1] - b[i][1] for i in common], clusters)


def compared(a_runs: list[Run], b_runs: list[Run], key: str, a_at: int = -1, b_at: int = -1) -> stats.Clustered | str | None:
    """`key` of a_runs at evaluation `a_at` minus that of b_runs at `b_at`: paired by problem (seeds averaged
    per problem), clustered by template, and, where a side has two or more seeds, widened by the spread
    between seeds (`stats.with_seed_spread`, which gives a side of one seed the other's spread; one setting
    against its own start: the spread of each seed's change). None where a side never recorded `key` (avg@K
    without --eval-samples)."""
    if not (_evaluated(a_runs, a_at, key) and _evaluated(b_runs, b_at, key)):
        return None
    a, b = per_problem(a_runs, a_at, key), per_problem(b_runs, b_at, key)
    if not a or not b:
        return "a setting's seeds share no held-out problem"
    result = paired(a, b)
    if isinstance(result, str):
        return result
    ids = set(a) & set(b)
    if a_runs is b_runs:  # one setting against its own start: each seed's change, of the seeds that recorded both
        both = [r for r in a_runs if key in r.evals[a_at] and key in r.evals[b_at]]
        samples = [[x - y for x, y in zip(per_seed(both, a_at, key, ids), per_seed(both, b_at, key, ids))]]
    else:
        samples = [per_seed(a_runs, a_at, key, ids), per_seed(b_runs, b_at, key, ids)]
    return stats.with_seed_spread(result, samples) if any(len(s) > 1 for s in samples) else result


def describe(result: stats.Clustered | str | None, scale: float = 100.0, unit: str = "points", p: float | None = None,
             comparisons: int = 1) -> str:
    """A paired result as "mean [95% interval] unit (verdict; G templates, n problems, seeds, the detectable
    difference[, p])". With `p`, a Holm-adjusted p-value of one of `comparisons`, the verdict follows it: an
    unadjusted interval that excludes 0 counts as a difference only where the adjusted p is below 0.05, and the
    detectable difference is that of Holm's first step, at 0.05 / comparisons. Where every template's mean is
    the same (no spread: a standard error of 0), there is no interval."""
    if result is None or isinstance(result, str):
        return f"n/a ({result or 'not recorded'})"
    basis = f"G = {result.clusters}, n = {result.n}" + (f", seeds {'/'.join(map(str, result.seeds))}" if result.seeds else "")
    if result.se == 0:
        return f"{scale * result.mean:+.1f} {unit} (no interval: no spread between templates; {basis})"
    low, high = stats.interval(result.mean, result.se, result.df)
    verdict = ("no detectable difference" if low <= 0 <= high else
               "no detectable difference after Holm's adjustment" if p is not None and p >= 0.05 else "excludes 0")
    holm = f", p {p:.3f} Holm" if p is not None else ""
    level = f" at 0.05/{comparisons}" if comparisons > 1 else ""
    detectable = stats.detectable(result.se, result.df, level=1 - 0.05 / comparisons)
    return (f"{scale * result.mean:+.1f} [{scale * low:+.1f}, {scale * high:+.1f}] {unit} ({verdict}; {basis}, "
            f"detectable ±{scale * detectable:.1f}{level}{holm})")


def p_value(result: stats.Clustered | str | None) -> float | None:
    """The two-sided p of a paired result; None where it has no interval (see `describe`)."""
    if not isinstance(result, stats.Clustered) or result.se == 0:
        return None
    return 2 * (1 - stats.t_cdf(abs(result.mean / result.se), result.df))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of several p-values (family-wise error over the comparisons)."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def holm_adjusted(results: list) -> list[float | None]:
    """The Holm-adjusted p-value of each paired result, over those that have one (the others get None)."""
    raw = [p_value(r) for r in results]
    adjusted = iter(holm([p for p in raw if p is not None]))
    return [None if p is None else next(adjusted) for p in raw]


def mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def label(group: list[Run]) -> str:
    """A setting's name: its runs' folder name without the seed suffix (-s0, _seed3), where they share it."""
    if group[0].label:
        return group[0].label
    names = [re.sub(r"(?:[-_]s|[-_]?seed)\d+$", "", r.name) for r in group]
    return names[0] if len(group) == 1 or len(set(names)) == 1 else group[0].name


def gate_table(groups: list[list[Run]]) -> str:
    """What the weights did in training, per setting (every step of every seed): the gate ω's mean and its
    smallest value, the magnitude w's mean, the mean teacher entropy, and the token regimes' shares. A
    skipped (non-finite) step's NaN is left out."""
    def over_steps(group, key, reduce=mean):
        values = [r[key] for run in group for r in run.train if r.get(key) is not None and math.isfinite(r[key])]
        return reduce(values) if values else math.nan

    header = (f"{'in training':<16} {'gate mean':>9} {'gate min':>8} {'w mean':>7} {'H mean':>7} "
              + " ".join(f"{name + ' %':>7}" for name in egrsd.REGIMES))
    lines = [header]
    for group in groups:
        lines.append(f"{label(group):<16} {over_steps(group, 'gate_mean'):>9.3f} {over_steps(group, 'gate_min', min):>8.3f} "
                     f"{over_steps(group, 'magnitude_mean'):>7.3f} {over_steps(group, 'teacher_entropy_mean'):>7.3f} "
                     + " ".join(f"{100 * over_steps(group, f'share_{name}'):>7.1f}" for name in egrsd.REGIMES))
    return "\n".join(lines)


EVALUATION_COLUMNS = (f"{'acc start':>9} {'acc end [95% seeds]':>21} {'len start':>9} {'len end':>7} {'Δlen':>7} "
                      f"{'acc/(len/1k)':>12} {'trunc':>6}")


def evaluation_columns(group: list[Run], prefix: str) -> str:
    """EVALUATION_COLUMNS of one setting, seeds pooled, for the greedy completions (`prefix` "eval_") or the K
    sampled ones ("eval_sampled_"): held-out accuracy at the start and at the end (with its 95% interval
    across seeds), mean length at both and its change, Acc/(length/1000) and the truncated share at the end.
    A measure that some seed did not record at that evaluation is "n/a"."""
    def pooled(at: int, name: str) -> float | None:
        values = [run.evals[at].get(prefix + name) for run in group]
        return None if None in values else mean(values)

    def cell(value, width, spec):
        return f"{'n/a' if value is None else format(value, spec):>{width}}"

    accuracies = [run.evals[-1].get(prefix + "accuracy") for run in group]
    end = None
    if None not in accuracies:
        end, low, high = stats.seed_interval(accuracies)
        end = f"{end:.3f}" + ("" if len(group) == 1 else f" [{low:.3f}, {high:.3f}]" if high > low else " (no spread)")
    length0, length1 = pooled(0, "length"), pooled(-1, "length")
    change = f"{(length1 / length0 - 1) * 100:+.1f}%" if length0 and length1 is not None else None
    return (f"{cell(pooled(0, 'accuracy'), 9, '.3f')} {cell(end, 21, '')} {cell(length0, 9, '.0f')} {cell(length1, 7, '.0f')} "
            f"{cell(change, 7, '')} {cell(pooled(-1, 'acc_per_1k_tokens'), 12, '.3f')} {cell(pooled(-1, 'truncated'), 6, '.3f')}")


def compare_table(run_dirs: list[str]) -> str:
    """The accuracy–length table of runs, from their metrics.jsonl (and config.json) alone.

    One row per setting, seeds pooled (mean over seeds; the end accuracy's 95% interval across seeds): the
    `evaluation_columns` of the greedy completions (left out where no run made any: --no-eval-greedy), seconds
    per step, peak GPU memory; where runs sampled K
    completions per problem, the same columns of those (avg@K: the paper's accuracy and length, which
    `tools/plot_runs.py --tradeoff` plots); then what the weights did in training (`gate_table`).
    Below them, with 95% intervals paired by problem and clustered by template (`compared`: CR2 on its
    Bell–McCaffrey degrees of freedom, the spread between seeds added where a side has two or more), the
    templates (G), problems (n) and seeds they rest on, and the smallest difference the design could detect
    (80% power): each setting's change from its own step 0 and training-reward slope (`stats.slope`: across
    seeds where there are several), then each setting minus the first in accuracy and in length, greedy and
    avg@K (each measure's p Holm-adjusted over the comparisons, the verdict following it, the detectable
    difference at Holm's first step): name the reference first (`--compare runs/grpo-s* runs/*-s*`; a folder
    named twice counts once). With one seed a side, a seed's luck, which moves every problem alike, is not in
    the interval. A run without an evaluation after training is listed apart, not pooled."""
    if not run_dirs:
        raise SystemExit("--compare: expected one or more run directories (python train_min.py --compare RUN_DIR ...)")
    groups, missing = evaluated_settings(run_dirs)
    greedy = any("eval_accuracy" in e for g in groups for run in g for e in run.evals)  # none: all --no-eval-greedy
    columns = EVALUATION_COLUMNS + " " if greedy else ""
    header = f"{'run':<16} {'method':<9} {'seeds':>5} {'steps':>5} {columns}{'s/step':>6} {'peak GiB':>8}"
    lines = [header, "-" * len(header)]
    for group in groups:
        timed = [r for run in group for r in (run.train[1:] or run.train)]  # the first step pays for warm-up
        steps = sorted({run.evals[-1]["step"] for run in group})
        lines.append(f"{label(group):<16} {group[0].evals[-1]['method']:<9} {len(group):>5} {'/'.join(map(str, steps)):>5} "
                     f"{evaluation_columns(group, 'eval_') + ' ' if greedy else ''}"
                     f"{mean([r['step_s'] for r in timed if 'step_s' in r]):>6.2f} "
                     f"{max((r.get('peak_gpu_mem_gb', math.nan) for run in group for r in run.train), default=math.nan):>8.1f}")
    if any(e.get("eval_samples") for g in groups for run in g for e in run.evals):
        lines += ["", "(no greedy evaluation: --no-eval-greedy)"] if not greedy else []
        lines += ["", f"{'sampled: avg@K':<16} {'K':>3} {EVALUATION_COLUMNS}"]
        for group in groups:
            k = "/".join(map(str, sorted({run.evals[-1].get("eval_samples") or 0 for run in group})))
            lines.append(f"{label(group):<16} {k:>3} {evaluation_columns(group, 'eval_sampled_')}")
    lines += [f"{name:<16} (no evaluation after training yet)" for name in missing]
    lines += ["", gate_table(groups)]
    lines += ["", "Change from step 0, paired by problem, 95% intervals clustered by template (CR2) with the spread of seeds' changes "
                  "where a setting has two or more; reward slope per 100 steps:"]
    for group in groups:
        parts = []
        for key, what in (("eval_correct", "greedy"), ("eval_sampled_correct", "avg@K")):
            change = compared(group, group, key, -1, 0)
            if change is not None:
                parts.append(f"{what} {describe(change)}")
        points = [(r["step"], r["reward"], id(run)) for run in group for r in run.train if "reward" in r]
        try:
            b, se, df = stats.slope(points)
            low, high = stats.interval(b, se, df)
            spread = "between the seeds' slopes" if len(group) > 1 else "around the fit"
            parts.append(f"reward slope {100 * b:+.3f} " + (f"[{100 * low:+.3f}, {100 * high:+.3f}]" if se > 0 else
                                                            f"(no interval: no spread {spread})"))
        except ValueError:
            parts.append("reward slope n/a (too few steps)")
        lines.append(f"  {label(group):<14} " + "; ".join(parts))
    if len(groups) > 1:
        reference = groups[0]
        lines += ["", f"Minus {label(reference)} at the end, paired by problem, seeds averaged per problem, 95% intervals clustered by "
                      f"template (CR2) with the spread between seeds where a setting has two or more; p Holm-adjusted over "
                      f"the comparisons of each measure that have one, and the detectable difference at Holm's first step:"]
        measures = {"eval_correct": "greedy", "eval_sampled_correct": "avg@K", "eval_lengths": "length",
                    "eval_sampled_lengths": "length@K"}
        results = {key: [compared(g, reference, key) for g in groups[1:]] for key in measures}
        p = {key: holm_adjusted(rs) for key, rs in results.items()}
        in_tokens = dict(scale=1.0, unit="tokens")
        for i, g in enumerate(groups[1:]):
            parts = [f"{what} " + describe(results[key][i], p=p[key][i], comparisons=sum(x is not None for x in p[key]),
                                           **({} if "correct" in key else in_tokens))
                     for key, what in measures.items() if (key == "eval_correct" and greedy) or results[key][i] is not None]
            lines.append(f"  {label(g):<14} " + "; ".join(parts))
    return "\n".join(lines)
