"""Problems, data files, prompts and the verifier for on-policy self-distillation.

A `Problem` is a question, a worked reference solution (the teacher's privileged context s*) and the
final answer as a string ("42", "-3", "2.5"). Problems come from a JSONL file (GSM8K rows or
problem/solution/answer rows); the built-in ones are the GSM8K-level files shipped in data/ (reasoning-gym's
gsm_symbolic, whole templates held out for evaluation; data/make_gsm_symbolic.py regenerates them).
The verifier reads the answer from the LAST `\\boxed{...}` of a completion's answer (after the model's thinking,
where it thinks first) and compares it numerically.
"""

import functools
import hashlib
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass

import torch

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
BUILT_IN = {"train": os.path.join(DATA_DIR, "gsm_symbolic_train.jsonl"), "eval": os.path.join(DATA_DIR, "gsm_symbolic_eval.jsonl")}
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
DECIMAL = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
GSM8K_CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass
class Problem:
    """One problem; `solution` is what the teacher sees and the student does not."""
    question: str
    solution: str  # worked, step-by-step reference solution: the teacher's privileged context
    answer: str  # final answer as a string, e.g. "42", "-3", "2.5"
    template: int | None = None  # the generator's template (built-in problems), else None

    @property
    def id(self) -> str:
        """A short hash of the question: runs pair their evaluations by problem, whatever the file's order."""
        return hashlib.sha1(self.question.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- JSONL data files

def _field(row: dict, name: str, where: str) -> str:
    """row[name], which must be a string."""
    if name not in row:
        raise ValueError(f"{where}missing field '{name}' (expected a string)")
    if not isinstance(row[name], str):
        raise ValueError(f"{where}field '{name}' must be a string, got {type(row[name]).__name__}")
    return row[name]


def _parse_row(row, where: str, numeric: bool) -> Problem:
    """One JSONL row: {"problem", "solution", "answer"}, or GSM8K {"question", "answer": "... #### N"}."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}expected a JSON object per line, got {type(row).__name__}")
    if "problem" in row:
        template = row.get("template")
        if template is not None and (isinstance(template, bool) or not isinstance(template, (str, int))):
            raise ValueError(f"{where}field 'template' must be a string or an integer, got {type(template).__name__}")
        problem = Problem(_field(row, "problem", where), _field(row, "solution", where),
                          _field(row, "answer", where).strip(), template)
    elif "question" in row:
        question, text = _field(row, "question", where), _field(row, "answer", where)
        if "#### " not in text:
            raise ValueError(f"{where}field 'answer' must end with '#### <final answer>' (GSM8K format)")
        solution, answer = text.rsplit("#### ", 1)
        # GSM8K's <<48/2=24>> calculator annotations are dropped from the teacher's context.
        problem = Problem(question, GSM8K_CALCULATOR.sub("", solution).strip(), answer.strip().replace(",", ""))
    else:
        raise ValueError(f"{where}missing field 'question' (GSM8K row) or 'problem' (problem/solution row)")
    if numeric and _to_number(problem.answer) is None:
        raise ValueError(f"{where}field 'answer': final answer must be a number, got {problem.answer!r} "
                         "(symbolic answers need --verifier math-verify)")
    return problem


def load_problems(path, numeric: bool = True) -> list[Problem]:
    """Every problem of a JSONL file; blank lines are skipped, anything malformed raises ValueError.
    numeric: every final answer must be a number (the built-in verifier compares numbers).
    A question that comes again is kept once, where it came first, with a warning: a problem is known by its
    question (`Problem.id`), and a repeat could otherwise be held out and trained on at once."""
    problems, lineno, first_line, repeats = [], 0, {}, []
    with open(path, "rb") as f:  # bytes: json.loads decodes each line, so bad UTF-8 gets a line number
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}: "
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}invalid JSON ({e})") from None
            problem = _parse_row(row, where, numeric)
            if problem.question in first_line:
                repeats.append(f"line {lineno} repeats line {first_line[problem.question]}")
                continue
            first_line[problem.question] = lineno
            problems.append(problem)
    if not problems:
        raise ValueError(f"{path}:{lineno}: no problems in file (expected one JSON object per line)")
    if repeats:
        warnings.warn(f"{path}: {len(repeats)} repeated question{'s' * (len(repeats) > 1)} kept once, where each came first "
                      f"({', '.join(repeats[:3])}{', ...' if len(repeats) > 3 else ''})")
    return problems


def built_in_problems(n_train: int, n_eval: int) -> tuple[list[Problem], list[Problem]]:
    """The first `n_train` training and `n_eval` held-out problems shipped in data/ (2,000 and 400 at most);
    no held-out problem shares a template with a training one."""
    return load_problems(BUILT_IN["train"])[:n_train], load_problems(BUILT_IN["eval"])[:n_eval]


# ---------------------------------------------------------------- the data of a run, in a fixed order that a
# resumed run finds again from the step alone

def load_data(cfg) -> tuple[list, list]:
    """(training problems, held-out problems) from --data / --eval-data, or the built-in problems."""
    if cfg.data:
        problems = load_problems(cfg.data, numeric=cfg.verifier == "builtin")
        split = 0 if cfg.eval_data or not cfg.eval_size else max(1, min(cfg.eval_size, len(problems) // 5))
        eval_problems, train_problems = problems[:split], problems[split:]
    else:
        train_problems, eval_problems = built_in_problems(cfg.train_size, cfg.eval_size)
    if cfg.eval_data:
        eval_problems = load_problems(cfg.eval_data, numeric=cfg.verifier == "builtin")[: cfg.eval_size]
    if not train_problems:
        sys.exit(f"--data: {cfg.data} leaves no training problem after the held-out split")
    print(f"data: {len(train_problems)} training problems ({cfg.data or 'built-in'}), {len(eval_problems)} held-out "
          f"({cfg.eval_data or cfg.data or 'built-in'})")
    return train_problems, eval_problems


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def batch_problems(problems: list, step: int, batch_size: int, seed: int) -> list:
    """Problems of `step`: the next slice of a seeded permutation per epoch, found from the step alone."""
    positions = (divmod(p, len(problems)) for p in range(step * batch_size, (step + 1) * batch_size))
    return [problems[epoch_order(len(problems), seed, epoch)[i]] for epoch, i in positions]


# ---------------------------------------------------------------- verifier

def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance and that holds something, e.g. `\\frac{1}{2}`
    (an empty `\\boxed{}` after the answer, the instruction repeated, does not hide it); "" where every box is
    empty; None if there is none."""
    found = None
    for start in reversed([m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i].strip()
                break
        if found and normalise_answer(found):  # (`\\boxed{\\,}` and `\\boxed{\\text{}}` hold nothing either)
            return found
    return "" if found is not None else None


def answer_part(text: str) -> str:
    """What a completion gives as its answer, outside the model's thinking (Qwen3's thinking mode writes
    `<think> … </think>` and then the answer): what follows the last `</think>` (all of it where there is
    none), up to a `<think>` opened there and never closed. A draft inside the thinking is not the answer.
    (A `</think>` written as text in the answer still ends the thinking, as Qwen's own parser reads it.)"""
    return text.rsplit("</think>", 1)[-1].split("<think>", 1)[0]


# GSM8K's "#### 42" ("#### $42", "#### **42**"); not a heading "#### 2. Add" or "#### 1) Count"
_MARKER = re.compile(r"####[ \t*$€£\\]*(%s)(?![.):]\s*[A-Za-z])" % NUMBER.pattern)


def extract_answer(text: str) -> str | None:
    """Of the answer part (`answer_part`): the last `\\boxed{}` content, else the number right after the last
    `####` followed by one (a markdown heading "#### Step 2: ..." is no marker), else the last number."""
    text = answer_part(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    markers = _MARKER.findall(text.translate(DASHES))  # "#### −5"; not a heading "#### Step 2:"
    if markers:
        return markers[-1]
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


# What models write around a number in a box, and what a careful grader ignores: LaTeX spacing, currency
# signs (the built-in problems price in $, € and £), degrees, percent, \text{} / \mathrm{} wrappers and a
# trailing unit word ("18 apples").
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~|\\left|\\right|\\(?:displaystyle|textstyle|bf|it)(?![A-Za-z])|[\u2009\u202f\u00a0]")
_DECORATION = re.compile(r"\\\$|\$|€|£|¥|₹|\\(?:texteuro|euro|pounds|textsterling|yen)(?![A-Za-z])\s*(?:\{\})?|\\%|%"
                         r"|(?:\^\s*\{?\\circ\}?|\\circ|°|\\degree)(?:\s*[CF](?![A-Za-z]))?|\{,\}")
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|textup|textnormal|emph|underline|mathrm|mathbf|mathit|mathsf|"
                      r"boldsymbol|mbox|operatorname)\s*\{([^{}]*)\}")
_COLOUR = re.compile(r"\\(?:textcolor|color)\s*\{[^{}]*\}")  # \textcolor{red}{15}, {\color{red} 15}: the colour goes
_FRACTION = re.compile(r"\\[dt]?frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)")
# a unit: words after a number, after a space or of two letters or more ("12 dollars", "7cm", "3 p.m.", "10 km/h"),
# or of two letters or more after a fraction ("\frac{1}{2} cup"), or a rate's unit after a slash ("\$15/hour", from a
# list: "12/pi" and "60/speed" are no rates); one letter right after a digit or a fraction is a variable ("2x",
# "\frac{3}{4} x"). A word may hold a hyphen before three letters or more ("go-karts", "T-shirts"; not "x-y"), end
# in "'s" ("children's"), and carry a square or a cube if it is m or of two letters or more ("m^2", "cm^{3}", "ft²";
# not "x^2"). Each word whole (no backtracking into its letters).
_UNIT_WORD = (r"(?:(?:[A-Za-z]{2,}|m)(?![A-Za-z])(?:\^\{?[23]\}?|[²³])"  # squared or cubed
              r"|[A-Za-z]+(?:-[A-Za-z]{3,})*(?:['’]s)?(?![A-Za-z]))")
_RATE = (r"(?:hour|hr|h|day|week|wk|month|year|yr|minute|min|second|sec|night|person|people|student|child|children|kid|"
         r"guest|adult|item|piece|unit|box|pack|bag|dozen|ticket|page|game|class|lesson|session|visit|meal|cup|kg|g|lb|"
         r"pound|ounce|oz|mile|km|m|ft|foot|feet|gallon|liter|litre|acre|sq)s?(?![A-Za-z])")
_UNIT = re.compile(r"(?:(?<=\d)(?<!\^\d)(?:\s+|(?=[A-Za-z]{2}))|(?<=\})(?<!\^\{\d\})\s*(?=[A-Za-z]{2})"
                   r"|(?<=[\d}])(?<!\^\d)(?<!\^\{\d\})\s*/\s*(?=%s))"  # (not after a square: "m^2 m^2 …" in linear time)
                   r"(?:%s(?:\s*/\s*%s)?\.?\s*)+$" % (_RATE, _UNIT_WORD, _UNIT_WORD))
# Words after a number that change its value: a scale multiplies it ("1.5 million dollars" is 1500000), the others
# leave no number to read ("2 and a half hours", "40 or more", "15 is not possible", "3 thousands"). Not "more",
# "fewer" or "quarters": "5 more apples" answers "how many more", and "12 quarters" counts coins.
_SCALES = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9}
_NOT_UNITS = {"and", "or", "not", "half", "halves", "third", "thirds", "hundreds", "thousands", "millions", "billions"}
_PAREN_UNIT = re.compile(r"(?<=[\d}])\s+\((?=\s*[A-Za-z]{2})(?:\s*%s\.?)+\s*\)\s*\.?$" % _UNIT_WORD)  # "15 (apples)"; not "15 (x)"
_SCIENTIFIC = re.compile(r"([-+]?\d+(?:\.\d+)?)\s*(?:(?:\\times|\\cdot|×|·)\s*10\s*\^\s*(?:\{\s*([-+]?\d{1,3})\s*\}|(\d))"
                         r"|[eE]([-+]?\d{1,3}))")  # 1.5 \times 10^{3}, 1.5e3 (an exponent unbraced is one digit, as in LaTeX)
_LABEL = re.compile(r"^(?:(?:the\s+)?(?:final\s+)?(?:answer|total|result|solution)(?:\s+is)?)\s*:\s*", re.IGNORECASE)
_TEXT_UNIT = re.compile(r"(?<=\d)\s*\\(?:text|mbox|mathrm)\s*\{\s*([A-Za-z]+\.?)\s*\}")  # 5\text{m}: a unit word, spaced
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:([, ])\d{3})(?:\1\d{3})*(?:\.\d+)?")
DASHES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2012": "-", "\ufe63": "-", "\uff0d": "-"})


def normalise_answer(text: str, units: bool = True) -> str:
    """`text` with what does not change its value removed: `\\$12.00` → `12.00`, `-3^\\circ` → `-3`,
    `\\text{12 dollars}` → `12`, `10\\%` → `10`, `{{5}}` → `5`, `\\dfrac12` → `\\frac{1}{2}`,
    `x = 5` → `5`, a Unicode minus → `-`; `x^2+2x` and `2x` stay as they are. A unit goes only after a
    number, and only with `units` (a symbolic answer is compared without removing any)."""
    s = text.translate(DASHES)
    s = _SPACING.sub(" ", s)
    s = _TEXT_UNIT.sub(r" \1", s)
    s = _COLOUR.sub("", s)
    for _ in range(3):  # wrappers inside wrappers
        s = _WRAPPER.sub(r"\1", s)
    s = _DECORATION.sub("", s)
    s = _FRACTION.sub(lambda m: "\\frac{%s}{%s}" % tuple(g.strip("{}").strip() for g in m.groups()), s)
    s = s.rsplit("=", 1)[-1].strip()  # "x = 5"
    parts = re.split(r"\\approx|≈", s)  # "x \approx 5", "\approx 5"; not "4.6 \approx 5", a rounded value
    if len(parts) > 1 and all(_value(p.strip()) is None for p in parts[:-1]):
        s = parts[-1].strip()
    s = _LABEL.sub("", s)  # a label: "Answer: 5", "\text{Total: } 5"
    s = _unwrapped(s, "{}")  # "{{5}}"
    s = re.sub(r"^([-+])\s+", r"\1", " ".join(s.split()))  # "- 3" → "-3"
    for unit in (_PAREN_UNIT, _UNIT) if units else ():  # "15 (apples)", then "18 apples", "\frac{1}{2} cup"
        found = unit.search(s)
        value = _value(s[:found.start()].strip()) if found else None
        if value is not None:  # only after a number: not "x^2+2x"
            words = [w.lower() for w in re.findall(r"[A-Za-z]+", found.group())]
            if _NOT_UNITS.intersection(words) or _SCALES.keys() & set(words[1:]):
                break  # words that change the value are no unit: "2 and a half", "40 or more" stay unread
            s = f"{value * _SCALES[words[0]]:.15g}" if words[0] in _SCALES else s[:found.start()].rstrip()  # "1.5 million"
    return s.strip().rstrip(".").strip()


def _unwrapped(s: str, pair: str) -> str:
    """`s` without up to three pairs of `pair` around the whole of it ("{{5}}", "((15))"): each check reads the
    whole string, so more pairs would cost n² time on a degenerate nest."""
    for _ in range(3):
        if s.startswith(pair[0]) and s.endswith(pair[1]) and _balanced(s[1:-1], pair):
            s = s[1:-1].strip()
    return s


def _balanced(s: str, pair: str) -> bool:
    depth = 0
    for c in s:
        depth += {pair[0]: 1, pair[1]: -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def _to_number(text: str) -> float | None:
    """The value of an answer string after `normalise_answer`: a decimal (`1,000` and `1 000` are
    thousands, also in a fraction; `1, 2` is a list and no number), `a/b`, `\\frac{a}{b}`, `-\\frac{a}{b}`; None
    otherwise."""
    return _value(normalise_answer(text))


def _value(s: str) -> float | None:
    """The value of a normalised answer string (`_to_number`), None where it is no number."""
    inner = _unwrapped(s, "()")  # "(15)", "((15))"
    return None if inner != s and "," in inner else _number(inner)  # "(1, 2)" and "(1,234)" are pairs, no number


def _number(s: str) -> float | None:
    """`_value` of a string without parentheses around it."""
    s = _without_thousands(s)
    fraction = re.fullmatch(r"([-+]?)\s*\\frac\{(.+)\}\{(.+)\}|([-+]?[\d.,]+(?: \d{3})*)\s*/\s*([-+]?[\d.,]+(?: \d{3})*)", s)
    if fraction:
        sign, *parts = fraction.groups()
        parts = [p for p in parts if p is not None]
        values = [_decimal(_without_thousands(p.strip())) for p in parts]  # \frac{1,000}{2}, 1,000/2
        if None in values or values[1] == 0:
            return None
        return (-1 if sign == "-" else 1) * values[0] / values[1]
    mixed = re.fullmatch(r"([-+]?)(\d+)(?:\s*\\frac\{(\d+)\}\{(\d+)\}|\s+(\d+)\s*/\s*(\d+))", s)  # 2\frac{1}{2}, 2 1/2
    if mixed:  # a mixed number, its fraction proper (`1 000/2` is a thousand halves, read above)
        sign, whole, *parts = mixed.groups()
        numerator, denominator = (int(p) for p in parts if p is not None)
        if 0 < numerator < denominator:
            return (-1 if sign == "-" else 1) * (int(whole) + numerator / denominator)
    scientific = _SCIENTIFIC.fullmatch(s)
    if scientific:
        mantissa, *exponent = scientific.groups()
        value = float(f"{mantissa}e{next(e for e in exponent if e is not None)}")
        return value if math.isfinite(value) and (value == 0) == (float(mantissa) == 0) else None  # no 0 from 5e-999
    return _decimal(s)


def _without_thousands(s: str) -> str:
    """`1,000` and `1 000` as `1000` where the separators group the whole string in threes; else `s` as is."""
    return s.replace(",", "").replace(" ", "") if _THOUSANDS.fullmatch(s) else s


def _decimal(s: str) -> float | None:
    s = s.strip()
    return float(s) if DECIMAL.fullmatch(s) else None


def is_correct(completion: str, answer: str) -> bool:
    """Whether the completion's extracted answer equals `answer`: numerically where `answer` is a number,
    else as normalised text."""
    predicted = extract_answer(completion)
    if predicted is None:
        return False
    x, y = _to_number(predicted), _to_number(answer)
    if y is not None:  # a numeric reference: the same number (a list such as "1, 2" is none)
        return x is not None and math.isclose(x, y, rel_tol=1e-9)  # (0 only as 0: 1e-10 is no 0)
    return (normalise_answer(predicted, units=False).replace(" ", "")  # LaTeX ignores spaces
            == normalise_answer(answer, units=False).replace(" ", ""))


def is_correct_symbolic(completion: str, answer: str) -> bool:
    """`is_correct`, else symbolic equality by the math-verify library (an optional extra: pip install
    math-verify) of the normalised extracted answer and `answer`, both read as LaTeX: `\\sqrt{8}` equals
    `2\\sqrt{2}`, `\\pi/2` equals `\\frac{\\pi}{2}`, `{2, 1}` equals `{1, 2}`."""
    if is_correct(completion, answer):
        return True
    from math_verify import parse, verify

    predicted = extract_answer(completion)
    if predicted is None:
        return False
    gold, guess = parse(f"${answer}$"), parse(f"${normalise_answer(predicted, units=False)}$")
    return bool(gold and guess and verify(gold, guess))


# ---------------------------------------------------------------- prompts

def student_messages(problem: Problem) -> list[dict]:
    """The student's chat: the question only."""
    return [{"role": "user", "content": f"{problem.question}\n{INSTRUCTION}"}]


def teacher_messages(problem: Problem) -> list[dict]:
    """The teacher's chat: the question and the reference solution; ends with the student's instruction."""
    content = (f"{problem.question}\n\nHere is a reference solution:\n{problem.solution}\n\n"
               f"Now solve the problem yourself, in your own words.\n{INSTRUCTION}")
    return [{"role": "user", "content": content}]
