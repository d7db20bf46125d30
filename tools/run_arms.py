"""Several training runs ("arms") side by side on one GPU, within a fixed time, for one call of a lent GPU.

    python tools/run_arms.py --out /tmp/runs --budget 480 \
        --common "--model /tmp/w/hf --device cuda --steps 40 ..." \
        --arm grpo="--method grpo" --arm egrsd="--method egrsd --gamma 0.3"

RUNS below is the --out folder; PACK is --pack (default: the GPU tool's $OUT, whose files come back).
1. Appends every arm's whole command line to RUNS/commands.sh (the common flags, then the arm's: later
   flags win), and sets aside an arm folder left by an earlier call (a run folder holds one run): renamed
   .NAME.earlier-TIME where it holds metrics (nothing is lost, nothing of it is packed; hidden, so that
   RUNS/*-s* names this call's runs alone), removed where it holds none.
2. Evaluates the untrained model once (`--steps 0`, into RUNS/initial or --initial, unless that folder holds
   its evaluation already, made with the evaluation settings of --common): the step-0 evaluation is the same
   for every arm, and each arm reuses it (`--initial-eval`, which checks that it is), so the card does it
   once, not once per arm. One made with other settings is set aside (as above) and made again; one that
   overruns --budget is killed, and no arm starts.
3. Starts the arms as separate processes (one log each, RUNS/NAME/log.txt), each with `--time-budget` set
   to what is left of --budget, less their start-up and the time their final evaluations lose to each
   other on one card (no arm starts where that is under a second), and `--no-save-model` (only metrics,
   config and log are kept), so that each stops training in time for its final evaluation. If arms are
   still running --grace seconds after the budget, what they wrote so far is packed (step 4), then they all
   get SIGTERM (each stops after its step or evaluation), and those still running --grace seconds later
   SIGKILL: by PID, never by name. The worst case ends budget + 2 × grace seconds after the start.
4. Packs RUNS's metrics, configs and logs (no models) into PACK/runs.tar.gz, and writes the `--compare`
   table of the arms to PACK/compare.txt and to the log: 2 files, within the GPU tool's 8.

Relative folders are taken from where it is called (the arms run in the repository's root).
Prints each arm's exit status (and the end of its log where it failed); exits 1 if an arm failed (the archive
is written all the same).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_UP = 15  # seconds an arm spends importing before its --time-budget clock starts
sys.path.insert(0, ROOT)

from trainer import run_io  # noqa: E402
from trainer.config import check_initial_eval, parse_args  # noqa: E402
from trainer.views import compare_table  # noqa: E402

EARLIER = ".earlier-"  # an earlier call's run folder, set aside


def command(flags: list[str], out: str, name: str) -> list[str]:
    return [sys.executable, "-u", os.path.join(ROOT, "train_min.py"), *flags, "--output-dir", os.path.join(out, name)]


def run_arms(out: str, budget: float, grace: float, common: list[str], arms: dict[str, list[str]], pack: str,
             initial_dir: str = "") -> int:
    started = time.monotonic()
    os.makedirs(out, exist_ok=True)
    initial_dir = initial_dir or os.path.join(out, "initial")
    initial = command(common + ["--steps", "0", "--no-save-model"], os.path.dirname(initial_dir), os.path.basename(initial_dir))
    arm_commands = {name: command(common + flags + ["--initial-eval", initial_dir, "--no-save-model"], out, name)
                    for name, flags in arms.items()}
    with open(os.path.join(out, "commands.sh"), "a") as f:  # appended: several calls may share OUT
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: tools/run_arms.py, each arm also given --time-budget\n")
        f.writelines(shlex.join(c) + "\n" for c in [initial, *arm_commands.values()])
    for name in arms:  # an earlier call's runs, first: a folder holds one run, and what is packed is this call's
        set_aside(os.path.join(out, name))
    row = run_io.initial_eval_row(initial_dir)  # made by an earlier call: the same for every arm, if made so
    other = row is not None and not_the_same(initial_dir, common)
    if other:
        print(f"[run_arms] {initial_dir} is not this evaluation ({other}): made again", flush=True)
    reuse = row is not None and not other
    if not reuse:
        row = None  # the evaluation made below is the one that counts
        set_aside(initial_dir)  # (or an earlier attempt cut off before its evaluation)
    print(f"[run_arms] initial evaluation: {'reused from ' + initial_dir if reuse else shlex.join(initial)}", flush=True)
    try:  # within the budget, like everything else
        status = 0 if reuse else subprocess.run(initial, cwd=ROOT, timeout=budget - (time.monotonic() - started)).returncode
    except subprocess.TimeoutExpired:
        status = "killed: it overran --budget"
    if status:
        print(f"[run_arms] the initial evaluation failed (exit {status})", flush=True)
        return finish(out, pack, arms, 1)
    left = budget - (time.monotonic() - started)
    # Each arm keeps room for EVALUATION_ROOM evaluations of its own (a trained model may answer at more length);
    # side by side, the arms' final evaluations share the card and take about that for every arm: the other
    # arms' part comes off each budget.
    row = row or run_io.initial_eval_row(initial_dir) or {}
    left -= (len(arms) - 1) * run_io.EVALUATION_ROOM * row.get("eval_s", 0.0) + START_UP
    if left < 1:  # (an arm's --time-budget is whole seconds, and 0 would be none)
        print(f"[run_arms] no time left for the arms ({left:.1f} s): raise --budget", flush=True)
        return finish(out, pack, arms, 1)
    processes = {}
    for name, cmd in arm_commands.items():
        os.makedirs(os.path.join(out, name))
        with open(os.path.join(out, name, "log.txt"), "w") as log:
            processes[name] = subprocess.Popen(cmd + ["--time-budget", f"{left:.0f}"], cwd=ROOT, stdout=log,
                                               stderr=subprocess.STDOUT)
        print(f"[run_arms] {name}: pid {processes[name].pid}, {left:.0f} s left", flush=True)
    statuses = wait(processes, started + budget + grace, grace, lambda: finish(out, pack, arms, 1))
    for name, status in statuses.items():
        print(f"[run_arms] {name}: exit {status}", flush=True)
        if status:
            with open(os.path.join(out, name, "log.txt"), errors="replace") as log:
                print("".join(log.readlines()[-15:]), end="", flush=True)
    return finish(out, pack, arms, int(any(statuses.values())))


def not_the_same(initial_dir: str, common: list[str]) -> str | None:
    """Why the step-0 evaluation in `initial_dir` is not the one that the flags `common` would make (train_min's
    own --initial-eval check), or None where it is or where the flags do not parse (the runs will say why)."""
    try:
        cfg = parse_args(common + ["--initial-eval", initial_dir])
    except SystemExit:
        return None
    try:
        check_initial_eval(cfg)
    except SystemExit as refused:
        return str(refused.code)
    return None


def set_aside(folder: str) -> None:
    """An earlier call's run folder: renamed .NAME.earlier-TIME beside it where it holds metrics (hidden, so that a
    shell pattern such as RUNS/*-s* names this call's runs alone), removed where it holds none."""
    metrics = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(metrics) or not os.path.getsize(metrics):
        shutil.rmtree(folder, ignore_errors=True)
        return
    parent, name = os.path.split(os.path.normpath(folder))
    aside = base = os.path.join(parent, f".{name}{EARLIER}{time.strftime('%Y%m%d-%H%M%S')}")  # hidden: `RUNS/*-s*` skips it
    n = 1
    while os.path.exists(aside):  # (two set aside within a second)
        n += 1
        aside = f"{base}-{n}"
    os.rename(folder, aside)
    print(f"[run_arms] {folder} holds an earlier call's run: moved to {aside}", flush=True)


def wait(processes: dict[str, subprocess.Popen], deadline: float, grace: float, before_signals) -> dict[str, int]:
    """Each arm's exit status. At `deadline` (time.monotonic()), if arms still run: `before_signals()` (pack
    what they wrote), SIGTERM to every one of them at once, and `grace` seconds later SIGKILL to those left."""
    for process in processes.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0))
    running = {name: process for name, process in processes.items() if process.poll() is None}
    if running:
        try:
            before_signals()
        except (Exception, SystemExit) as error:  # noqa: BLE001 (the arms must be stopped whatever the packing did)
            print(f"[run_arms] packing before the signals failed: {type(error).__name__}: {error}", flush=True)
        signal_all(running, signal.SIGTERM)
        end = time.monotonic() + grace
        for process in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(end - time.monotonic(), 0))
        signal_all(running, signal.SIGKILL)
    return {name: process.wait() for name, process in processes.items()}


def signal_all(running: dict[str, subprocess.Popen], sig: signal.Signals) -> None:
    for name, process in running.items():
        if process.poll() is None:
            print(f"[run_arms] {name} (pid {process.pid}) overran its budget: {sig.name}", flush=True)
            process.send_signal(sig)


def finish(out: str, pack: str, arms: dict, status: int) -> int:
    """Pack metrics, configs and logs (never checkpoints or models) and write the comparison."""
    os.makedirs(pack, exist_ok=True)
    with tarfile.open(os.path.join(pack, "runs.tar.gz"), "w:gz") as archive:
        for folder, dirs, files in os.walk(out):
            dirs[:] = [d for d in dirs if d not in ("checkpoint", "checkpoint.tmp", "checkpoint.old", "final", "final.tmp")
                       and EARLIER not in d and os.path.abspath(os.path.join(folder, d)) != os.path.abspath(pack)]
            for file in (f for f in files if f != run_io.LOCK_FILE and not f.endswith(".tmp")):  # (a lock; a write cut off)
                path = os.path.join(folder, file)
                archive.add(path, arcname=os.path.join(os.path.basename(os.path.normpath(out)), os.path.relpath(path, out)))
    evaluated = [os.path.join(out, n) for n in arms if os.path.isfile(os.path.join(out, n, "metrics.jsonl"))]
    table = compare_table(evaluated) if evaluated else "(no arm wrote metrics)"
    with open(os.path.join(pack, "compare.txt"), "w", encoding="utf-8") as f:  # (Δ, ±: whatever the locale)
        f.write(table + "\n")
    print(table, flush=True)
    return status


def parse_arms(parser: argparse.ArgumentParser, specs: list[str], reserved: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """--arm NAME=FLAGS, repeated: {name: its flags}; a name is new, of letters, digits, - and _, and not `reserved`."""
    arms = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        if not name or not name.replace("-", "").replace("_", "").isalnum() or name in arms or name in reserved:
            parser.error(f"--arm: expected NAME=FLAGS with a new name of letters, digits, - and _, got {spec!r}")
        arms[name] = shlex.split(flags)
    if not arms:
        parser.error("--arm: expected at least one arm")
    return arms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the runs (OUT/initial, OUT/NAME for each arm)")
    parser.add_argument("--budget", type=float, required=True, help="seconds for everything, initial evaluation included")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds past the budget before SIGTERM, then SIGKILL")
    parser.add_argument("--common", default="", help="train_min.py flags of every arm, one string")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS", help="an arm: its name and its own flags")
    parser.add_argument("--pack", default=os.environ.get("OUT", ""), help="where runs.tar.gz and compare.txt go (default: $OUT)")
    parser.add_argument("--initial", default="", help="folder of the step-0 evaluation, reused if it is there already "
                                                       "(several calls with the same evaluation); default OUT/initial")
    args = parser.parse_args(argv)
    arms = parse_arms(parser, args.arm, reserved=("initial",))
    if not args.pack:
        parser.error("--pack: expected a folder (or $OUT set)")
    if args.budget <= 0:
        parser.error(f"--budget: expected > 0 seconds, got {args.budget}")
    out, pack, initial = (os.path.abspath(path) if path else "" for path in (args.out, args.pack, args.initial))  # (arms run in ROOT)
    return run_arms(out, args.budget, args.grace, shlex.split(args.common), arms, pack, initial)


if __name__ == "__main__":
    sys.exit(main())
