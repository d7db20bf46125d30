"""Pictures of runs, from their metrics.jsonl (and config.json) alone: one small PNG each.

    pip install matplotlib                     # an optional extra (requirements-extras.txt), for this script only
    python tools/plot_runs.py docs/real_runs/curves.png docs/real_runs/egrsd docs/real_runs/grpo
    python tools/plot_runs.py --tradeoff figure1.png RUN_DIR [RUN_DIR ...]

Curves (the default): left, the mean reward of each step's rollouts; middle, their mean length in tokens;
right, held-out accuracy at each evaluation (greedy; avg@K for a run evaluated with --no-eval-greedy). Thin
lines are the steps, thick ones a moving average over 5 steps.

--tradeoff: the paper's Figure 1 at this scale: held-out accuracy (avg@K where every run has it, else
greedy) against the mean length of the same completions at the end of training, one point per setting
(seeds pooled as `--compare` pools them, a folder named twice counted once, with 95% intervals across seeds
on both axes), and the untrained model's point.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

try:
    import matplotlib
except ModuleNotFoundError:  # (an optional extra)
    sys.exit("tools/plot_runs.py draws with matplotlib, an optional extra: pip install -r requirements-extras.txt")

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer import stats  # noqa: E402
from trainer.views import evaluated_settings, label, read_rows  # noqa: E402


def moving_average(values: list, width: int = 5) -> list:
    return [sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


def plot(path: str, run_dirs: list[str]) -> None:
    figure, axes, drawn = *plt.subplots(1, 3, figsize=(11, 3.0), dpi=110), set()
    for run_dir, colour in zip(run_dirs, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        rows = read_rows(run_dir)
        train = [r for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") == "eval"]
        label = train[0]["method"] if train else os.path.basename(os.path.normpath(run_dir))
        steps = [r["step"] for r in train]
        for ax, key in zip(axes, ("reward", "length_mean")):
            values = [r[key] for r in train]
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
            ax.plot(steps, moving_average(values), color=colour, linewidth=2, label=label)
        key = "eval_accuracy" if all("eval_accuracy" in r for r in evals) else "eval_sampled_accuracy"  # --no-eval-greedy
        drawn |= {key} if evals else set()
        axes[2].plot([r["step"] for r in evals], [r.get(key) for r in evals], "o-" if key == "eval_accuracy" else "s--",
                     color=colour, label=label)
    accuracy = {frozenset({"eval_accuracy"}): "held-out greedy accuracy", frozenset({"eval_sampled_accuracy"}): "held-out "
                "avg@K accuracy"}.get(frozenset(drawn), "held-out accuracy (greedy ○, avg@K □)")
    for ax, title in zip(axes, ("rollout reward", "rollout length (tokens)", accuracy)):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def tradeoff(path: str, run_dirs: list[str]) -> None:
    groups, _ = evaluated_settings(run_dirs)
    if not groups:
        sys.exit("--tradeoff: no run has an evaluation after training yet")
    sampled = all("eval_sampled_accuracy" in r.evals[-1] for g in groups for r in g)
    if not sampled and not all("eval_accuracy" in r.evals[-1] for g in groups for r in g):
        sys.exit("--tradeoff: the runs' last evaluations share no measure (some only avg@K, some only greedy)")
    key, length = ("eval_sampled_accuracy", "eval_sampled_length") if sampled else ("eval_accuracy", "eval_length")
    figure, ax = plt.subplots(figsize=(5.5, 4.0), dpi=110)
    start = next((r.evals[0] for g in groups for r in g if key in r.evals[0] and length in r.evals[0]), None)
    if start is not None:  # (none where every run's step 0 lacks this measure)
        ax.plot(start[length], start[key], "k*", markersize=12, label="untrained")
    for group, colour in zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        (x, x_low, x_high), (y, y_low, y_high) = (stats.seed_interval([r.evals[-1][k] for r in group])
                                                  for k in (length, key))
        error = ([[x - x_low], [x_high - x]], [[y - y_low], [y_high - y]]) if len(group) > 1 else (None, None)
        ax.errorbar(x, y, xerr=error[0], yerr=error[1], fmt="o", color=colour, capsize=3,
                    label=f"{label(group)} ({len(group)} seed{'s' if len(group) > 1 else ''})")
    ax.set_xlabel(("sampled" if sampled else "greedy") + " mean response length (tokens)")
    measure = "greedy"
    if sampled:  # (settings may sample another K: avg@K estimates one accuracy whatever K)
        ks = sorted({r.evals[-1]["eval_samples"] for g in groups for r in g})
        measure = f"avg@{ks[0]}" if len(ks) == 1 else f"avg@K (K = {', '.join(map(str, ks))})"
    ax.set_ylabel(f"{measure} held-out accuracy")
    ax.set_title("accuracy against length at the end (95% across seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(arguments: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python tools/plot_runs.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tradeoff", action="store_true", help="the accuracy-length figure instead of the curves")
    parser.add_argument("out", metavar="OUT.png", help="the picture to write")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (train_min.py --output-dir)")
    args = parser.parse_args(arguments)
    (tradeoff if args.tradeoff else plot)(args.out, args.runs)


if __name__ == "__main__":
    main(sys.argv[1:])
