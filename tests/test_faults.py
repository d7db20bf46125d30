"""Faults a long run meets, injected deterministically (no mounts, no timing): a SIGKILL at each stage of a
checkpoint write, a full disk or a permission error at each kind of write, too little free space, an
unwritable --output-dir, a torn metrics line, and a checkpoint state file that holds more than data."""
import errno
import fcntl
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

import train_min
from trainer import config, offline_models, run_io, views

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--model", "tiny", "--device", "cpu", "--batch-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "8",
         "--train-size", "16", "--eval-size", "4", "--eval-batch-size", "4", "--steps", "3", "--save-every", "1",
         "--eval-every", "2", "--dump-tokens", "3"]
TIMING_KEYS = {"rollout_tokens_per_s", "generate_s", "score_s", "update_s", "step_s", "peak_gpu_mem_gb", "eval_s"}


def rows_of(run_dir) -> list[dict]:
    """The run's rows, the last of each step, without timings: what an uninterrupted run must equal."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in views.read_rows(str(run_dir))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("straight")
    train_min.main(FLAGS + ["--output-dir", str(run_dir)])
    return rows_of(run_dir)


def run_then_resume(run_dir) -> None:
    """Resume an interrupted run (the cause fixed) to its end."""
    train_min.main(["--resume", str(run_dir)])


KILL_STAGES = ("model", "state", "renamed")


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """One run SIGKILLed at each stage of the write of its second checkpoint: after its model, after its state
    file, between the two renames. One process imports train_min, then forks a child per stage (before any
    tensor work, so the child starts as a fresh process would; the import took seconds a process):
    {stage: (run folder, the signal that ended its child, the end of the driver's output)}."""
    out = tmp_path_factory.mktemp("killed")
    driver = textwrap.dedent(f"""
        import os, signal, sys, traceback
        sys.path.insert(0, {str(ROOT)!r})
        import train_min
        from trainer import run_io
        for stage in {KILL_STAGES!r}:
            child = os.fork()
            if child == 0:
                seen = []
                def kill_at(at):
                    seen.append(at)
                    if seen.count(stage) == 2:  # the checkpoint of step 2
                        os.kill(os.getpid(), signal.SIGKILL)
                run_io.on_stage = kill_at
                try:
                    train_min.main({FLAGS!r} + ["--output-dir", {str(out)!r} + "/" + stage])
                except BaseException:
                    traceback.print_exc()
                sys.stdout.flush()
                os._exit(1)  # not killed: never back into the loop
            status = os.waitpid(child, 0)[1]
            print("ended", stage, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True)
    ended = dict(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("ended "))
    return {stage: (out / stage, int(ended.get(stage, 0)), done.stdout[-2000:] + done.stderr[-2000:]) for stage in KILL_STAGES}


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_a_kill_at_each_stage_of_a_checkpoint_write_loses_nothing(stage, killed, straight):
    """SIGKILL while the second checkpoint is written (after its model, after its state file, between the
    two renames): the first checkpoint stays usable, and the resumed run ends exactly as the uninterrupted one."""
    run_dir, ended_by, output = killed[stage]
    assert ended_by == signal.SIGKILL, output
    assert run_io.checkpoint_step(run_io.find_checkpoint(str(run_dir))) == 1
    run_then_resume(run_dir)
    assert rows_of(run_dir) == straight


class Killed(BaseException):
    """A kill, raised in the process (it unwinds like SIGKILL's aftermath: nothing after it is written)."""


@pytest.mark.parametrize("step", [2, 3])
def test_a_kill_during_an_evaluation_is_made_good_on_resume(step, straight, tmp_path, monkeypatch):
    """A step's checkpoint is written before its evaluation: killed during the evaluation of step 2 (due by
    --eval-every) or of the last step 3, the resumed run evaluates that step first and ends exactly as the
    uninterrupted one (before, the evaluation was lost for good, the final one included)."""
    evaluate, steps = train_min.evaluate, []

    def killed_at_step(*args):
        steps.append([0, 2, 3][len(steps)])  # the steps this run evaluates
        if steps[-1] == step:
            raise Killed
        return evaluate(*args)

    monkeypatch.setattr(train_min, "evaluate", killed_at_step)
    with pytest.raises(Killed):
        train_min.main(FLAGS + ["--output-dir", str(tmp_path)])
    monkeypatch.undo()
    assert step not in [r["step"] for r in views.read_rows(str(tmp_path)) if r["kind"] == "eval"]
    run_then_resume(tmp_path)
    assert rows_of(tmp_path) == straight


@pytest.mark.parametrize("step", [0, 2])
def test_ctrl_c_during_an_evaluation_between_checkpoints_checkpoints_that_step(step, straight, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the evaluation of step 2 (due by --eval-every) where no checkpoint is due (--save-every 0),
    or during that of step 0, before any step: the run finishes the evaluation, then checkpoints that step (before,
    at step 2 it printed that it had and saved none; at step 0 it died with a traceback and left a folder that
    could neither resume nor start again) and the resumed run ends exactly as the uninterrupted one."""
    evaluate, steps = train_min.evaluate, []

    def interrupted(*args):
        steps.append([0, 2, 3][len(steps)])  # the steps this run evaluates
        if steps[-1] == step:
            signal.raise_signal(signal.SIGINT)
        return evaluate(*args)

    monkeypatch.setattr(train_min, "evaluate", interrupted)
    train_min.main(FLAGS + ["--save-every", "0", "--output-dir", str(tmp_path)])
    monkeypatch.undo()
    assert f"checkpoint saved at step {step}; continue with" in capsys.readouterr().out
    assert run_io.checkpoint_step(run_io.find_checkpoint(str(tmp_path))) == step
    assert [r["step"] for r in views.read_rows(str(tmp_path))][-1] == step, "no step after the Ctrl-C"
    run_then_resume(tmp_path)
    assert rows_of(tmp_path) == straight


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_the_run_resumes_exactly(straight, tmp_path, monkeypatch):
    save, calls = torch.save, []

    def full_at_the_second(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half a file")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_the_second)
    with pytest.raises(SystemExit) as stop:
        train_min.main(FLAGS + ["--output-dir", str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith(f"could not write the checkpoint to {tmp_path}/checkpoint.tmp: no space left on the device")
    assert f"The last complete checkpoint is {tmp_path}/checkpoint (step 1)" in message
    assert f"python train_min.py --resume {tmp_path}" in message
    assert not (tmp_path / "checkpoint.tmp").exists(), "the half-written checkpoint is removed"
    monkeypatch.undo()  # space freed
    run_then_resume(tmp_path)
    assert rows_of(tmp_path) == straight


class FailingFile:
    """metrics.jsonl whose write of the row of `step` fails with `code` (a full disk, no permission)."""

    def __init__(self, file, step: int, code: int):
        self.file, self.step, self.code, self.name = file, step, code, file.name

    def write(self, data: bytes):
        if f'"step": {self.step},'.encode() in data and b'"kind": "train"' in data:
            self.file.write(data[: len(data) // 2])  # a torn line, as a full disk leaves
            self.file.flush()
            raise OSError(self.code, os.strerror(self.code))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on the device"), (errno.EACCES, "permission denied")])
def test_a_failed_metrics_row_stops_with_the_reason_and_the_resumed_run_parses_every_row(code, reason, straight, tmp_path,
                                                                                           monkeypatch, capsys):
    open_metrics = run_io.open_metrics
    monkeypatch.setattr(run_io, "open_metrics", lambda run_dir, *a: FailingFile(open_metrics(run_dir, *a), 3, code))
    with pytest.raises(SystemExit) as stop:
        train_min.main(FLAGS + ["--output-dir", str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith(f"could not write the metrics row of step 3 to {tmp_path}/metrics.jsonl: {reason}")
    assert "(step 2)" in message and f"--resume {tmp_path}" in message
    monkeypatch.undo()
    assert not (tmp_path / "metrics.jsonl").read_bytes().endswith(b"\n"), "the torn line is there"
    capsys.readouterr()
    run_then_resume(tmp_path)
    assert capsys.readouterr().err.count(f"{tmp_path}/metrics.jsonl:") == 1, "the torn line is reported once, with its file and line"
    assert rows_of(tmp_path) == straight
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum(not line.endswith("}") for line in lines) == 1, "only the torn line does not parse"


def test_a_failed_write_of_an_evaluations_completions_leaves_no_part_of_it_and_the_run_resumes_exactly(straight, tmp_path,
                                                                                                       monkeypatch):
    """The disk fills while eval/step_2.jsonl is written (rows already in its temporary file): the run stops with
    what, where and why, leaves neither that file nor its temporary one nor the evaluation's metrics row, and the
    resumed run evaluates step 2 again and ends exactly as the uninterrupted one, every evaluation's file whole."""
    extract, seen = run_io.extract_answer, []

    def full_at_step_2_row_3(text):
        seen.append(text)
        if len(seen) == 4 * 5 + 2 * 5 + 1:  # step 0 whole (4 problems, greedy and 4 sampled each), step 2's third row
            raise OSError(errno.ENOSPC, "No space left on device")
        return extract(text)

    monkeypatch.setattr(run_io, "extract_answer", full_at_step_2_row_3)
    with pytest.raises(SystemExit) as stop:
        train_min.main(FLAGS + ["--output-dir", str(tmp_path)])
    assert str(stop.value.code).startswith(f"could not write the completions of the evaluation of step 2 to {tmp_path}/eval/"
                                           "step_2.jsonl: no space left on the device")
    assert os.listdir(tmp_path / "eval") == ["step_0.jsonl"]
    assert [r["step"] for r in views.read_rows(str(tmp_path)) if r["kind"] == "eval"] == [0]
    monkeypatch.undo()
    run_then_resume(tmp_path)
    assert rows_of(tmp_path) == straight
    assert sorted(os.listdir(tmp_path / "eval")) == ["step_0.jsonl", "step_2.jsonl", "step_3.jsonl"]
    assert all(len((tmp_path / "eval" / name).read_text().splitlines()) == 4 for name in os.listdir(tmp_path / "eval"))


def test_a_failed_final_save_and_token_view_name_what_and_why(tmp_path, monkeypatch):
    save = transformers.PreTrainedModel.save_pretrained

    def no_permission_for_final(self, path, *args, **kwargs):
        if str(path).endswith("final.tmp"):  # final/ is written beside and renamed into place
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", no_permission_for_final)
    with pytest.raises(SystemExit) as stop:
        train_min.main(FLAGS + ["--output-dir", str(tmp_path / "final_run")])
    assert str(stop.value.code).startswith(f"could not write the final model to {tmp_path}/final_run/final: permission denied")
    assert "(step 3)" in str(stop.value.code)
    assert not (tmp_path / "final_run" / "final.tmp").exists() and not (tmp_path / "final_run" / "final").exists()
    monkeypatch.undo()
    monkeypatch.setattr(views, "dump_tokens", lambda path, *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(SystemExit, match="could not write the token view to .*step_3.html: no space left"):
        train_min.main(FLAGS + ["--output-dir", str(tmp_path / "view_run")])


def test_too_little_free_space_stops_before_any_model_loads_with_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(run_io, "free_bytes", lambda path: 10_000)
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        train_min.main(FLAGS + ["--output-dir", str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith(f"--output-dir: {tmp_path} has 0.00 GiB free; this run needs about")
    assert "two checkpoints of" in message and "final/" in message
    new, _ = config.run_bytes(config.Config(model="tiny"))  # a resumed run has its checkpoint on the disk already
    resumed, detail = config.run_bytes(config.Config(model="tiny", resume=str(tmp_path)))
    params = sum(p.numel() for p in offline_models.meta_model(offline_models.model_config("tiny")).parameters())
    assert new - resumed == 12 * params and detail.startswith("one more checkpoint of")


@pytest.mark.parametrize("where", ["/proc/egrsd-run", "below a file"])
def test_an_unwritable_output_dir_stops_before_any_model_loads(where, tmp_path, monkeypatch):
    if where == "below a file":
        (tmp_path / "file").write_text("x")
        where = str(tmp_path / "file" / "run")
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=f"--output-dir: expected a folder this run can write, got '{where}'"):
        train_min.main(FLAGS + ["--output-dir", where])


def test_compare_skips_a_torn_last_line_and_names_any_other_malformed_line(tmp_path, capsys):
    rows = "".join('{"kind": "eval", "step": %d, "method": "egrsd", "eval_accuracy": 0.5, "eval_length": 100.0, '
                   '"eval_acc_per_1k_tokens": 5.0}\n' % step for step in (0, 2))  # evaluated before and after training
    (tmp_path / "metrics.jsonl").write_text(rows + '{"kind": "train", "step": 1, "rew')
    train_min.main(["--compare", str(tmp_path)])
    output = capsys.readouterr()
    assert "0.500" in output.out and output.err.count(f"{tmp_path}/metrics.jsonl:3: a torn line") == 1
    (tmp_path / "metrics.jsonl").write_text(rows + "not json\n" + rows)
    with pytest.raises(SystemExit, match=f"{tmp_path}/metrics.jsonl:3: not a JSON row"):
        train_min.main(["--compare", str(tmp_path)])


class Payload:
    """What someone could hide in a state file: unpickling it would call os.system."""

    def __reduce__(self):
        return os.system, ("echo owned > /dev/null",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")  # the planted file: pickled by hand
def test_a_checkpoint_state_that_holds_code_is_refused(tmp_path):
    train_min.main(FLAGS + ["--steps", "1", "--output-dir", str(tmp_path)])
    state = tmp_path / "checkpoint" / run_io.STATE_FILE
    with open(state, "wb") as f:
        pickle.dump({"step": 1, "payload": Payload()}, f)
    os.remove(tmp_path / "checkpoint" / run_io.MANIFEST)  # (else its checksum refuses the file first) a checkpoint
    # from before manifests, or one whose manifest was rewritten to match: the state is still read as data only
    with pytest.raises(SystemExit, match="holds more than tensors and plain types.*refusing to load it"):
        train_min.main(["--resume", str(tmp_path), "--steps", "1"])


# ----------------------------------------------------------------------------------------------------
# Round 2: a folder that belongs to one run, checked checkpoints and run files, a guard over the whole step,
# bounded sizes, failed writes of any exception type, and user errors that end with their message alone.

ONE_STEP = FLAGS[:-6] + ["--steps", "1", "--eval-size", "0", "--lr-schedule", "constant"]


def no_model(monkeypatch):
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))


def test_a_run_folder_belongs_to_one_process_and_one_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "my run"  # a space: the printed resume command must paste as one argument
    run_dir.mkdir()
    with open(run_dir / run_io.LOCK_FILE, "a") as lock, monkeypatch.context() as m:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process's run (flock locks are per open file, even in one process)
        no_model(m)
        with pytest.raises(SystemExit, match="is in use by another running process"):
            train_min.main(ONE_STEP + ["--output-dir", str(run_dir)])
    train_min.main(ONE_STEP + ["--output-dir", str(run_dir)])  # the lock went with its holder
    before = (run_dir / "metrics.jsonl").read_bytes()
    no_model(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        train_min.main(ONE_STEP + ["--output-dir", str(run_dir)])
    assert f"--output-dir: {run_dir} holds another run" in str(stop.value.code)
    assert f"python train_min.py --resume '{run_dir}'" in str(stop.value.code)
    assert (run_dir / "metrics.jsonl").read_bytes() == before, "the other run's rows are untouched"


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A finished one-step run (constant schedule: it can be extended), copied by each test that breaks it."""
    run_dir = tmp_path_factory.mktemp("one_step") / "run"
    train_min.main(ONE_STEP + ["--output-dir", str(run_dir)])
    return run_dir


def test_a_taken_folder_is_refused_before_the_checks_that_would_misname_why(one_step, tmp_path, monkeypatch):
    """A resume of a run still running (in its step-0 evaluation: no checkpoint yet) is told the folder is in use,
    not that it has no checkpoint; a new run into another run's folder on a nearly full disk is told the folder
    holds another run, not to free space for a run that would be refused."""
    busy = tmp_path / "busy"
    busy.mkdir()
    shutil.copy(one_step / "config.json", busy / "config.json")
    no_model(monkeypatch)
    with open(busy / run_io.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the running process's
        with pytest.raises(SystemExit, match=f"^--output-dir: {busy} is in use by another running process"):
            train_min.main(["--resume", str(busy)])
    monkeypatch.setattr(run_io, "free_bytes", lambda path: 1000)
    with pytest.raises(SystemExit, match=f"^--output-dir: {one_step} holds another run"):
        train_min.main(ONE_STEP + ["--output-dir", str(one_step)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="^--device"):
        train_min.main(ONE_STEP + ["--device", "meta", "--output-dir", str(tmp_path / "empty")])
    assert not list((tmp_path / "empty").iterdir()), "a refusal writes nothing (no lock file)"


def test_a_resume_whose_settings_write_fails_leaves_config_json_whole_for_the_command_it_prints(one_step, tmp_path, monkeypatch):
    """The disk fills while a resume rewrites config.json (part of it written): the settings before it stay whole
    and no temporary file is left, so the printed command continues (it was truncated in place before)."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_step, run_dir)
    before = (run_dir / "config.json").read_bytes()

    def full_disk(settings, f, **kwargs):
        f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_io.json, "dump", full_disk)
    with pytest.raises(SystemExit, match=f"^could not write the run's settings to {run_dir}/config.json: no space left"):
        train_min.main(["--resume", str(run_dir), "--steps", "2"])
    assert (run_dir / "config.json").read_bytes() == before and not (run_dir / "config.json.tmp").exists()


@pytest.mark.parametrize("inside", ["checkpoint", "final"])
def test_a_resume_of_a_folder_inside_a_run_names_the_run_directory(inside, one_step, monkeypatch):
    """checkpoint/ and final/ hold a config.json too (the model's), as HF tools expect a checkpoint folder: not
    "unknown key 'architectures'", but the folder one up."""
    monkeypatch.chdir(one_step.parent)
    with pytest.raises(SystemExit, match=f"^--resume: expected a run directory, got 'run/{inside}/', its {inside}/ folder; "
                                         "pass --resume run$"):
        train_min.main(["--resume", f"run/{inside}/"])


def test_a_run_stopped_early_says_which_checkpoint_it_can_continue_from(one_step, tmp_path):
    """--time-budget or Ctrl-C: the checkpoint of this step, or under --no-save-model (which a resume may
    add) an older one, or none (before, it said "no checkpoint" beside the checkpoint of step 1)."""
    assert run_io.stopped(str(one_step), 1, True) == f"checkpoint saved at step 1; continue with: python train_min.py --resume {one_step}"
    assert run_io.stopped(str(one_step), 3, False) == "stopped at step 3 (--no-save-model: the last checkpoint is of step 1)"
    assert run_io.stopped(str(tmp_path), 3, False) == "stopped at step 3 (--no-save-model: no checkpoint to resume from)"


def broken_copy(one_step, tmp_path, path: str, change) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(one_step, run_dir)
    change(run_dir / path)
    return run_dir


def edit_json(**changes):
    return lambda path: path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("path, change, message", [
    ("checkpoint/trainer_state.pt", flip_a_byte, "trainer_state.pt does not match its SHA-256 in .*manifest.json"),
    ("checkpoint/trainer_state.pt", os.remove, "trainer_state.pt is missing \\(listed in .*manifest.json\\): the checkpoint is incomplete"),
    ("checkpoint/model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000]),
     "model.safetensors has 1000 bytes, expected [0-9]+ .*truncated"),
    ("checkpoint/manifest.json", edit_json(kind="lora"), "holds a lora checkpoint; this run trains full"),
    ("checkpoint/manifest.json", lambda p: p.write_text(p.read_text().replace('"hidden_size": 64', '"hidden_size": 96')),
     "holds a model with hidden_size 96; this run's model has 64"),
    ("config.json", lambda p: p.write_text("{not json"), "config.json: expected the JSON object of a run's settings"),
    ("config.json", edit_json(bogus=1), "config.json: unknown key 'bogus'"),
    ("config.json", edit_json(batch_size="4"), "config.json: key 'batch_size': expected a int, got '4'"),
    ("config.json", edit_json(batch_size=True), "config.json: key 'batch_size': expected a int, got True"),
    ("config.json", edit_json(method="grpo"), "--method: a resumed run keeps 'egrsd'"),
    ("checkpoint/step.json", lambda p: p.write_text("garbage"), 'step.json: expected {"step": N}'),
    ("checkpoint/step.json", lambda p: p.write_text('{"step": "1"}'), "step.json: key 'step': expected an integer ≥ 0, got '1'"),
    ("checkpoint/step.json", lambda p: p.write_text('{"step": 7}'), "manifest.json: key 'step': expected 7, the step of its "
     "step.json, got 1: it or step.json was changed since they were saved"),  # (it decides --steps' bound and the evaluations owed)
    ("checkpoint/manifest.json", edit_json(files={}), "manifest.json: key 'files': expected an object of every file's bytes "
     "and sha256, got {}"),  # (nothing would be checked)
    ("checkpoint/manifest.json", edit_json(settings=None), "manifest.json: key 'settings': expected an object, got None"),
    ("checkpoint/manifest.json", edit_json(files={"model.safetensors": {"sha256": "0"}}), "manifest.json: key 'files'"),
    ("checkpoint/step.json", os.remove, r"^--resume: no complete checkpoint in '.*run' \(a complete one holds "
     r".*run/checkpoint/step.json, written last\)$"),
    ("config.json", lambda p: (edit_json(save_model=False)(p), os.remove(p.parent / "checkpoint" / "step.json")),
     r"no complete checkpoint in '.*run' \(it ran with --no-save-model, which writes none\)$"),
])
def test_resume_checks_the_checkpoint_and_run_files_before_any_model_loads(path, change, message, one_step, tmp_path,
                                                                           monkeypatch):
    run_dir = broken_copy(one_step, tmp_path, path, change)
    no_model(monkeypatch)
    with pytest.raises(SystemExit, match=message):
        train_min.main(["--resume", str(run_dir), "--steps", "2"])


def test_a_saved_float_setting_may_be_written_as_an_integer_and_an_integer_one_not_as_a_float_or_boolean(tmp_path):
    """config.json edited by hand: `"grad_clip": 1` is the float 1.0, as the --grad-clip 1 of a command line; `"steps":
    3.0` and `"steps": true` are refused naming the key; a run saved when gradient checkpointing was a boolean keeps it."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"grad_clip": 1, "steps": 3, "gradient_checkpointing": False}))
    assert config.read_config(str(path)) == {"grad_clip": 1, "steps": 3, "gradient_checkpointing": "off"}
    for bad in (3.0, True):
        path.write_text(json.dumps({"steps": bad}))
        with pytest.raises(SystemExit, match=f"^{re.escape(str(path))}: key 'steps': expected a int, got {bad!r}$"):
            config.read_config(str(path))


def test_a_malformed_metrics_row_stops_a_resume_before_the_checkpoint_is_hashed(one_step, tmp_path, monkeypatch):
    """Hashing a multi-GB checkpoint takes a while: the quick check of metrics.jsonl comes first."""
    run_dir = broken_copy(one_step, tmp_path, "metrics.jsonl", lambda p: p.write_text(p.read_text() + "hello\n"))
    monkeypatch.setattr(run_io, "verify_checkpoint", lambda checkpoint: pytest.fail("the checkpoint was hashed first"))
    with pytest.raises(SystemExit, match=re.escape(f"{run_dir}/metrics.jsonl:2: not a JSON row")):
        train_min.main(["--resume", str(run_dir), "--steps", "2"])


def test_a_resumed_run_keeps_room_for_the_evaluation_it_made_before(tmp_path, monkeypatch):
    """--time-budget stops training where another step and the final evaluation would not fit: a resumed run
    that owes no evaluation takes the last one's seconds from metrics.jsonl (before, 0 until it evaluated)."""
    train_min.main(FLAGS + ["--steps", "2", "--lr-schedule", "constant", "--output-dir", str(tmp_path)])
    last = [r for r in views.read_rows(str(tmp_path)) if r["kind"] == "eval"][-1]
    seen, out_of_time = [], run_io.out_of_time
    monkeypatch.setattr(run_io, "out_of_time", lambda budget, started, step_s, eval_s: seen.append(eval_s) or out_of_time(
        budget, started, step_s, eval_s))
    train_min.main(["--resume", str(tmp_path), "--steps", "4"])
    assert last["step"] == 2 and last["eval_s"] > 0 and seen[0] == last["eval_s"]
    before = len(seen)
    train_min.main(["--resume", str(tmp_path), "--steps", "6", "--eval-size", "0"])  # no evaluation to come
    assert seen[before:] == [0.0, 0.0], "before its first step and after step 5, each with no evaluation to keep room for"


def test_resume_keeps_the_compute_dtype_and_a_split_of_data_before_any_model_loads(one_step, tmp_path, monkeypatch):
    no_model(monkeypatch)
    with pytest.raises(SystemExit, match=r"^--dtype: a resumed run keeps computing in float32, as it did on --device cpu "
                                         r"\(got --dtype bfloat16 on --device cpu: bfloat16\); pass --dtype float32"):
        train_min.main(["--resume", str(one_step), "--steps", "2", "--dtype", "bfloat16"])
    monkeypatch.undo()
    data = tmp_path / "data.jsonl"  # no --eval-data: the held-out problems are the first --eval-size of --data
    data.write_text("".join((ROOT / "data/gsm_symbolic_train.jsonl").read_text().splitlines(keepends=True)[:30]))
    train_min.main(ONE_STEP + ["--data", str(data), "--eval-size", "4", "--output-dir", str(tmp_path / "run")])
    no_model(monkeypatch)
    for flag, value in (("--eval-size", "2"), ("--eval-data", str(data))):
        with pytest.raises(SystemExit, match=f"^{flag}: a resumed run keeps .* its training problems are what --data left"):
            train_min.main(["--resume", str(tmp_path / "run"), "--steps", "2", flag, value])
    monkeypatch.undo()  # and the other way: a run with --eval-data may not drop it and split --data instead
    train_min.main(ONE_STEP + ["--data", str(data), "--eval-data", str(data), "--output-dir", str(tmp_path / "run2")])
    no_model(monkeypatch)
    with pytest.raises(SystemExit, match="^--eval-data: a resumed run keeps .* its training problems are what --data left"):
        train_min.main(["--resume", str(tmp_path / "run2"), "--steps", "2", "--eval-data", ""])
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):  # held out from their own file: --eval-size may change
        train_min.main(["--resume", str(tmp_path / "run2"), "--steps", "2", "--eval-size", "2"])


def test_a_checkpoint_saved_before_manifests_resumes_after_a_notice(one_step, tmp_path, capsys):
    run_dir = broken_copy(one_step, tmp_path, "checkpoint/manifest.json", os.remove)
    train_min.main(["--resume", str(run_dir), "--steps", "2"])
    assert "has no manifest.json (saved before checkpoints carried one)" in capsys.readouterr().err
    assert [r["step"] for r in views.read_rows(str(run_dir)) if r["kind"] == "train"] == [1, 2]


def test_a_run_saved_when_gradient_checkpointing_was_on_or_off_resumes_with_it(one_step, tmp_path):
    run_dir = broken_copy(one_step, tmp_path, "config.json", edit_json(gradient_checkpointing=False))
    train_min.main(["--resume", str(run_dir), "--steps", "2"])
    assert json.loads((run_dir / "config.json").read_text())["gradient_checkpointing"] == "off"
    assert [r["gradient_checkpointing"] for r in views.read_rows(str(run_dir)) if r["kind"] == "train"] == [False, False]


def out_of_memory_at(call: int, monkeypatch) -> list:
    """The student's forward in the update runs out of device memory at its `call`-th call (counted from 1),
    once; returns the list of calls, each with whether the student then recomputed its activations."""
    calls, hidden = [], train_min.completion_hidden

    def maybe_out_of_memory(model, *args):
        if torch.is_grad_enabled():
            calls.append(bool(getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False))))
            if len(calls) == call:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return hidden(model, *args)

    monkeypatch.setattr(train_min, "completion_hidden", maybe_out_of_memory)
    return calls


@pytest.mark.parametrize("extra", [[], ["--lora-r", "4", "--lora-dropout", "0.3"]])
def test_auto_checkpointing_switches_on_when_an_update_runs_out_of_memory_and_takes_it_again_exactly(extra, tmp_path,
                                                                                                    monkeypatch):
    """The second micro-batch of the first update runs out: the first one's gradients are already accumulated,
    so an update taken again without dropping them would differ from a run with checkpointing on throughout;
    with LoRA dropout, so would one that drew other dropout masks."""
    if extra:
        pytest.importorskip("peft", reason="the optional extra peft is not installed")
    flags = FLAGS[:-6] + ["--steps", "2", "--eval-size", "0"] + extra  # (FLAGS: micro-batches of 2)
    with monkeypatch.context() as m:
        calls = out_of_memory_at(2, m)
        auto, _ = train_min.main(flags + ["--gradient-checkpointing", "auto", "--output-dir", str(tmp_path / "auto")])
    assert calls[:2] == [False, False] and all(calls[2:]) and len(calls) == 2 + 2 * 2, calls
    always, _ = train_min.main(flags + ["--gradient-checkpointing", "on", "--output-dir", str(tmp_path / "on")])
    rows = {name: [r for r in views.read_rows(str(tmp_path / name)) if r["kind"] == "train"] for name in ("auto", "on")}
    assert [r["gradient_checkpointing"] for r in rows["auto"]] == [True, True]
    for a, b in zip(rows["auto"], rows["on"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    for p, q in zip(auto.parameters(), always.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_resumed_auto_run_keeps_the_checkpointing_it_switched_on(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        out_of_memory_at(1, m)
        train_min.main(ONE_STEP + ["--gradient-checkpointing", "auto", "--output-dir", str(tmp_path)])
    calls = out_of_memory_at(0, monkeypatch)  # (0: never out of memory; records the calls)
    train_min.main(["--resume", str(tmp_path), "--steps", "2"])
    assert calls and all(calls), "the resumed run recomputes from its first update"
    assert [r["gradient_checkpointing"] for r in views.read_rows(str(tmp_path)) if r["kind"] == "train"] == [True, True]


@pytest.mark.parametrize("setting", ["on", "off"])
def test_out_of_memory_under_a_fixed_checkpointing_setting_is_raised(setting, tmp_path, monkeypatch):
    out_of_memory_at(1, monkeypatch)
    with pytest.raises(torch.OutOfMemoryError):
        train_min.main(ONE_STEP + ["--gradient-checkpointing", setting, "--output-dir", str(tmp_path)])


def test_an_evaluation_out_of_memory_checkpoints_names_a_smaller_batch_and_the_run_resumes_with_it(tmp_path, monkeypatch):
    """Training holds memory that the step-0 evaluation did not need (AdamW's state), so a later evaluation can
    run out where the first did not: what was trained since the last checkpoint is saved (--save-every 0
    here: none was due), and the run stops with a batch size that halves the largest batch it made (4
    problems × avg@4 = 16 rows, under --eval-batch-size 64) and the command that continues with it."""
    calls, fail_at, evaluate = [], [2], train_min.evaluate

    def short_of_memory(model, tokenizer, problems, cfg):
        calls.append(cfg.eval_batch_size)
        if len(calls) in fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return evaluate(model, tokenizer, problems, cfg)

    monkeypatch.setattr(train_min, "evaluate", short_of_memory)
    with pytest.raises(SystemExit) as stop:  # FLAGS: evaluations at steps 0, 2 and 3
        train_min.main(FLAGS + ["--save-every", "0", "--eval-batch-size", "64", "--output-dir", str(tmp_path)])
    assert stop.value.code == (f"the evaluation of step 2 ran out of memory in batches of 16 rows (--eval-batch-size 64), "
                               f"each holding the KV cache of its prompt and 8 new tokens. The checkpoint of step 2 is "
                               f"{tmp_path}/checkpoint; continue in smaller batches with:\n"
                               f"    python train_min.py --resume {tmp_path} --eval-batch-size 8")
    train_min.main(["--resume", str(tmp_path), "--eval-batch-size", "8"])
    evals = [r for r in views.read_rows(str(tmp_path)) if r["kind"] == "eval"]
    assert calls == [64, 64, 8, 8] and [r["step"] for r in evals] == [0, 2, 3]
    assert [r["evaluated_with"]["eval_batch_size"] for r in evals] == [64, 8, 8], "each row records how it was made"
    calls[:], fail_at[:] = [], [1]
    with pytest.raises(SystemExit, match=r"^the evaluation of step 0 .* batches of 1 row .*; at one row a batch, a card "
                                         r"with more memory helps, or a smaller --eval-max-new-tokens in a new run \(a "
                                         r"resumed run keeps its cap\)\.\nThe last complete checkpoint is .* \(step 0\)"):
        train_min.main(FLAGS + ["--eval-batch-size", "1", "--output-dir", str(tmp_path / "again")])
    monkeypatch.undo()  # the resume of a step-0 checkpoint still evaluates: another run's evaluation is checked first
    no_model(monkeypatch)
    with pytest.raises(SystemExit, match=r"^--initial-eval: expected a run directory holding config.json"):
        train_min.main(["--resume", str(tmp_path / "again"), "--initial-eval", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match=r"^--initial-eval: .* evaluated with --eval-batch-size 64, this run with --eval-batch-size 1;"):
        train_min.main(["--resume", str(tmp_path / "again"), "--initial-eval", str(tmp_path)])


def test_out_of_memory_in_the_optimizer_step_is_raised_not_retried(tmp_path, monkeypatch):
    """Once the optimizer has begun its step, a retry could apply part of it twice (and recomputing
    activations frees nothing there)."""
    import importlib

    adam = importlib.import_module("torch.optim.adam")  # AdamW's step calls this module's adam()
    calls, step = [], adam.adam

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # (a retry would then succeed)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return step(*args, **kwargs)

    monkeypatch.setattr(adam, "adam", out_of_memory_once)
    with pytest.raises(torch.OutOfMemoryError):
        train_min.main(ONE_STEP + ["--gradient-checkpointing", "auto", "--output-dir", str(tmp_path)])


def test_checkpointing_if_needed_takes_again_only_out_of_memory_and_leaves_no_hook_behind(monkeypatch):
    """Another error is raised as it is (no checkpointing switched on, no second update), and each call
    removes the step hook it put on the optimizer, also when it raises: a run makes one call per step."""
    from trainer import modeling

    switched = []
    monkeypatch.setattr(modeling, "enable_activation_checkpointing", switched.append)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("a bug, not memory")

    with pytest.raises(RuntimeError, match="a bug, not memory"):
        modeling.checkpointing_if_needed(broken, model, optimizer, may_switch=True)
    assert calls == [1] and switched == [] and not optimizer._optimizer_step_pre_hooks  # (torch's private registry)
    assert modeling.checkpointing_if_needed(lambda: 7, model, optimizer, may_switch=True) == (7, False)
    assert not optimizer._optimizer_step_pre_hooks


def test_a_huge_learning_rate_never_saves_non_finite_weights_and_an_infinite_one_is_refused(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        no_model(m)
        with pytest.raises(SystemExit, match="--lr: expected a finite number, got inf"):
            train_min.main(ONE_STEP + ["--lr", "inf", "--output-dir", str(tmp_path / "inf")])
    train_min.main(ONE_STEP + ["--lr", "1e30", "--output-dir", str(tmp_path / "huge")])
    assert [r["skipped"] for r in views.read_rows(str(tmp_path / "huge")) if r["kind"] == "train"] == [True]
    initial = train_min.load_model_and_tokenizer("tiny", "cpu", torch.float32)[0].state_dict()
    for saved in ("checkpoint", "final"):
        weights = safetensors.torch.load_file(tmp_path / "huge" / saved / "model.safetensors")
        assert all(torch.equal(w, initial[k]) for k, w in weights.items()), f"{saved}: the blown-up step was undone"


def test_sizes_are_bounded_before_any_model_loads_naming_the_problem_that_does_not_fit(tmp_path, monkeypatch):
    no_model(monkeypatch)
    row = {"problem": "What is 1 + 1?", "solution": "1 + 1 = 2.", "answer": "2"}
    long = row | {"problem": "What is 9 + 1?", "solution": "Add nine and one. " * 150}  # fits the student's prompt, not the teacher's
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [row | {"problem": f"What is {i} + 1?"} for i in range(3)] + [long]))
    with pytest.raises(SystemExit) as stop:
        train_min.main(FLAGS + ["--data", str(data), "--max-new-tokens", "1024", "--output-dir", str(tmp_path / "run")])
    assert str(stop.value.code).startswith(f"--max-new-tokens: the teacher's prompt (its question and solution) of the "
                                           f"problem at {data}:4 is ")
    short, held_out = tmp_path / "short.jsonl", tmp_path / "held_out.jsonl"  # prompts of 46 (teacher 71) and 238 tokens
    short.write_text(json.dumps(row) + "\n")
    held_out.write_text(json.dumps(row) + "\n" + json.dumps(row | {"problem": "What is 2 + 2? " * 20}) + "\n")
    for cap, flag in ((["--max-new-tokens", "1900"], "--max-new-tokens"), (["--eval-max-new-tokens", "1900"], "--eval-max-new-tokens")):
        with pytest.raises(SystemExit) as stop:  # a held-out problem: the student's prompt and the evaluation's cap
            train_min.main(FLAGS + cap + ["--data", str(short), "--eval-data", str(held_out), "--output-dir", str(tmp_path / "run")])
        assert str(stop.value.code).startswith(f"{flag}: the student's prompt of the problem at {held_out}:2 is "), stop.value.code
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):  # every check passed: the held-out prompts
        train_min.main(FLAGS + ["--max-new-tokens", "1900", "--eval-max-new-tokens", "8", "--data", str(short),  # fit their cap
                                "--eval-data", str(held_out), "--output-dir", str(tmp_path / "run")])
    for flag, value in [("--seed", "-1"), ("--seed", str(2**40)), ("--batch-size", str(10**9)), ("--steps", str(2**40))]:
        with pytest.raises(SystemExit, match=f"^{flag}: expected"):
            train_min.main(FLAGS + [flag, value, "--output-dir", str(tmp_path / "run")])


def test_a_real_file_size_limit_at_each_kind_of_checkpoint_write_stops_with_the_reason_and_cleans_up(tmp_path):
    """RLIMIT_FSIZE in a subprocess (SIGXFSZ ignored, so a write fails with EFBIG): a limit between the
    tokenizer and the model makes safetensors fail (its own error type), one between the model and the
    state file makes torch.save fail (a RuntimeError without errno)."""
    driver = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import train_min
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for limit in (200_000, 600_000):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            try:
                train_min.main({ONE_STEP!r} + ["--output-dir", {str(tmp_path)!r} + f"/run_{{limit}}"])
            except SystemExit as stop:
                print("STOP", limit, stop.code)
    """)
    done = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"STOP 200000 could not write the checkpoint to {tmp_path}/run_200000/checkpoint.tmp: file too large: over "
            "the file-size limit (ulimit -f)") in done.stdout
    assert (f"STOP 600000 could not write the checkpoint to {tmp_path}/run_600000/checkpoint.tmp: RuntimeError: ") in done.stdout
    assert "(the file-size limit (ulimit -f) is 600000 bytes)" in done.stdout
    for limit in (200_000, 600_000):
        assert not (tmp_path / f"run_{limit}" / "checkpoint.tmp").exists(), "the half-written checkpoint is removed"


def test_compare_and_a_data_file_stop_with_file_and_line_alone(tmp_path, monkeypatch):
    row = {"kind": "eval", "step": 0, "method": "egrsd", "eval_accuracy": 0.5, "eval_length": 100.0, "eval_acc_per_1k_tokens": 5.0}
    for lines, problem in [([row, [1, 2]], "2: not a metrics row of train_min.py: expected a JSON object"),
                           ([row | {"eval_accuracy": None}], "1: not a metrics row of train_min.py: key 'eval_accuracy': "
                                                             "expected int or float, got None"),
                           ([{k: v for k, v in row.items() if k != "eval_accuracy"}], "1: not a metrics row of train_min.py: "
                            "an evaluation row without eval_accuracy or eval_sampled_accuracy"),
                           ([row | {"eval_sampled_accuracy": 0.5}], "1: not a metrics row of train_min.py: "
                            "eval_sampled_accuracy without eval_sampled_length")]:
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        with pytest.raises(SystemExit, match=re.escape(f"{tmp_path}/metrics.jsonl:{problem}")):
            train_min.main(["--compare", str(tmp_path)])
    (tmp_path / "data.jsonl").write_text('{"problem": "1 + 1?", "solution": "2", "answer": "2"}\n{"problem": 3}\n')
    no_model(monkeypatch)
    with pytest.raises(SystemExit, match=f"^--data: {tmp_path}/data.jsonl:2: field 'problem' must be a string"):
        train_min.main(FLAGS + ["--data", str(tmp_path / "data.jsonl"), "--output-dir", str(tmp_path / "run")])
    # an --eval-data whose name ends the --data's path: the error is still the --data file's
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.jsonl").write_text('{"problem": "1 + 1?", "solution": "2", "answer": "2", "template": [1]}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=f"^--data: {tmp_path}/sub/data.jsonl:1: field 'template' must be a string or an "
                                         "integer, got list"):
        train_min.main(FLAGS + ["--data", str(tmp_path / "sub" / "data.jsonl"), "--eval-data", "data.jsonl",
                                "--output-dir", str(tmp_path / "run")])


def test_a_model_name_that_cannot_be_read_stops_at_once_naming_the_flag_the_choices_and_the_reason(tmp_path, monkeypatch):
    """A built-in name mistyped, on a machine offline (the default Qwen/... offline is the same): one line, not
    transformers' traceback, from the first check that reads the config (each would wait for the hub again)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fails at once, without retries
    no_model(monkeypatch)
    reading = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, real=transformers.AutoConfig.from_pretrained,
                        **k: reading.append(a) or real(*a, **k))
    with pytest.raises(SystemExit, match=r"^--model: expected tiny, random-0.5b, random-qwen3-4b \(built in code\), a folder "
                                         r".* got 'random-0.5B': its config could not be read \(We couldn't connect .*\)$"):
        train_min.main(ONE_STEP + ["--model", "random-0.5B", "--output-dir", str(tmp_path / "run")])
    assert len(reading) == 1 and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match=r"^--model: .* got 'random-0.5B': its tokenizer could not be read \(.+\)$"):
        offline_models.load_tokenizer("random-0.5B")


@pytest.mark.parametrize("flags, message", [
    (["--device", "meta"], "--device: expected cpu, cuda or cuda:N, got 'meta'"),
    (["--resume", ""], "--resume: expected a run directory, got ''"),
    (["--model", "/no/such/model"], "--model: expected a Hugging Face model name .*, got '/no/such/model'"),
    (["--model", "WEIGHTS_ONLY"], r"--model: expected .* a folder holding config.json and a tokenizer \(tokenizer.json, .*"),
    *[(["--lora-r", "4", "--lora-target-modules", f"q_proj,{name}"], r"--lora-target-modules: expected names of the model's "
       rf"linear layers below its LM head \(down_proj, .*\), got {name}") for name in ("foo_proj", "lm_head")],
])
def test_a_device_model_or_lora_target_that_cannot_be_is_refused_before_any_model_loads(flags, message, tmp_path, monkeypatch):
    if "WEIGHTS_ONLY" in flags:  # a model folder without tokenizer files (their empty tokenizer encodes nothing)
        transformers.AutoConfig.for_model("qwen2").save_pretrained(tmp_path / "weights")
        flags = [str(tmp_path / "weights") if f == "WEIGHTS_ONLY" else f for f in flags]
    no_model(monkeypatch)
    with pytest.raises(SystemExit, match=f"^{message}$"):
        train_min.main(ONE_STEP + flags + ["--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists(), "nothing written: the corrected command runs into the same folder"
    if (tmp_path / "weights").exists():  # and where the load comes anyway (a hub repository without them, say)
        with pytest.raises(SystemExit, match=r"^--model: .*weights: its tokenizer encodes text to nothing"):
            offline_models.load_tokenizer(str(tmp_path / "weights"))


def test_a_non_finite_teacher_stops_with_the_message_alone_and_applies_nothing(tmp_path, monkeypatch):
    """The frozen teacher overflowing (say in bf16): the run stops at once with the reason and, since a resume would
    sample the same step in the same dtype and temperatures (which it may not change), a new run; nothing of that
    step is written."""
    train_min.main(FLAGS + ["--steps", "1", "--lr-schedule", "constant", "--output-dir", str(tmp_path)])
    hidden = train_min.completion_hidden
    monkeypatch.setattr(train_min, "completion_hidden", lambda model, *a: hidden(model, *a) * (1.0 if model.training else math.inf))
    with pytest.raises(SystemExit) as stop:
        train_min.main(["--resume", str(tmp_path), "--steps", "2"])
    assert str(stop.value.code) == ("the frozen teacher's forward is not finite (an overflow in torch.float32?); nothing "
                                    "of this step was applied. A resume would sample it again, in the same dtype and "
                                    "temperatures: start a new run with a --temperature (and any --score-temperature) not near 0.")
    assert [r["step"] for r in rows_of(tmp_path) if r["kind"] == "train"] == [1]


def test_a_non_finite_weight_is_undone_wherever_it_stands_among_the_parameters():
    """undo_if_blown_up compares on the device: a NaN in a later tensor is not lost (Python's max of floats
    returns 0.5 for [0.5, nan])."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        model[1].bias[0] = math.nan
    assert run_io.undo_if_blown_up(model, before)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters()), "put back"
    assert not run_io.undo_if_blown_up(model, before), "an unchanged model is left alone"


def test_a_step_is_undone_only_when_it_moves_a_weight_by_more_than_the_largest_weight():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -0.5]]))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        model.weight[0, 1] += 1.0  # by exactly the largest |w|: kept
    assert not run_io.undo_if_blown_up(model, before)
    assert torch.equal(model.weight, torch.tensor([[1.0, 0.5]]))
    with torch.no_grad():
        model.weight[0, 1] += 0.25  # by more: put back
    assert run_io.undo_if_blown_up(model, before)
    assert torch.equal(model.weight, before["weight"])


def test_a_metrics_row_holds_every_key_of_its_kind_with_its_type():
    good = {"kind": "eval", "step": 0, "method": "egrsd", "eval_accuracy": 0.5, "eval_length": 100.0, "eval_acc_per_1k_tokens": 5.0}
    assert run_io.row_problem(good) is None and run_io.row_problem({"kind": "train", "step": 1, "loss": math.nan}) is None
    without_method = {k: v for k, v in good.items() if k != "method"}
    for bad in ([good], good | {"kind": "test"}, good | {"step": True}, good | {"step": 1.0}, without_method,
                good | {"eval_accuracy": True}, good | {"eval_correct": "1"}):
        assert run_io.row_problem(bad), bad


# ---- proposed by mutation testing -------------------------------------------------------------------------

def test_training_prompts_meet_the_rollouts_cap_and_a_prompt_that_just_fits_passes(tmp_path, monkeypatch):
    no_model(monkeypatch)
    row = {"problem": "What is 1 + 1?", "solution": "1 + 1 = 2.", "answer": "2"}
    short, question, solution = tmp_path / "short.jsonl", tmp_path / "question.jsonl", tmp_path / "solution.jsonl"
    short.write_text(json.dumps(row) + "\n")
    question.write_text(json.dumps(row | {"problem": "What is 2 + 2? " * 20}) + "\n")  # student's prompt: 238 tokens
    solution.write_text(json.dumps(row | {"solution": "Add one and one. " * 100}) + "\n")  # only the teacher's is long
    for data, who in ((question, "student's prompt"), (solution, "teacher's prompt (its question and solution)")):
        with pytest.raises(SystemExit) as stop:  # a small evaluation cap does not excuse a training prompt
            train_min.main(FLAGS + ["--max-new-tokens", "1900", "--eval-max-new-tokens", "8", "--data", str(data),
                                    "--eval-data", str(short), "--output-dir", str(tmp_path / "run")])
        assert str(stop.value.code).startswith(f"--max-new-tokens: the {who} of the problem at {data}:1 is "), stop.value.code
    held_out = FLAGS + ["--data", str(short), "--eval-data", str(question), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stop:
        train_min.main(held_out + ["--eval-max-new-tokens", "1900"])
    bound = int(re.search(r"expected --eval-max-new-tokens ≤ (\d+)", str(stop.value.code)).group(1))
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):  # prompt + cap = the positions: it fits
        train_min.main(held_out + ["--eval-max-new-tokens", str(bound)])
    with pytest.raises(SystemExit, match=f"^--eval-max-new-tokens: .* expected --eval-max-new-tokens ≤ {bound}"):
        train_min.main(held_out + ["--eval-max-new-tokens", str(bound + 1)])


def test_the_evaluation_cap_is_bounded_like_the_rollouts_and_train_size_binds_only_the_built_in_problems(tmp_path, monkeypatch):
    no_model(monkeypatch)
    with pytest.raises(SystemExit, match=r"^--eval-max-new-tokens: expected ≤ 1048576"):  # before the positions' check
        train_min.main(FLAGS + ["--eval-max-new-tokens", str(2**20 + 1), "--output-dir", str(tmp_path / "run")])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(line for line, _ in zip(open(ROOT / "data/gsm_symbolic_train.jsonl"), range(30))))
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):  # --train-size means nothing with --data
        train_min.main(FLAGS + ["--data", str(data), "--train-size", "2001", "--output-dir", str(tmp_path / "run")])


def test_a_resumed_run_may_name_its_evaluation_cap_but_not_change_it(one_step, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"  # one_step evaluates up to --max-new-tokens 8, without --eval-max-new-tokens
    shutil.copytree(one_step, run_dir)
    no_model(monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):
        train_min.main(["--resume", str(run_dir), "--steps", "2", "--eval-max-new-tokens", "8"])
    with pytest.raises(SystemExit, match="^--eval-max-new-tokens: a resumed run keeps evaluating up to 8 new tokens"):
        train_min.main(["--resume", str(run_dir), "--steps", "2", "--eval-max-new-tokens", "4"])


def test_a_resumed_run_samples_its_evaluations_as_before_but_may_take_another_k(one_step, tmp_path, monkeypatch):
    """Its step-0 evaluation sampled avg@2 at temperature 1.0, top-p 0.95, no top-k: another K, or no sampling,
    resumes; another temperature, top-p or top-k, once it sampled, would compare two measures as one."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_step, run_dir)
    sampled = {"eval_samples": 2, "eval_temperature": 1.0, "eval_top_p": 0.95, "eval_top_k": 0}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "eval", "step": 0, "method": "egrsd", "eval_sampled_accuracy": 0.0, "eval_sampled_length": 8.0,
                            "eval_sampled_acc_per_1k_tokens": 0.0, "eval_samples": 2, "evaluated_with": sampled}) + "\n")
    no_model(monkeypatch)
    for fine in (["--eval-samples", "3"], ["--eval-samples", "0", "--eval-temperature", "0.5"]):
        with pytest.raises(pytest.fail.Exception, match="a model was loaded"):
            train_min.main(["--resume", str(run_dir), "--steps", "2", "--eval-top-p", "0.95", "--eval-top-k", "0", *fine])
    for flag, value in (("--eval-temperature", "0.5"), ("--eval-top-p", "0.9"), ("--eval-top-k", "20")):
        with pytest.raises(SystemExit, match=re.escape("--eval-temperature, --eval-top-p, --eval-top-k: a resumed run samples "
                                                       "its evaluations as its earlier ones did (1.0, 0.95, 0; got ")):
            train_min.main(["--resume", str(run_dir), "--steps", "2", "--eval-samples", "2", "--eval-top-p", "0.95",
                            "--eval-top-k", "0", flag, value])


def test_a_run_folder_is_locked_against_any_second_holder_and_a_run_without_checkpoint_is_kept(tmp_path):
    """owning(): the exclusive lock refuses a second holder, resuming or not, until the first leaves the block;
    a new run refuses a folder that holds only another run's settings and rows (--no-save-model)."""
    with run_io.owning(str(tmp_path), resume=False):
        for resume in (False, True):
            with pytest.raises(SystemExit, match="is in use by another running process"):
                with run_io.owning(str(tmp_path), resume=resume):
                    pass
    with run_io.owning(str(tmp_path), resume=True):  # released on leaving
        pass
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match=r"holds another run \(config.json, metrics.jsonl\); it has no checkpoint to resume"):
        with run_io.owning(str(tmp_path), resume=False):
            pass


def test_a_metrics_row_is_fsynced_and_follows_a_torn_line_on_a_line_of_its_own(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(run_io.os, "fsync", lambda fd: synced.append(fd))
    (tmp_path / "metrics.jsonl").write_bytes(b'{"kind": "train", "step": 1}\n{"kind": "train", "st')
    with run_io.open_metrics(str(tmp_path)) as metrics:
        run_io.append_row(metrics, {"kind": "train", "step": 2})
        assert synced == [metrics.fileno()], "the row is made durable"
    assert [r["step"] for r in run_io.read_rows(str(tmp_path / "metrics.jsonl"), quiet=True)] == [1, 2]


def test_the_free_space_check_stops_below_the_need_and_passes_at_it(tmp_path, monkeypatch):
    monkeypatch.setattr(run_io, "free_bytes", lambda path: 10_000)
    run_io.check_output_dir(str(tmp_path), 10_000, "what it writes")
    run_io.check_output_dir(str(tmp_path), None, "")
    with pytest.raises(SystemExit, match=r"has 0.00 GiB free; this run needs about 0.00 GiB \(what it writes\)"):
        run_io.check_output_dir(str(tmp_path), 10_001, "what it writes")


def test_the_free_space_need_counts_final_in_the_compute_dtype():
    params = sum(p.numel() for p in offline_models.meta_model(offline_models.model_config("tiny")).parameters())
    full, _ = config.run_bytes(config.Config(model="tiny", device="cpu", dtype="float32"))
    half, _ = config.run_bytes(config.Config(model="tiny", device="cpu", dtype="bfloat16"))
    assert full == 2 * 12 * params + 4 * params and full - half == 2 * params


def test_a_failed_final_write_keeps_the_previous_final(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("the previous final model")

    def full_disk(folder):
        os.makedirs(folder)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SystemExit, match="^could not write the final model to .*final: no space left on the device"):
        run_io.save_final(str(tmp_path), full_disk)
    assert (tmp_path / "final" / "model.safetensors").read_text() == "the previous final model"
    assert not (tmp_path / "final.tmp").exists()


def test_a_resumed_run_keeps_what_its_steps_mean_and_may_change_the_optimizer_flags(one_step, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(one_step, run_dir)
    no_model(monkeypatch)
    for flag, value, kept in (("--seed", "1", "0"), ("--batch-size", "8", "4"), ("--temperature", "0.7", "1.1"),
                              ("--method", "grpo", "'egrsd'"), ("--max-new-tokens", "6", "8")):
        with pytest.raises(SystemExit, match=f"^{flag}: a resumed run keeps {kept}, as it continues from it"):
            train_min.main(["--resume", str(run_dir), "--steps", "2", flag, value])
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):  # every check passed
        train_min.main(["--resume", str(run_dir), "--steps", "2", "--lr", "2e-6", "--weight-decay", "0.01",
                        "--grad-clip", "1.0", "--advantage-warmup", "2"])
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):  # its own folder however spelled; as many steps
        train_min.main(["--resume", str(run_dir), "--output-dir", str(run_dir) + "/", "--steps", "1"])  # as it has done


def test_the_flags_a_resumed_run_keeps_are_those_docs_trainer_names():
    """docs/TRAINER.md names the settings that stay fixed on resume (what its steps mean; under a decaying schedule
    also the schedule's length): the code's lists are exactly the named ones, so that a flag dropped from one (or
    added to it) shows here (test_a_resumed_run_keeps_what_its_steps_mean checks that the lists are enforced)."""
    text = " ".join((ROOT / "docs/TRAINER.md").read_text().split())
    kept = text.split("stay fixed on resume", 1)[1].split(". The compute dtype", 1)[0]
    always, decaying = kept.split("and under a decaying schedule")
    flags = lambda part: {f.removeprefix("--").replace("-", "_") for f in re.findall(r"`(--[a-z-]+)`", part)}  # noqa: E731
    assert set(config.FIXED_ON_RESUME) == flags(always)
    assert set(config.FIXED_UNDER_DECAY) == flags(decaying.split("; under a constant schedule")[0])


def test_an_evaluation_is_owed_where_one_is_due_and_metrics_has_none_and_the_budget_keeps_the_last_ones_seconds(tmp_path):
    row = {"kind": "eval", "method": "egrsd", "eval_accuracy": 0.5, "eval_length": 8.0, "eval_acc_per_1k_tokens": 5.0}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row | {"step": step, "eval_s": seconds}) + "\n"
                                                    for step, seconds in ((0, 1.0), (2, 3.0))))
    cfg = config.Config(output_dir=str(tmp_path), steps=6, eval_every=2)
    assert [run_io.evaluations_so_far(cfg, step) for step in (0, 1, 2, 4, 6)] == [
        (False, 3.0), (False, 3.0), (False, 3.0), (True, 3.0), (True, 3.0)]


def test_every_integer_flag_may_be_its_upper_bound_and_not_one_more(tmp_path):
    cfg = dict(model="tiny", device="cpu", output_dir=str(tmp_path), save_model=False)
    config.check_config(config.Config(**cfg, seed=2**32 - 1, eval_seed=2**32 - 1, chunk_size=2**20, steps=2**31 - 1))
    for name, value in (("seed", 2**32), ("chunk_size", 2**20 + 1), ("steps", 2**31)):
        with pytest.raises(SystemExit, match=f"^--{name.replace('_', '-')}: expected ≤ {value - 1}, got {value}$"):
            config.check_config(config.Config(**cfg, **{name: value}))


@pytest.mark.parametrize("settings, flag, refused", [
    (dict(top_p=1.0), "top_p", False), (dict(top_p=1.01), "top_p", True),
    (dict(eval_top_p=1.0), "eval_top_p", False), (dict(eval_top_p=1.01), "eval_top_p", True),
    (dict(steps=0), "steps", False), (dict(steps=-1), "steps", True),
    (dict(temperature=0.0), "temperature", True), (dict(eval_temperature=0.0), "eval_temperature", True),
    (dict(temperature=math.inf), "temperature", True),
    (dict(regime_low=0.0, regime_high=0.01), "regime_low", False), (dict(regime_low=-0.1), "regime_low", True),
    (dict(regime_low=0.3, regime_high=0.3), "regime_high", True),
    (dict(group_size=0), "group_size", True), (dict(batch_size=6, group_size=4), "batch_size", True),
    (dict(batch_size=8, group_size=4), "batch_size", False),
    (dict(micro_batch_size=0), "micro_batch_size", True), (dict(eval_batch_size=0), "eval_batch_size", True),
    (dict(chunk_size=0), "chunk_size", True), (dict(top_k=0), "top_k", False), (dict(top_k=-1), "top_k", True),
    (dict(lr=0.0), "lr", True), (dict(beta_length=0.0), "beta_length", False), (dict(beta_length=-0.1), "beta_length", True),
    (dict(eval_every=0, save_every=0), "eval_every", False), (dict(save_every=-1), "save_every", True),
    (dict(eval_seed=-1), "eval_seed", True), (dict(advantage_warmup=-1), "advantage_warmup", True),
    (dict(device="cpux"), "device", True), (dict(device="cuda:1x"), "device", True),
    (dict(device="cuda:1", rollout="graph"), "rollout", False),
    (dict(lora_target_modules="q_proj,,v_proj"), "lora_target_modules", True),
])
def test_each_flag_is_refused_just_outside_its_range_and_accepted_at_its_edge_naming_the_flag(settings, flag, refused, tmp_path):
    """check_config's table at its edges: top-p 1 and top-k 0 (off) are allowed, a temperature of 0 is not, --regime-high
    must exceed --regime-low, and so on. A refusal names the flag; an accepted value may stop later for another
    reason (here: no CUDA), never naming it."""
    cfg = dict(model="tiny", device="cpu", output_dir=str(tmp_path), save_model=False) | settings
    try:
        config.check_config(config.Config(**cfg))
        stop = ""
    except SystemExit as error:
        stop = str(error.code)
    name = "--" + flag.replace("_", "-")
    assert stop.startswith(name + ": expected") == refused, stop
