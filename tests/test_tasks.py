"""trainer/tasks.py: the verifier on what models write (graded as a careful grader would), the data files
of both formats, the built-in problems and their held-out templates, and clear errors for bad files.
"""

import importlib.util
import json
import random
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from trainer.tasks import (INSTRUCTION, Problem, batch_problems, built_in_problems, epoch_order, is_correct, is_correct_symbolic,
                           load_data, load_problems, student_messages, teacher_messages)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("completion, answer, correct", [
    ("So the answer is \\boxed{42}.", "42", True),
    ("first \\boxed{3}, then \\boxed{4}", "4", True),  # the last box counts
    ("\\boxed{\\frac{1}{2}}", "0.5", True),  # nested braces
    ("\\boxed{1,000}", "1000", True), ("\\boxed{$18.00}", "18", True),
    ("she has 5 apples, then 7\n#### 12", "12", True),  # GSM8K's marker before the last number
    ("#### 5\nno, recount: 5 + 7\n#### 12", "12", True),  # the number after the LAST marker
    ("so she is 5 short\n#### \u22125", "-5", True), ("so she is 5 short\n#### \u22125", "5", False),  # a Unicode minus
    ("#### Step 1: count\nShe has 20.\n#### Step 2: add\nSo it held 22 spoons.", "22", True),  # markdown headings,
    ("#### Step 1: count\nShe has 20.\n#### Step 2: add\nSo it held 22 spoons.", "2", False),  # not the marker
    ("so\n#### $42", "42", True), ("so\n#### **42**", "42", True),
    ("#### 2. Add\nShe has 20 and 2 more.\n#### 3) Total\nSo it held 22 spoons.", "22", True),  # numbered headings
    ("3 + 4 = 7", "7", True), ("3 + 4 = 7", "8", False),  # else the last number
    ("\\boxed{-3}", "-3", True), ("\\boxed{-3}", "3", False),
    ("no number at all", "7", False), ("\\boxed{seven}", "7", False),
    # a model that thinks first (Qwen3's thinking mode): only what follows the last </think> is the answer
    ("<think>\nmaybe \\boxed{37}? no.\n</think>\n\nThe answer is **22**.", "22", True),
    ("<think>\n22 + 15 = 37\n#### 37\n</think>\n\nThe answer is 22.", "37", False),
    ("<think>\nso it is 22\n</think>\n\n", "22", False),  # no answer after the thinking
    ("<think>\nso it is 22, then", "22", False),  # the thinking never closed
    ("<think>\n1 + 1\n</think>\n\nThe answer is 22.\n<think>\nhmm, maybe 37", "22", True),  # nor the one after it
    ("so it is 22\n</think>\n\n\\boxed{22}", "22", True),  # the prompt opened the thinking
    ("<think>\na\n</think>\n\\boxed{37}\n<think>\nb\n</think>\n\n\\boxed{22}", "22", True),  # the LAST </think>
    ("The answer is 22.\n<think>\nhmm 37\n<think>\nno", "22", True),  # up to the FIRST <think> opened after it
])
def test_the_verifier_reads_the_last_box_then_the_marker_then_the_last_number(completion, answer, correct):
    assert is_correct(completion, answer) is correct


# What real models write in the box, with the verdict a careful grader gives (answer, then the completion's end).
DECIMAL_ANSWER = re.compile(r"-?\d+(\.\d+)?")
GRADED = [
    # currency, in and around the box
    ("12", r"The total is \boxed{\$12}.", True), ("12", r"\boxed{\$12.00}", True), ("12", r"\boxed{\text{\$}12}", True),
    ("1250.5", r"\boxed{\$1,250.50}", True), ("12", r"\boxed{12 \text{ dollars}}", True), ("12", r"\boxed{\$13}", False),
    ("22", r"\boxed{€22}", True), ("22", r"\boxed{\text{€}22}", True), ("22.5", r"\boxed{€22.50}", True),  # 13% of the
    ("1250", r"\boxed{£1,250}", True), ("22.5", r"\boxed{\pounds22.50}", True), ("12", r"\boxed{€13}", False),  # problems
    # an empty box after the answer (the instruction repeated) hides nothing; an empty box alone is no answer
    ("42", r"\boxed{42}. So the final answer is \boxed{}.", True), ("7", r"\boxed{ }", False),
    ("42", r"\boxed{42} \boxed{\,}", True), ("42", r"\boxed{42} \boxed{\text{}}", True),
    # units, degrees, percent
    ("18", r"\boxed{18 apples}", True), ("18", r"\boxed{18\text{ apples}}", True), ("7", r"\boxed{7 \mathrm{cm}}", True),
    ("-3", r"\boxed{-3^\circ}", True), ("25", r"\boxed{25^{\circ}\text{C}}", True), ("25", r"\boxed{25°}", True),
    ("10", r"\boxed{10\%}", True), ("10", r"\boxed{10 \%}", True), ("10", r"\boxed{11\%}", False),
    ("5", r"\boxed{5\mathrm{m}}", True), ("42", r"\boxed{42\mathrm{h}}", True),
    # words that change the value: a scale multiplies it, others leave no number
    ("1500000", r"\boxed{1.5 \text{ million}}", True), ("1.5", r"\boxed{1.5 \text{ million}}", False),
    ("12000", r"\boxed{\$12 \text{ thousand}}", True), ("300", r"\boxed{3 \text{ hundred}}", True),
    ("3", r"\boxed{3 \text{ hundred}}", False), ("1500000", r"\boxed{1.5 million dollars}", True),
    ("2.5", r"\boxed{2 \text{ and a half hours}}", False), ("2", r"\boxed{2 \text{ and a half hours}}", False),
    ("40", r"\boxed{40 \text{ or more}}", False), ("15", r"\boxed{15 \text{ is not possible}}", False),
    ("5", r"\boxed{5 \text{ more apples}}", True), ("20", r"\boxed{\$20 more}", True), ("3", r"\boxed{3 fewer pages}", True),
    ("12", r"\boxed{12 \text{ quarters}}", True),  # "how many more": a unit of the difference; coins
    ("18", r"\boxed{18cm}", True), ("5", r"\boxed{5 m}", True), ("0.5", r"\boxed{\frac{1}{2} \text{ cup}}", True),
    ("25", r"\boxed{25^{\circ}\text{F}}", True), ("5", r"\boxed{5\text{m}}", True), ("500", r"\boxed{500\mbox{g}}", True),
    ("-3", r"\boxed{- 3 \text{ m}}", True), ("-5", r"\boxed{- \$5 \text{ each}}", True), ("10", r"\boxed{10 \text{ km/h}}", True),
    ("0.75", r"\boxed{\frac{3}{4} x}", False),  # a variable after a fraction, not a unit
    ("15", r"\boxed{15 \text{ m}^2}", True), ("15", r"\boxed{15\,\text{cm}^{2}}", True), ("15", r"\boxed{15 \mathrm{m^3}}", True),
    ("15", r"\boxed{15 ft²}", True), ("12", r"\boxed{12 \text{ go-karts}}", True), ("8", r"\boxed{8 \text{ children's books}}", True),
    ("15", r"\boxed{\$15/\text{hour}}", True), ("15", r"\boxed{15/day}", True), ("10", r"\boxed{10 \mathrm{~km} / \mathrm{h}}", True),
    ("15", r"\boxed{15/x}", False),  # a rate's unit is a word, not a variable
    ("12", r"\boxed{12 \text{ T-shirts}}", True), ("2", r"\boxed{2\,x^2}", False), ("2", r"\boxed{2 x-y}", False),  # no units
    ("12", r"\boxed{12/pi}", False), ("60", r"\boxed{60/\text{speed}}", False),  # a rate's unit is a unit, not any word
    # minus signs and spacing
    ("-3", "\\boxed{\u22123}", True), ("-3", "\\boxed{\u2212 3}", True), ("3", "\\boxed{\u22123}", False),
    ("1234", r"\boxed{1\,234}", True), ("12000", "\\boxed{12\u202f000}", True), ("1234", r"\boxed{1{,}234}", True),
    # fractions: \frac12, \dfrac, \tfrac, a sign before them, a/b
    ("0.5", r"\boxed{\frac12}", True), ("0.5", r"\boxed{\dfrac12}", True), ("0.75", r"\boxed{\tfrac{3}{4}}", True),
    ("-0.75", r"\boxed{-\frac{3}{4}}", True), ("0.75", r"\boxed{-\frac{3}{4}}", False), ("0.75", r"\boxed{3/4}", True),
    ("0.5", r"\boxed{\frac{1}{0}}", False),
    # mixed numbers, the fraction proper (`1 000/2` above is a thousand halves)
    ("2.5", r"\boxed{2\frac{1}{2}}", True), ("2.75", r"\boxed{2 \dfrac{3}{4} \text{ cups}}", True), ("-2.5", r"\boxed{-2\frac12}", True),
    ("1.5", r"\boxed{1 1/2}", True), ("1", r"\boxed{2\frac{1}{2}}", False),  # not 2 times a half
    # nested braces and wrappers, "x = 5", a final period
    ("5", r"\boxed{{5}}", True), ("5", r"\boxed{{{5}}}", True), ("42", r"\boxed{\textbf{42}}", True),
    ("15", r"\boxed{(15)}", True), ("1.5", r"\boxed{\left(\frac{3}{2}\right)}", True), ("12", r"\boxed{(1, 2)}", False),
    ("1234", r"\boxed{(1,234)}", False),  # a pair in parentheses, not thousands
    ("15", r"\boxed{\displaystyle 15}", True), ("15", r"\boxed{\bf 15}", True), ("15", r"\boxed{\boldsymbol{15}}", True),
    ("15", r"\boxed{15 \textit{apples}}", True), ("15", r"\boxed{\underline{15}}", True), ("15", r"\boxed{\textcolor{red}{15}}", True),
    ("15", r"\boxed{{\color{blue} 15}}", True),
    # a unit in parentheses (words only: "15 (3)" and "15(x)" are products)
    ("15", r"\boxed{15 \text{ (apples)}}", True), ("15", r"\boxed{15 (US dollars).}", True), ("0.5", r"\boxed{\frac{1}{2} (cup)}", True),
    ("15", r"\boxed{15 (3)}", False), ("15", r"\boxed{15(x)}", False), ("15", r"\boxed{15 (x)}", False),  # (x: one letter)
    ("0.75", r"\boxed{\frac{3}{4} (x)}", False),
    # scientific notation
    ("1500", r"\boxed{1.5 \times 10^{3}}", True), ("1500", r"\boxed{1.5 \times 10^3}", True), ("1500", r"\boxed{1.5e3}", True),
    ("0.0015", r"\boxed{1.5\cdot 10^{-3}}", True), ("150", r"\boxed{1.5 \times 10^{3}}", False),
    ("5", r"\boxed{x = 2 + 3 = 5}", True),  # the value after the last "="
    ("5", r"\boxed{x = 5}", True), ("42", r"\boxed{42.}", True), ("7", r"\boxed {7}", True), ("7", r"\fbox{7}", True),
    ("15", r"\boxed{\text{Answer: } 15}", True), ("15", r"\boxed{\text{Total: }\$15}", True),  # a label
    ("7", r"\boxed{\text{The final answer is: } 7}", True), ("5", r"\boxed{\text{Not possible: } 5}", False),  # not any words
    ("15", r"\boxed{\approx 15}", True), ("15", r"\boxed{x \approx 15}", True),  # the value after the last "\approx",
    ("5", r"\boxed{4.6 \approx 5}", False),  # unless a number comes before it: 5 is then 4.6 rounded
    # thousands separators against lists
    ("1000", r"\boxed{1,000}", True), ("1234567", r"\boxed{1,234,567}", True), ("12", r"\boxed{1, 2}", False),
    ("12", r"\boxed{1,2}", False), ("12", r"\boxed{1 2}", False), ("1000", r"\boxed{1,0000}", False),
    ("10002", r"\boxed{1,000, 2}", False),  # a list of which one is written with a thousands separator
    ("500", r"\boxed{\frac{1,000}{2}}", True), ("500", r"\boxed{1,000/2}", True), ("0.0005", r"\boxed{1/2,000}", True),
    ("500", r"\boxed{1\,000/2}", True), ("500", r"\boxed{\frac{1 000}{2}}", True), ("500", r"\boxed{1 000 / 2}", True),
    ("500", r"\boxed{1,00/2}", False), ("500", r"\boxed{1 00/2}", False),  # thousands in a fraction: in threes only
    # a near miss is wrong; words between numbers are no unit (2 h 30 min is not 230)
    ("1000", r"\boxed{1001}", False), ("230", r"\boxed{2 \text{ hours } 30 \text{ minutes}}", False),
    # symbolic references (MATH-500 style): the built-in verifier refuses to load them, math-verify grades them
    (r"2\sqrt{2}", r"\boxed{2\sqrt{2}}", True), (r"2\sqrt{2}", r"\boxed{2 \sqrt{2}}", True), (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", True),
    (r"2\sqrt{2}", r"\boxed{\sqrt{6}}", False), (r"\frac{\pi}{2}", r"\boxed{\pi/2}", True), (r"x^2+1", r"\boxed{1 + x^2}", True),
    (r"\{1,2\}", r"\boxed{\{2, 1\}}", True), (r"(1, 2)", r"\boxed{(2, 1)}", False),
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}.}", True),  # math-verify reads the normalised answer (no final period)
    # a letter after a number is a variable there, not a unit: x^2+2 is not x^2+2x, nor is 3 the answer 3x
    (r"x^2+2x", r"\boxed{x^2+2}", False), (r"x^2+2x", r"\boxed{x^2 + 2x}", True), (r"3x", r"\boxed{3}", False),
    (r"3x", r"\boxed{3x}", True), (r"3x", r"\boxed{3 x}", True), (r"\frac{3}{4}x", r"\boxed{\frac{3}{4}\,x}", True),
]
NUMERIC = [row for row in GRADED if DECIMAL_ANSWER.fullmatch(row[0])]


@pytest.mark.parametrize("answer, completion, correct", NUMERIC)
def test_the_verifier_grades_what_models_write_as_a_careful_grader(answer, completion, correct):
    assert is_correct("Let me think step by step. 3 + 4 = 7. " + completion, answer) is correct


# Where math-verify, tried after the built-in verifier, reads more leniently than a careful grader (docs/TRAINER.md)
MATH_VERIFY_READS = {("40", r"\boxed{40 \text{ or more}}"): True}


@pytest.mark.parametrize("answer, completion, correct", GRADED)
def test_the_math_verify_verifier_grades_numbers_and_symbols_as_a_careful_grader(answer, completion, correct):
    pytest.importorskip("math_verify", reason="the optional extra math-verify is not installed")
    verdict = MATH_VERIFY_READS.get((answer, completion), correct)
    assert is_correct_symbolic("Let me think step by step. 3 + 4 = 7. " + completion, answer) is verdict


def test_data_files_of_both_formats_load_into_problems(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "How many?", "answer": "4 * 3 = <<4*3=12>>12\n#### 1,200"}) + "\n\n"
                    + json.dumps({"problem": "p", "solution": "s", "answer": " 7 "}) + "\n"
                    + json.dumps({"question": "q", "answer": "#### 5\nno, recount\n#### 12"}) + "\n"  # the LAST marker
                    + json.dumps({"problem": "p0", "solution": "s", "answer": "0", "template": "t"}) + "\n")  # 0 is a number
    gsm8k, own, recounted, zero = load_problems(path)
    assert (gsm8k.question, gsm8k.solution, gsm8k.answer) == ("How many?", "4 * 3 = 12", "1200")
    assert (own.question, own.solution, own.answer, own.template) == ("p", "s", "7", None)
    assert (recounted.solution, recounted.answer) == ("#### 5\nno, recount", "12")
    assert (zero.answer, zero.template) == ("0", "t")


def test_a_repeated_question_is_kept_once_with_a_warning_so_that_no_split_holds_it_out_and_trains_on_it(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(10)] + [{"question": "What is 0 + 1?", "answer": "#### 1"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=re.escape(f"{path}: 1 repeated question kept once, where each came first (line 11 repeats line 1)")):
        train, held_out = load_data(types.SimpleNamespace(data=str(path), eval_data="", eval_size=2, train_size=100, verifier="builtin"))
    assert len(train) + len(held_out) == 10 and not {p.id for p in train} & {p.id for p in held_out}


def test_built_in_problems_hold_out_whole_templates_and_are_solved_by_their_own_solutions():
    train, held_out = built_in_problems(2000, 400)
    assert (len(train), len(held_out)) == (2000, 400)
    train_templates, held_out_templates = {p.template for p in train}, {p.template for p in held_out}
    assert None not in train_templates | held_out_templates
    assert len(held_out_templates) >= 15 and not train_templates & held_out_templates
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert all(is_correct(p.solution, p.answer) for p in train + held_out)  # the worked solution ends "#### N"
    assert built_in_problems(3, 2) == (train[:3], held_out[:2])


def test_a_deep_nest_of_parentheses_or_braces_is_read_as_no_number_without_recursion():
    """Up to three pairs are taken off; a rule that took one per pair, recursively, raised RecursionError here (and
    with two calls per pair, took 2^n calls for n pairs); one that took every pair of braces read the whole string
    once per pair (n² time: a nest of 100k characters took minutes). The built-in verifier only: math-verify times
    out on it."""
    for inside in ("5", "x"):
        assert not is_correct("\\boxed{" + "(" * 2000 + inside + ")" * 2000 + "}", "5")
    assert not is_correct("\\boxed{" + "{\\color{red}" * 2000 + "5" + "}" * 2000 + "}", "5")
    assert is_correct(r"\boxed{{ {\color{red}{5}} }}", "5"), "three pairs are read"


def test_zero_is_read_only_from_a_zero():
    """No tolerance around 0 (it has no relative one): 1e-10 is a wrong answer, and 5e-999, which a float rounds to
    0, is read as no number (the built-in verifier only: math-verify rounds to 6 digits)."""
    for zero in ("0", "0.0", "-0", r"0 \times 10^{3}", r"\frac{0}{5}"):
        assert is_correct(f"\\boxed{{{zero}}}", "0"), zero
    for small in ("1e-10", r"1 \times 10^{-12}", "5e-999", "0.0000000001"):
        assert not is_correct(f"\\boxed{{{small}}}", "0"), small


def test_trainer_md_gives_the_size_of_this_table():
    text = " ".join((ROOT / "docs/TRAINER.md").read_text().split())
    assert f"a table of {len(GRADED)} real-looking answers ({len(NUMERIC)} with numeric references)" in text


def test_scientific_notation_reads_an_unbraced_exponent_as_one_digit_as_latex_does():
    """LaTeX typesets `10^12` as 10¹2, so it is not read as 10¹² (the built-in verifier only)."""
    assert is_correct(r"\boxed{2 \times 10^{12}}", "2000000000000")
    assert not is_correct(r"\boxed{2 \times 10^12}", "2000000000000")
    assert is_correct(r"\boxed{2 \times 10^1}", "20") and is_correct(r"\boxed{2E+3}", "2000")


@pytest.mark.parametrize("content, message", [
    ("", "no problems"), ('{"question": "q"\n', ":1: "), ('[1, 2]\n', ":1: "),
    ('{"problem": "p", "solution": "s"}\n', "answer"), ('{"question": "q", "answer": "no marker"}\n', "####"),
    ('{"problem": "p", "solution": "s", "answer": "7"}\n{"problem": "p", "solution": "s", "answer": "seven"}\n', ":2: "),
    ('{"problem": "p", "solution": "s", "answer": "2x"}\n', ":1: field 'answer': final answer must be a number, got '2x'"),
    ('{"problem": "p", "solution": "s", "answer": "(1,234)"}\n', ":1: field 'answer': final answer must be a number"),
    ('{"problem": "p", "answer": "7"}\n', ":1: missing field 'solution' (expected a string)"),
    ('{"problem": "p", "solution": ["s"], "answer": "7"}\n', ":1: field 'solution' must be a string, got list"),
    ('"problem"\n', ":1: expected a JSON object per line, got str"),  # a string holds "problem" too
    ('{"problem": "p", "solution": "s", "answer": "7", "template": true}\n', ":1: field 'template' must be a string or an "
     "integer, got bool"),
    (b'{"problem": "p", "solution": "s", "answer": "7"}\n{"problem": "\xff"}\n', ":2: invalid JSON ("),  # bad UTF-8
])
def test_a_bad_data_file_names_the_file_line_and_field(content, message, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as error:
        load_problems(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_each_epoch_takes_every_problem_once_in_a_seeded_order_of_its_own_found_from_the_step_alone():
    """Five batches of 4 from 10 problems: two epochs, the third batch wrapping across their end. A resumed run
    finds its batch from (step, seed) alone: the same in a fresh process (the cache cleared), and drawn without
    touching the global RNG (which sampling uses)."""
    problems = [f"p{i}" for i in range(10)]
    rng = torch.get_rng_state()
    batches = [batch_problems(problems, step, 4, seed=3) for step in range(5)]
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG is left as it was"
    assert [len(b) for b in batches] == [4] * 5
    first, second = sum(batches, [])[:10], sum(batches, [])[10:]
    assert sorted(first) == sorted(second) == sorted(problems), "each epoch takes every problem once"
    assert first != second and first != problems, "each epoch in an order of its own"
    assert first == [problems[i] for i in epoch_order(10, 3, 0)] and second == [problems[i] for i in epoch_order(10, 3, 1)]
    epoch_order.cache_clear()
    assert [batch_problems(problems, step, 4, seed=3) for step in (4, 2)] == [batches[4], batches[2]]
    assert [batch_problems(problems, step, 4, seed=4) for step in range(5)] != batches, "another seed, another order"


def test_the_student_sees_the_question_and_the_instruction_and_the_teacher_also_the_reference_solution():
    problem = Problem("How many apples?", "3 + 4 = 7 apples.\n#### 7", "7")
    assert student_messages(problem) == [{"role": "user", "content": "How many apples?\n" + INSTRUCTION}]
    (teacher,) = teacher_messages(problem)
    assert teacher["role"] == "user" and teacher["content"].startswith("How many apples?\n")
    assert "reference solution:\n3 + 4 = 7 apples.\n#### 7\n" in teacher["content"]
    assert teacher["content"].endswith("in your own words.\n" + INSTRUCTION), "the student's instruction ends it"


def test_a_problems_id_is_its_questions_alone_and_stays_what_recorded_runs_hold():
    """Runs pair evaluations by these ids, also with rows written by earlier versions: the id may not change."""
    assert Problem("How many apples?", "s", "7").id == Problem("How many apples?", "t", "8", 3).id == "4acf9e5a1662"
    assert built_in_problems(0, 1)[1][0].id == "3cb789fe3f88"


# ---------------------------------------------------------------- data/make_gsm_symbolic.py, the generator of the
# built-in files (it needs reasoning-gym, which the tests do not install: it runs on a stand-in)

TEMPLATES = sorted({json.loads(line)["template"] for name in ("train", "eval")
                    for line in (ROOT / f"data/gsm_symbolic_{name}.jsonl").read_text().splitlines()})


def load_generator():
    spec = importlib.util.spec_from_file_location("make_gsm_symbolic", ROOT / "data/make_gsm_symbolic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def held_out_templates(generator) -> set:
    """The templates the generator holds out: HELD_OUT_TEMPLATES of the 85, drawn with its seed."""
    return set(random.Random(generator.SEED).sample(TEMPLATES, generator.HELD_OUT_TEMPLATES))


@pytest.fixture
def generator(monkeypatch, tmp_path):
    """data/make_gsm_symbolic.py importing a stand-in for reasoning-gym 0.1.25 (tasks_ok: the 85 templates of
    the shipped files, a sorted list as reasoning-gym's is; each dataset draws templates 0-99, with repeated
    questions, and every fifth solution states 1 + 1 = 3), writing into tmp_path, 40 training and 12 held-out problems."""
    class Dataset:
        def __init__(self, size, seed):
            rng = random.Random(seed)
            self.task_indices = [rng.randrange(100) for _ in range(size)]
            self.questions = [f"template {t}: question {rng.randrange(3)}" for t in self.task_indices]

        def __getitem__(self, index):
            return {"question": self.questions[index], "answer": str(index),
                    "metadata": {"answer_cot": ("so 1 + 1 = 3 and " if index % 5 == 0 else "") + f"worked #### {index}"}}

    gym = types.ModuleType("reasoning_gym")
    gym.create_dataset = lambda name, size, seed: Dataset(size, seed) if name == "gsm_symbolic" else pytest.fail(name)
    leaf = types.ModuleType("reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic")
    leaf.tasks_ok = list(TEMPLATES)
    for name, module in (("reasoning_gym", gym), ("reasoning_gym.arithmetic", types.ModuleType("a")),
                         ("reasoning_gym.arithmetic.gsm_symbolic", types.ModuleType("b")), (leaf.__name__, leaf)):
        monkeypatch.setitem(sys.modules, name, module)
    module = load_generator()
    module.SHIPPED_SIZES = (module.TRAIN_SIZE, module.EVAL_SIZE)  # the sizes of the files in data/
    for name, value in (("HERE", str(tmp_path)), ("TRAIN_SIZE", 40), ("EVAL_SIZE", 12), ("version", lambda _: "0.1.25")):
        monkeypatch.setattr(module, name, value)
    return module


def test_the_generator_holds_out_whole_templates_and_writes_distinct_questions_with_their_template(generator, tmp_path):
    generator.main()
    train, held_out = (load_problems(tmp_path / f"gsm_symbolic_{name}.jsonl") for name in ("train", "eval"))
    assert (len(train), len(held_out)) == (40, 12)
    drawn = held_out_templates(generator)
    assert {p.template for p in held_out} <= drawn and not {p.template for p in train} & drawn
    for problems in (train, held_out):
        assert len({p.question for p in problems}) == len(problems), "no question twice"
        assert all(p.question.startswith(f"template {p.template}:") for p in problems), "each row names its own template"
        assert not any("1 + 1 = 3" in p.solution for p in problems), "a solution with an inexact step is skipped"
    generator.version = lambda _: "0.1.26"
    with pytest.raises(SystemExit, match="^reasoning-gym 0.1.25 expected .* got 0.1.26$"):
        generator.main()


def test_every_built_in_worked_solution_states_only_exact_arithmetic():
    """reasoning-gym's generators truncate with int(): for some numbers a solution states "$137.20 - $39.20 = $97"
    (98) or 41.6 students as 41, and its reference answer follows it (57 such training problems were shipped
    once). The data script skips them; the steps of a longer expression are not judged."""
    inexact_steps = load_generator().inexact_steps
    assert inexact_steps("He has $137.20 - $39.20 = $97 left.\n#### 97") == ["$137.20 - $39.20 = $97"]
    assert inexact_steps("561.0 / 1.1 = 509 bags; 0.52 * 80 = 41 students; 11 x 0.5 = 5 tubes") == [
        "561.0 / 1.1 = 509", "0.52 * 80 = 41", "11 x 0.5 = 5"]
    assert inexact_steps("5 + 3 * 2 = 11, then 137.20 - 39.20 = 98 and 0.52 * 80 = 41.6; 7 / 0 = 0") == []
    assert inexact_steps("He has $137.20 - $39.20 = $97.") == ["$137.20 - $39.20 = $97"], "a step that ends a sentence"
    assert inexact_steps("$1,200 + 300 = 1,500 apples, and 1,200 + 300 = 1,400.") == ["1,200 + 300 = 1,400"]
    train, held_out = built_in_problems(2000, 400)
    assert [p.question[:60] for p in train + held_out if inexact_steps(p.solution)] == []


def test_the_shipped_files_are_the_generators_sizes_and_held_out_templates(generator):
    """What the generator's constants say of the files it wrote: their sizes, the held-out templates it draws
    (with its seed, of the 85 templates) and distinct questions in each."""
    train, held_out = built_in_problems(10**6, 10**6)
    assert (len(train), len(held_out)) == generator.SHIPPED_SIZES
    drawn = held_out_templates(generator)
    assert {p.template for p in held_out} == drawn and {p.template for p in train} == set(TEMPLATES) - drawn
    assert len({p.question for p in train}) == len(train) and len({p.question for p in held_out}) == len(held_out)

