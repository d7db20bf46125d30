"""Regenerate the built-in problems: data/gsm_symbolic_train.jsonl and data/gsm_symbolic_eval.jsonl.

    pip install reasoning-gym==0.1.25      # needed by this script only, not by the trainer or the tests
    python data/make_gsm_symbolic.py

The problems come from reasoning-gym's `gsm_symbolic` (Apache-2.0, https://github.com/open-thought/reasoning-gym):
85 templates derived from GSM8K test questions (the GSM-Symbolic idea), each drawing fresh names and numbers
and writing a worked solution. Whole templates are held out: the evaluation file uses only templates that no
training problem uses, so held-out accuracy measures more than memorised templates. Rows are
{"problem", "solution", "answer", "template"}: `solution` is the template's worked `answer_cot` (the
teacher's privileged context), `answer` its numeric answer (an integer, or a decimal for a few templates).
Deterministic for a given reasoning-gym version.
"""

import json
import os
import random
from importlib.metadata import version

import reasoning_gym
from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

VERSION, SEED = "0.1.25", 2026
HELD_OUT_TEMPLATES = 17  # of 85: 20% of the templates, only for evaluation
TRAIN_SIZE, EVAL_SIZE = 2000, 400
HERE = os.path.dirname(os.path.abspath(__file__))


def rows(templates: set[int], size: int, seed: int) -> list[dict]:
    """`size` problems with distinct questions, drawn only from `templates`."""
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=40 * size, seed=seed)
    out, seen = [], set()
    for index, template in enumerate(dataset.task_indices):
        if template not in templates:
            continue
        example = dataset[index]
        if example["question"] in seen:
            continue
        seen.add(example["question"])
        out.append({"problem": example["question"], "solution": example["metadata"]["answer_cot"],
                    "answer": example["answer"], "template": template})
        if len(out) == size:
            return out
    raise RuntimeError(f"only {len(out)} distinct problems of {size} from {len(templates)} templates")


def main() -> None:
    if version("reasoning-gym") != VERSION:  # (reasoning_gym.__version__ lags behind the package's version)
        raise SystemExit(f"reasoning-gym {VERSION} expected (the files are pinned to it), got {version('reasoning-gym')}")
    held_out = set(random.Random(SEED).sample(sorted(tasks_ok), HELD_OUT_TEMPLATES))
    splits = {"train": rows(set(tasks_ok) - held_out, TRAIN_SIZE, SEED), "eval": rows(held_out, EVAL_SIZE, SEED + 1)}
    for name, problems in splits.items():
        path = os.path.join(HERE, f"gsm_symbolic_{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in problems)
        print(f"{path}: {len(problems)} problems from {len({p['template'] for p in problems})} templates")


if __name__ == "__main__":
    main()
