"""Faults a long run meets, injected deterministically (no mounts, no timing): a SIGKILL at each stage of a
checkpoint write, a full disk or a permission error at each kind of write, too little free space, an
unwritable --output-dir, a torn metrics line, and a checkpoint state file that holds more than data."""
import errno
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

import train_min
from trainer import run_io, views

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


@pytest.mark.parametrize("stage", ["model", "state", "renamed"])
def test_a_kill_at_each_stage_of_a_checkpoint_write_loses_nothing(stage, straight, tmp_path):
    """SIGKILL while the second checkpoint is written (after its model, after its state file, between the
    two renames): the first checkpoint stays usable, and the resumed run ends exactly as the uninterrupted one."""
    driver = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import train_min
        from trainer import run_io
        seen = []
        def kill_at(stage):
            seen.append(stage)
            if seen.count({stage!r}) == 2:  # the checkpoint of step 2
                os.kill(os.getpid(), signal.SIGKILL)
        run_io.on_stage = kill_at
        train_min.main({FLAGS + ["--output-dir", str(tmp_path)]!r})
    """)
    killed = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert run_io.checkpoint_step(run_io.find_checkpoint(str(tmp_path))) == 1
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
    monkeypatch.setattr(run_io, "open_metrics", lambda run_dir: FailingFile(open_metrics(run_dir), 3, code))
    with pytest.raises(SystemExit) as stop:
        train_min.main(FLAGS + ["--output-dir", str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith(f"could not write the metrics row of step 3 to {tmp_path}/metrics.jsonl: {reason}")
    assert f"(step 2)" in message and f"--resume {tmp_path}" in message
    monkeypatch.undo()
    assert not (tmp_path / "metrics.jsonl").read_bytes().endswith(b"\n"), "the torn line is there"
    run_then_resume(tmp_path)
    assert rows_of(tmp_path) == straight
    assert "metrics.jsonl:" in capsys.readouterr().err, "the torn line is reported with its file and line"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum(not line.endswith("}") for line in lines) == 1, "only the torn line does not parse"


def test_a_failed_final_save_and_token_view_name_what_and_why(tmp_path, monkeypatch):
    save = transformers.PreTrainedModel.save_pretrained

    def no_permission_for_final(self, path, *args, **kwargs):
        if str(path).endswith("final"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", no_permission_for_final)
    with pytest.raises(SystemExit) as stop:
        train_min.main(FLAGS + ["--output-dir", str(tmp_path / "final_run")])
    assert str(stop.value.code).startswith(f"could not write the final model to {tmp_path}/final_run/final: permission denied")
    assert "(step 3)" in str(stop.value.code)
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


@pytest.mark.parametrize("where", ["/proc/egrsd-run", "below a file"])
def test_an_unwritable_output_dir_stops_before_any_model_loads(where, tmp_path, monkeypatch):
    if where == "below a file":
        (tmp_path / "file").write_text("x")
        where = str(tmp_path / "file" / "run")
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=f"--output-dir: expected a folder this run can write, got '{where}'"):
        train_min.main(FLAGS + ["--output-dir", where])


def test_compare_skips_a_torn_last_line_and_names_any_other_malformed_line(tmp_path, capsys):
    rows = '{"kind": "eval", "step": 0, "method": "egrsd", "eval_accuracy": 0.5, "eval_length": 100.0, ' \
           '"eval_acc_per_1k_tokens": 5.0}\n'
    (tmp_path / "metrics.jsonl").write_text(rows + '{"kind": "train", "step": 1, "rew')
    train_min.main(["--compare", str(tmp_path)])
    output = capsys.readouterr()
    assert "0.500" in output.out and output.err.count(f"{tmp_path}/metrics.jsonl:2: a torn line") == 1
    (tmp_path / "metrics.jsonl").write_text(rows + "not json\n" + rows)
    with pytest.raises(SystemExit, match=f"{tmp_path}/metrics.jsonl:2: not a JSON row"):
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
    with pytest.raises(SystemExit, match="holds more than tensors and plain types.*refusing to load it"):
        train_min.main(["--resume", str(tmp_path), "--steps", "1"])
