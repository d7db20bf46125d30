"""Problems, data files, prompts and the verifier for on-policy self-distillation.

A `Problem` is a question, a worked reference solution (the teacher's privileged context s*) and the
final answer as a string ("42", "-3", "2.5"). Problems come from a seeded generator of GSM8K-easy
arithmetic word problems (no download) or from a JSONL file (GSM8K rows or problem/solution/answer rows).
The verifier reads the answer from the LAST `\\boxed{...}` of a completion and compares it numerically.
"""

import json
import math
import random
import re
from dataclasses import dataclass

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
NAMES = ["Ava", "Ben", "Carla", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam"]
ITEMS = ["apples", "pencils", "stickers", "cookies", "marbles", "books", "cards", "oranges", "balloons"]
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
DECIMAL = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
GSM8K_CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass
class Problem:
    """One problem; `solution` is what the teacher sees and the student does not."""
    question: str
    solution: str  # worked, step-by-step reference solution: the teacher's privileged context
    answer: str  # final answer as a string, e.g. "42", "-3", "2.5"


# ---------------------------------------------------------------- generated arithmetic problems
# Each template draws small integers from `rng` and returns (question, solution steps, answer).

def _shopping(rng, name, item):
    """3 steps: buy two kinds of items, pay with a bill, get change."""
    a, p, b, q = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 5), rng.randint(1, 6)
    bill = 50 if a * p + b * q < 50 else 100
    question = (f"{name} buys {a} {item} for ${p} each and {b} notebooks for ${q} each. "
                f"{name} pays with a ${bill} bill. How much change does {name} get, in dollars?")
    steps = [f"The {item} cost {a} * {p} = {a * p} dollars.",
             f"The notebooks cost {b} * {q} = {b * q} dollars.",
             f"Together that is {a * p} + {b * q} = {a * p + b * q} dollars.",
             f"The change is {bill} - {a * p + b * q} = {bill - a * p - b * q} dollars."]
    return question, steps, bill - a * p - b * q


def _sharing(rng, name, item):
    """2 steps: add more items, then share them equally."""
    k, each = rng.randint(2, 6), rng.randint(2, 9)
    b = rng.randint(1, k * each - 1)
    a = k * each - b
    question = (f"{name} has {a} {item} and gets {b} more. {name} shares all of them equally among "
                f"{k} friends. How many {item} does each friend get?")
    steps = [f"{name} has {a} + {b} = {a + b} {item}.",
             f"Each friend gets {a + b} / {k} = {each} {item}."]
    return question, steps, each


def _boxes(rng, name, item):
    """3 steps: buy boxes of items, give some away, use some."""
    boxes, per_box = rng.randint(2, 6), rng.randint(3, 12)
    total = boxes * per_box
    given = rng.randint(1, total // 2)
    used = rng.randint(1, total - given - 1)
    question = (f"{name} buys {boxes} boxes with {per_box} {item} in each box. {name} gives {given} "
                f"{item} to a neighbor and uses {used}. How many {item} are left?")
    steps = [f"{name} buys {boxes} * {per_box} = {total} {item}.",
             f"After giving some away, {total} - {given} = {total - given} are left.",
             f"After using some, {total - given} - {used} = {total - given - used} are left."]
    return question, steps, total - given - used


def _wages(rng, name, item):
    """4 steps: earn an hourly wage on two days, spend some, save half of the rest."""
    rate, h1, h2 = rng.randint(5, 15), rng.randint(2, 6), rng.randint(1, 5)
    earned = rate * (h1 + h2)
    spent = rng.randrange(2 - earned % 2, earned - 3, 2)  # same parity as `earned`: the half is whole
    question = (f"{name} earns ${rate} per hour. {name} works {h1} hours on Monday and {h2} hours on "
                f"Tuesday, then spends ${spent} on {item}. {name} saves half of the money that is left. "
                f"How many dollars does {name} save?")
    steps = [f"{name} works {h1} + {h2} = {h1 + h2} hours.",
             f"{name} earns {h1 + h2} * {rate} = {earned} dollars.",
             f"After spending, {earned} - {spent} = {earned - spent} dollars are left.",
             f"{name} saves {earned - spent} / 2 = {(earned - spent) // 2} dollars."]
    return question, steps, (earned - spent) // 2


def _temperature(rng, name, item):
    """3 steps: a temperature falls, rises, then falls again (the answer may be negative)."""
    start, drop, rise, drop2 = rng.randint(1, 10), rng.randint(5, 15), rng.randint(2, 8), rng.randint(3, 12)
    end = start - drop + rise - drop2
    question = (f"While {name} packs {item} for a trip, the temperature is {start} degrees. It falls by "
                f"{drop} degrees, rises by {rise} degrees, then falls by {drop2} degrees. "
                f"What is the temperature now, in degrees?")
    steps = [f"After the first fall: {start} - {drop} = {start - drop} degrees.",
             f"After the rise: {start - drop} + {rise} = {start - drop + rise} degrees.",
             f"After the second fall: {start - drop + rise} - {drop2} = {end} degrees."]
    return question, steps, end


TEMPLATES = [_shopping, _sharing, _boxes, _wages, _temperature]


def make_arithmetic_problems(n: int, seed: int) -> list[Problem]:
    """`n` distinct (by question text) 2-4 step arithmetic word problems, the same for the same seed."""
    rng = random.Random(seed)
    problems, seen = [], set()
    for _ in range(100 * n):
        if len(problems) == n:
            break
        template = rng.choice(TEMPLATES)
        question, steps, answer = template(rng, rng.choice(NAMES), rng.choice(ITEMS))
        if question not in seen:
            seen.add(question)
            problems.append(Problem(question, "\n".join(steps + [f"The answer is {answer}."]), str(answer)))
    if len(problems) < n:
        raise ValueError(f"n: could only make {len(problems)} distinct problems, asked for {n}")
    return problems


def train_eval_problems(n_train: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and eval sets (no question text in both); the eval set does not depend on n_train."""
    problems = make_arithmetic_problems(n_eval + n_train, seed)
    return problems[n_eval:], problems[:n_eval]


# ---------------------------------------------------------------- JSONL data files

def _field(row: dict, name: str, where: str) -> str:
    """row[name], which must be a string."""
    if name not in row:
        raise ValueError(f"{where}missing field '{name}' (expected a string)")
    if not isinstance(row[name], str):
        raise ValueError(f"{where}field '{name}' must be a string, got {type(row[name]).__name__}")
    return row[name]


def _parse_row(row, where: str) -> Problem:
    """One JSONL row: {"problem", "solution", "answer"}, or GSM8K {"question", "answer": "... #### N"}."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}expected a JSON object per line, got {type(row).__name__}")
    if "problem" in row:
        problem = Problem(_field(row, "problem", where), _field(row, "solution", where),
                          _field(row, "answer", where).strip())
    elif "question" in row:
        question, text = _field(row, "question", where), _field(row, "answer", where)
        if "#### " not in text:
            raise ValueError(f"{where}field 'answer' must end with '#### <final answer>' (GSM8K format)")
        solution, answer = text.rsplit("#### ", 1)
        # GSM8K's <<48/2=24>> calculator annotations are dropped from the teacher's context.
        problem = Problem(question, GSM8K_CALCULATOR.sub("", solution).strip(), answer.strip().replace(",", ""))
    else:
        raise ValueError(f"{where}missing field 'question' (GSM8K row) or 'problem' (problem/solution row)")
    if _to_number(problem.answer) is None:
        raise ValueError(f"{where}field 'answer': final answer must be a number, got {problem.answer!r}")
    return problem


def load_problems(path) -> list[Problem]:
    """Every problem of a JSONL file; blank lines are skipped, anything malformed raises ValueError."""
    problems, lineno = [], 0
    with open(path, "rb") as f:  # bytes: json.loads decodes each line, so bad UTF-8 gets a line number
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}: "
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}invalid JSON ({e})") from None
            problems.append(_parse_row(row, where))
    if not problems:
        raise ValueError(f"{path}:{lineno}: no problems in file (expected one JSON object per line)")
    return problems


# ---------------------------------------------------------------- verifier

def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance, e.g. `\\frac{1}{2}`; None if none."""
    for start in reversed([m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The last `\\boxed{}` content, else the number after the last `#### `, else the last number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    after_hashes = NUMBER.search(text.rsplit("#### ", 1)[1]) if "#### " in text else None
    if after_hashes:
        return after_hashes.group()
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


# What models write around a number in a box, and what a careful grader ignores: LaTeX spacing, dollar
# signs, degrees, percent, \text{} / \mathrm{} wrappers and a trailing unit word ("18 apples").
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~|\\left|\\right|[\u2009\u202f\u00a0]")
_DECORATION = re.compile(r"\\\$|\$|\\%|%|\^\s*\{?\\circ\}?|\\circ|°|\\degree|\{,\}")
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRACTION = re.compile(r"\\[dt]?frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)")
_UNIT = re.compile(r"(?<=\d)\s*(?:[A-Za-z]+\.?\s*)+$")  # "12 dollars", "7 cm", "3 p.m."
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:([, ])\d{3})(?:\1\d{3})*(?:\.\d+)?")
DASHES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2012": "-", "\ufe63": "-", "\uff0d": "-"})


def normalise_answer(text: str) -> str:
    """`text` with what does not change its value removed: `\\$12.00` → `12.00`, `-3^\\circ` → `-3`,
    `\\text{12 dollars}` → `12`, `10\\%` → `10`, `{{5}}` → `5`, `\\dfrac12` → `\\frac{1}{2}`,
    `x = 5` → `5`, a Unicode minus → `-`."""
    s = text.translate(DASHES)
    s = _SPACING.sub(" ", s)
    for _ in range(3):  # wrappers inside wrappers
        s = _WRAPPER.sub(r"\1", s)
    s = _DECORATION.sub("", s)
    s = _FRACTION.sub(lambda m: "\\frac{%s}{%s}" % tuple(g.strip("{}").strip() for g in m.groups()), s)
    s = s.rsplit("=", 1)[-1].strip()  # "x = 5"
    while s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        s = s[1:-1].strip()
    s = _UNIT.sub("", s).strip().rstrip(".").strip()
    return " ".join(s.split())


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def _to_number(text: str) -> float | None:
    """The value of an answer string after `normalise_answer`: a decimal (`1,000` and `1 000` are
    thousands, `1, 2` is a list and no number), `a/b`, `\\frac{a}{b}`, `-\\frac{a}{b}`; None otherwise."""
    s = normalise_answer(text)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    fraction = re.fullmatch(r"([-+]?)\s*\\frac\{(.+)\}\{(.+)\}|([-+]?[\d.]+)\s*/\s*([-+]?[\d.]+)", s)
    if fraction:
        sign, *parts = fraction.groups()
        parts = [p for p in parts if p is not None]
        values = [_decimal(p) for p in parts]
        if None in values or values[1] == 0:
            return None
        return (-1 if sign == "-" else 1) * values[0] / values[1]
    return _decimal(s)


def _decimal(s: str) -> float | None:
    s = s.strip()
    return float(s) if DECIMAL.fullmatch(s) else None


def is_correct(completion: str, answer: str) -> bool:
    """Whether the completion's extracted answer equals `answer`: numerically, else as normalised strings."""
    predicted = extract_answer(completion)
    if predicted is None:
        return False
    x, y = _to_number(predicted), _to_number(answer)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
    return normalise_answer(predicted) == normalise_answer(answer)


# ---------------------------------------------------------------- prompts

def student_messages(problem: Problem) -> list[dict]:
    """The student's chat: the question only."""
    return [{"role": "user", "content": f"{problem.question}\n{INSTRUCTION}"}]


def teacher_messages(problem: Problem) -> list[dict]:
    """The teacher's chat: the question and the reference solution; ends with the student's instruction."""
    content = (f"{problem.question}\n\nHere is a reference solution:\n{problem.solution}\n\n"
               f"Now solve the problem yourself, in your own words.\n{INSTRUCTION}")
    return [{"role": "user", "content": content}]
