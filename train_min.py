"""On-policy self-distillation with EGRSD / CL-EGRSD, minimal: one GPU, full fine-tuning or LoRA.

Every step: sample rollouts from the student (one per problem, or G with --group-size), verify them, score
every completion token with a frozen copy of the initial model whose prompt also holds the reference
solution (the privileged teacher), weight each token (egrsd.py) and take one AdamW step. Five methods share
the same rollouts, reward, advantage and optimizer; only the per-token weight differs (docs/METHOD.md):

    grpo      Â = A_i                        rlsd      Â = A_i · w            (EGRSD with γ = 0)
    opsd      loss = KL(p_T ‖ p_θ) per token egrsd     Â = A_i · w · ω        cl-egrsd  ω with lookahead W

Run:
    python train_min.py                                      # EGRSD, Qwen2.5-0.5B-Instruct, one CUDA GPU
    python train_min.py --method cl-egrsd --window 3 --output-dir runs/cl
    python train_min.py --model tiny --device cpu --steps 2 --batch-size 8 --max-new-tokens 64 --eval-size 16 \\
        --output-dir runs/smoke                              # a smoke run on CPU, the tiny model built in code
    python train_min.py --resume runs/cl                     # continue an interrupted run
    python train_min.py --compare runs/egrsd runs/cl         # accuracy-length table of runs, no model

Settings: trainer/config.py (`--help`); machinery (rollouts, tasks, run files, views): trainer/. Here: the algorithm.

Simplified on purpose: rollouts from trainer/decoding.py (a static KV cache and a CUDA graph per decode step,
or HF `generate` with --rollout hf-dynamic); one optimizer step per batch (fully on-policy, so no importance
ratio or clipping of the policy); the teacher scores only the completion positions, and the full-vocabulary
quantities are computed from hidden states in chunks (never a (tokens × V) tensor).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import AutoModelForCausalLM

import egrsd
from trainer import decoding, lora, run_io, updates, views
from trainer.modeling import (checkpointing_if_needed, copy_weights, in_batch_order, lm_head, micro_batches, rows_to_grid,
                              to_grid, trainable, without_shared_padding)
from trainer.config import (Config, check_config, checked_data, compare_dirs, compute_dtype, learning_rate_factor, parse_args,
                            score_temperature)
from trainer.offline_models import enable_activation_checkpointing, eos_list, load_model_and_tokenizer
from trainer.tasks import batch_problems, is_correct, is_correct_symbolic, student_messages, teacher_messages


# ----------------------------------------------------------------------------------------------------
# What one step passes from stage to stage.


@dataclass
class Rollouts:
    """One step's problems as the student and the teacher see them, and the student's completions."""
    student_ids: torch.Tensor  # (B, P) left-padded chat prompts: the question
    student_mask: torch.Tensor  # (B, P) their attention mask
    teacher_ids: torch.Tensor  # (B, P') the question and the reference solution s*
    teacher_mask: torch.Tensor  # (B, P')
    completion: torch.Tensor  # (B, T) sampled token ids, padding after the EOS
    mask: torch.Tensor  # (B, T) bool: True up to and including the first EOS
    finished: torch.Tensor  # (B,) bool: an EOS came before the cap


@dataclass
class Scores:
    """What the frozen teacher and the policy that sampled say of each completion token; no gradient."""
    teacher_logp: torch.Tensor  # (B, T) log p_T(y_t | x, s*, y_<t), 0 off the mask
    teacher_entropy: torch.Tensor  # (B, T) H_T in nats (Eq. 4)
    student_logp: torch.Tensor | None  # (B, T) log p_S(y_t | x, y_<t) before the update (None: the update's)
    teacher_hidden: list[torch.Tensor]  # per micro-batch, (N, D) at its valid tokens: OPSD's teacher


@dataclass
class TokenWeights:
    """The factors of Eq. 7 per token (1 where a method has no such factor), and their product Â."""
    magnitude: torch.Tensor  # (B, T) w (Eq. 2)
    gate: torch.Tensor  # (B, T) ω (Eq. 6, 8)
    advantage: torch.Tensor  # (B, T) Â = A_i · w · ω


# ----------------------------------------------------------------------------------------------------
# Rollouts and the verifier (the problems and their order: trainer/tasks.py).


def rollouts(sampler, tokenizer, problems: list, cfg: Config) -> Rollouts:
    """The problems as the student and the teacher see them, and the student's completions."""
    student_ids, student_mask = encode_prompts(tokenizer, [student_messages(p) for p in problems], cfg.device)
    teacher_ids, teacher_mask = encode_prompts(tokenizer, [teacher_messages(p) for p in problems], cfg.device)
    return Rollouts(student_ids, student_mask, teacher_ids, teacher_mask, *generate(sampler, tokenizer, student_ids, student_mask, cfg))


def encode_prompts(tokenizer, conversations: list[list[dict]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-template the conversations and left-pad them: ids, attention mask (B, P)."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def generate(model, tokenizer, prompt_ids, prompt_mask, cfg: Config, greedy: bool = False, sampling: dict | None = None,
             max_new_tokens: int = 0, progress: str = "rollout tokens"):
    """Sample completions: ids (B, T), mask (B, T) bool up to and including the first EOS, finished (B,).
    Every EOS id of the model's generation config ends a row (Qwen2.5-Instruct: <|im_end|>, <|endoftext|>).
    `sampling` (temperature, top_k, top_p) and `max_new_tokens` (0) default to the rollouts' settings."""
    eos_ids = eos_list(model)
    args = (model, prompt_ids, prompt_mask, max_new_tokens or cfg.max_new_tokens, eos_ids, tokenizer.pad_token_id)
    sampling = dict(greedy=greedy, **(sampling or dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)))
    if cfg.rollout in ("hf-static", "hf-dynamic"):
        completion = decoding.hf_generate(*args, **sampling, static=cfg.rollout == "hf-static")
    else:  # decoding.py; auto: CUDA graphs on CUDA unless a capture fails there
        completion = decoding.generate(*args, **sampling, graph={"auto": None, "graph": True, "eager": False}[cfg.rollout],
                                       progress=progress, compile_step=cfg.compile_decode)
    return (completion, *completion_mask(completion, eos_ids))


def completion_mask(completion, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, T) bool, True up to and including the first EOS; finished (B,): an EOS came at all."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    return (is_eos.cumsum(dim=1) - is_eos.long()) == 0, is_eos.any(dim=1)


def completion_texts(tokenizer, completion, mask) -> list[str]:
    """Each completion as text, up to and including its first EOS, without special tokens."""
    return [tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in zip(completion, mask)]


def verify(texts: list[str], finished, problems, cfg: Config) -> torch.Tensor:
    """correct (B,) bool: finished (EOS before the cap) and the answer in the text matches the reference."""
    judge = is_correct if cfg.verifier == "builtin" else is_correct_symbolic
    return torch.tensor([f and judge(t, p.answer) for t, f, p in zip(texts, finished.tolist(), problems)])


# ----------------------------------------------------------------------------------------------------
# Scoring: hidden states at the completion positions, never the full logits.


def completion_hidden(model, prompt_ids, prompt_mask, completion, mask) -> torch.Tensor:
    """Final hidden states of the positions that predict the valid completion tokens: (N, D), row-major in
    `mask`, from a forward without the padding that all the rows share."""
    prompt_ids, prompt_mask, completion, mask = without_shared_padding(prompt_ids, prompt_mask, completion, mask)
    ids = torch.cat([prompt_ids, completion], dim=1)
    attention = torch.cat([prompt_mask, mask.long()], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # left padding: positions as in generate
    body = (model.get_base_model() if lora.is_adapted(model) else model).base_model  # the decoder stack, no LM head
    hidden = body(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False).last_hidden_state
    return hidden[:, prompt_ids.shape[1] - 1 : -1][mask]  # position P − 1 + t predicts completion token t


@torch.no_grad()
def score(policy, teacher, batch: Rollouts, cfg: Config) -> Scores:
    """The teacher's log-probs and entropy at every completion token, from logits divided by the score
    temperature (dividing the hidden states divides the logits), and those of `policy` (the model that
    sampled) where one is given. Training passes None: the update's own forward gives the student's."""
    completion, mask, temperature = batch.completion, batch.mask, score_temperature(cfg)
    teacher.eval()  # (with LoRA the teacher is the student, left in train mode by the last update)
    rows = {"teacher_logp": [], "teacher_entropy": [], "student_logp": [], "teacher_hidden": []}
    micro = micro_batches(mask, cfg.micro_batch_size)
    for mb in micro:
        m, tokens = mask[mb], completion[mb][mask[mb]]
        with lora.adapter_off(teacher):  # with LoRA the teacher is the student's own base model
            h_t = completion_hidden(teacher, batch.teacher_ids[mb], batch.teacher_mask[mb], completion[mb], m) / temperature
        if not bool(torch.isfinite(h_t).all()):  # the frozen teacher overflowed: every step would, so stop
            fix = "--dtype float32" if compute_dtype(cfg) != torch.float32 else "a --temperature (and any --score-temperature) not near 0"
            sys.exit(f"the frozen teacher's forward is not finite (an overflow in {compute_dtype(cfg)}?); nothing of this step "
                     f"was applied. A resume would sample it again, in the same dtype and temperatures: start a new run with {fix}.")
        logp_t, entropy_t = egrsd.linear_token_logprobs_and_entropy(h_t, lm_head(teacher), tokens, chunk_size=cfg.chunk_size)
        rows["teacher_hidden"].append(h_t)
        rows["teacher_logp"].append(logp_t)
        rows["teacher_entropy"].append(entropy_t)  # Eq. 4, from the same pass over the teacher's logits
        if policy is not None:
            policy.eval()
            h_s = completion_hidden(policy, batch.student_ids[mb], batch.student_mask[mb], completion[mb], m) / temperature
            rows["student_logp"].append(egrsd.linear_token_logprobs(h_s, lm_head(policy), tokens, chunk_size=cfg.chunk_size))
    return Scores(**{k: v if k == "teacher_hidden" else rows_to_grid(mask, micro, v) if v else None for k, v in rows.items()})


# ALGO LOGIC: the per-token weights, the only thing that differs between the methods.
def weight_tokens(advantages, scores: Scores, mask, cfg: Config, gate=None) -> TokenWeights:
    """Eq. 7, Â = A_i · w · ω (B, T):
    GRPO and OPSD use neither factor (OPSD's loss is the KL), RLSD w only, EGRSD both, CL-EGRSD both
    with the lookahead gate (Eq. 8). `gate`: ω of these rows if already known (it is normalised over the
    whole batch, so the update, which weights a micro-batch at a time, computes it first)."""
    magnitude = mask.float()
    if cfg.method in ("rlsd", "egrsd", "cl-egrsd"):  # Eq. 2
        magnitude = egrsd.ratio_magnitude(scores.teacher_logp, scores.student_logp, torch.sign(advantages), mask, eps=cfg.eps)
    gate = token_gate(step_gates(scores.teacher_entropy, mask, cfg), mask, cfg) if gate is None else gate
    return TokenWeights(magnitude, gate, advantages[:, None] * magnitude * gate)


def step_gates(teacher_entropy, mask, cfg: Config) -> egrsd.Gates:
    """The gate of the step's batch, computed once (Eq. 5, 6, 8): ω at W = 0 and at --window, Ĥ^CL and the
    token regimes, for the update (token_gate), the metrics and the token view."""
    settings = egrsd.GateSettings.from_flags(cfg)
    return settings.gates(teacher_entropy, mask, tau_low=cfg.regime_low, tau_high=cfg.regime_high)


def token_gate(gates: egrsd.Gates, mask, cfg: Config) -> torch.Tensor:
    """ω (B, T): Eq. 5, 6 for egrsd, with the lookahead (Eq. 8) for cl-egrsd, 1 for the other methods."""
    return {"egrsd": gates.plain, "cl-egrsd": gates.lookahead}.get(cfg.method, mask.float())


# ----------------------------------------------------------------------------------------------------
# The update.


def update(student, teacher, optimizer, batch: Rollouts, scores: Scores, advantages, cfg: Config, gates: egrsd.Gates = None):
    """One AdamW step on the whole batch (gradient accumulation over micro-batches), each micro-batch's
    tokens weighted from the log-probs of this forward itself (δ and w need the student's log-probs before
    the step: these are they, so no separate scoring pass). Returns (loss, grad norm, TokenWeights); a
    non-finite loss or norm means the step was skipped and nothing was applied."""
    student.train()
    mask, completion, total = batch.mask, batch.completion, batch.mask.sum().clamp(min=1)
    gates = step_gates(scores.teacher_entropy, mask, cfg) if gates is None else gates
    gate, parts, loss_sum = token_gate(gates, mask, cfg), [], 0.0
    micro = micro_batches(mask, cfg.micro_batch_size)
    for i, mb in enumerate(micro):
        m = mask[mb]
        with autocast(cfg):
            h = completion_hidden(student, batch.student_ids[mb], batch.student_mask[mb], completion[mb], m) / score_temperature(cfg)
            if not bool(torch.isfinite(h).all()):  # a non-finite forward (bf16 overflow): skip the step
                optimizer.zero_grad(set_to_none=True)
                nan = torch.full(mask.shape, math.nan, device=mask.device)
                return math.nan, math.nan, TokenWeights(nan, gate, nan)
            logp = None if cfg.method == "opsd" else to_grid(
                m, egrsd.linear_token_logprobs(h, lm_head(student), completion[mb][m], chunk_size=cfg.chunk_size))
            mine = Scores(scores.teacher_logp[mb], scores.teacher_entropy[mb], None if logp is None else logp.detach(), [])
            parts.append(weight_tokens(advantages[mb], mine, m, cfg, gate=gate[mb]))
            if cfg.method == "opsd":  # Eq. 1: token mean of the full-vocabulary KL(p_T ‖ p_θ)
                loss = egrsd.linear_opsd_loss(h, lm_head(student), scores.teacher_hidden[i], lm_head(teacher), chunk_size=cfg.chunk_size)
            else:  # Eq. 7: −Σ m · Â · log p_θ / Σ m
                loss = egrsd.policy_loss(logp, parts[-1].advantage, m)
        loss = loss * m.sum() / total  # micro-batch mean → batch token mean (in the loss's dtype)
        loss.backward()
        loss_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(student), cfg.grad_clip).item()
    if math.isfinite(loss_sum) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    weights = TokenWeights(*(in_batch_order(micro, [getattr(w, k) for w in parts]) for k in ("magnitude", "gate", "advantage")))
    return loss_sum, grad_norm, weights


# ----------------------------------------------------------------------------------------------------
# Evaluation and precision.


@torch.no_grad()
def evaluate(model, tokenizer, problems: list, cfg: Config) -> dict:
    """Held-out accuracy and mean length (the paper's trade-off) of the greedy completion and avg@K of K sampled
    ones (--eval-samples; their own seeded stream, the same for every run, the training's restored after); per
    problem its id and template (runs pair by problem, intervals cluster by template); the settings used."""
    start = time.perf_counter()
    row = {"eval_ids": [p.id for p in problems], "eval_templates": [p.template for p in problems]}
    if cfg.eval_greedy:
        row |= solve(model, tokenizer, problems, cfg, "eval_", greedy=True)
    if cfg.eval_samples:
        device = torch.device(cfg.device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.eval_seed)
            sampling = dict(temperature=cfg.eval_temperature, top_k=cfg.eval_top_k, top_p=cfg.eval_top_p)
            repeated = [p for p in problems for _ in range(cfg.eval_samples)]
            row |= solve(model, tokenizer, repeated, cfg, "eval_sampled_", sampling=sampling, per=cfg.eval_samples)
    return row | {"eval_samples": cfg.eval_samples, "evaluated_with": run_io.evaluation_settings(vars(cfg)),
                  "eval_s": time.perf_counter() - start}


def solve(model, tokenizer, problems: list, cfg: Config, prefix: str, per: int = 1, **how) -> dict:
    """Complete and verify each problem: accuracy, mean length, Acc/(length/1000), the truncated share; per problem
    (averaged over its `per` consecutive copies) the correct share and mean length; each completion (eval/step_N.jsonl)."""
    correct, lengths, finished, texts, cap = [], [], [], [], run_io.eval_cap(vars(cfg))  # the evaluation's cap
    starts = range(0, len(problems), cfg.eval_batch_size)
    for start in run_io.progress(starts, f"evaluation ({prefix.strip('_')}), batches", len(starts)):
        batch = problems[start : start + cfg.eval_batch_size]
        ids, attention = encode_prompts(tokenizer, [student_messages(p) for p in batch], cfg.device)
        completion, mask, ended = generate(model, tokenizer, ids, attention, cfg, max_new_tokens=cap, progress="", **how)
        texts += completion_texts(tokenizer, completion, mask)
        correct += verify(texts[start:], ended, batch, cfg).int().tolist()  # (this batch's texts)
        lengths += mask.sum(dim=1).tolist()
        finished += ended.tolist()
    n = max(len(correct), 1)
    accuracy, length = sum(correct) / n, sum(lengths) / n

    def per_problem(xs):
        return xs if per == 1 else [sum(xs[i : i + per]) / per for i in range(0, len(xs), per)]

    return {f"{prefix}accuracy": accuracy, f"{prefix}length": length,
            f"{prefix}acc_per_1k_tokens": accuracy / (length / 1000) if length else 0.0,
            f"{prefix}truncated": 1 - sum(finished) / n,
            f"{prefix}correct": per_problem(correct), f"{prefix}lengths": per_problem(lengths),
            f"{prefix}completions": [dict(text=t, correct=c, length=k, ended=e) for t, c, k, e in zip(texts, correct, lengths, finished)]}


def autocast(cfg: Config):
    """The student's update: bf16 compute with float32 master weights (bf16 weights would round updates of
    lr ~1e-6 away; so does the bf16 sampler, which `updates.sampler_share_changed` measures)."""
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=compute_dtype(cfg) == torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# The loop.


@dataclass
class Run:
    """What a run holds from step to step: settings, data, the model's three roles, optimizer, metrics file."""
    cfg: Config
    train_problems: list
    eval_problems: list
    tokenizer: object
    teacher: torch.nn.Module  # the initial weights, frozen (with LoRA: the base with the adapter off)
    student: torch.nn.Module  # the trained weights (float32 master weights, or the adapter)
    sampler: torch.nn.Module  # the student in the compute dtype: rollouts and evaluation
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    advantage: egrsd.RunningAdvantage
    metrics: object  # metrics.jsonl, open for appending
    start_step: int
    started: float  # time.perf_counter() at the start, for --time-budget
    checkpointing: bool  # whether the student recomputes its activations in the backward (--gradient-checkpointing)


def setup(cfg: Config) -> Run:
    """Seeds, data, models, optimizer; on --resume the checkpoint's weights, optimizer, schedule, advantage
    statistics and random state; then config.json and the metrics file."""
    started = time.perf_counter()
    transformers.set_seed(cfg.seed)  # Python's, NumPy's and torch's generators
    train_problems, eval_problems = checked_data(cfg)  # each prompt fits the model's positions

    # Full fine-tuning: the teacher is the initial weights, frozen (the paper's); the student holds trainable
    # float32 master weights (the checkpoint's when resuming); the sampler, a copy in the compute dtype
    # refreshed after each update, rolls out and evaluates (decoding float32 would halve its speed). LoRA: one
    # base model in the compute dtype: the student trains an adapter on it, the teacher is it with the adapter
    # off, and the sampler shares its weights and adds the adapter unmerged (trainer/lora.py).
    checkpoint = run_io.find_checkpoint(cfg.output_dir) if cfg.resume else None
    teacher, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, compute_dtype(cfg))
    teacher.eval().requires_grad_(False)
    if cfg.lora_r:
        student = teacher = lora.attach(teacher, cfg, checkpoint)
        sampler = lora.sampler(student)
    else:
        student = (AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, use_safetensors=True).to(cfg.device)
                   if checkpoint else copy.deepcopy(teacher).float().requires_grad_(True))
        sampler = student if compute_dtype(cfg) == torch.float32 else copy.deepcopy(teacher)
        copy_weights(student, sampler)
    optimizer = torch.optim.AdamW(trainable(student), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(cfg))
    advantage = egrsd.RunningAdvantage(warmup_steps=cfg.advantage_warmup)
    start_step, recompute = 0, cfg.gradient_checkpointing == "on"
    if checkpoint:
        state = run_io.load_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        advantage.load_state_dict(state["advantage"])
        schedule.load_state_dict(state["schedule"])  # where in the schedule the run is
        schedule.base_lrs = [cfg.lr] * len(optimizer.param_groups)  # the flags of this call win over saved ones
        for group in optimizer.param_groups:
            group.update(lr=cfg.lr * learning_rate_factor(cfg)(schedule.last_epoch), weight_decay=cfg.weight_decay)
        advantage.warmup_steps = cfg.advantage_warmup
        run_io.set_rng_states(state["rng"])  # the sampling continues as if never interrupted
        start_step = state["step"]
        recompute |= cfg.gradient_checkpointing == "auto" and state.get("gradient_checkpointing", False)  # auto's switch
        print(f"resumed {cfg.output_dir} at step {start_step}")
    if recompute:
        enable_activation_checkpointing(student)
    run_io.write_config(cfg.output_dir, asdict(cfg) | {"resume": ""})
    return Run(cfg, train_problems, eval_problems, tokenizer, teacher, student, sampler, optimizer, schedule, advantage,
               run_io.open_metrics(cfg.output_dir, start_step if checkpoint else None), start_step, started, recompute)


def train(cfg: Config):
    """The whole run; returns the (student, teacher) models at the end."""
    run = setup(cfg)
    student, tokenizer, bad_steps = run.student, run.tokenizer, 0
    with contextlib.closing(run.metrics), run_io.StopOnSignal() as stop:
        owed, eval_seconds = run_io.evaluations_so_far(cfg, run.start_step)  # step 0's, or one a kill cut off
        eval_seconds = (evaluate_and_log(run, run.start_step) if owed else eval_seconds) if run.eval_problems else 0.0
        saved, out_of_time = bool(cfg.resume), run_io.out_of_time(cfg.time_budget, run.started, 0.0, eval_seconds)
        for step in range(run.start_step, cfg.steps):
            if stop.requested or out_of_time:  # Ctrl-C, or no room left for a step and the final evaluation
                if not saved:  # (they came during an evaluation, which changes neither weights nor random state)
                    save_checkpoint(run, step)
                print(run_io.stopped(cfg.output_dir, step, cfg.save_model))
                return student, run.teacher
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

            # 1. Rollouts from the current student, and the verifier.
            problems = batch_problems(run.train_problems, step, cfg.batch_size // cfg.group_size, cfg.seed)
            problems = [p for p in problems for _ in range(cfg.group_size)]  # G rollouts of a problem, side by side
            batch = rollouts(run.sampler, tokenizer, problems, cfg)
            lengths = batch.mask.sum(dim=1)
            correct = verify(completion_texts(tokenizer, batch.completion, batch.mask), batch.finished, problems, cfg)
            t1 = time.perf_counter()

            # 2. ALGO LOGIC: reward (length-shaped, 0 unless correct and finished), advantage (running, or
            #    GRPO's per group), teacher scoring and the per-token weights.
            rewards = egrsd.length_shaped_reward(correct, lengths.cpu(), cfg.max_new_tokens, beta=cfg.beta_length)
            advantages = egrsd.group_advantages(rewards, cfg.group_size) if cfg.group_size > 1 else run.advantage(rewards)
            scores = score(None, run.teacher, batch, cfg)  # the teacher's; the student's come from the update
            gates = step_gates(scores.teacher_entropy, batch.mask, cfg)  # ω at 0 and W, Ĥ^CL, regimes: once
            t2 = time.perf_counter()

            # 3. One optimizer step on the batch, its tokens weighted (Eq. 7) from the update's own forward (a
            #    non-finite step is skipped, not applied), and whether it reached the model that samples (bf16
            #    rounds away updates much below 2⁻⁹·|w|).
            lr = run.optimizer.param_groups[0]["lr"]
            before = updates.snapshot(student)
            (loss, grad_norm, weights), switched = checkpointing_if_needed(  # --gradient-checkpointing auto
                lambda: update(student, run.teacher, run.optimizer, batch, scores, advantages.to(cfg.device), cfg, gates),
                student, run.optimizer, may_switch=cfg.gradient_checkpointing == "auto" and not run.checkpointing)
            run.checkpointing |= switched
            # A finite step can still overflow the weights (a huge --lr): it is undone and counts as skipped.
            skipped = not (math.isfinite(loss) and math.isfinite(grad_norm)) or run_io.undo_if_blown_up(student, before)
            with warnings.catch_warnings():  # (a skipped first step steps the schedule before the optimizer)
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
                run.schedule.step()
            (lora.refresh if cfg.lora_r else copy_weights)(student, run.sampler)
            reach = {"update_rel": updates.relative_update(student, before), "sampler_changed": updates.sampler_share_changed(
                student if cfg.lora_r else run.sampler, before, lora=bool(cfg.lora_r))}
            del before
            t3 = time.perf_counter()

            # 4. The metrics row and the step line.
            done, bad_steps = step + 1, bad_steps + 1 if skipped else 0
            row = {"kind": "train", "step": done, "method": cfg.method, "reward": rewards.mean().item(),
                   "accuracy": correct.float().mean().item(), "length_mean": lengths.float().mean().item(),
                   "length_max": int(lengths.max()), "truncated": (~batch.finished).float().mean().item(),
                   "loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": skipped, **reach,
                   "gradient_checkpointing": run.checkpointing, **views.regime_stats(scores, weights, batch.mask, gates),
                   "rollout_tokens_per_s": int(lengths.sum()) / (t1 - t0), "generate_s": t1 - t0, "score_s": t2 - t1,
                   "update_s": t3 - t2, "step_s": t3 - t0,
                   "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}
            run_io.append_row(run.metrics, row)
            print(views.step_line(row, cfg.steps), flush=True)
            if cfg.dump_tokens and done % cfg.dump_tokens == 0:
                page = os.path.join(cfg.output_dir, "tokens", f"step_{done}.html")
                with run_io.writing("the token view", page, cfg.output_dir):
                    views.dump_tokens(page, done, tokenizer, batch, scores, weights, rewards.tolist(), correct.tolist(), gates, skipped)

            # 5. Checkpoint, then evaluate (a kill during the evaluation loses no step); a stop comes before the next step.
            if bad_steps >= cfg.max_bad_steps:
                save_checkpoint(run, done)
                sys.exit(f"stopped: {bad_steps} skipped steps in a row, non-finite or blown up (loss {loss}, grad norm "
                         f"{grad_norm}): lower --lr?\n{run_io.last_good(cfg.output_dir)}")
            out_of_time = done < cfg.steps and run_io.out_of_time(cfg.time_budget, run.started, t3 - t0, eval_seconds)
            if saved := (cfg.save_every and done % cfg.save_every == 0) or stop.requested or out_of_time or done == cfg.steps:
                save_checkpoint(run, done)
            if run.eval_problems and (run_io.evaluation_due(cfg, done) or out_of_time):
                eval_seconds = evaluate_and_log(run, done)  # it took time: is there still room for a step and the last one?
                out_of_time = out_of_time or done < cfg.steps and run_io.out_of_time(cfg.time_budget, run.started, t3 - t0, eval_seconds)
    save_final(run)
    return student, run.teacher


def evaluate_and_log(run: Run, step: int) -> float:
    """Evaluate the sampler (at step 0 with --initial-eval: reuse that run's evaluation), append the row,
    print it; returns the seconds the evaluation took."""
    cfg = run.cfg
    reused = step == 0 and cfg.initial_eval  # the untrained model's evaluation, made once for every arm
    with run_io.evaluating(cfg, step, len(run.eval_problems), save=lambda: save_checkpoint(run, step)):  # out of memory
        result = run_io.initial_eval_row(cfg.initial_eval) if reused else evaluate(run.sampler, run.tokenizer, run.eval_problems, cfg)
    row = result | {"kind": "eval", "step": step, "method": cfg.method, "reused_from": cfg.initial_eval if reused else None}
    run_io.write_completions(cfg.output_dir, step, run.eval_problems, row)  # the texts, out of the row: eval/step_N.jsonl
    run_io.append_row(run.metrics, row)
    print(f"eval step {step}{' (reused)' if reused else ''}: {views.evaluation_line(row)}", flush=True)
    return row.get("eval_s", 0.0)


def save_checkpoint(run: Run, step: int) -> None:
    if run.cfg.save_model:
        state = {"step": step, "optimizer": run.optimizer.state_dict(), "advantage": run.advantage.state_dict(),
                 "schedule": run.schedule.state_dict(), "gradient_checkpointing": run.checkpointing}
        run_io.save_checkpoint(run.cfg.output_dir, run.student, run.tokenizer, state, asdict(run.cfg) | {"resume": ""})


def save_final(run: Run) -> None:
    """final/: the sampler's weights in the compute dtype (LoRA: the adapter, and base + adapter merged), its generation config."""
    if run.cfg.save_model:
        run_io.save_final(run.cfg.output_dir, lambda path: lora.save_final(run.student, run.tokenizer, path) if run.cfg.lora_r
                          else [m.save_pretrained(path) for m in (run.sampler, run.tokenizer)], run.teacher.own_generation_config)
        print(f"saved {run.cfg.output_dir}/final")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if (run_dirs := compare_dirs(argv)) is not None:  # python train_min.py --compare RUN_DIR ...: a table, no model
        return print(views.compare_table(run_dirs))
    cfg = parse_args(argv, description=__doc__)
    check_config(cfg)
    transformers.logging.disable_progress_bar()  # bars for loading and writing a few files: noise in a run's log
    with run_io.owning(cfg.output_dir, cfg.resume):  # one process and one run per folder
        return train(cfg)


if __name__ == "__main__":
    main()
