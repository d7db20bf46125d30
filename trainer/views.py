"""Read-only views of a run, kept out of train_min.py so that the script stays the algorithm.

- `token_html(...)`: a self-contained HTML page (no scripts, no external styles) of a few rollouts, each
  token coloured by its final weight Â (hue: the sign, blue pushed up, red pushed down; darkness: its own
  factor w·ω), with the teacher entropy H, the lookahead-normalised Ĥ^CL, the gate ω, the magnitude w, Â
  and the regime on hover.
- `regime_stats(...)`: what the gate did this step, per token regime (the metrics of train_min.py);
  `dump_tokens(...)` writes the token view of a step's first rollouts.
- `compare_table(run_dirs)`: the accuracy–length table of several runs from their metrics.jsonl alone
  (`python train_min.py --compare runs/a runs/b`), without loading any model.
"""

from __future__ import annotations

import functools
import html
import os

import egrsd
from trainer import run_io


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, decoded by prefix so that the pieces join back into the whole text. A
    character whose UTF-8 bytes span several tokens goes to the token that completes it (an unfinished one
    decodes as U+FFFD, which the next token may still change)."""
    pieces, emitted = [], ""
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i])
        stable = text if i == len(ids) else text.rstrip("\ufffd")
        pieces.append(stable[len(emitted):] if stable.startswith(emitted) else "")
        emitted = stable if stable.startswith(emitted) else emitted
    return pieces


def _colour(advantage: float, factor: float, low: float, high: float) -> str:
    """Hue: the sign of Â (blue +, red −, grey 0); darkness: the token's factor w·ω within [low, high]."""
    strength = (factor - low) / (high - low) if high > low else 0.5
    hue, saturation = (215, 80) if advantage > 0 else (0, 80) if advantage < 0 else (0, 0)
    return f"hsl({hue}, {saturation}%, {92 - 50 * strength:.0f}%)"


def token_html(step: int, rollouts: list[dict]) -> str:
    """One page. Each rollout dict: "title" (str), "ids" and "tokens" (each token's id and text), and
    per-token lists "entropy", "entropy_cl", "gate", "magnitude", "advantage", "regime" (names)."""
    factors = [w * g for r in rollouts for w, g in zip(r["magnitude"], r["gate"])]
    low, high = min(factors, default=0.0), max(factors, default=1.0)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>EGRSD tokens, step {step}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "pre{white-space:pre-wrap;font-size:14px;line-height:1.6}"
             "span.t{border-radius:2px}h3{font-size:15px;margin-top:2em}</style></head><body>",
             f"<h2>Step {step}: token weights Â = A·w·ω</h2><p>Blue: Â &gt; 0 (a rewarded rollout, reinforced), "
             f"red: Â &lt; 0 (penalised), grey: A = 0. The darker the token, the larger its own factor w·ω "
             f"(palest {low:.3f}, darkest {high:.3f} on this page). Hover a token for its signals.</p>"]
    for rollout in rollouts:
        parts.append(f"<h3>{html.escape(rollout['title'])}</h3><pre>")
        for i, text in enumerate(rollout["tokens"]):
            tip = (f"H={rollout['entropy'][i]:.3f} nats, Ĥ_CL={rollout['entropy_cl'][i]:.3f}, "
                   f"ω={rollout['gate'][i]:.3f}, w={rollout['magnitude'][i]:.3f}, Â={rollout['advantage'][i]:+.4f}, "
                   f"{rollout['regime'][i]}")
            colour = _colour(rollout["advantage"][i], rollout["magnitude"][i] * rollout["gate"][i], low, high)
            parts.append(f"<span class='t' data-id='{rollout['ids'][i]}' style='background:{colour}' "
                         f"title='{html.escape(tip, quote=True)}'>{html.escape(text)}</span>")
        parts.append("</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def _mean(x, chosen):
    return x[chosen].mean().item() if chosen.any() else None


def regime_stats(scores, weights, mask, cfg) -> dict:
    """Per step: the means of the signals, and per regime (lock, mid, pivot, fork) its share of the
    tokens, its mean gate (the gate the method applied: 1 without one), and restored_*, the weight the
    lookahead gives back, ω(W) − ω(0) at this γ and W: applied by cl-egrsd, what it would give back for
    the other methods."""
    entropy, gate = scores.teacher_entropy, weights.gate
    gate_at = functools.partial(egrsd.entropy_gate, entropy, mask, gamma=cfg.gamma, floor=cfg.floor,
                                min_denominator=cfg.min_denominator, denominator=cfg.denominator,
                                group=cfg.gate_group or None)
    restored = gate_at(cfg.window) - gate_at(0)
    regimes = egrsd.token_regimes(entropy, mask, cfg.window, tau_low=cfg.regime_low, tau_high=cfg.regime_high,
                                  min_denominator=cfg.min_denominator, group=cfg.gate_group or None)
    stats = {"gate_mean": _mean(gate, mask), "gate_min": gate[mask].min().item() if mask.any() else None,
             "magnitude_mean": _mean(weights.magnitude, mask), "teacher_entropy_mean": _mean(entropy, mask)}
    for code, name in enumerate(egrsd.REGIMES, start=1):
        chosen = regimes == code
        stats |= {f"share_{name}": (chosen.sum() / mask.sum().clamp(min=1)).item(),
                  f"gate_{name}": _mean(gate, chosen), f"restored_{name}": _mean(restored, chosen)}
    return stats


def dump_tokens(path: str, step: int, tokenizer, batch, scores, weights, rewards, correct, cfg, count: int = 4) -> None:
    """The token view of the first `count` rollouts of this step (train_min's Rollouts, Scores, TokenWeights)."""
    entropy, mask = scores.teacher_entropy, batch.mask
    entropy_cl = egrsd.normalised_entropy(entropy, mask, cfg.window, min_denominator=cfg.min_denominator,
                                          denominator=cfg.denominator, group=cfg.gate_group or None)
    regimes = egrsd.token_regimes(entropy, mask, cfg.window, tau_low=cfg.regime_low, tau_high=cfg.regime_high,
                                  min_denominator=cfg.min_denominator, group=cfg.gate_group or None)
    shown = []
    for b in range(min(count, len(mask))):
        m, ids = mask[b], batch.completion[b][mask[b]].tolist()
        shown.append({"title": f"rollout {b}: reward {rewards[b]:.3f}, {'correct' if correct[b] else 'wrong'}, {int(m.sum())} tokens",
                      "ids": ids, "tokens": token_texts(tokenizer, ids),
                      "entropy": entropy[b][m].tolist(), "entropy_cl": entropy_cl[b][m].tolist(),
                      **{k: getattr(weights, k)[b][m].tolist() for k in ("gate", "magnitude", "advantage")},
                      "regime": [egrsd.REGIMES[c - 1] for c in regimes[b][m].tolist()]})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(token_html(step, shown))


def read_rows(run_dir: str) -> list[dict]:
    """The rows of a run's metrics.jsonl (torn lines skipped, run_io.read_rows); a step that appears twice
    (run again after a resume) keeps its last row."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"--compare: expected a run directory holding metrics.jsonl, got {run_dir!r}")
    rows = {(row.get("kind"), row["step"]): row for row in run_io.read_rows(path)}
    return sorted(rows.values(), key=lambda r: (r["step"], r.get("kind") != "eval"))


def paired_difference(a: list, b: list) -> tuple[float, float, float]:
    """Mean of a − b over the same problems (0/1 each) and its 95% interval (normal approximation)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = (sum((x - mean) ** 2 for x in d) / max(n - 1, 1) / n) ** 0.5
    return mean, mean - 1.96 * se, mean + 1.96 * se


def compare_table(run_dirs: list[str]) -> str:
    """Per run: method, steps, held-out accuracy and mean length before → after, Acc/(length/1000), the
    relative change of length (the paper's accuracy–length trade-off), the truncated share at the end,
    seconds per step, peak GPU memory, and the paired accuracy difference to the first run on the same
    held-out problems with its 95% interval."""
    header = f"{'run':<16} {'method':<9} {'steps':>5} {'acc start':>9} {'acc end':>8} {'len start':>9} " \
             f"{'len end':>8} {'Δlen':>7} {'acc/(len/1k)':>12} {'trunc':>6} {'s/step':>6} {'peak GiB':>8}  Δacc vs first run [95%]"
    lines, first_correct = [header, "-" * len(header)], None
    for run_dir in run_dirs:
        rows = read_rows(run_dir)
        evals = [r for r in rows if r.get("kind") == "eval"]
        train = [r for r in rows if r.get("kind") == "train"]
        name = os.path.basename(os.path.normpath(run_dir))
        if not evals:
            lines.append(f"{name:<16} (no evaluation rows yet)")
            continue
        first, last = evals[0], evals[-1]
        change = (last["eval_length"] / first["eval_length"] - 1) * 100 if first["eval_length"] else 0.0
        timed = train[1:] or train  # the first step pays for warm-up and compilation
        seconds = sum(r["step_s"] for r in timed) / len(timed) if timed else float("nan")
        peak = max((r["peak_gpu_mem_gb"] for r in train), default=float("nan"))
        paired = ""
        correct = last.get("eval_correct")
        if first_correct is None:
            first_correct = correct
        elif correct and len(correct) == len(first_correct):
            mean, low, high = paired_difference(correct, first_correct)
            verdict = " (no detectable difference)" if low <= 0 <= high else ""
            paired = f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] points{verdict}"
        lines.append(f"{name:<16} {last['method']:<9} {last['step']:>5} "
                     f"{first['eval_accuracy']:>9.3f} {last['eval_accuracy']:>8.3f} {first['eval_length']:>9.0f} "
                     f"{last['eval_length']:>8.0f} {change:>+6.1f}% {last['eval_acc_per_1k_tokens']:>12.3f} "
                     f"{last.get('eval_truncated', float('nan')):>6.3f} {seconds:>6.2f} {peak:>8.1f}  {paired}")
    return "\n".join(lines)
