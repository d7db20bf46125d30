"""What a training run writes and reads back, so that nothing is lost: atomic checkpoints, durable
metric rows, random states, and a Ctrl-C that stops cleanly. Plumbing for train_min.py, not the method."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys

import torch

STATE_FILE = "trainer_state.pt"


def rng_states() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: str, model, tokenizer, state: dict) -> None:
    """run_dir/checkpoint/: the model and tokenizer (safetensors) and `state` plus the RNG states, written
    to a temporary directory and renamed into place, so a crash mid-write never leaves a broken one."""
    final = os.path.join(run_dir, "checkpoint")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({**state, "rng": rng_states()}, os.path.join(tmp, STATE_FILE))
    with open(os.path.join(tmp, "step.json"), "w") as f:  # readable without loading the optimizer state
        json.dump({"step": state["step"]}, f)
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: str) -> str:
    """checkpoint/, or checkpoint.old/ if a crash came between the two renames of save_checkpoint."""
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.isfile(os.path.join(run_dir, name, "step.json")):  # written last: the rest is complete
            return os.path.join(run_dir, name)
    sys.exit(f"--resume: no checkpoint in {run_dir!r} (expected {run_dir}/checkpoint/{STATE_FILE})")


def checkpoint_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "step.json")) as f:
        return json.load(f)["step"]


def load_state(checkpoint: str) -> dict:
    """The state saved with the checkpoint; its random states are restored as it is read."""
    state = torch.load(os.path.join(checkpoint, STATE_FILE), weights_only=False)
    set_rng_states(state["rng"])
    return state


def append_row(metrics_file, row: dict) -> None:
    """Append one JSON row and make it durable: rows already written are never rewritten."""
    metrics_file.write(json.dumps(row) + "\n")
    metrics_file.flush()
    os.fsync(metrics_file.fileno())


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
