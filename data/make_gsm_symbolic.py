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

A drawn problem is skipped where its worked solution states a step `a op b = c` that is not exact
(`inexact_steps`): some generators truncate with int(), so that for some numbers the solution states false
arithmetic ("$137.20 - $39.20 = $97") or a whole count where the question's value is fractional (41.6
students), and the answer follows it. 57 of the first 2,000 training problems were such (six training
templates; none held out); the next problems drawn take their places.
"""

import json
import os
import random
import re
from fractions import Fraction
from importlib.metadata import version

VERSION, SEED = "0.1.25", 2026
HELD_OUT_TEMPLATES = 17  # of 85: 20% of the templates, only for evaluation
TRAIN_SIZE, EVAL_SIZE = 2000, 400
HERE = os.path.dirname(os.path.abspath(__file__))


NUMBER = r"[$£€]?(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?)"  # 1,200 too
# a whole number on each side (not the tail of 1,200 or 3.5), the result before a full stop included ("= $97.")
STEP = re.compile(r"(?<![\d,.])" + NUMBER + r"\s*([-+*/x×÷])\s*" + NUMBER + r"\s*=\s*" + NUMBER + r"(?![\d/%,]|\.\d)")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "x": lambda a, b: a * b,
              "×": lambda a, b: a * b, "/": lambda a, b: a / b, "÷": lambda a, b: a / b}


def inexact_steps(solution: str) -> list[str]:
    """The steps `a op b = c` of a worked solution whose c is not a op b (exact arithmetic on the decimals as
    written, relative tolerance 1e-6). A step inside a longer expression ("5 + 3 * 2 = 11") is not judged."""
    wrong = []
    for step in STEP.finditer(solution):
        if re.search(r"[-+*/x×÷(\d]\s*$", solution[max(0, step.start() - 6):step.start()]):
            continue  # the end of a longer expression
        a, operation, b, c = step.groups()
        a, b, c = (Fraction(number.replace(",", "")) for number in (a, b, c))
        if operation in "/÷" and b == 0:
            continue
        if abs(OPERATIONS[operation](a, b) - c) > Fraction(1, 10**6) * max(1, abs(c)):
            wrong.append(step.group(0))
    return wrong


def rows(templates: set[int], size: int, seed: int) -> list[dict]:
    """`size` problems with distinct questions and exact worked solutions, drawn only from `templates`."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=40 * size, seed=seed)
    out, seen = [], set()
    for index, template in enumerate(dataset.task_indices):
        if template not in templates:
            continue
        example = dataset[index]
        if example["question"] in seen or inexact_steps(example["metadata"]["answer_cot"]):
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
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    held_out = set(random.Random(SEED).sample(sorted(tasks_ok), HELD_OUT_TEMPLATES))
    splits = {"train": rows(set(tasks_ok) - held_out, TRAIN_SIZE, SEED), "eval": rows(held_out, EVAL_SIZE, SEED + 1)}
    for name, problems in splits.items():
        path = os.path.join(HERE, f"gsm_symbolic_{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in problems)
        print(f"{path}: {len(problems)} problems from {len({p['template'] for p in problems})} templates")


if __name__ == "__main__":
    main()
