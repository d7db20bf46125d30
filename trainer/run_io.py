"""What a training run writes and reads back, so that nothing is lost: atomic checkpoints, durable metric
rows, random states, a Ctrl-C that stops cleanly, and writes that fail with one clear message (what, where,
why, which checkpoint is intact, the command that continues). Plumbing for train_min.py, not the method."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import sys
import time

import torch

from trainer import lora
from trainer.tasks import extract_answer

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
# What makes a checkpoint's weights fit a model: its family and every dimension of its tensors.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


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
               errno.EROFS: "read-only file system", errno.ENOTDIR: "a part of the path is a file, not a folder",
               errno.EFBIG: "file too large: over the file-size limit (ulimit -f) or the file system's largest file"}
    return reasons.get(error.errno, error.strerror or str(error))


def cause(error: Exception, path: str) -> str:
    """Why a write failed, whatever it surfaced as: an OSError, safetensors' error ("os error 27"), or
    torch.save's RuntimeError, which keeps no errno ("unexpected pos ..."): then the file-size limit if one
    is set, else the free space, the two usual causes."""
    code = error.errno if isinstance(error, OSError) else None
    found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(error))
    code = code or (int(found.group(1) or found.group(2)) if found else None)
    if code:
        return why(OSError(code, os.strerror(code)), path)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    context = (f"the file-size limit (ulimit -f) is {limit} bytes" if limit != resource.RLIM_INFINITY
               else f"{gib(free_bytes(path))} free")
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]} ({context})"


def resume_command(run_dir: str) -> str:
    """The command that continues a run, quoted for the shell (a path with spaces pastes as one argument)."""
    return f"python train_min.py --resume {shlex.quote(run_dir)}"


def stopped(run_dir: str, step: int, saved: bool) -> str:
    """What a run that stops before its last step (Ctrl-C, --time-budget) says: the command that continues
    from the checkpoint of `step`, or (--no-save-model, none saved) which checkpoint, if any, the run has."""
    if saved:
        return f"checkpoint saved at step {step}; continue with: {resume_command(run_dir)}"
    checkpoint = complete_checkpoint(run_dir)
    return f"stopped at step {step} (--no-save-model: " + ("no checkpoint to resume from)" if checkpoint is None else
                                                          f"the last checkpoint is of step {checkpoint_step(checkpoint)})")


def last_good(run_dir: str) -> str:
    """Which checkpoint a run directory holds intact, and how to continue from it."""
    checkpoint = complete_checkpoint(run_dir)
    if checkpoint is None:
        return (f"No checkpoint was complete yet: once the cause is fixed, remove {shlex.quote(run_dir)} (its metrics "
                "rows are those of a run with nothing to resume) and start the run again.")
    return (f"The last complete checkpoint is {checkpoint} (step {checkpoint_step(checkpoint)}); once the cause is "
            f"fixed, continue with:\n    {resume_command(run_dir)}")


@contextlib.contextmanager
def evaluating(cfg, step: int, problems: int, save):
    """The evaluation of `step`, of `problems` held-out problems. If it runs out of device memory (training
    holds memory that the step-0 evaluation did not need: AdamW's state), `save()` writes the checkpoint of
    `step` where there is none yet (what was trained is intact: evaluating neither trains nor draws from the
    training's random state), and the run stops with the batch size to pass and the command that continues."""
    try:
        yield
        return
    except torch.OutOfMemoryError:
        pass  # (leaving this block frees the exception, and the evaluation's tensors that its frames hold)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    checkpoint = complete_checkpoint(cfg.output_dir)
    if checkpoint is None or checkpoint_step(checkpoint) != step:
        save()
    rows = min(cfg.eval_batch_size, problems * max(1, cfg.eval_samples))  # the largest batch it makes
    what = (f"the evaluation of step {step} ran out of memory in batches of {rows} row{'s' * (rows > 1)} (--eval-batch-size "
            f"{cfg.eval_batch_size}), each holding the KV cache of its prompt and {eval_cap(vars(cfg))} new tokens")
    checkpoint = complete_checkpoint(cfg.output_dir)
    if rows > 1 and checkpoint:
        sys.exit(f"{what}. The checkpoint of step {checkpoint_step(checkpoint)} is {checkpoint}; continue in smaller "
                 f"batches with:\n    {resume_command(cfg.output_dir)} --eval-batch-size {rows // 2}")
    instead = (f"pass --eval-batch-size {rows // 2}" if rows > 1 else "at one row a batch, a card with more memory "
               "helps, or a smaller --eval-max-new-tokens in a new run (a resumed run keeps its cap)")
    sys.exit(f"{what}; {instead}.\n{last_good(cfg.output_dir)}")


@contextlib.contextmanager
def writing(what: str, path: str, run_dir: str):
    """A write of the run: if it fails (a full disk, no permission, a file-size limit), remove a half-written
    checkpoint or final model and stop with what was written, where, why, the intact checkpoint and the
    command that continues. Any exception counts: torch.save and safetensors raise their own types for a
    failed write, and the block holds writes only."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 (see above)
        for name in ("checkpoint.tmp", "final.tmp"):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        sys.exit(f"could not write {what} to {path}: {cause(error, path)}.\n{last_good(run_dir)}")


def write_config(run_dir: str, settings: dict) -> None:
    """config.json: the run's settings, which --resume and --compare read back; written beside it and renamed,
    so that a failed write (a resume's, say) leaves the settings before it whole for the command that continues."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.json")
    with writing("the run's settings", path, run_dir), replacing(path) as f:
        json.dump(settings, f, indent=1)


@contextlib.contextmanager
def replacing(path: str):
    """A text file for `path`, written beside it (path.tmp) and renamed into place when the block ends: whole
    or not at all (a failed write leaves neither part of it nor the temporary file)."""
    try:
        with open(path + ".tmp", "w") as f:
            yield f
        os.replace(path + ".tmp", path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + ".tmp")


@contextlib.contextmanager
def owning(run_dir: str, resume: bool):
    """Inside this block the run directory belongs to this process and to this run: an exclusive flock on
    run_dir/.lock (the kernel drops it when the process ends, however it ends, so a crashed run leaves no
    stale lock), and a new run (no --resume) refuses a folder that already holds a run's files."""
    with open(os.path.join(run_dir, LOCK_FILE), "a") as lock:
        claim(lock, run_dir, resume)
        yield


def claim(lock, run_dir: str, resume: bool) -> None:
    """`owning`'s refusals: the flock on the open file `lock`, and (a new run) a folder without another run's files."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"--output-dir: {run_dir} is in use by another running process; wait for it to end, or "
                 "choose another --output-dir")
    held = [n for n in ("config.json", "metrics.jsonl", "checkpoint", "checkpoint.old", "final")
            if os.path.exists(os.path.join(run_dir, n))]
    if held and not resume:
        checkpoint = complete_checkpoint(run_dir)
        how = (f"continue it with\n    {resume_command(run_dir)}\nor" if checkpoint else "it has no checkpoint to "
               "resume from; remove the folder to start over, or")
        sys.exit(f"--output-dir: {run_dir} holds another run ({', '.join(held)}); {how} choose another --output-dir")


def refuse_if_taken(run_dir: str, resume: bool) -> None:
    """`owning`'s refusals, made first where the folder exists, before the checks of a run's flags: a resume of
    a run still running would be told that its checkpoint is missing (or hash one its writer is replacing), a
    new run into another run's folder that the disk is too full. It writes nothing: a running run has made its
    lock file, which is read here and let go; `owning` takes the lock for the run."""
    path = os.path.join(run_dir, LOCK_FILE)
    if not os.path.isdir(run_dir):
        return
    try:
        lock = open(path) if os.path.isfile(path) else open(os.devnull)  # (no lock file: no process holds it)
    except OSError:
        return  # (a folder it cannot read: check_output_dir names it)
    with lock:
        claim(lock, run_dir, resume)


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


def shape_of(model_config) -> dict:
    """The SHAPE_KEYS of a transformers config: what a checkpoint's weights must match."""
    return {key: getattr(model_config, key, None) for key in SHAPE_KEYS}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(run_dir: str, model, tokenizer, state: dict, settings: dict) -> None:
    """run_dir/checkpoint/: the model (with LoRA the adapter) and tokenizer (safetensors), `state` plus
    the RNG states (tensors and plain types only), and manifest.json: every file's size and SHA-256, the
    kind (lora or full), the model's shape and the run's `settings`, which resume checks against. Written
    to checkpoint.tmp/ and renamed into place, so a crash mid-write never leaves a broken one; a failed
    write stops the run (`writing`)."""
    final = os.path.join(run_dir, "checkpoint")
    tmp, old = final + ".tmp", final + ".old"
    with writing("the checkpoint", tmp, run_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        on_stage("model")
        torch.save({**state, "rng": rng_states()}, os.path.join(tmp, STATE_FILE))
        on_stage("state")
        files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)), "sha256": sha256(os.path.join(tmp, name))}
                 for name in sorted(os.listdir(tmp))}
        manifest = {"kind": "lora" if lora.is_adapted(model) else "full", "shape": shape_of(model.config),
                    "settings": settings, "step": state["step"], "files": files}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
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
        try:
            with open(os.path.join(run_dir, "config.json"), "rb") as f:
                unsaved = json.loads(f.read()).get("save_model") is False
        except (OSError, ValueError, AttributeError):
            unsaved = False
        why = ("it ran with --no-save-model, which writes none" if unsaved else
               f"a complete one holds {run_dir}/checkpoint/step.json, written last")
        sys.exit(f"--resume: no complete checkpoint in {run_dir!r} ({why})")
    return checkpoint


def read_json_file(path: str, what: str) -> dict:
    """A JSON object from `path`, or a stop that names the file and what was expected there."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as error:
        sys.exit(f"{path}: expected {what}, could not read it ({error})")
    if not isinstance(data, dict):
        sys.exit(f"{path}: expected {what}, got {type(data).__name__}")
    return data


def checkpoint_step(checkpoint: str) -> int:
    path = os.path.join(checkpoint, "step.json")
    step = read_json_file(path, '{"step": N}').get("step")
    if type(step) is not int or step < 0:
        sys.exit(f"--resume: {path}: key 'step': expected an integer ≥ 0, got {step!r}")
    return step


def read_manifest(checkpoint: str) -> dict | None:
    """The checkpoint's manifest, checked whole (kind, shape, settings, a table of every file's size and SHA-256,
    and its step, which step.json must repeat), without hashing anything; None for a checkpoint saved before
    manifests existed."""
    path = os.path.join(checkpoint, MANIFEST)
    if not os.path.isfile(path):
        return None
    manifest, step = read_json_file(path, "the manifest train_min.py writes"), checkpoint_step(checkpoint)
    entry_ok = lambda e: isinstance(e, dict) and type(e.get("bytes")) is int and isinstance(e.get("sha256"), str)  # noqa: E731
    for key, expected, ok in (("kind", "lora or full", lambda v: v in ("lora", "full")),
                              ("shape", "an object", lambda v: isinstance(v, dict)),
                              ("settings", "an object", lambda v: isinstance(v, dict)),
                              ("files", "an object of every file's bytes and sha256",
                               lambda v: isinstance(v, dict) and v and all(map(entry_ok, v.values()))),
                              ("step", f"{step}, the step of its step.json",  # (none: saved before manifests held it)
                               lambda v: "step" not in manifest or v == step)):
        if not ok(manifest.get(key)):
            sys.exit(f"--resume: {path}: key {key!r}: expected {expected}, got {manifest.get(key)!r}: it or step.json was "
                     "changed since they were saved")
    return manifest


def verify_checkpoint(checkpoint: str) -> dict | None:
    """Before any model loads: the manifest is whole (`read_manifest`), and every file it lists has its size and
    SHA-256 (a truncated or corrupted file is named). Returns the manifest, or None for a checkpoint saved
    before manifests existed, which loads as before, after a notice."""
    manifest, path = read_manifest(checkpoint), os.path.join(checkpoint, MANIFEST)
    if manifest is None:
        print(f"notice: {checkpoint} has no {MANIFEST} (saved before checkpoints carried one): its files are not "
              "checked before loading", file=sys.stderr)
        return None
    for name, entry in manifest["files"].items():
        file = os.path.join(checkpoint, name)
        if not os.path.isfile(file):
            sys.exit(f"--resume: {file} is missing (listed in {path}): the checkpoint is incomplete")
        if os.path.getsize(file) != entry["bytes"]:
            sys.exit(f"--resume: {file} has {os.path.getsize(file)} bytes, expected {entry['bytes']} ({path}): "
                     "truncated or changed since it was saved")
        if sha256(file) != entry["sha256"]:
            sys.exit(f"--resume: {file} does not match its SHA-256 in {path}: corrupted or changed since it was saved")
    return manifest


def check_model(checkpoint: str, manifest: dict, adapter: bool, shape: dict | None) -> None:
    """The checkpoint is of this run's kind (LoRA or full) and of its model's shape (None: the shape could
    not be read before loading)."""
    kind = "lora" if adapter else "full"
    if manifest.get("kind") != kind:
        sys.exit(f"--resume: {checkpoint} holds a {manifest.get('kind')} checkpoint; this run trains {kind} "
                 f"(--lora-r {'> 0' if adapter else '0'})")
    for key, value in (shape or {}).items():
        if manifest.get("shape", {}).get(key) != value:
            sys.exit(f"--resume: {checkpoint} holds a model with {key} {manifest['shape'].get(key)!r}; this run's "
                     f"model has {value!r}: the checkpoint is of another model")


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


def open_metrics(run_dir: str, resumed_at: int | None = None):
    """metrics.jsonl for appending. A last line torn by a crash (no final newline) is left as it is, and
    the next row starts on a line of its own, so that every row appended parses. `resumed_at`: the step of
    the checkpoint a resumed run continues from, recorded in a row {"kind": "resume", "step": N}: the rows
    before it of later steps are of a trajectory the run threw away, which readers drop (views.read_rows)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with writing("the metrics", path, run_dir):
        metrics = open(path, "a+b")
        if metrics.tell():
            metrics.seek(-1, os.SEEK_END)
            if metrics.read(1) != b"\n":
                metrics.write(b"\n")
    if resumed_at is not None:
        with writing(f"the metrics row of the resume at step {resumed_at}", path, run_dir):
            append_row(metrics, {"kind": "resume", "step": resumed_at})
    return metrics


def append_row(metrics_file, row: dict) -> None:
    """Append one JSON row and make it durable: rows already written are never rewritten."""
    path = metrics_file.name
    with writing(f"the metrics row of step {row['step']}", path, os.path.dirname(path)):
        metrics_file.write((json.dumps(row) + "\n").encode())
        metrics_file.flush()
        os.fsync(metrics_file.fileno())


def write_completions(run_dir: str, step: int, problems: list, row: dict) -> str | None:
    """eval/step_<step>.jsonl: what the model wrote at the evaluation of `step`, one row per held-out problem:
    its id, template and reference answer, then "greedy" (one completion) and "sampled" (its K), each
    completion's text, the answer the verifier read from it, its verdict, its length in tokens and whether it
    ended (an EOS before the cap). The metrics keep the verdicts and lengths; this keeps the texts, to read and
    to grade again (by hand, or by a verifier of another version). Takes the completions out of the evaluation
    `row` (`solve`'s "eval_completions", "eval_sampled_completions"); none there (a reused step-0 row), no
    file. Whole or not at all: written beside, then renamed into place. Returns the path, or None."""
    kinds = {"eval": ("greedy", 1), "eval_sampled": ("sampled", row.get("eval_samples") or 1)}
    completions = {kind: row.pop(f"{kind}_completions") for kind in kinds if f"{kind}_completions" in row}
    if not completions:
        return None
    path = os.path.join(run_dir, "eval", f"step_{step}.jsonl")
    with writing(f"the completions of the evaluation of step {step}", path, run_dir):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with replacing(path) as f:
            for i, problem in enumerate(problems):
                line = {"id": problem.id, "template": problem.template, "reference": problem.answer}
                for kind, written in completions.items():
                    name, k = kinds[kind]
                    mine = [c | {"answer": extract_answer(c["text"])} for c in written[i * k : (i + 1) * k]]
                    line[name] = mine[0] if name == "greedy" else mine
                f.write(json.dumps(line) + "\n")
    return path


def save_final(run_dir: str, write, generation_config=None) -> None:
    """final/: `write(folder)` writes the model into final.tmp/ beside it, which is then renamed into place,
    so that a failed or killed write never leaves a half-written final/ (the previous one stays until then);
    `generation_config`, where given, replaces the one written."""
    final, tmp = os.path.join(run_dir, "final"), os.path.join(run_dir, "final.tmp")
    with writing("the final model", final, run_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


@torch.no_grad()
def undo_if_blown_up(model, before: dict) -> bool:
    """After an optimizer step: if a trained parameter is no longer finite, or moved by more than the
    largest weight's magnitude (a huge learning rate; weights still finite then overflow the next forward),
    put back the parameters of `before` (updates.snapshot) and return True: the step counts as skipped, and
    such weights are never sampled from, checkpointed or saved. A sane step moves a weight by about the
    learning rate, orders of magnitude less."""
    params = dict(model.named_parameters())
    # torch's max propagates NaN (Python's max of floats can skip one that is not first), read back once
    largest = torch.stack([old.abs().amax().float() for old in before.values()]).max()
    moved = torch.stack([(params[name] - old).abs().amax().float() for name, old in before.items()]).max()
    largest, moved = torch.stack([largest, moved]).tolist()
    if math.isfinite(moved) and moved <= largest:
        return False
    for name, old in before.items():
        params[name].copy_(old)
    return True


# What readers of metrics.jsonl (--compare, --initial-eval, tools/plot_runs.py) take from a row: keys every row
# of its kind holds, and the type of keys that only some rows hold (older runs, --eval-samples 0).
NUMBER = (int, float)
# An evaluation row holds the greedy measures (eval_accuracy ...), the sampled ones (eval_sampled_accuracy ...)
# or both (--eval-greedy, --eval-samples).
ROW_KEYS = {"eval": {"method": str}, "train": {}, "resume": {}}
OPTIONAL_KEYS = {"reward": NUMBER, "step_s": NUMBER, "peak_gpu_mem_gb": NUMBER, "eval_samples": int,
                 "eval_accuracy": NUMBER, "eval_length": NUMBER, "eval_acc_per_1k_tokens": NUMBER,
                 "eval_sampled_accuracy": NUMBER, "eval_truncated": NUMBER, "eval_correct": list,
                 "eval_sampled_correct": list, "eval_lengths": list, "eval_ids": list, "eval_templates": list,
                 "evaluated_with": dict, "eval_sampled_length": NUMBER, "eval_sampled_acc_per_1k_tokens": NUMBER,
                 "eval_sampled_truncated": NUMBER, "eval_sampled_lengths": list}


def row_problem(row) -> str | None:
    """What makes a parsed line no metrics row of train_min.py, or None."""
    if not isinstance(row, dict) or row.get("kind") not in ROW_KEYS or type(row.get("step")) is not int:
        return 'expected a JSON object with "kind" train, eval or resume and an integer "step"'
    for key, kind in ROW_KEYS[row["kind"]].items() | {k: v for k, v in OPTIONAL_KEYS.items() if k in row}.items():
        if key not in row or not isinstance(row[key], kind) or isinstance(row[key], bool):
            return f"key {key!r}: expected {' or '.join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))}, got {row.get(key)!r}"
    if row["kind"] == "eval" and "eval_accuracy" not in row and "eval_sampled_accuracy" not in row:
        return "an evaluation row without eval_accuracy or eval_sampled_accuracy"
    for prefix in ("eval_", "eval_sampled_"):  # a measure's accuracy comes with its length and trade-off
        missing = [prefix + k for k in ("length", "acc_per_1k_tokens") if prefix + "accuracy" in row and prefix + k not in row]
        if missing:
            return f"{prefix}accuracy without {missing[0]}"
    return None


def read_rows(path: str, quiet: bool = False) -> list[dict]:
    """Every row of a metrics.jsonl. A torn line (a JSON object cut off by a crash or a full disk) is
    reported with its file and line (unless `quiet`: a check before the read that reports) and skipped;
    any other malformed line, or a row that is not a train or eval row with an integer step (another
    program's file), stops with file:line."""
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                if line.lstrip().startswith(b"{"):  # the start of a row whose write was cut off
                    quiet or print(f"{path}:{number}: a torn line (a write cut off), skipped", file=sys.stderr)
                    continue
                sys.exit(f"{path}:{number}: not a JSON row ({error})")
            problem = row_problem(row)
            if problem:
                sys.exit(f"{path}:{number}: not a metrics row of train_min.py: {problem}")
            rows.append(row)
    return rows


def evaluations_so_far(cfg, step: int) -> tuple[bool, float]:
    """(whether a run that starts at `step` owes that step's evaluation, the seconds its last evaluation took).
    One is owed where it is due (at step 0, by --eval-every, or at the last step) and metrics.jsonl has none: a
    resumed run owes one where a kill cut it off after the checkpoint was written. The seconds are what
    --time-budget keeps room for until the run evaluates again (0 where it never did). Reads (and so checks)
    every row of the run's metrics.jsonl."""
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    evals = [r for r in (read_rows(path) if os.path.isfile(path) else []) if r["kind"] == "eval"]
    owed = evaluation_due(cfg, step) and all(r["step"] != step for r in evals)
    return owed, (evals[-1].get("eval_s", 0.0) if evals else 0.0)


def evaluation_due(cfg, step: int) -> bool:
    """Whether the run evaluates at `step`: at step 0, every --eval-every steps, and at the last step (and
    where --time-budget stops it early, which the training loop adds)."""
    return step in (0, cfg.steps) or bool(cfg.eval_every and step % cfg.eval_every == 0)


def eval_cap(settings: dict) -> int:
    """The held-out evaluation's completion cap, of a run's settings (`vars(cfg)` or its config.json):
    --eval-max-new-tokens, or where that is 0 (or was not a flag yet) --max-new-tokens."""
    return settings.get("eval_max_new_tokens") or settings.get("max_new_tokens")


def with_eval_cap(settings: dict) -> dict:
    """A copy of a run's settings whose --eval-max-new-tokens is the cap it evaluates with (`eval_cap`): two
    runs evaluate alike whether the cap was given, followed --max-new-tokens, or predates the flag."""
    return {**settings, "eval_max_new_tokens": eval_cap(settings)}


# What makes two runs' step-0 evaluations the same (--initial-eval): the model, the held-out problems and
# how they are decoded and judged.
EVAL_SETTINGS = ("model", "dtype", "device", "data", "eval_data", "eval_size", "eval_max_new_tokens", "eval_batch_size",
                 "eval_greedy", "eval_samples", "eval_temperature", "eval_top_p", "eval_top_k", "eval_seed", "rollout",
                 "verifier")


SAMPLED_EVAL_SETTINGS = ("eval_temperature", "eval_top_p", "eval_top_k", "eval_seed")  # unused at --eval-samples 0


def as_compared(settings: dict) -> dict:
    """A run's settings as two runs are compared (--compare's settings, --initial-eval's evaluations): the
    device's type alone (cuda:1 computes as cuda:0), and no SAMPLED_EVAL_SETTINGS where nothing was sampled."""
    compared = {**settings, "device": str(settings["device"]).split(":")[0]}
    return compared if compared["eval_samples"] else {k: v for k, v in compared.items() if k not in SAMPLED_EVAL_SETTINGS}


def evaluation_settings(settings: dict) -> dict:
    """The EVAL_SETTINGS of a run's settings (`vars(cfg)` or its config.json), the cap as it evaluates
    (`with_eval_cap`): what each evaluation row records as `evaluated_with`."""
    capped = with_eval_cap(settings)
    return {name: capped.get(name) for name in EVAL_SETTINGS}


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


EVALUATION_ROOM = 1.25  # a final evaluation may take a quarter longer than the last: a trained model's answers are longer


def out_of_time(budget: float, started: float, step_seconds: float, eval_seconds: float) -> bool:
    """--time-budget: whether another step, then the final evaluation (EVALUATION_ROOM times the last one),
    would overrun `budget` seconds from `started` (time.perf_counter())."""
    left = budget - (time.perf_counter() - started)
    needed = step_seconds + EVALUATION_ROOM * eval_seconds
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
