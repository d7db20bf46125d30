"""Speed and memory of EGRSD-min side by side with the plain baselines, all in one run.

    python tools/bench_egrsd.py                      # CPU, small sizes (2 to 6 minutes on 2 cores, quiet to busy)
    python tools/bench_egrsd.py --device cuda        # one GPU, Qwen2.5-0.5B architecture, random weights
    python tools/bench_egrsd.py --json bench.json    # also write every number as JSON (null: not measured or not known)
    python tools/bench_egrsd.py --only rollouts      # some parts only (scoring, lookahead, step, rollouts, ...)

1. Student scoring step (forward, log-probs of the sampled tokens, backward): plain (full logits, float32
   log-softmax) vs the project's (`egrsd.linear_token_logprobs` from hidden states in chunks): peak
   memory, time, largest differences of log-probs and gradients. Teacher entropy likewise. CPU: one run of
   each, each in a process of its own; CUDA: one untimed call of each, then best of 3, alternating which goes first.
2. Rollouts: each engine of `train_min.generate`: HF `generate` with a dynamic cache (the baseline) and
   a static cache (compiled on CUDA), trainer/decoding.py eager and, on CUDA, with one CUDA graph per
   decode step (the trainer's default there) and with that step's forward compiled inside the graph
   (`--compile-decode`): new tokens per second at batch 32 and 128, best of 5 (CPU) or 3 (CUDA) after a
   warm-up, milliseconds a decode step (the whole call over its new tokens), and whether each engine's
   greedy tokens equal decoding.py's. Then the same model with a LoRA adapter, through peft's forward and
   through train_min's sampler (`lora.sampler`).
3. `lookahead_min`: a Python loop vs the vectorised version.
4. Two training steps of train_min.py at its defaults (CUDA) or small sizes (CPU); the second, split into
   generate / score / update with tokens per second and share of the step; `--profile FILE` adds a third
   step under torch.profiler.
5. Full fine-tuning against LoRA: time per step and peak memory (CPU: a 2-layer model of Qwen2.5-0.5B's
   width; CUDA: Qwen2.5-0.5B both ways and Qwen3-4B with LoRA at the paper's batch and length), and an
   estimate from parameter counts of what Qwen2.5-0.5B, Qwen3-4B and Qwen3-8B need either way.
6. Score + update of one batch whose completions have the real model's lengths (its greedy lengths in
   docs/real_runs, 512-token cap): the trainer's micro-batches (rows of like length, without the padding
   they all share) against the baseline (rows in order, every micro-batch as wide as the batch), the same
   weights and batch, side by side (CUDA: Qwen2.5-0.5B, 32 rows, micro-batches of 8; CPU: the 2-layer model,
   8 rows of lengths scaled to a 128-token cap, micro-batches of 2; `--padding-model` for other weights).

Peak memory is torch.cuda.max_memory_allocated on CUDA; on CPU each variant runs in its own process
and reports its peak resident memory above what it held when the measured block began (the process's
high-water mark reset then, so that an earlier peak, building the model say, does not count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import egrsd  # noqa: E402


def sizes(device: str) -> dict:
    if device == "cuda":  # the sizes: Qwen2.5-0.5B, 16 × 1024 tokens scored, 64 + 256 tokens rolled out
        return dict(layers=24, score_batch=16, score_length=1024, chunk_size=1024, score_repeats=3, rollout_layers=24, prompt=64,
                    new_tokens=256, batches=(32, 128), repeats=3, lora_rank=64, project_engine="graph",
                    engines=("eager", "graph", "graph-compiled", "hf-dynamic", "hf-static"), step_model="random-0.5b", step_batch=32, step_flags=[],
                    padding=dict(model="random-0.5b", batch=32, micro=8, cap=512, dtype="bfloat16", repeats=3),  # the real runs' step
                    finetune=[("qwen2.5-0.5b full", "random-0.5b", []), ("qwen2.5-0.5b lora", "random-0.5b", LORA),
                              ("qwen3-4b lora", "random-qwen3-4b", LORA)])  # the paper's batch and length
    # CPU: the real vocabulary and width with 2 layers for scoring (4 chunks instead of 16), and the tiny
    # model for rollouts and the training step
    # and a 2-layer model of that width and vocabulary for full fine-tuning against LoRA
    small = ["--batch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "32", "--dtype", "float32"]
    return dict(layers=2, score_batch=4, score_length=256, chunk_size=256, score_repeats=1, rollout_layers=0, prompt=64,
                new_tokens=64, batches=(32, 128), repeats=5, lora_rank=8, project_engine="eager",
                engines=("eager", "hf-dynamic", "hf-static"), step_model="tiny", step_batch=8, step_flags=["--max-new-tokens", "64"],
                padding=dict(model="2-layer", batch=8, micro=2, cap=128, dtype="float32", repeats=2),
                finetune=[("2-layer full", "2-layer", small), ("2-layer lora", "2-layer", small + LORA)])


LORA = ["--lora-r", "64", "--lora-alpha", "128"]  # the paper's LoRA: r 64, α 128, dropout 0, all seven projections


def qwen05b(layers: int, device: str, dtype: torch.dtype):
    """Qwen2.5-0.5B's architecture with random weights (fewer layers on CPU: same vocabulary and width)."""
    from trainer.offline_models import build_tiny_tokenizer, qwen25_05b_config
    from transformers import AutoModelForCausalLM

    config = qwen25_05b_config(build_tiny_tokenizer())
    config.num_hidden_layers, config.layer_types = layers, (config.layer_types or [])[:layers] or None
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    fork and exec, so a process spawned by a parent holding 4 GiB reports a peak of at least 4 GiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """Lower this process's high-water mark (VmHWM) to what it holds now (Linux: 5 to /proc/self/clear_refs), so
    that peak_rss_bytes is then the peak reached from here on, not an earlier one (building the model, say)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def best_of(repeats: int, run, device: str):
    """(the shortest time of `repeats` calls of run(), what the last call returned)."""
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = run()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


@contextlib.contextmanager
def measured(device: str):
    """Time and peak memory of the block, above what was held when it began: {"seconds", "peak_gib"}. The peak
    is the block's own: the high-water mark is reset when it begins."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    before = torch.cuda.memory_allocated() if device == "cuda" else rss_bytes()
    result, start = {}, time.perf_counter()
    yield result
    sync(device)
    result["seconds"] = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    result["peak_gib"] = (peak - before) / 2**30


# ----------------------------------------------------------------------------------------------------
# 1. Scoring


def scoring_step(variant: str, device: str, layers: int, batch: int, length: int, chunk_size: int) -> dict:
    """One student scoring step; returns time, peak memory and a sample of the outputs."""
    from trainer.offline_models import enable_activation_checkpointing

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = qwen05b(layers, device, dtype)
    enable_activation_checkpointing(model)
    model.train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length + 1), generator=generator).to(device)
    advantages = torch.randn(batch, 1, generator=generator).to(device).expand(batch, length)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    weight = model.get_output_embeddings().weight
    with measured(device) as result:
        hidden = model.base_model(input_ids=ids[:, :-1], use_cache=False).last_hidden_state
        hidden.retain_grad()
        if variant == "plain":
            logits = (hidden @ weight.T).float()  # (B, T, V) float32: the tensor the project never builds
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        else:
            logp = egrsd.linear_token_logprobs(hidden, weight, ids[:, 1:], chunk_size=chunk_size)
        egrsd.policy_loss(logp, advantages, mask).backward()
    return {**result, "logp": logp.detach().float().cpu()[:, :256],
            "grad_hidden": hidden.grad.float().cpu()[:, :256], "grad_weight": weight.grad.float().cpu()[:2048]}


def entropy_pass(variant: str, device: str, layers: int, batch: int, length: int, chunk_size: int) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = qwen05b(layers, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(2)).to(device)
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        with measured(device) as result:
            if variant == "plain":
                logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
                entropy = -(logp.exp() * logp).sum(-1)
            else:
                entropy = egrsd.linear_token_entropy(hidden, weight, chunk_size=chunk_size)
    return {**result, "entropy": entropy.float().cpu()}


def isolated(function, *args) -> dict:
    """On CPU, run in a fresh process so that its peak resident memory is its own."""
    if args[1] == "cuda":
        result = function(*args)
        torch.cuda.empty_cache()
        return result
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_reraised, (function, *args))


def _reraised(function, *args):
    """function(*args), its error as a RuntimeError: some library errors cannot be pickled back to the
    parent process, which would then wait for ever."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"{type(error).__name__}: {error}") from None


def side_by_side(function, args: tuple, device: str, repeats: int, variants=("plain", "chunked")) -> dict:
    """{variant: function(variant, device, *args)}, each variant in the same state as the other. CPU: one run each,
    each in a process of its own (its peak resident memory is its own). CUDA: all in this process, so each variant
    first gets one untimed call (the first call in a process pays once for all: the cuBLAS handles and workspace,
    the kernels loaded on first use, the allocator's growth; its time is kept as `warmup_s`), then `repeats` timed
    calls each, alternating which goes first (ABBA...): the shortest time, the largest peak, every time
    (`seconds_each`), and the last call's outputs."""
    if device != "cuda":
        return {v: isolated(function, v, device, *args) for v in variants}
    warmup = {v: isolated(function, v, device, *args)["seconds"] for v in variants}
    out = {}
    for repeat in range(repeats):
        for v in variants if repeat % 2 == 0 else variants[::-1]:
            result, seen = isolated(function, v, device, *args), out.get(v, {"seconds_each": [], "peak_gib": -math.inf})
            out[v] = result | {"seconds_each": seen["seconds_each"] + [result["seconds"]], "warmup_s": warmup[v],
                               "peak_gib": max(seen["peak_gib"], result["peak_gib"])}
            out[v]["seconds"] = min(out[v]["seconds_each"])
    return out


def bench_scoring(device: str, s: dict) -> dict:
    """Part 1: each variant's time and peak memory (`side_by_side`: on CUDA warmed up, best of `score_repeats`)."""
    args = (s["layers"], s["score_batch"], s["score_length"], s["chunk_size"])
    step = side_by_side(scoring_step, args, device, s.get("score_repeats", 1))
    entropy = side_by_side(entropy_pass, args, device, s.get("score_repeats", 1))
    (plain, ours), (plain_h, ours_h) = (step["plain"], step["chunked"]), (entropy["plain"], entropy["chunked"])
    err = lambda key, a, b: (a[key] - b[key]).abs().max().item()  # noqa: E731
    timing = lambda r: {k: r[k] for k in ("seconds", "peak_gib", "seconds_each", "warmup_s") if k in r}  # noqa: E731
    return {
        "tokens": s["score_batch"] * s["score_length"], "layers": s["layers"],
        "plain_step": timing(plain), "chunked_step": timing(ours),
        "max_err_logp": err("logp", plain, ours), "max_err_grad_hidden": err("grad_hidden", plain, ours),
        "max_err_grad_weight": err("grad_weight", plain, ours),
        "plain_entropy": timing(plain_h), "chunked_entropy": timing(ours_h),
        "max_err_entropy": err("entropy", plain_h, ours_h),
    }


# ----------------------------------------------------------------------------------------------------
# 2. Rollouts


def bench_rollouts(device: str, s: dict, save=lambda partial: None) -> dict:
    """New tokens per second of each rollout engine of train_min.py (`s["engines"]`) on the same prompts,
    sampling settings and model: decoding.py without / with CUDA graphs (ENGINE-compiled: with
    --compile-decode), HF generate with a dynamic / static cache (compiled on CUDA). Best of `repeats` after a
    warm-up, which pays for the compilations (its time is kept as `warmup_s`); decoding.py captures its graph in
    every call, as in training, so each timed graph run includes its capture. `ms_per_token`: the best call's
    time over its new tokens (one decode step of the whole batch, the prefill and capture included). `save`
    gets the results so far after each engine (a run cut short keeps them)."""
    import train_min
    from trainer.offline_models import build_tiny_model, build_tiny_tokenizer
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer()
    if s["rollout_layers"]:
        model = qwen05b(s["rollout_layers"], device, torch.bfloat16).eval()
    else:
        model = build_tiny_model(tokenizer).eval()
    # an EOS id the random model can never sample: every row decodes the full length with every engine
    model.generation_config = GenerationConfig(eos_token_id=[10**9], pad_token_id=tokenizer.pad_token_id)
    ours, engines = s["project_engine"], s["engines"]
    configs = {e: train_min.Config(device=device, max_new_tokens=s["new_tokens"], rollout=e.removesuffix("-compiled"),
                                   compile_decode=e.endswith("-compiled")) for e in engines}
    out = {"engines": list(engines), "project_engine": ours, "repeats": s["repeats"]}
    for batch in s["batches"]:
        prompts = torch.randint(3, len(tokenizer), (batch, s["prompt"]), generator=torch.Generator().manual_seed(batch)).to(device)
        attention = torch.ones_like(prompts)
        run = lambda engine, greedy=False: train_min.generate(  # noqa: E731
            model, tokenizer, prompts, attention, configs[engine], greedy=greedy)[0]
        greedy = {}
        for engine in engines:
            try:  # an engine that fails (a compile error, say) is recorded, and the others still run
                start = time.perf_counter()
                run(engine)  # warm-up (and HF's compilation)
                sync(device)
                out[f"{engine}_batch{batch}_warmup_s"] = time.perf_counter() - start
                seconds, completion = best_of(s["repeats"], lambda: run(engine), device)
                assert completion.shape[1] == s["new_tokens"], f"{engine} stopped after {completion.shape[1]} of {s['new_tokens']} tokens"
                out[f"{engine}_batch{batch}_tokens_per_s"] = batch * s["new_tokens"] / seconds
                out[f"{engine}_batch{batch}_ms_per_token"] = 1000 * seconds / s["new_tokens"]
                if batch == s["batches"][0]:  # the greedy tokens of each engine, row by row, against decoding.py eager
                    greedy[engine] = run(engine, greedy=True)
                    out["greedy_rows_equal_to_eager"] = {e: (g == greedy["eager"]).all(-1).float().mean().item() for e, g in greedy.items()}
            except Exception as error:  # noqa: BLE001
                out[f"{engine}_batch{batch}_error"] = f"{type(error).__name__}: {error}"[:2000]
            save(out)
        for baseline in ("hf-dynamic", "hf-static"):
            if f"{baseline}_batch{batch}_tokens_per_s" in out and f"{ours}_batch{batch}_tokens_per_s" in out:
                out[f"speedup_batch{batch}" + ("" if baseline == "hf-dynamic" else "_vs_static")] = (
                    out[f"{ours}_batch{batch}_tokens_per_s"] / out[f"{baseline}_batch{batch}_tokens_per_s"])
        if f"{ours}-compiled_batch{batch}_tokens_per_s" in out and f"{ours}_batch{batch}_tokens_per_s" in out:
            out[f"compiled_speedup_batch{batch}"] = (out[f"{ours}-compiled_batch{batch}_tokens_per_s"]
                                                     / out[f"{ours}_batch{batch}_tokens_per_s"])
        save(out)
    out |= lora_rollouts(model, tokenizer, s, configs[ours], ours)
    save(out)
    return out


def lora_rollouts(model, tokenizer, s: dict, cfg, engine: str) -> dict:
    """The project's engine at the first batch size on the same model with a LoRA adapter (rank
    `lora_rank`, B random so that it acts): through peft's forward, and through train_min's sampler
    (`lora.sampler`); new tokens per second, and each as a share of the plain model's rate."""
    import copy

    import train_min
    from trainer import lora
    from trainer.config import Config

    batch = s["batches"][0]
    out = {"lora_rank": s["lora_rank"], "lora_batch": batch}
    try:
        adapted = lora.attach(copy.deepcopy(model), Config(lora_r=s["lora_rank"], lora_alpha=2 * s["lora_rank"]))
    except Exception as error:  # noqa: BLE001 (peft missing, say: recorded)
        return out | {"lora_error": f"{type(error).__name__}: {error}"[:2000]}
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    prompts = torch.randint(3, len(tokenizer), (batch, s["prompt"]), generator=torch.Generator().manual_seed(batch))
    prompts = prompts.to(next(model.parameters()).device)
    for label, variant in (("lora_peft", lambda: adapted), ("lora_sampler", lambda: lora.sampler(adapted))):
        try:  # each on its own: a failure of one (a graph capture, say) is recorded and the other still runs
            sampler = variant()
            run = lambda: train_min.generate(sampler, tokenizer, prompts, torch.ones_like(prompts), cfg)[0]  # noqa: E731
            run()  # warm-up
            seconds, _ = best_of(s["repeats"], run, cfg.device)
            out[f"{label}_batch{batch}_tokens_per_s"] = batch * s["new_tokens"] / seconds
        except Exception as error:  # noqa: BLE001
            out["lora_error"] = (out.get("lora_error", "") + f"{label}: {type(error).__name__}: {error}; ")[:2000]
    return out


# ----------------------------------------------------------------------------------------------------
# 5. Full fine-tuning against LoRA


def finetune_step(label: str, device: str, model: str, flags: list) -> dict:
    """Two steps of train_min.py; the second one's time, and the peak memory of the whole run (GPU: the
    step's; CPU: the process's resident memory above what it held before, its high-water mark reset then)."""
    import train_min

    if device != "cuda":
        reset_peak_rss()
    before = rss_bytes()
    with tempfile.TemporaryDirectory() as run_dir:
        if model == "2-layer":
            model = saved_two_layer_model(os.path.join(run_dir, "model"))
        train_min.main(["--model", model, "--device", device, "--steps", "2", "--eval-size", "0", "--save-every", "0",
                        "--output-dir", os.path.join(run_dir, "run"), *flags])
        last = [json.loads(line) for line in open(os.path.join(run_dir, "run", "metrics.jsonl"))][-1]
    peak = last["peak_gpu_mem_gb"] if device == "cuda" else (peak_rss_bytes() - before) / 2**30
    return {"flags": flags, "step_s": last["step_s"], "peak_gib": peak, "length_mean": last["length_mean"]}


def memory_estimates(lora_r: int = 64) -> dict:
    """Weights, gradients and optimizer state of full fine-tuning and of LoRA at the paper's sizes, from
    the parameter counts (models built on the meta device, no memory): an ESTIMATE, without activations,
    KV cache or logits chunks. Full: float32 master weights, gradients and two AdamW moments, and the bf16
    teacher and sampler copies (20 bytes a parameter). LoRA: one bf16 base (2 bytes a parameter) and a
    float32 adapter with its gradient and moments and the sampler's bf16 copy (18 bytes an adapter parameter)."""
    from trainer import lora
    from trainer.config import Config
    from trainer.offline_models import build_tiny_tokenizer, meta_model, qwen25_05b_config, qwen3_config

    tokenizer, out = build_tiny_tokenizer(), {}
    for name, config in (("Qwen2.5-0.5B", qwen25_05b_config(tokenizer)), ("Qwen3-4B", qwen3_config("4b", tokenizer)),
                         ("Qwen3-8B", qwen3_config("8b", tokenizer))):
        model = meta_model(config)
        params = sum(p.numel() for p in model.parameters())
        trainable = lora.adapter_parameters(model, Config(lora_r=lora_r, lora_alpha=2 * lora_r))  # train_min's targets
        out[name] = {"parameters": params, "adapter_parameters": trainable, "full_gib": 20 * params / 2**30,
                     "lora_gib": (2 * params + 18 * trainable) / 2**30}
    return out



def bench_finetune(device: str, s: dict, save=lambda partial: None) -> dict:
    out = {"estimate": memory_estimates()}
    save(out)
    for label, model, flags in s["finetune"]:
        try:
            out[label] = isolated(finetune_step, label, device, model, flags)
        except Exception as error:  # noqa: BLE001 (out of memory, say: recorded, the others still run)
            out[label] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        save(out)
    return out


def saved_two_layer_model(folder: str) -> str:
    """Qwen2.5-0.5B's vocabulary and width with 2 layers, random weights, saved as a model folder."""
    from trainer.offline_models import build_tiny_tokenizer

    qwen05b(2, "cpu", torch.float32).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


REAL_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "real_runs", "grpo")  # its lengths at step 0


def bench_padding(device: str, s: dict) -> dict:
    """Score + update of one batch (the teacher's scoring pass and the AdamW step), the trainer's micro-batches
    against the baseline (the micro-batching train_min used until 2026-12-01, put back for the call), on one model
    and batch: first an untimed call of each that takes no step (SGD at lr 0), so both see the same weights
    and their gradient norms must agree up to rounding; then timed calls, alternating which goes first
    (ABBA...), best of `repeats` each; and the positions the student's forwards ran over."""
    import train_min
    from trainer import run_io

    p = s["padding"]
    eval_lengths = run_io.initial_eval_row(REAL_RUN)["eval_lengths"]
    pool = [min(p["cap"], max(1, round(n * p["cap"] / 512))) for n in eval_lengths]
    lengths = torch.tensor(random.Random(0).sample(pool, p["batch"]))
    baseline = {"micro_batches": lambda mask, size: list(torch.arange(len(mask), device=mask.device).split(size)),
                "without_shared_padding": lambda *tensors: tensors}
    variants = ("baseline", "like_length")
    out = {"model": p["model"], "batch": p["batch"], "micro_batch": p["micro"], "cap": p["cap"], "repeats": p["repeats"],
           "length_mean": lengths.float().mean().item(), "length_max": int(lengths.max())}
    with tempfile.TemporaryDirectory() as folder:
        model = saved_two_layer_model(os.path.join(folder, "model")) if p["model"] == "2-layer" else p["model"]
        cfg = train_min.parse_args(["--model", model, "--device", device, "--dtype", p["dtype"], "--batch-size", str(p["batch"]),
                                    "--micro-batch-size", str(p["micro"]), "--max-new-tokens", str(p["cap"]),
                                    "--method", "cl-egrsd", "--output-dir", os.path.join(folder, "run")])
        run = train_min.setup(cfg)
        run.metrics.close()
        problems = run.train_problems[: p["batch"]]
        prompts = [train_min.encode_prompts(run.tokenizer, [who(q) for q in problems], device)
                   for who in (train_min.student_messages, train_min.teacher_messages)]
        mask = (torch.arange(int(lengths.max())) < lengths[:, None]).to(device)  # as wide as the longest row, as generate returns
        completion = torch.randint(0, run.tokenizer.vocab_size, mask.shape, generator=torch.Generator().manual_seed(0))
        completion = completion.to(device).masked_fill(~mask, run.tokenizer.pad_token_id)
        batch = train_min.Rollouts(*prompts[0], *prompts[1], completion, mask, torch.ones(len(mask), dtype=torch.bool, device=device))
        advantages = torch.randn(len(mask), generator=torch.Generator().manual_seed(1)).to(device)

        def score_and_update(variant: str, optimizer) -> float:
            saved = {name: getattr(train_min, name) for name in baseline}
            if variant == "baseline":
                vars(train_min).update(baseline)
            try:
                scores = train_min.score(None, run.teacher, batch, cfg)
                return train_min.update(run.student, run.teacher, optimizer, batch, scores, advantages, cfg)[1]
            finally:
                vars(train_min).update(saved)

        still = torch.optim.SGD(train_min.trainable(run.student), lr=0.0)
        grad_norms = {v: score_and_update(v, still) for v in variants}
        seconds = dict.fromkeys(variants, math.inf)
        for repeat in range(p["repeats"]):
            for v in variants if repeat % 2 == 0 else variants[::-1]:
                sync(device)
                start = time.perf_counter()
                score_and_update(v, run.optimizer)
                sync(device)
                seconds[v] = min(seconds[v], time.perf_counter() - start)
        micro = {"baseline": baseline["micro_batches"](mask, p["micro"]), "like_length": train_min.micro_batches(mask, p["micro"])}
        for v in variants:
            trim = baseline["without_shared_padding"] if v == "baseline" else train_min.without_shared_padding
            kept = [trim(batch.student_ids[rows], batch.student_mask[rows], completion[rows], mask[rows]) for rows in micro[v]]
            out[v] = {"seconds": seconds[v], "grad_norm": grad_norms[v], "forward_tokens": sum(k[0].numel() + k[2].numel() for k in kept)}
    out["speedup"] = out["baseline"]["seconds"] / out["like_length"]["seconds"]
    out["valid_tokens"] = int(batch.student_mask.sum() + mask.sum())  # what a forward without any padding would run over
    return out


# ----------------------------------------------------------------------------------------------------
# 3. lookahead_min, 4. a training step


def loop_lookahead_min(entropy, mask, window):
    h, m = entropy.tolist(), mask.tolist()
    out = [[0.0] * len(row) for row in h]
    for b, row in enumerate(h):
        for t in range(len(row)):
            if m[b][t]:
                out[b][t] = min(row[j] for j in range(t, min(t + window + 1, len(row))) if m[b][j])
    return torch.tensor(out)


def bench_lookahead(batch: int = 32, length: int = 1024, window: int = 3) -> dict:
    entropy, mask = torch.rand(batch, length) * 5, torch.rand(batch, length) > 0.1
    (loop_s, first), (vectorised_s, second) = (best_of(3, lambda f=f: f(entropy, mask, window), "cpu")
                                               for f in (loop_lookahead_min, egrsd.lookahead_min))
    return {"loop_s": loop_s, "vectorised_s": vectorised_s, "speedup": loop_s / vectorised_s,
            "max_err": (first - second).abs().max().item(), "shape": [batch, length], "window": window}


def bench_step(device: str, s: dict, profile: str = "") -> dict:
    """Two steps of train_min.py at its defaults (on CUDA: batch 32, up to 1,024 new tokens) but a constant
    learning-rate schedule (the same timings; a third, profiled step may then extend the run); the second is
    reported: each phase's seconds, completion tokens per second and share of the step, peak memory,
    whether activations were recomputed (--gradient-checkpointing auto). Then the same two steps with
    gradient checkpointing on, side by side (`checkpointing_on`). With `profile`, a third step of the
    default run runs under torch.profiler and its busiest operators go to that text file."""
    import train_min

    constant = ["--lr-schedule", "constant"]  # (the profiled third step extends the run: a decaying schedule refuses)

    def two_steps(extra: list, profile: str = "") -> dict:
        with tempfile.TemporaryDirectory() as run_dir:
            flags = ["--model", s["step_model"], "--device", device, "--eval-size", "0", "--save-every", "0", *constant,
                     "--batch-size", str(s["step_batch"]), "--output-dir", run_dir, *s["step_flags"], *extra]
            train_min.main(flags + ["--steps", "2"])
            rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
            if profile:
                try:  # (a profile that fails, or cannot be written, leaves the two steps' numbers)
                    _profile_one_more_step(flags, run_dir, device, profile)
                except Exception as error:  # noqa: BLE001
                    profile_error.append(f"{type(error).__name__}: {error}"[:2000])
        return rows[-1]  # the second step: compilation and warm-up are behind it

    profile_error = []
    last = two_steps([], profile)
    tokens = last["length_mean"] * s["step_batch"]
    keys = ("generate_s", "score_s", "update_s", "step_s", "length_mean", "length_max", "peak_gpu_mem_gb", "gradient_checkpointing")
    out = {"model": s["step_model"], "batch": s["step_batch"], "flags": constant + s["step_flags"], **{k: last[k] for k in keys},
           "completion_tokens": tokens, **{f"{phase}_tokens_per_s": tokens / last[f"{phase}_s"] for phase in ("generate", "score", "update")},
           "score_plus_update_share": (last["score_s"] + last["update_s"]) / last["step_s"]}
    out |= flop_floor(s["step_model"], tokens, last["score_s"] + last["update_s"], device, last["gradient_checkpointing"])
    if profile_error:
        out["profile_error"] = profile_error[0]
    try:  # (out of memory, say: the default step's numbers are kept)
        on = two_steps(["--gradient-checkpointing", "on"])
        out["checkpointing_on"] = {k: on[k] for k in ("score_s", "update_s", "step_s", "length_mean", "peak_gpu_mem_gb")}
    except Exception as error:  # noqa: BLE001
        out["checkpointing_on_error"] = f"{type(error).__name__}: {error}"[:2000]
    return out


# Dense bf16 tensor-core peak of a card (its data sheet, without sparsity), for the FLOP floor, by the card's
# whole name as torch.cuda.get_device_name gives it: variants of one chip differ (the H100 PCIe and NVL and the
# H200 NVL run at lower clocks than the SXM cards), so a name not listed exactly has no known peak.
PEAK_BF16_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
                   "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
                   "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
                   "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L40S": 362e12}


def flop_floor(model: str, completion_tokens: float, seconds: float, device: str, recomputed: bool) -> dict:
    """The least time score + update could take at the card's bf16 peak: 2 FLOPs a parameter a token for
    each forward pass over the completion tokens, four passes (the teacher's forward, the update's forward,
    its backward counted as two), five where gradient checkpointing recomputed the forward; prompts not
    counted, so this floor is a little low. NaN where the card's peak is not known (and on CPU; null in the JSON)."""
    from trainer.offline_models import meta_model, model_config

    params = sum(p.numel() for p in meta_model(model_config(model)).parameters())
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    peak = PEAK_BF16_FLOPS.get(" ".join(name.split()), math.nan)  # the whole name (spaces as one), not a part of it
    flops = 2 * params * completion_tokens * (5 if recomputed else 4)
    floor = flops / peak
    return {"score_update_flops": flops, "score_update_floor_s": floor,
            "score_update_over_floor": seconds / floor}


def _profile_one_more_step(flags: list, run_dir: str, device: str, path: str) -> None:
    """Resume the two-step run for a third step under torch.profiler; write the operators by device time."""
    import train_min
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        train_min.main(["--resume", run_dir, "--steps", "3", "--save-every", "0"])
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to measure (default: cpu)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file (at the start, then after each part; "
                        "its folder is made at the start)")
    parser.add_argument("--only", default="scoring,lookahead,step,rollouts,finetune,padding", help="comma-separated parts to run, in this order")
    parser.add_argument("--profile", default="", help="also profile a third training step (with --only step); write its "
                        "operator table here (its folder is made at the start)")
    parser.add_argument("--padding-model", default="", help="part 6 on this model (a folder or hub name) instead of random weights")
    args = parser.parse_args()
    s, parts = sizes(args.device), args.only.split(",")
    s["padding"]["model"] = args.padding_model or s["padding"]["model"]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: expected a CUDA device, but this torch ({torch.__version__}) sees none")

    unwritten = []  # a write of --json that failed after the start (a full disk, say): the numbers go to stdout at the end

    def save(part: str, value) -> None:  # after every part (and engine), so that a run cut short keeps them
        results[part] = value
        if args.json:
            try:
                write_json(args.json, results)
            except (OSError, TypeError, ValueError) as error:  # (a full disk, say, or a value JSON cannot hold)
                print(f"--json: could not write {args.json} ({error}); the numbers are printed at the end", file=sys.stderr)
                unwritten.append(error)

    runners = {"scoring": lambda: bench_scoring(args.device, s),
               "rollouts": lambda: bench_rollouts(args.device, s, lambda partial: save("rollouts", partial)),
               "lookahead": bench_lookahead, "step": lambda: bench_step(args.device, s, args.profile),
               "finetune": lambda: bench_finetune(args.device, s, lambda partial: save("finetune", partial)),
               "padding": lambda: bench_padding(args.device, s)}
    if unknown := [p for p in parts if p not in runners]:
        parser.error(f"--only: expected parts among {', '.join(runners)}, got {', '.join(unknown)}")
    if args.profile and "step" not in parts:
        parser.error(f"--profile: expected --only to include step (it profiles a third training step), got --only {args.only}")
    for flag, path in (("--json", args.json), ("--profile", args.profile)):  # before any part runs, not after one has
        check_output_file(parser, flag, path)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    results = {"device": machine, "torch": torch.__version__, "transformers": transformers.__version__}
    if args.json:  # now: a file that cannot be written stops the bench before any part runs
        try:
            write_json(args.json, results)
        except OSError as error:
            parser.error(f"--json: expected a file that can be written, got {args.json!r} ({error})")
    failed = []
    for number, part in enumerate(parts, start=1):
        print(f"[{number}/{len(parts)} {part} ...]", flush=True)  # the parts take minutes: say which one runs
        start = time.perf_counter()
        key = part
        try:
            value = runners[part]()
        except (Exception, SystemExit) as error:  # noqa: BLE001 (the other parts still run; the error is kept)
            key, value = f"{part}_error", f"{type(error).__name__}: {error}"[:2000]
            failed.append(part)
        save(key, value)  # (outside the try: a write that fails is reported by save, not taken for the part's error)
        print(f"[{part}: {time.perf_counter() - start:.0f} s]", flush=True)
    problems = ["failed: " + ", ".join(f"{part} ({results[part + '_error']})" for part in failed)] if failed else []
    if unwritten:  # (nothing measured is lost: the JSON that could not be written goes to stdout)
        print(json.dumps(finite_or_null(results), indent=1, allow_nan=False, default=repr))
    print(report({k: v for k, v in results.items() if k not in failed}))
    if unwritten:
        problems.append(f"--json: {args.json} could not be written ({unwritten[-1]}); its numbers are printed above")
    if problems:
        sys.exit("\n".join(problems))


def check_output_file(parser, flag: str, path: str) -> None:
    """Make the folder of `path` (a file to be written later, if given) and stop with parser.error, naming `flag`,
    where it cannot be made or the file cannot be written: before any measurement, not after one has run."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        parser.error(f"{flag}: expected a file in a folder that exists or can be made, got {path!r} ({error})")
    if os.path.isdir(path) or not os.access(path if os.path.exists(path) else folder, os.W_OK):
        parser.error(f"{flag}: expected a file that can be written, got {path!r}")


def finite_or_null(value):
    """value with every float that is not finite (NaN: not measured or not known) as None: JSON has no NaN, and
    strict parsers (JavaScript, Go, serde_json) refuse the NaN that json.dump writes by default."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_json(path: str, results: dict) -> None:
    """results as standard JSON (null for NaN), replacing `path` at once (a run cut short leaves the last whole file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(finite_or_null(results), f, indent=1, allow_nan=False)
    os.replace(path + ".tmp", path)


def _cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return "CPU"


def report(r: dict) -> str:
    lines = [f"device: {r['device']}, torch {r['torch']}, transformers {r.get('transformers', '?')}"]
    if "scoring" in r:
        sc = r["scoring"]
        timed = (f"best of {len(sc['plain_step']['seconds_each'])} after a warm-up" if "seconds_each" in sc["plain_step"]
                 else "one run each")
        lines += [f"\n1. student scoring step, {sc['tokens']} tokens ({sc['layers']} layers)    peak GiB    seconds ({timed})",
                  f"   plain (full float32 logits)          {sc['plain_step']['peak_gib']:9.2f}  {sc['plain_step']['seconds']:9.2f}",
                  f"   chunked (linear_token_logprobs)      {sc['chunked_step']['peak_gib']:9.2f}  {sc['chunked_step']['seconds']:9.2f}",
                  f"   memory ratio {sc['chunked_step']['peak_gib'] / max(sc['plain_step']['peak_gib'], 1e-9):.3f}; max |Δ| log-prob "
                  f"{sc['max_err_logp']:.2e}, grad hidden {sc['max_err_grad_hidden']:.2e}, grad W {sc['max_err_grad_weight']:.2e}",
                  f"   teacher entropy, plain               {sc['plain_entropy']['peak_gib']:9.2f}  {sc['plain_entropy']['seconds']:9.2f}",
                  f"   teacher entropy, chunked             {sc['chunked_entropy']['peak_gib']:9.2f}  {sc['chunked_entropy']['seconds']:9.2f}",
                  f"   max |Δ| entropy {sc['max_err_entropy']:.2e}"]
    if "rollouts" in r:
        ro = r["rollouts"]
        lines.append("\n2. rollouts, new tokens/s   " + "".join(f"{e:>15}" for e in ro["engines"])
                     + f"   {ro['project_engine']} / hf-dynamic, / hf-static")
        for batch in sorted({int(m.group(1)) for k in ro if (m := re.search(r"_batch(\d+)_", k))}):
            rate = lambda e, key="tokens_per_s": ro.get(f"{e}_batch{batch}_{key}", math.nan)  # noqa: E731 (nan: not measured)
            lines.append(f"   batch {batch:>4}              " + "".join(f"{rate(e):15.0f}" for e in ro["engines"])
                         + f"   {ro.get(f'speedup_batch{batch}', math.nan):.2f}×, {ro.get(f'speedup_batch{batch}_vs_static', math.nan):.2f}×")
            lines.append("     ms a decode step      " + "".join(f"{rate(e, 'ms_per_token'):15.2f}" for e in ro["engines"])
                         + (f"   compiled / not: {ro[f'compiled_speedup_batch{batch}']:.2f}×" if f"compiled_speedup_batch{batch}" in ro else ""))
        same = ro.get("greedy_rows_equal_to_eager", {})
        lines.append("   greedy rows equal to eager " + "".join(f"{same.get(e, math.nan):15.2f}" for e in ro["engines"]))
        if "lora_batch" in ro:
            batch = ro["lora_batch"]
            plain = ro.get(f"{ro['project_engine']}_batch{batch}_tokens_per_s", math.nan)
            rates = [ro.get(f"{label}_batch{batch}_tokens_per_s", math.nan) for label in ("lora_peft", "lora_sampler")]
            lines.append(f"   LoRA r {ro['lora_rank']}, batch {batch}, {ro['project_engine']}: through peft {rates[0]:.0f} "
                         f"({rates[0] / plain:.2f} of the plain model's rate), through lora.sampler {rates[1]:.0f} ({rates[1] / plain:.2f})"
                         + (f"; {ro['lora_error'][:100]}" if "lora_error" in ro else ""))
    if "lookahead" in r:
        la = r["lookahead"]
        lines.append(f"\n3. lookahead_min {la['shape']} W={la['window']}: loop {la['loop_s'] * 1000:.0f} ms, vectorised "
                     f"{la['vectorised_s'] * 1000:.2f} ms ({la['speedup']:.0f}×), max |Δ| {la['max_err']:.1e}")
    if "step" in r:
        st = r["step"]
        lines.append(f"\n4. training step ({st['model']}, batch {st['batch']}, {st['completion_tokens']:.0f} completion tokens): "
                     f"peak GPU {st['peak_gpu_mem_gb']:.1f} GiB")
        for phase in ("generate", "score", "update"):
            lines.append(f"   {phase:<9} {st[f'{phase}_s']:7.2f} s {100 * st[f'{phase}_s'] / st['step_s']:4.0f}%  "
                         f"{st[f'{phase}_tokens_per_s']:9.0f} tokens/s")
        floor = st.get("score_update_floor_s")  # (NaN, or null read back from a JSON file: the peak is not known)
        floor = (f"{st['score_update_over_floor']:.1f}× its FLOP floor of {floor:.2f} s" if floor is not None and math.isfinite(floor)
                 else "no FLOP floor (the device's bf16 peak is not known)")
        lines.append(f"   step      {st['step_s']:7.2f} s; score + update = {100 * st['score_plus_update_share']:.0f}%, "
                     f"{floor}; gradient checkpointing {'on' if st.get('gradient_checkpointing') else 'off'} (auto)")
        if "profile_error" in st:
            lines.append(f"   profiled third step: {st['profile_error'][:100]}")
        if "checkpointing_on_error" in st:
            lines.append(f"   with gradient checkpointing on: {st['checkpointing_on_error'][:100]}")
        if "checkpointing_on" in st:
            on = st["checkpointing_on"]
            lines.append(f"   with gradient checkpointing on: score {on['score_s']:.2f} s, update {on['update_s']:.2f} s, "
                         f"step {on['step_s']:.2f} s, peak GPU {on['peak_gpu_mem_gb']:.1f} GiB")
    if "finetune" in r:
        ft = r["finetune"]
        lines.append("\n5. full fine-tuning against LoRA (r = 64, α = 128), two steps each: the second's time, the run's peak")
        for label, row in ft.items():
            if label != "estimate":
                lines.append(f"   {label:<22} " + (row["error"][:80] if "error" in row else
                             f"{row['step_s']:7.2f} s   peak {row['peak_gib']:6.2f} GiB"))
        lines.append("   ESTIMATE from parameter counts (weights, gradients, AdamW; no activations):")
        for name, row in ft["estimate"].items():
            lines.append(f"   {name:<13} {row['parameters'] / 1e9:5.2f}B parameters, adapter {row['adapter_parameters'] / 1e6:5.1f}M: "
                         f"full {row['full_gib']:6.1f} GiB, LoRA {row['lora_gib']:5.1f} GiB")
    if "padding" in r:
        pd = r["padding"]
        lines.append(f"\n6. score + update, {pd['batch']} rows of the real model's lengths (mean {pd['length_mean']:.0f}, max "
                     f"{pd['length_max']} of {pd['cap']}), micro-batches of {pd['micro_batch']}: seconds, student forward tokens, grad norm")
        for variant, label in (("baseline", "rows in order, full width"), ("like_length", "rows of like length, trimmed")):
            v = pd[variant]
            lines.append(f"   {label:<30} {v['seconds']:7.2f} s  {v['forward_tokens']:8d}  {v['grad_norm']:.6f}")
        lines.append(f"   speedup {pd['speedup']:.2f}×; without any padding a forward would run over {pd['valid_tokens']} tokens")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
