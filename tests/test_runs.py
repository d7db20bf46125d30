"""What runs on a lent GPU need, on the tiny model: sampled evaluation (avg@K) from its own seeded stream,
one step-0 evaluation shared by every arm, a time budget that leaves room for the final evaluation,
G rollouts per problem with GRPO's group advantage, and the one-call runner of several arms."""

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import egrsd
import train_min
from trainer import config, run_io
from test_trainer import TINY, read_metrics, without_timings


def evaluations(run_dir) -> list[dict]:
    return [without_timings(r) for r in read_metrics(run_dir) if r["kind"] == "eval"]


def test_sampled_evaluation_draws_its_own_stream_and_leaves_training_as_it_was(tmp_path, monkeypatch):
    """avg@K at the paper's evaluation settings from --eval-seed: two runs with different training seeds
    evaluate the untrained model identically, and a run with avg@K trains exactly as one without it."""
    calls, generate = [], train_min.generate

    def spy(*args, greedy=False, sampling=None, **kwargs):
        calls.append((greedy, sampling))
        return generate(*args, greedy=greedy, sampling=sampling, **kwargs)

    monkeypatch.setattr(train_min, "generate", spy)
    flags = TINY + ["--steps", "2", "--eval-every", "1", "--no-save-model", "--max-new-tokens", "12"]
    for name, extra in {"a": ["--seed", "0"], "b": ["--seed", "1"], "greedy": ["--seed", "0", "--eval-samples", "0"]}.items():
        train_min.main(flags + extra + ["--output-dir", str(tmp_path / name)])
    a, b, greedy = (read_metrics(tmp_path / n) for n in ("a", "b", "greedy"))
    first = [r for r in a if r["kind"] == "eval"][0]
    assert first["eval_samples"] == 4 and len(first["eval_sampled_correct"]) == len(first["eval_ids"]) == 4
    assert all(0 <= x <= 1 for x in first["eval_sampled_correct"])
    assert without_timings(first) == evaluations(tmp_path / "b")[0]
    assert [without_timings(r) for r in a if r["kind"] == "train"] == [without_timings(r) for r in greedy if r["kind"] == "train"]
    assert (False, {"temperature": 1.0, "top_k": 0, "top_p": 0.95}) in calls, "sampled at temperature 1, top-p 0.95"


def test_a_run_reuses_the_step_0_evaluation_of_another_only_when_it_would_be_the_same(tmp_path):
    """Also: evaluation completes up to --eval-max-new-tokens and training up to --max-new-tokens, so a run
    that trains at 8 new tokens and evaluates at 12 makes the evaluation of one that does both at 12."""
    flags = TINY + ["--lr-schedule", "constant"]
    train_min.main(flags + ["--max-new-tokens", "12", "--steps", "0", "--no-save-model", "--output-dir", str(tmp_path / "initial")])
    flags += ["--max-new-tokens", "8", "--eval-max-new-tokens", "12"]
    train_min.main(flags + ["--steps", "1", "--method", "grpo", "--initial-eval", str(tmp_path / "initial"),
                            "--output-dir", str(tmp_path / "reused")])
    train_min.main(flags + ["--steps", "1", "--method", "grpo", "--no-save-model", "--output-dir", str(tmp_path / "own")])
    initial, reused, own = (evaluations(tmp_path / n)[0] for n in ("initial", "reused", "own"))
    assert reused["reused_from"] == str(tmp_path / "initial") and reused["method"] == "grpo"
    assert evaluations(tmp_path / "reused")[1]["reused_from"] is None, "the evaluation after training is the run's own"
    drop = lambda row: {k: v for k, v in row.items() if k not in ("method", "reused_from")}  # noqa: E731
    assert drop(reused) == drop(initial) == drop(own), "the reused evaluation is the one the run would have made"
    assert max(own["eval_lengths"]) > 8 and max(r["length_max"] for r in read_metrics(tmp_path / "own") if r["kind"] == "train") <= 8
    for extra, refused in ((["--eval-top-p", "0.9"], "--eval-top-p 0.95"), (["--eval-max-new-tokens", "16"], "--eval-max-new-tokens 12")):
        with pytest.raises(SystemExit, match=f"--initial-eval: .* {refused}, this run with"):
            train_min.main(flags + extra + ["--steps", "1", "--initial-eval", str(tmp_path / "initial"),
                                            "--output-dir", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="^--eval-max-new-tokens: a resumed run keeps evaluating up to 12 new tokens"):
        train_min.main(["--resume", str(tmp_path / "reused"), "--steps", "2", "--eval-max-new-tokens", "16"])
    shutil.rmtree(tmp_path / "initial")  # a resumed run is past its step-0 evaluation: it needs it no more
    train_min.main(["--resume", str(tmp_path / "reused"), "--steps", "2", "--eval-size", "3"])
    assert [r["step"] for r in read_metrics(tmp_path / "reused") if r["kind"] == "train"] == [1, 2]


def test_a_time_budget_that_the_step_0_evaluation_used_up_trains_no_step(tmp_path, capsys):
    """No room left for a step and the final evaluation before the first step: the run stops there, its step-0
    evaluation its last (before, it took a step and evaluated it past the budget)."""
    train_min.main(TINY + ["--steps", "50", "--time-budget", "1e-3", "--no-save-model", "--output-dir", str(tmp_path)])
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path)] == [("eval", 0)]
    out = capsys.readouterr().out
    assert "time budget" in out and "stopped at step 0 (--no-save-model: no checkpoint to resume from)" in out
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "final").exists(), "--no-save-model"


def test_the_time_budget_counts_the_evaluation_due_at_a_step(tmp_path, monkeypatch, capsys):
    """A step takes 1 s and an evaluation 10 s (a fake clock); --eval-every 2, a 26 s budget. After step 2's
    evaluation (22 s) another step and the final evaluation (1 + 12.5 s) no longer fit: the run stops there,
    that evaluation its last, and checkpoints step 2 (before, it took step 3 and evaluated again, to 33 s)."""
    clock = SimpleNamespace(now=0.0)
    fake_time = SimpleNamespace(perf_counter=lambda: clock.now, monotonic=time.monotonic, time=time.time)
    for module in (train_min, run_io):
        monkeypatch.setattr(module, "time", fake_time)
    rollouts, evaluate = train_min.rollouts, train_min.evaluate

    def tick(seconds, function):
        def timed(*args):
            clock.now += seconds
            return function(*args)
        return timed

    monkeypatch.setattr(train_min, "rollouts", tick(1.0, rollouts))
    monkeypatch.setattr(train_min, "evaluate", tick(10.0, lambda *args: evaluate(*args) | {"eval_s": 10.0}))
    train_min.main(TINY + ["--steps", "10", "--eval-every", "2", "--time-budget", "26", "--output-dir", str(tmp_path)])
    rows = read_metrics(tmp_path)
    assert clock.now == 22.0 and [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    assert "checkpoint saved at step 2; continue with" in capsys.readouterr().out
    assert run_io.checkpoint_step(run_io.find_checkpoint(str(tmp_path))) == 2


def test_group_size_samples_each_problem_g_times_with_the_group_advantage(tmp_path, monkeypatch):
    seen = []
    group_advantages = egrsd.group_advantages

    def spy_verify(texts, finished, problems, cfg):
        seen.append([p.id for p in problems])
        return torch.arange(len(problems)) % 3 == 0  # some groups mixed, some not

    def spy_group(rewards, group_size, **kw):
        advantages = group_advantages(rewards, group_size, **kw)
        seen.append(advantages.reshape(-1, group_size).sum(dim=1))
        return advantages

    monkeypatch.setattr(train_min, "verify", spy_verify)
    monkeypatch.setattr(train_min.egrsd, "group_advantages", spy_group)
    train_min.main(TINY + ["--steps", "1", "--eval-size", "0", "--group-size", "2", "--batch-size", "4",
                           "--no-save-model", "--output-dir", str(tmp_path)])
    ids, sums = seen
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2], "2 problems × 2 rollouts, side by side"
    assert torch.allclose(sums, torch.zeros(2), atol=1e-6)
    with pytest.raises(SystemExit, match="--batch-size: expected a multiple of --group-size 3"):
        train_min.main(TINY + ["--group-size", "3", "--output-dir", str(tmp_path / "bad")])


def test_the_runner_starts_arms_side_by_side_and_packs_their_files(tmp_path, monkeypatch, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "runs" / "initial").mkdir(parents=True)  # an initial evaluation cut off before it evaluated
    (tmp_path / "runs" / "initial" / "metrics.jsonl").write_text("")
    (tmp_path / "runs" / "grpo").mkdir()  # an arm of an earlier call (a folder holds one run: removed first)
    (tmp_path / "runs" / "grpo" / "config.json").write_text("{}")
    from tools import run_arms

    monkeypatch.setenv("OUT", str(out))  # where the GPU tool's files come back from: the default of --pack
    status = run_arms.main(["--out", str(tmp_path / "runs"), "--budget", "120",
                            "--common", " ".join(TINY + ["--steps", "1", "--max-new-tokens", "6"]),
                            "--arm", "grpo=--method grpo", "--arm", "egrsd=--method egrsd --gamma 0.3"])
    assert status == 0, capfd.readouterr()
    with tarfile.open(out / "runs.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"runs/grpo/metrics.jsonl", "runs/egrsd/config.json", "runs/grpo/log.txt", "runs/commands.sh"} <= names
    assert not any("checkpoint" in n or "final" in n for n in names)
    assert "egrsd" in (out / "compare.txt").read_text()
    assert json.loads((tmp_path / "runs" / "egrsd" / "config.json").read_text())["initial_eval"].endswith("initial")
    assert '"step": 0' in (tmp_path / "runs" / "initial" / "metrics.jsonl").read_text(), "made again, not reused"


def test_arms_that_overrun_get_sigterm_together_then_sigkill_after_the_grace(tmp_path):
    """Three arms that ignore SIGTERM (busy in a final evaluation, say): packed once at the deadline (a packing
    that fails stops nothing), then SIGTERM to all at once and SIGKILL one grace later, 1 + 1 s in all (one
    after another it was 1 + 3 × 1)."""
    from tools import run_arms

    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
    processes = {f"arm{i}": subprocess.Popen([sys.executable, "-c", ignore], stdout=subprocess.PIPE) for i in range(3)}
    for process in processes.values():
        process.stdout.readline()  # the handler is in place
    packed, start = [], time.monotonic()

    def pack():
        packed.append(time.monotonic() - start)
        raise SystemExit("--compare: a malformed row")  # (how this code reports a bad file)

    statuses = run_arms.wait(processes, start + 1, 1, pack)
    elapsed = time.monotonic() - start
    assert statuses == {name: -signal.SIGKILL for name in processes} and len(packed) == 1 and packed[0] >= 1
    assert 2 <= elapsed < 3.5, elapsed


def test_long_work_reports_progress_in_a_log_file(capsys):
    assert list(run_io.progress(range(3), "evaluation (greedy), batches", 3, every=0)) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines()[-1].startswith("evaluation (greedy), batches: 3/3 (")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_llama_or_mistral_shaped_checkpoint_trains_with_the_default_rollout_engine(family, tmp_path, recwarn):
    """Users try SmolLM2 (a Llama) or a Mistral: a tiny random one, saved as a checkpoint, trains two steps with
    --rollout auto, in the project's own decoder (no fallback notice)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.offline_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  max_position_embeddings=2048, tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    student, _ = train_min.main(["--model", str(tmp_path / "model")] + TINY[2:] + [
        "--steps", "2", "--rollout", "auto", "--method", "cl-egrsd", "--no-save-model", "--output-dir", str(tmp_path / "run")])
    assert student.config.model_type == family
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"] == [1, 2]
    assert not [w for w in recwarn if "HF generate" in str(w.message)], "decoded by the project's engine"


def test_out_of_time_keeps_room_for_a_step_and_a_quarter_more_than_the_last_evaluation():
    now = time.perf_counter()
    assert not run_io.out_of_time(100.0, now, 10.0, 60.0)  # 10 + 1.25 · 60 = 85 s of the 100 left
    assert run_io.out_of_time(100.0, now, 10.0, 80.0)  # 110 s: stop now
    assert run_io.out_of_time(100.0, now - 95.0, 10.0, 0.0)  # 95 s gone: not even a step fits
    assert not run_io.out_of_time(0.0, now - 1e6, 10.0, 80.0)  # 0: no budget


STEP_0 = {"kind": "eval", "step": 0, "method": "grpo", "eval_accuracy": 0.5, "eval_length": 100.0,
          "eval_acc_per_1k_tokens": 5.0}  # an evaluation row, as a run writes it


class FakeArm:
    """An arm's process (subprocess.Popen) that ran at once: it writes an evaluation row, the model folders and
    lock a run without --no-save-model leaves, and exits with `status` (2: it failed, after writing a traceback)."""
    started = []

    def __init__(self, cmd, cwd, stdout, stderr):
        run_dir = cmd[cmd.index("--output-dir") + 1]
        self.cmd, self.pid, self.status = cmd, 4000 + len(FakeArm.started), 2 if "--fail" in cmd else 0
        FakeArm.started.append(self)
        if self.status:
            stdout.write("Traceback: the arm broke\n")
            return
        (Path(run_dir) / "metrics.jsonl").write_text(json.dumps(STEP_0) + "\n")
        for folder in ("checkpoint", "checkpoint.tmp", "checkpoint.old", "final", "final.tmp"):
            (Path(run_dir) / folder).mkdir()
            (Path(run_dir) / folder / "model.safetensors").write_text("weights")
        (Path(run_dir) / run_io.LOCK_FILE).write_text("")

    def wait(self, timeout=None):
        return self.status

    poll = wait


def fake_arms(monkeypatch, initial_run=lambda cmd, cwd, timeout: pytest.fail("the initial evaluation was run again")):
    """run_arms with FakeArm for its processes and a clock that stands still (budgets exact however busy the
    machine); returns the module and the (deadline - now, grace) of its wait."""
    from tools import run_arms

    monkeypatch.setattr(FakeArm, "started", [])
    waits, wait, now = [], run_arms.wait, 1000.0
    monkeypatch.setattr(run_arms, "time", SimpleNamespace(monotonic=lambda: now, strftime=time.strftime))
    monkeypatch.setattr(run_arms, "subprocess", SimpleNamespace(Popen=FakeArm, run=initial_run, STDOUT=subprocess.STDOUT,
                                                                TimeoutExpired=subprocess.TimeoutExpired))
    monkeypatch.setattr(run_arms, "wait", lambda processes, deadline, grace, before: waits.append(
        (deadline - now, grace)) or wait(processes, deadline, grace, before))
    return run_arms, waits


def initial_evaluation(run_dir, eval_s: float, flags: list[str]) -> None:
    """A step-0 evaluation made with `flags`, as the runner's initial run writes it."""
    run_dir.mkdir(parents=True)
    made_with = run_io.evaluation_settings(vars(config.parse_args(flags)))
    (run_dir / "metrics.jsonl").write_text(json.dumps(STEP_0 | {"eval_s": eval_s, "evaluated_with": made_with}) + "\n")


def test_the_runner_gives_each_arm_the_budget_less_start_up_and_shared_evaluations_and_packs_no_model(tmp_path, monkeypatch,
                                                                                                      capsys):
    """3 arms, a reused step-0 evaluation of 40 s: each gets 600 - (3 - 1) · 1.25 · 40 - 15 = 485 s (and keeps
    1.25 · 40 s of it for its own final evaluation: the three share the card then), the signals come
    at budget + grace; the archive holds metrics, logs and commands (of both calls, appended), no model, no lock,
    not itself, nor the first call's arms, which the second call set aside; one arm failed: exit 1, the end of
    its log shown."""
    initial_evaluation(tmp_path / "runs" / "initial", eval_s=40.0, flags=["--steps", "3"])
    run_arms, waits = fake_arms(monkeypatch)
    flags = ["--out", str(tmp_path / "runs") + "/", "--budget", "600", "--grace", "30", "--pack", str(tmp_path / "runs" / "pack"),
             "--common", "--steps 3", "--arm", "a=--data '/data/my file.jsonl'", "--arm", "b=--seed 1", "--arm", "c=--fail"]
    for call in range(2):  # the second call finds the first's arm folders and sets them aside
        assert run_arms.main(flags) == 1
        assert [a.cmd[a.cmd.index("--time-budget") + 1] for a in FakeArm.started[-3:]] == ["485"] * 3
        assert waits[-1] == (630.0, 30.0)
    aside = sorted(p.name.split(".earlier-")[0] for p in (tmp_path / "runs").glob(".*.earlier-*"))
    assert aside == [".a", ".b"], "runs with metrics are kept (c failed before it wrote any, and is removed)"
    assert "/data/my file.jsonl" in FakeArm.started[0].cmd and "c: exit 2\nTraceback: the arm broke" in capsys.readouterr().out
    assert (tmp_path / "runs" / "commands.sh").read_text().count("tools/run_arms.py") == 2, "appended, not overwritten"
    with tarfile.open(tmp_path / "runs" / "pack" / "runs.tar.gz") as archive:
        names = set(archive.getnames())
    assert names == {"runs/commands.sh", "runs/initial/metrics.jsonl", "runs/a/metrics.jsonl", "runs/a/log.txt",
                     "runs/b/metrics.jsonl", "runs/b/log.txt", "runs/c/log.txt"}
    assert "b" in (tmp_path / "runs" / "pack" / "compare.txt").read_text()


def test_the_runner_makes_again_a_step_0_evaluation_made_with_other_settings_and_keeps_the_old_one(tmp_path, monkeypatch,
                                                                                                   capsys):
    """A step-0 evaluation of 200 s left by an earlier call with --eval-samples 2, where this call's flags say 0:
    reusing it would make every arm refuse it; it is set aside and made again (40 s), and the arms' budgets come
    from the new one: 600 - (3 - 1) · 1.25 · 40 - 15 = 485 s each (85 s from the old one)."""
    initial_evaluation(tmp_path / "runs" / "initial", eval_s=200.0, flags=["--eval-samples", "2"])
    made = []

    def make_it_again(cmd, cwd, timeout):
        made.append(cmd)
        initial_evaluation(tmp_path / "runs" / "initial", eval_s=40.0, flags=["--eval-samples", "0"])
        return SimpleNamespace(returncode=0)

    run_arms, _ = fake_arms(monkeypatch, initial_run=make_it_again)
    run_arms.main(["--out", str(tmp_path / "runs"), "--budget", "600", "--pack", str(tmp_path / "pack"),
                   "--common", "--eval-samples 0", "--arm", "a=", "--arm", "b=", "--arm", "c="])
    assert len(made) == 1 and "with --eval-samples 2, this run with --eval-samples 0" in capsys.readouterr().out
    assert [a.cmd[a.cmd.index("--time-budget") + 1] for a in FakeArm.started] == ["485"] * 3
    assert [p.name.split(".earlier-")[0] for p in (tmp_path / "runs").iterdir() if ".earlier-" in p.name] == [".initial"]


@pytest.mark.parametrize("budget, initial_status", [(600, 3), (600, "overran"), (10, 0), (15.5, 0)])
def test_the_runner_exits_1_and_starts_no_arm_when_the_initial_evaluation_fails_or_no_time_is_left(
        budget, initial_status, tmp_path, monkeypatch, capsys):
    """On a clock that stands still: the initial evaluation may take the whole budget and is killed past it;
    10 s of budget is less than an arm's 15 s start-up, and 15.5 s leaves half a second, which an arm's
    --time-budget (whole seconds; 0 is none) cannot hold (before, it started with no limit). A call that starts no
    arm packs none of an earlier call's runs as its own."""
    (tmp_path / "runs" / "a").mkdir(parents=True)  # an earlier call's run of this arm, finished
    (tmp_path / "runs" / "a" / "metrics.jsonl").write_text(json.dumps(STEP_0) + "\n")
    given = []

    def initial_run(cmd, cwd, timeout):
        given.append(timeout)
        if initial_status == "overran":
            raise subprocess.TimeoutExpired(cmd, timeout)
        return SimpleNamespace(returncode=initial_status)

    run_arms, _ = fake_arms(monkeypatch, initial_run=initial_run)
    assert run_arms.main(["--out", str(tmp_path / "runs"), "--budget", str(budget), "--pack", str(tmp_path / "pack"),
                          "--arm", "a="]) == 1
    assert given == [budget] and not FakeArm.started
    with tarfile.open(tmp_path / "pack" / "runs.tar.gz") as archive:
        assert not any(name.startswith("runs/a/") for name in archive.getnames()), "the earlier run, set aside"
    assert (tmp_path / "pack" / "compare.txt").read_text() == "(no arm wrote metrics)\n"
    out = capsys.readouterr().out
    assert {3: "initial evaluation failed (exit 3)", "overran": "initial evaluation failed (exit killed: it overran --budget)",
            0: "no time left for the arms"}[initial_status] in out


def test_the_runner_takes_relative_folders_from_where_it_is_called(tmp_path, monkeypatch):
    """The arms run in the repository's root: a relative --out given elsewhere once split each run in two."""
    initial_evaluation(tmp_path / "rel" / "initial", eval_s=1.0, flags=[])
    run_arms, _ = fake_arms(monkeypatch)
    monkeypatch.chdir(tmp_path)
    run_arms.main(["--out", "rel", "--budget", "600", "--pack", "pack", "--arm", "a="])
    (arm,) = FakeArm.started
    assert arm.cmd[arm.cmd.index("--output-dir") + 1] == str(tmp_path / "rel" / "a")
    assert arm.cmd[arm.cmd.index("--initial-eval") + 1] == str(tmp_path / "rel" / "initial")
    assert (tmp_path / "pack" / "runs.tar.gz").exists() and (tmp_path / "rel" / "commands.sh").exists()


@pytest.mark.parametrize("flags, message", [
    (["--arm", "a=", "--arm", "a=--seed 1"], "--arm: expected NAME=FLAGS with a new name"),
    (["--arm", "initial=--seed 1"], "--arm: expected NAME=FLAGS with a new name"),  # the step-0 evaluation's folder
    (["--arm", "a b="], "--arm: expected NAME=FLAGS with a new name"), ([], "--arm: expected at least one arm"),
    (["--arm", "a=", "--budget", "0"], "--budget: expected > 0 seconds, got 0.0"),
])
def test_the_runner_refuses_a_repeated_or_reserved_arm_name_and_an_empty_budget(flags, message, tmp_path, monkeypatch,
                                                                                 capsys):
    run_arms, _ = fake_arms(monkeypatch, initial_run=lambda cmd, cwd, timeout: pytest.fail("started"))
    with pytest.raises(SystemExit):
        run_arms.main(["--out", str(tmp_path), "--budget", "60", "--pack", str(tmp_path / "pack"), *flags])
    assert message in capsys.readouterr().err


def test_overrunning_arms_get_sigterm_all_at_once_and_sigkill_exactly_one_grace_later():
    """On a fake clock: an arm that ended in time gets no signal; the other two, which ignore SIGTERM, get
    SIGTERM at the deadline, both before any SIGKILL, and SIGKILL at deadline + grace (not later: the grace is
    shared, not one per arm)."""
    from tools import run_arms

    clock, signals = SimpleNamespace(now=0.0), []

    class Stubborn:
        def __init__(self, name, ends):
            self.name, self.ends, self.pid, self.status = name, ends, 1, None

        def wait(self, timeout=None):
            if self.status is None and clock.now + timeout < self.ends:
                clock.now += timeout
                raise subprocess.TimeoutExpired("arm", timeout)
            clock.now = max(clock.now, min(self.ends, clock.now + (timeout or 0)))
            self.status = self.status if self.status is not None else 0
            return self.status

        def poll(self):
            return self.status

        def send_signal(self, sig):
            signals.append((self.name, sig, clock.now))
            if sig == signal.SIGKILL:
                self.status = -signal.SIGKILL

    processes = {"done": Stubborn("done", 5.0), "x": Stubborn("x", 1e9), "y": Stubborn("y", 1e9)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_arms, "time", SimpleNamespace(monotonic=lambda: clock.now))
        statuses = run_arms.wait(processes, 100.0, 30.0, lambda: None)
    assert statuses == {"done": 0, "x": -signal.SIGKILL, "y": -signal.SIGKILL}
    assert signals == [("x", signal.SIGTERM, 100.0), ("y", signal.SIGTERM, 100.0),
                       ("x", signal.SIGKILL, 130.0), ("y", signal.SIGKILL, 130.0)]
