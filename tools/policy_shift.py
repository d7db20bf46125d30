"""How far one update moves the policy that samples, per arm, from one batch of rollouts: a learning rate
checked on a CPU before a GPU is spent on it.

    python tools/policy_shift.py --common "--model DIR --device cpu --dtype bfloat16 --batch-size 32 \\
            --max-new-tokens 512 --lr-schedule constant --warmup-steps 0" \\
        --arm full-1e-6="--lr 1e-6" --arm lora-5e-5="--lora-r 64 --lora-alpha 128 --lr 5e-5" [--json FILE]

The untrained model samples one batch, as train_min.py's first step would with the first arm's settings:
B / G problems and G rollouts of each, G the largest --group-size of the arms (an arm with a smaller G
learns from the same rollouts, a batch whose problems repeat). The arms differ in how they learn (method,
learning rate, LoRA, group size), not in what they learn from. Each arm, from the initial weights, then
takes train_min.py's first step on that batch (scoring, weights, one AdamW step), and the model that samples
is read on the batch's tokens before and after it, at the temperature the update scores with (--score-temperature,
else the rollouts' --temperature; without top-k or top-p): the bf16 copy of full fine-tuning in bf16, the base
with the adapter unmerged with LoRA; and the float32 student too where it is another model, to show what the
rounding to the sampler's dtype kept of the step. Each arm is read at its own such temperature (its row's
`temperature`, the table's T column). Per arm and model:

    KL        mean over the tokens of KL(p_before ‖ p_after) over the whole vocabulary, in nats (computed in
              float32: below about 1e-6 it is rounding, and may come out just below 0)
    |Δlog p|  mean absolute change of the sampled tokens' log-probabilities
    Â>0, Â<0  their mean change where the token's advantage Â (Eq. 7) is positive, negative: a step that
              follows the rewards raises the first and lowers the second (with one rollout a problem, Â>0 may
              rest on the tokens of a few right rollouts; "-" where there are none)
    gain      the token mean of Â · Δlog p, to first order the rise of the objective (> 0: uphill)

beside the step's learning rate, loss, grad norm, update_rel (‖Δθ‖/‖θ‖) and sampler_changed (the share
of the sampler's weights that changed) and whether it was skipped (not finite, or blown up and undone), as
train_min.py logs them. A learning rate whose step moves the sampler by a KL far below that of a setting
known to learn will not learn in a short run; one whose Â>0 change is not positive goes where the rounding or
the noise takes it. Adam's first step moves every weight of the float32 master by about the learning rate;
a bf16 sampler may still change more in a later step, as changes add up past its spacing. So this says how
fast each arm starts to move, not where a run ends. Only --json FILE is kept: each arm's run folder is a
temporary one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import egrsd  # noqa: E402
import train_min  # noqa: E402
from tools.bench_egrsd import check_output_file, finite_or_null  # noqa: E402
from tools.run_arms import parse_arms  # noqa: E402
from trainer import lora, run_io, updates  # noqa: E402
from trainer.config import check_config, parse_args, score_temperature  # noqa: E402
from trainer.modeling import copy_weights, lm_head, micro_batches  # noqa: E402
from trainer.tasks import batch_problems  # noqa: E402


def config(flags: list[str], output_dir: str):
    """An arm's train_min.py settings: one step, no evaluation, no model saved. A flag train_min.py's parser
    refuses stops with SystemExit and its message (not printed: the caller names the arm)."""
    argv = flags + ["--steps", "1", "--eval-size", "0", "--no-save-model", "--output-dir", output_dir]
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            cfg = parse_args(argv)
    except SystemExit as error:
        if error.code == 0:  # (--help: printed, as asked)
            raise
        message = (refused.getvalue().strip().splitlines() or [str(error.code)])[-1]
        raise SystemExit(message.partition("error: ")[2] or message) from None  # (argparse's "PROG: error: ..." less PROG)
    check_config(cfg)
    return cfg


def sample(cfg, group_size: int):
    """(problems, rollouts, seconds): the untrained model's batch of train_min.py's first step, G rollouts a problem."""
    run = train_min.setup(cfg)  # (seeds every generator as a run does)
    with run.metrics:
        problems = [p for p in batch_problems(run.train_problems, 0, cfg.batch_size // group_size, cfg.seed)
                    for _ in range(group_size)]
        start = time.perf_counter()
        batch = train_min.rollouts(run.sampler, run.tokenizer, problems, cfg)
        return problems, batch, time.perf_counter() - start


@torch.no_grad()
def read(model, batch, micro: list, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states (N, D) at the completion tokens, micro-batch by micro-batch, divided by `temperature` (which
    divides the logits); the LM head (V, D)), float32 copies."""
    model.eval()
    hidden = [train_min.completion_hidden(model, batch.student_ids[mb], batch.student_mask[mb], batch.completion[mb],
                                          batch.mask[mb]) for mb in micro]
    return torch.cat(hidden).float() / temperature, lm_head(model).detach().to(torch.float32, copy=True)


@torch.no_grad()
def shift(before, after, tokens, advantage, chunk_size: int) -> dict:
    """How the model moved on these tokens (see the module's docstring)."""
    (h0, w0), (h1, w1) = before, after
    kl = egrsd.linear_opsd_loss(h1, w1, h0, w0, chunk_size=chunk_size).item()  # the token mean of KL(p_before ‖ p_after)
    change = (egrsd.linear_token_logprobs(h1, w1, tokens, chunk_size=chunk_size)
              - egrsd.linear_token_logprobs(h0, w0, tokens, chunk_size=chunk_size))
    up, down = advantage > 0, advantage < 0
    return {"kl": kl, "abs_dlogp": change.abs().mean().item(),
            "dlogp_pos": change[up].mean().item() if up.any() else math.nan,
            "dlogp_neg": change[down].mean().item() if down.any() else math.nan,
            "gain": (advantage * change).mean().item()}


def probe(cfg, problems: list, batch) -> dict:
    """One arm: train_min.py's first step on `batch`, and how far it moved the model that samples."""
    run = train_min.setup(cfg)
    with run.metrics:
        # As train_min.train's step: the verifier, reward, advantage, the teacher's scores and the gate.
        correct = train_min.verify(train_min.completion_texts(run.tokenizer, batch.completion, batch.mask), batch.finished,
                                   problems, cfg)
        rewards = egrsd.length_shaped_reward(correct, batch.mask.sum(dim=1).cpu(), cfg.max_new_tokens, beta=cfg.beta_length)
        advantages = egrsd.group_advantages(rewards, cfg.group_size) if cfg.group_size > 1 else run.advantage(rewards)
        scores = train_min.score(None, run.teacher, batch, cfg)
        gates = train_min.step_gates(scores.teacher_entropy, batch.mask, cfg)
        models = {"sampler": run.sampler} | ({"student": run.student} if run.student is not run.sampler and not cfg.lora_r else {})
        micro = micro_batches(batch.mask, cfg.micro_batch_size)
        temperature = score_temperature(cfg)
        before = {name: read(model, batch, micro, temperature) for name, model in models.items()}
        snapshot, lr = updates.snapshot(run.student), run.optimizer.param_groups[0]["lr"]
        loss, grad_norm, weights = train_min.update(run.student, run.teacher, run.optimizer, batch, scores,
                                                    advantages.to(cfg.device), cfg, gates)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm)) or run_io.undo_if_blown_up(run.student, snapshot)
        (lora.refresh if cfg.lora_r else copy_weights)(run.student, run.sampler)
        row = {"temperature": temperature, "correct": int(correct.sum()), "lr": lr, "loss": loss, "grad_norm": grad_norm,
               "skipped": skipped,
               "update_rel": updates.relative_update(run.student, snapshot),
               "sampler_changed": updates.sampler_share_changed(run.student if cfg.lora_r else run.sampler, snapshot,
                                                                lora=bool(cfg.lora_r))}
        tokens = torch.cat([batch.completion[mb][batch.mask[mb]] for mb in micro])
        advantage = torch.cat([weights.advantage[mb][batch.mask[mb]] for mb in micro]).float()
        for name, model in models.items():
            row[name] = shift(before[name], read(model, batch, micro, temperature), tokens, advantage, cfg.chunk_size)
        return row


def table(summary: dict, arms: dict) -> str:
    lines = [f"one batch: {summary['problems']} problem(s) x {summary['group_size']} rollout(s), {summary['tokens']} tokens, "
             f"{summary['correct']} of {summary['rollouts']} correct, {summary['finished']} finished (sampled at temperature "
             f"{summary['rollout_temperature']:g} in {summary['sample_s']:.0f} s); each arm read at the "
             f"temperature its update scores with (T):",
             f"{'arm':<16} {'model':<8} {'T':>5} {'lr':>8} {'loss':>8} {'grad':>7} {'Δθ/θ':>8} {'changed':>8} {'KL':>9} {'|Δlog p|':>9} "
             f"{'Â>0':>9} {'Â<0':>9} {'gain':>9}"]
    for name, row in arms.items():
        for model in ("sampler", "student"):
            if model in row:
                m = row[model]
                signed = [f"{m[k]:>+9.2e}" if math.isfinite(m[k]) else f"{'-':>9}" for k in ("dlogp_pos", "dlogp_neg", "gain")]
                lines.append(f"{name:<16} {model:<8} {row['temperature']:>5g} {row['lr']:>8.1e} {row['loss']:>8.4f} {row['grad_norm']:>7.3f} "
                             f"{row['update_rel']:>8.1e} {row['sampler_changed']:>7.1%} {m['kl']:>9.2e} {m['abs_dlogp']:>9.2e} "
                             + " ".join(signed))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--common", default="", help="train_min.py flags of every arm, one string")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS", help="an arm: its name and its own flags")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    try:
        common = shlex.split(args.common)
    except ValueError as error:
        parser.error(f"--common: expected train_min.py flags as a shell would split them, got {args.common!r} ({error})")
    for spec in args.arm:  # (parse_arms splits them too, but its error would name no arm)
        name, _, flags = spec.partition("=")
        try:
            shlex.split(flags)
        except ValueError as error:
            parser.error(f"--arm {name}: expected train_min.py flags as a shell would split them, got {flags!r} ({error})")
    arms = parse_arms(parser, args.arm)
    check_output_file(parser, "--json", args.json)  # (written at the end: its folder is made now, a bad file refused now)
    with tempfile.TemporaryDirectory() as scratch:
        configs = {}
        for name, flags in arms.items():
            try:
                configs[name] = config(common + flags, os.path.join(scratch, name))
            except SystemExit as error:  # a bad flag: which arm's settings it was found in
                if error.code in (0, None):  # (--help)
                    raise
                parser.error(f"--arm {name} (with --common): {error}")
        first, group_size = next(iter(configs.values())), max(c.group_size for c in configs.values())
        if first.batch_size % group_size:
            parser.error(f"--group-size: the largest of the arms, {group_size}, must divide the first arm's --batch-size "
                         f"{first.batch_size}")
        for name, cfg in configs.items():  # each problem is sampled G times: a group must not span two problems
            if group_size % cfg.group_size:
                parser.error(f"--arm {name}: its --group-size {cfg.group_size} must divide the largest of the arms, {group_size}")
        problems, batch, seconds = sample(dataclasses.replace(first, output_dir=os.path.join(scratch, "sample")), group_size)
        results = {name: probe(cfg, problems, batch) for name, cfg in configs.items()}
    summary = {"problems": len(problems) // group_size, "group_size": group_size, "rollouts": len(problems),
               "correct": next(iter(results.values()))["correct"], "tokens": int(batch.mask.sum()),
               "finished": int(batch.finished.sum()), "sample_s": seconds, "rollout_temperature": first.temperature}
    print(table(summary, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(finite_or_null({"batch": summary, "arms": results, "common": common, "flags": arms}), f, indent=1,
                      allow_nan=False)  # (null where a mean has no token: JSON has no NaN)
    return results


if __name__ == "__main__":
    main()
