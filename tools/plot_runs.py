"""The reward and length curves of runs, from their metrics.jsonl alone: one small PNG.

    pip install matplotlib                     # an optional extra (requirements-extras.txt), for this script only
    python tools/plot_runs.py docs/real_runs/curves.png docs/real_runs/egrsd docs/real_runs/grpo

Left: the mean reward of each step's rollouts; middle: their mean length in tokens; right: held-out greedy
accuracy at each evaluation. Thin lines are the steps, thick ones a moving average over 5 steps.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.views import read_rows  # noqa: E402


def moving_average(values: list, width: int = 5) -> list:
    return [sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


def plot(path: str, run_dirs: list[str]) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.0), dpi=110)
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
        axes[2].plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", color=colour, label=label)
    for ax, title in zip(axes, ("rollout reward", "rollout length (tokens)", "held-out greedy accuracy")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python tools/plot_runs.py OUT.png RUN_DIR [RUN_DIR ...]")
    plot(sys.argv[1], sys.argv[2:])
