"""What a training run writes and reads back, so that nothing is lost: atomic checkpoints, durable metric
rows, random states, a Ctrl-C that stops cleanly, and writes that fail with one clear message (what, where,
why, which checkpoint is intact, the command that continues). Plumbing for train_min.py, not the method."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
import signal
import sys
import time

import torch

STATE_FILE = "trainer_state.pt"


def on_stage(stage: str) -> None:
    """Called at each stage of a checkpoint write ("model", "state", "renamed"): a hook for tests that kill
    the process there. Does nothing."""


# ----------------------------------------------------------------------------------------------------
# Writing: every write that fails stops the run with one message.


def free_bytes(path: str) -> int:
    """Free space of the file system that holds `path` (or its nearest existing parent)."""
    while not os.path.exists(path):
        path = os.path.dirname(os.path.abspath(path))
    return shutil.disk_usage(path).free


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def why(error: OSError, path: str) -> str:
    reasons = {errno.ENOSPC: f"no space left on the device ({gib(free_bytes(path))} free)",
               errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOTDIR: "a part of the path is a file, not a folder"}
    return reasons.get(error.errno, error.strerror or str(error))


def last_good(run_dir: str) -> str:
    """Which checkpoint a run directory holds intact, and how to continue from it."""
    checkpoint = complete_checkpoint(run_dir)
    if checkpoint is None:
        return "No checkpoint was complete yet: start the run again once the cause is fixed."
    return (f"The last complete checkpoint is {checkpoint} (step {checkpoint_step(checkpoint)}); once the cause is "
            f"fixed, continue with:\n    python train_min.py --resume {run_dir}")


@contextlib.contextmanager
def writing(what: str, path: str, run_dir: str):
    """A write of the run: if it fails (a full disk, no permission), remove a half-written checkpoint and
    stop with what was written, where, why, the intact checkpoint and the command that continues."""
    try:
        yield
    except OSError as error:
        shutil.rmtree(os.path.join(run_dir, "checkpoint.tmp"), ignore_errors=True)
        sys.exit(f"could not write {what} to {path}: {why(error, path)}.\n{last_good(run_dir)}")


def check_output_dir(run_dir: str, needed: int | None, detail: str) -> None:
    """Before any model loads: `run_dir` can be created and written, and holds `needed` bytes."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        sys.exit(f"--output-dir: expected a folder this run can write, got {run_dir!r}: {why(error, run_dir)}")
    free = free_bytes(run_dir)
    if needed is not None and free < needed:
        sys.exit(f"--output-dir: {run_dir} has {gib(free)} free; this run needs about {gib(needed)} ({detail}). "
                 "Free some space or choose another --output-dir.")


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def rng_states() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: str, model, tokenizer, state: dict) -> None:
    """run_dir/checkpoint/: the model (with LoRA the adapter) and tokenizer (safetensors) and `state` plus
    the RNG states (tensors and plain types only), written to checkpoint.tmp/ and renamed into place, so a
    crash mid-write never leaves a broken one; a failed write stops the run (`writing`)."""
    final = os.path.join(run_dir, "checkpoint")
    tmp, old = final + ".tmp", final + ".old"
    with writing("the checkpoint", tmp, run_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        on_stage("model")
        torch.save({**state, "rng": rng_states()}, os.path.join(tmp, STATE_FILE))
        on_stage("state")
        with open(os.path.join(tmp, "step.json"), "w") as f:  # written last: the rest is complete
            json.dump({"step": state["step"]}, f)
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        on_stage("renamed")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoint(run_dir: str) -> str | None:
    """checkpoint/, or checkpoint.old/ if a crash came between the two renames of save_checkpoint."""
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.isfile(os.path.join(run_dir, name, "step.json")):
            return os.path.join(run_dir, name)
    return None


def find_checkpoint(run_dir: str) -> str:
    checkpoint = complete_checkpoint(run_dir)
    if checkpoint is None:
        sys.exit(f"--resume: no checkpoint in {run_dir!r} (expected {run_dir}/checkpoint/{STATE_FILE})")
    return checkpoint


def checkpoint_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "step.json")) as f:
        return json.load(f)["step"]


def load_state(checkpoint: str) -> dict:
    """The state saved with the checkpoint, read with torch.load(weights_only=True): tensors and plain
    types only, so a state file from someone else cannot run code. Its random states are under "rng"
    (`set_rng_states` restores them)."""
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        sys.exit(f"--resume: {path} holds more than tensors and plain types ({str(error).splitlines()[0]}); "
                 "refusing to load it, since unpickling it could run code. A checkpoint written by train_min.py "
                 "never does: this one was changed or made elsewhere.")
    return state


# ----------------------------------------------------------------------------------------------------
# Metric rows


def open_metrics(run_dir: str):
    """metrics.jsonl for appending. A last line torn by a crash (no final newline) is left as it is, and
    the next row starts on a line of its own, so that every row appended parses."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with writing("the metrics", path, run_dir):
        metrics = open(path, "a+b")
        if metrics.tell():
            metrics.seek(-1, os.SEEK_END)
            if metrics.read(1) != b"\n":
                metrics.write(b"\n")
    return metrics


def append_row(metrics_file, row: dict) -> None:
    """Append one JSON row and make it durable: rows already written are never rewritten."""
    path = metrics_file.name
    with writing(f"the metrics row of step {row['step']}", path, os.path.dirname(path)):
        metrics_file.write((json.dumps(row) + "\n").encode())
        metrics_file.flush()
        os.fsync(metrics_file.fileno())


def read_rows(path: str) -> list[dict]:
    """Every row of a metrics.jsonl. A torn line (a JSON object cut off by a crash or a full disk) is
    reported once with its file and line and skipped; any other malformed line stops with file:line."""
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                if line.lstrip().startswith(b"{"):  # the start of a row whose write was cut off
                    print(f"{path}:{number}: a torn line (a write cut off), skipped", file=sys.stderr)
                    continue
                sys.exit(f"{path}:{number}: not a JSON row ({error})")
    return rows


def initial_eval_row(run_dir: str) -> dict | None:
    """The step-0 evaluation row of a run (the untrained model's), or None."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_rows(path) if os.path.isfile(path) else []
    return next((r for r in rows if r.get("kind") == "eval" and r.get("step") == 0), None)


def progress(iterable, description: str, total: int | None = None, every: float = 60.0):
    """Yield from `iterable`, showing that long work moves: a tqdm bar on a terminal; in a log file (no
    terminal) a line such as `evaluation (greedy): 3/7 (95 s)` at most every `every` seconds."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm  # (tqdm comes with transformers)

        yield from tqdm(iterable, desc=description, total=total, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    for done, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            print(f"{description}: {done}/{total if total is not None else '?'} ({now - start:.0f} s)", file=sys.stderr, flush=True)
            last = now


def out_of_time(budget: float, started: float, step_seconds: float, eval_seconds: float) -> bool:
    """--time-budget: whether another step, then the final evaluation (with a quarter more for the longer
    answers of a trained model), would overrun `budget` seconds from `started` (time.perf_counter())."""
    left = budget - (time.perf_counter() - started)
    needed = step_seconds + 1.25 * eval_seconds
    if budget and left < needed:
        print(f"time budget: {left:.0f} s left, a step takes {step_seconds:.0f} s and the evaluation "
              f"{eval_seconds:.0f} s: stopping now", flush=True)
        return True
    return False


class StopOnSignal:
    """`with StopOnSignal() as stop:` the first Ctrl-C (or SIGTERM) sets `stop.requested`, so that the
    loop checkpoints and stops after the current step; a second one stops at once. On leaving the block
    the previous handlers are back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = False
        self.previous = [signal.signal(sig, self.handle) for sig in self.SIGNALS]
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (again to abort now)", flush=True)

    def __exit__(self, *exception):
        for sig, handler in zip(self.SIGNALS, self.previous):
            signal.signal(sig, handler)
