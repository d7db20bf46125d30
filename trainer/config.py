"""The settings of train_min.py: one dataclass, a docstring under each field (the --help text and the
documentation are the same thing), and the check of every flag before any model loads.

    cfg = parse_args()      # the command line (and, with --resume, the run's saved config.json)
    check_config(cfg)       # stops with the flag's name and what is allowed
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import math
import os
import re
import shlex
import sys
import warnings
from dataclasses import dataclass, fields

import torch

import egrsd
from trainer import run_io

METHODS = ("grpo", "opsd", "rlsd", "egrsd", "cl-egrsd")
SMOKE = ("python train_min.py --model tiny --device cpu --steps 2 --batch-size 8 --max-new-tokens 64 --eval-size 16 "
         "--output-dir runs/smoke")
SCHEDULES = ("constant", "linear", "cosine")
ROLLOUTS = ("auto", "graph", "eager", "hf-static", "hf-dynamic")
CHECKPOINTING = ("auto", "on", "off")


@dataclass
class Config:
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """a hub name or local directory (safetensors), or built in code, offline: `tiny`, or random weights of
    Qwen2.5-0.5B's / Qwen3-4B's shape (`random-0.5b`, `random-qwen3-4b`) for speed and memory runs"""
    method: str = "egrsd"
    """one of grpo, opsd, rlsd, egrsd, cl-egrsd"""
    data: str = ""
    """a JSONL file of GSM8K rows or {problem, solution, answer} rows; empty: the built-in GSM8K-level
    problems of data/ (reasoning-gym gsm_symbolic)"""
    eval_data: str = ""
    """a JSONL file of held-out problems (same formats; its first --eval-size are used); empty: the
    built-in held-out templates, or with --data the first fifth of that file (at most --eval-size)"""
    output_dir: str = "runs/egrsd"
    """where metrics.jsonl, config.json, checkpoint/ and final/ are written"""
    resume: str = ""
    """a run directory to continue from its checkpoint (its config.json is used; flags given here override)"""
    device: str = "cuda"
    """torch device"""
    dtype: str = "auto"
    """auto (bfloat16 on CUDA, float32 on CPU), bfloat16 or float32"""
    seed: int = 0
    """seed for data order and sampling"""
    steps: int = 100
    """optimizer steps (the paper: 100)"""
    batch_size: int = 32
    """rollouts per step (the paper: 32 prompts × 1 rollout); with --group-size G, --batch-size / G problems"""
    group_size: int = 1
    """G, rollouts per problem: 1 (the paper) uses the running advantage; G ≥ 2 GRPO's group-normalised one,
    (r − group mean) / (group std + 1e-4), for every method (TRL's num_generations); divides --batch-size"""
    micro_batch_size: int = 8
    """rollouts per forward/backward pass (gradient accumulation; does not change the update)"""
    max_new_tokens: int = 1024
    """completion cap L_max; a rollout without EOS by then is truncated and earns 0"""
    temperature: float = 1.1
    """rollout sampling temperature"""
    top_p: float = 0.95
    """rollout nucleus sampling"""
    top_k: int = 20
    """rollout top-k sampling (0: off)"""
    lr: float = 1e-6
    """AdamW learning rate (the paper's 5e-6 is for LoRA; full fine-tuning of 0.5B wants less)"""
    lr_schedule: str = "linear"
    """constant, linear or cosine decay to 0 at --steps, after --warmup-steps of linear warm-up; linear is
    the HF Trainer's default, which the OPSD code the paper builds on runs with"""
    warmup_steps: int = 0
    """steps of linear learning-rate warm-up from 0 (the HF Trainer's default: none)"""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper gives none; 0 is the HF Trainer's default, where torch's AdamW has 0.01)"""
    grad_clip: float = 0.1
    """gradient-norm clip (the paper: 0.1)"""
    gamma: float = 0.3
    """γ, strength of the entropy gate (egrsd, cl-egrsd)"""
    window: int = 3
    """W, the causal lookahead of cl-egrsd (egrsd is W = 0)"""
    eps: float = 0.2
    """ε, clip range of the likelihood-ratio magnitude (rlsd, egrsd, cl-egrsd)"""
    floor: float = 0.1
    """lower bound of the gate: every token keeps a nonzero weight"""
    min_denominator: float = 1.0
    """floor, in nats, of the batch-max entropy that normalises the gate"""
    denominator: str = "raw"
    """cl-egrsd normaliser: raw (Eq. 8) or filtered (Algorithm 1)"""
    gate_group: int = 0
    """rollouts that share one entropy normaliser (Eq. 5): 0, the whole batch; 4 is the paper's layout of
    4 rollouts on each of 8 GPUs, a smaller maximum and so a stronger gate"""
    score_temperature: float = 0.0
    """temperature of the scored distributions (teacher and student log-probs, entropy, the trained
    log-prob): 0 follows --temperature, as TRL's GRPO and the OPSD code divide logits by the sampling one"""
    lora_r: int = 0
    """LoRA rank (0: full fine-tuning; the paper: 64). With LoRA the teacher is the base model with the adapter
    off (one copy of the weights) and checkpoints hold the adapter and its optimizer; needs the peft extra"""
    lora_alpha: float = 128.0
    """LoRA scale α (the update is α/r · BA); the paper's LoRA is r 64, α 128, dropout 0 on all seven
    projections of every layer"""
    lora_dropout: float = 0.0
    """LoRA dropout; 0 keeps the trained log-prob that of the policy that sampled (on-policy)"""
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """comma-separated module names that get adapters: every linear layer of a Qwen2/Qwen3 block"""
    verifier: str = "builtin"
    """builtin (numbers: the last \\boxed{}, else `#### N`, else the last number; units, $, %, \\frac
    understood) or math-verify (also symbolic answers such as 2\\sqrt{2}; the optional math-verify package)"""
    beta_length: float = 0.5
    """β_L of the length-shaped reward r = 1 + β_L (1 − |y| / L_max) for a correct answer"""
    advantage_warmup: int = 10
    """steps that use A = r − 0.5 before the running mean and std take over"""
    train_size: int = 2000
    """built-in training problems (at most 2,000)"""
    eval_size: int = 200
    """held-out problems for evaluation"""
    eval_every: int = 25
    """evaluate every N steps (and before and after training); 0: only before and after"""
    eval_batch_size: int = 64
    """completions per evaluation batch"""
    eval_max_new_tokens: int = 0
    """completion cap of held-out evaluation (the paper evaluates Qwen3 in thinking mode with up to 32,768);
    0: --max-new-tokens. Each evaluation row holds one KV cache of prompt + this many tokens"""
    eval_samples: int = 4
    """K: K sampled completions per held-out problem (besides the greedy one, unless --no-eval-greedy), reported
    as avg@K (the paper's avg@4); 0: greedy only"""
    eval_greedy: bool = True
    """evaluate the greedy completion too (the tables' and curves' first measure); --no-eval-greedy: avg@K
    alone, as the paper reports, where greedy decoding is advised against (Qwen3 in thinking mode, whose greedy
    completions may repeat themselves up to the cap and hold a whole batch there); a resumed run keeps it"""
    eval_temperature: float = 1.0
    """sampling temperature of avg@K (the paper's evaluation: 1.0)"""
    eval_top_p: float = 0.95
    """nucleus of avg@K (the paper's evaluation: 0.95)"""
    eval_top_k: int = 0
    """top-k of avg@K; 0: none, as the paper states no top-k for evaluation"""
    eval_seed: int = 0
    """seed of avg@K's draws, apart from --seed: every run and evaluation draws from the same stream, and
    the training's random state is left as it was"""
    initial_eval: str = ""
    """a run directory whose step-0 evaluation this run reuses instead of evaluating again: the untrained
    model's is the same for every method and seed (same model, held-out problems and evaluation settings,
    which are checked)"""
    time_budget: float = 0.0
    """seconds this run may take from its start (0: no limit): training stops when another step and the
    final evaluation would not fit (checkpoint writes not counted: use it with --no-save-model); a resumed
    run counts it again from its restart (for a GPU lent for a fixed time)"""
    save_model: bool = True
    """write checkpoints and final/; --no-save-model keeps only metrics.jsonl and config.json (a run
    that cannot resume: for measurement runs whose multi-GB models would not be kept anyway)"""
    save_every: int = 25
    """checkpoint every N steps (and on Ctrl-C and at the end); 0: only then"""
    rollout: str = "auto"
    """auto (decoding.py: a CUDA graph per decode step on CUDA; if capture fails, a warning and no graphs),
    graph, eager (decoding.py without graphs), hf-static or hf-dynamic (HF generate with that cache)"""
    compile_decode: bool = False
    """compile the decode step's forward with torch.compile (fused norms, rotary and activations: fewer kernels a
    token, inside the CUDA graph on CUDA); the first rollout pays the compilation (tens of seconds). Greedy tokens
    are the same in float32, and may break near ties otherwise in bf16. decoding.py rollouts only"""
    chunk_size: int = 1024
    """rows of logits alive at once when scoring (memory O(chunk × vocab))"""
    gradient_checkpointing: str = "auto"
    """recompute activations in the backward to save memory: on, off, or auto (off until an update's forward or
    backward raises torch.OutOfMemoryError; then on for the rest of the run, resumes included, and that update
    taken again: nothing of it was applied. Out of memory elsewhere still stops the run)"""
    max_bad_steps: int = 3
    """stop after this many skipped steps in a row (non-finite, or weights that blew up: each is skipped, not applied)"""
    regime_low: float = 0.2
    """τ_low: a token with normalised teacher entropy ≤ τ_low is a "lock" (metrics and token view)"""
    regime_high: float = 0.5
    """τ_high: Ĥ ≥ τ_high is a "fork", or a "pivot" if its lookahead Ĥ_CL ≤ τ_low"""
    dump_tokens: int = 0
    """every N steps write tokens/step_N.html: a few rollouts, each token coloured by its weight; 0: never"""


def field_docs(cls) -> dict[str, str]:
    """The string under each dataclass field: the --help text and the documentation are one thing."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def read_config(path: str) -> dict:
    """A run's config.json, checked: a JSON object whose every key is a flag of Config holding a value of
    that flag's type; else a stop that names the file, the key and what was expected."""
    saved = run_io.read_json_file(path, "the JSON object of a run's settings that train_min.py writes")
    if isinstance(saved.get("gradient_checkpointing"), bool):  # a run saved when the flag was on/off only
        saved["gradient_checkpointing"] = "on" if saved["gradient_checkpointing"] else "off"
    kinds = {f.name: f.type for f in fields(Config)}
    types = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    for key, value in saved.items():
        if key not in kinds:
            sys.exit(f"{path}: unknown key {key!r} (expected only flags of train_min.py, as --help lists them)")
        if not isinstance(value, types[kinds[key]]) or (isinstance(value, bool) and kinds[key] != "bool"):
            sys.exit(f"{path}: key {key!r}: expected a {kinds[key]}, got {value!r}")
    return saved


def compare_dirs(argv: list[str]) -> list[str] | None:
    """The run directories of `--compare RUN_DIR ...` (or `--compare=RUN_DIR ...`), wherever --compare stands;
    any other flag is refused. None where the command line does not ask to compare."""
    if not any(a == "--compare" or a.startswith("--compare=") for a in argv):
        return None
    argv = [a.removeprefix("--compare=") for a in argv if a != "--compare"]
    flags = [a for a in argv if a.startswith("--")]
    if flags:
        sys.exit(f"--compare: expected run directories only, got {flags[0]} (--compare prints a table; it trains nothing)")
    return argv


def parse_args(argv=None, description: str = __doc__) -> Config:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    docs = field_docs(Config)
    for f in fields(Config):
        types = {"int": int, "float": float, "str": str}
        kind = dict(action=argparse.BooleanOptionalAction) if f.type == "bool" else dict(type=types[f.type], metavar=f.type.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), help=f"{docs[f.name]} (default: {f.default})".replace("%", "%%"), **kind)
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                        help="print the accuracy-length table of these runs and exit, no model loaded: seeds of one "
                             "setting pooled, differences paired by problem, 95%% intervals clustered by template")
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    if "compare" in given:  # train_min.main answers --compare itself; an abbreviation of it gets here
        sys.exit("--compare: write it out (python train_min.py --compare RUN_DIR ...); it prints a table and trains nothing")
    saved = {}
    if given.get("resume") == "":  # (an unset shell variable: not a new run into the default folder)
        sys.exit("--resume: expected a run directory, got ''")
    if given.get("resume"):
        path, folder = os.path.join(given["resume"], "config.json"), os.path.normpath(given["resume"])
        if (any(os.path.isfile(os.path.join(folder, f)) for f in MODEL_FILES)
                and os.path.isfile(os.path.join(os.path.dirname(folder), "config.json"))):
            sys.exit(f"--resume: expected a run directory, got {given['resume']!r}, its {os.path.basename(folder)}/ folder; "
                     f"pass --resume {shlex.quote(os.path.dirname(folder) or '.')}")
        if not os.path.isfile(path):
            sys.exit(f"--resume: expected a run directory holding config.json, got {given['resume']!r}")
        saved = {**BEFORE_THESE_FLAGS, **read_config(path), "output_dir": given["resume"]}
    return Config(**{**saved, **given})


# Files of a model folder inside a run directory (checkpoint/, final/: their config.json is the model's), which a
# --resume may name by mistake.
MODEL_FILES = ("step.json", "model.safetensors", "adapter_config.json")

# A run saved before these flags existed resumes with the behaviour it had (where that is not today's default).
BEFORE_THESE_FLAGS = {"lr_schedule": "constant", "score_temperature": 1.0, "gate_group": 0, "lora_r": 0,
                      "group_size": 1, "eval_samples": 0, "eval_max_new_tokens": 0, "eval_greedy": True}


def with_every_flag(settings: dict) -> dict:
    """A run's saved settings (config.json, or an evaluation row's record) with each flag the run predates:
    its BEFORE_THESE_FLAGS value, else today's default (what the run did before the flag existed)."""
    return {**{f.name: f.default for f in fields(Config)}, **BEFORE_THESE_FLAGS, **settings}
# Flags a resumed run cannot change: the weights it continues from, what its steps mean (the method and its
# constants, the reward, the sampling, the data and its order), the compute dtype (`--dtype`, or `auto` on
# another `--device`, checked apart), and, under a decaying schedule, the length of the schedule it is part
# of. --lr, --weight-decay, --grad-clip, --advantage-warmup and the evaluation and output flags may change
# (--eval-size and --eval-data not where, before or after, the held-out problems are split off --data).
FIXED_ON_RESUME = ("model", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "method", "gamma", "window",
                   "eps", "floor", "min_denominator", "denominator", "gate_group", "score_temperature", "beta_length",
                   "group_size", "batch_size", "max_new_tokens", "temperature", "top_p", "top_k", "verifier", "data",
                   "train_size", "seed")
FIXED_UNDER_DECAY = ("steps", "lr_schedule", "warmup_steps")
FIXED_WITH_A_SPLIT = ("eval_size", "eval_data")  # where the held-out problems are the first of --data's
# Upper bounds of the integer flags (their lower bounds are in check_config's rules): sizes allocated at once
# are bounded where no run could use more (the completion caps also by the model's positions, check_lengths),
# seeds by what torch and Python take, every other count by 2³¹ − 1.
INT_MAX = {"batch_size": 2**16, "micro_batch_size": 2**16, "eval_batch_size": 2**16, "group_size": 2**16,
           "chunk_size": 2**20, "max_new_tokens": 2**20, "eval_max_new_tokens": 2**20, "eval_samples": 2**10,
           "window": 2**16, "lora_r": 2**16, "seed": 2**32 - 1, "eval_seed": 2**32 - 1}


def check_config(cfg: Config) -> None:
    """Stop on an impossible flag before any model is loaded, naming the flag and what is allowed; first on a
    folder that another running process holds, or (a new run) another run's (run_io.refuse_if_taken)."""
    run_io.refuse_if_taken(cfg.output_dir, bool(cfg.resume))
    rules = [
        ("method", cfg.method in METHODS, f"one of {', '.join(METHODS)}"),
        ("device", re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device) is not None, "cpu, cuda or cuda:N"),
        ("model", not looks_like_a_folder(cfg.model) or holds_a_model(cfg.model),
         "a Hugging Face model name (org/name), tiny, or a folder holding config.json and a tokenizer (tokenizer.json, "
         "tokenizer.model, or vocab.json and merges.txt)"),
        ("dtype", cfg.dtype in ("auto", "bfloat16", "float32"), "auto, bfloat16 or float32"),
        ("rollout", cfg.rollout in ROLLOUTS, ", ".join(ROLLOUTS)),
        ("rollout", cfg.rollout != "graph" or cfg.device.startswith("cuda"), "graph only with a CUDA --device"),
        ("compile_decode", not cfg.compile_decode or cfg.rollout in ("auto", "graph", "eager"),
         "--rollout auto, graph or eager (decoding.py; HF generate compiles its own static cache)"),
        ("gradient_checkpointing", cfg.gradient_checkpointing in CHECKPOINTING, ", ".join(CHECKPOINTING)),
        ("verifier", cfg.verifier in ("builtin", "math-verify"), "builtin or math-verify"),
        ("verifier", cfg.verifier != "math-verify" or importlib.util.find_spec("math_verify") is not None,
         "math-verify installed (pip install -r requirements-extras.txt)"),
        ("data", not cfg.data or os.path.isfile(cfg.data), "an existing JSONL file"),
        ("eval_data", not cfg.eval_data or os.path.isfile(cfg.eval_data), "an existing JSONL file"),
        ("steps", cfg.steps >= 0, "≥ 0"), ("batch_size", cfg.batch_size > 0, "> 0"),
        ("micro_batch_size", cfg.micro_batch_size > 0, "> 0"), ("max_new_tokens", cfg.max_new_tokens > 0, "> 0"),
        ("temperature", cfg.temperature > 0, "> 0"), ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"),
        ("top_k", cfg.top_k >= 0, "≥ 0"), ("lr", cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, "≥ 0"),
        ("grad_clip", cfg.grad_clip > 0, "> 0"), ("beta_length", cfg.beta_length >= 0, "≥ 0"),
        *egrsd.GateSettings.flag_rules(cfg),  # γ, W, ε, floor, min_denominator, denominator, gate_group: egrsd.SETTINGS
        ("advantage_warmup", cfg.advantage_warmup >= 0, "≥ 0"), ("train_size", cfg.train_size > 0, "> 0"),
        ("train_size", cfg.train_size <= 2000 or bool(cfg.data), "≤ 2000, the built-in training problems"),
        ("eval_size", cfg.eval_size >= 0, "≥ 0"), ("eval_every", cfg.eval_every >= 0, "≥ 0"),
        ("eval_batch_size", cfg.eval_batch_size > 0, "> 0"), ("save_every", cfg.save_every >= 0, "≥ 0"),
        ("chunk_size", cfg.chunk_size > 0, "> 0"), ("max_bad_steps", cfg.max_bad_steps > 0, "> 0"),
        ("regime_low", cfg.regime_low >= 0, "≥ 0"), ("regime_high", cfg.regime_high > cfg.regime_low, "> --regime-low"),
        ("dump_tokens", cfg.dump_tokens >= 0, "≥ 0"), ("seed", cfg.seed >= 0, "≥ 0"), ("eval_seed", cfg.eval_seed >= 0, "≥ 0"),
        ("group_size", cfg.group_size > 0, "≥ 1"),
        ("batch_size", cfg.batch_size % max(cfg.group_size, 1) == 0, f"a multiple of --group-size {cfg.group_size}"),
        ("eval_max_new_tokens", cfg.eval_max_new_tokens >= 0, "≥ 0 (0: --max-new-tokens)"),
        ("eval_samples", cfg.eval_samples >= 0, "≥ 0"), ("eval_temperature", cfg.eval_temperature > 0, "> 0"),
        ("eval_samples", cfg.eval_samples > 0 or cfg.eval_greedy, "≥ 1 under --no-eval-greedy (avg@K is then the only evaluation)"),
        ("eval_top_p", 0 < cfg.eval_top_p <= 1, "in (0, 1]"), ("eval_top_k", cfg.eval_top_k >= 0, "≥ 0"),
        ("time_budget", cfg.time_budget >= 0, "≥ 0 seconds (0: no limit)"),
        ("initial_eval", not cfg.initial_eval or past_step_0(cfg) or os.path.isfile(os.path.join(cfg.initial_eval, "config.json")),
         "a run directory holding config.json"),
        ("lr_schedule", cfg.lr_schedule in SCHEDULES, ", ".join(SCHEDULES)), ("warmup_steps", cfg.warmup_steps >= 0, "≥ 0"),
        ("score_temperature", cfg.score_temperature >= 0, "≥ 0 (0: the rollout --temperature)"),
        ("lora_r", cfg.lora_r >= 0, "≥ 0 (0: full fine-tuning)"), ("lora_alpha", cfg.lora_alpha > 0, "> 0"),
        ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
        ("lora_target_modules", all(cfg.lora_target_modules.split(",")), "comma-separated module names"),
        ("lora_r", not cfg.lora_r or importlib.util.find_spec("peft") is not None,
         "peft installed for LoRA (pip install -r requirements-extras.txt)"),
    ]
    rules += [(f.name, getattr(cfg, f.name) <= INT_MAX.get(f.name, 2**31 - 1), f"≤ {INT_MAX.get(f.name, 2**31 - 1)}")
              for f in fields(Config) if f.type == "int"]
    rules += [(f.name, math.isfinite(getattr(cfg, f.name)), "a finite number") for f in fields(Config) if f.type == "float"]
    for name, ok, allowed in rules:
        if not ok:
            sys.exit(f"--{name.replace('_', '-')}: expected {allowed}, got {getattr(cfg, name)!r}")
    if cfg.resume:
        if os.path.abspath(cfg.output_dir) != os.path.abspath(cfg.resume):
            sys.exit(f"--output-dir: a resumed run writes to its own directory {cfg.resume!r}, got {cfg.output_dir!r}")
        checkpoint = run_io.find_checkpoint(cfg.resume)  # stops now if there is none
        run_io.read_manifest(checkpoint)  # (its step is step.json's, which decides what follows)
        done = run_io.checkpoint_step(checkpoint)
        if cfg.steps < done:
            sys.exit(f"--steps: expected ≥ {done}, the step of the checkpoint in {cfg.resume!r}, got {cfg.steps}")
        if os.path.isfile(metrics := os.path.join(cfg.resume, "metrics.jsonl")):
            check_evaluation_sampling(cfg, run_io.read_rows(metrics, quiet=True))  # (a malformed row stops now too)
        manifest = run_io.verify_checkpoint(checkpoint)  # (hashing takes about a second a GB: the quick checks first)
        # The checkpoint's own record of the settings, where it has one: an edited config.json cannot change them.
        saved = manifest["settings"] if manifest else {**BEFORE_THESE_FLAGS, **read_config(os.path.join(cfg.resume, "config.json"))}
        # the held-out problems split off --data (in the saved run or in this call) decide the training problems
        carved = saved.get("data") and not (saved.get("eval_data") and cfg.eval_data)
        fixed = (FIXED_ON_RESUME + (FIXED_UNDER_DECAY if saved["lr_schedule"] != "constant" else ())
                 + (FIXED_WITH_A_SPLIT if carved else ()))
        for name in fixed:
            if getattr(cfg, name) != saved.get(name, getattr(cfg, name)):
                why = ("its decaying learning-rate schedule was laid out for" if name in FIXED_UNDER_DECAY else
                       "its training problems are what --data left after the held-out split of" if name in FIXED_WITH_A_SPLIT
                       else "it continues from")
                sys.exit(f"--{name.replace('_', '-')}: a resumed run keeps {saved[name]!r}, as {why} it "
                         f"(got {getattr(cfg, name)!r}, from the command line or an edited config.json); start a "
                         "new run to change it")
        if cfg.eval_greedy != saved.get("eval_greedy", True):  # so that a run's evaluations compare with each other
            sys.exit(f"{as_typed('eval_greedy', cfg.eval_greedy)}: a resumed run keeps "
                     f"{as_typed('eval_greedy', saved.get('eval_greedy', True))}, as its evaluations so far did; start a "
                     "new run to change it")
        if run_io.eval_cap(vars(cfg)) != run_io.eval_cap(saved):  # so that a run's evaluations compare with each other
            sys.exit(f"--eval-max-new-tokens: a resumed run keeps evaluating up to {run_io.eval_cap(saved)} new tokens, as its "
                     f"evaluations so far did (got {run_io.eval_cap(vars(cfg))}); start a new run to change it")
        if "dtype" in saved and compute_dtype(cfg) != compute_dtype(saved):  # --device moves --dtype auto too
            name = str(compute_dtype(saved)).removeprefix("torch.")
            sys.exit(f"--dtype: a resumed run keeps computing in {name}, as it did on --device {saved['device']} (got --dtype "
                     f"{cfg.dtype} on --device {cfg.device}: {str(compute_dtype(cfg)).removeprefix('torch.')}); pass "
                     f"--dtype {name}, or start a new run")
        if manifest:
            run_io.check_model(checkpoint, manifest, bool(cfg.lora_r), model_shape(cfg.model))
    if cfg.lora_r:
        check_lora_targets(cfg)
    if cfg.initial_eval and not past_step_0(cfg):
        check_initial_eval(cfg)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"CUDA is not available on this machine. For a CPU smoke run:\n    {SMOKE}")
    size = run_bytes(cfg) if cfg.save_model else None  # --no-save-model writes metrics only
    run_io.check_output_dir(cfg.output_dir, *(size or (None, "")))


def looks_like_a_folder(model: str) -> bool:
    """Whether --model names a local folder rather than a hub model (org/name) or a model built in code: an
    absolute or ./ path, one deeper than org/name, or one that exists."""
    from trainer.offline_models import is_built_in

    if is_built_in(model):
        return False
    return os.path.isabs(model) or model.startswith(".") or model.count("/") > 1 or os.path.exists(model)


def holds_a_model(folder: str) -> bool:
    """Whether a --model folder holds a model's config and a tokenizer (without its files, transformers builds
    an empty tokenizer that encodes every text to nothing, and the run would fail only once the model loaded)."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    return has("config.json") and (has("tokenizer.json") or has("tokenizer.model") or (has("vocab.json") and has("merges.txt")))


def check_lora_targets(cfg: Config) -> None:
    """Every --lora-target-modules name ends the name of one of the model's linear layers (as peft matches
    them), from its config on the meta device (a config that cannot be read stops: offline_models.model_config);
    skipped where transformers cannot build it on the meta device (the model load will tell). Not the
    LM head: the log-probs read its weight directly (egrsd.linear_*), so an adapter there would never train."""
    from trainer import offline_models

    try:
        model = offline_models.meta_model(offline_models.model_config(cfg.model))
    except Exception:  # noqa: BLE001 (a config of no causal LM, say: the model load will tell)
        return
    head = model.get_output_embeddings()
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not head]
    missing = [t for t in cfg.lora_target_modules.split(",") if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        sys.exit(f"--lora-target-modules: expected names of the model's linear layers below its LM head ({', '.join(names)}), "
                 f"got {', '.join(missing)}")


def past_step_0(cfg: Config) -> bool:
    """Whether the run is past its step-0 evaluation: resumed from a checkpoint beyond step 0 (a step-0 checkpoint
    is what an evaluation that ran out of memory leaves: that resume still evaluates, or reuses one)."""
    return bool(cfg.resume) and run_io.checkpoint_step(run_io.find_checkpoint(cfg.resume)) > 0


def check_evaluation_sampling(cfg: Config, rows: list[dict]) -> None:
    """A resumed run samples its held-out evaluations as its earlier ones did (temperature, top-p, top-k: the
    evaluated_with of its metrics rows), so that they compare with each other. --eval-samples may change: avg@K
    estimates one accuracy whatever K."""
    names = tuple(name for name in run_io.SAMPLED_EVAL_SETTINGS if name != "eval_seed")  # (another seed: other draws, one measure)
    now = tuple(getattr(cfg, name) for name in names)
    earlier = {tuple(w.get(name) for name in names) for r in rows
               if r.get("kind") == "eval" and (w := r.get("evaluated_with") or {}).get("eval_samples")}
    if cfg.eval_samples and earlier - {now}:
        before = sorted(earlier - {now}, key=str)[0]
        sys.exit(f"--eval-temperature, --eval-top-p, --eval-top-k: a resumed run samples its evaluations as its earlier "
                 f"ones did ({', '.join(map(str, before))}; got {', '.join(map(str, now))}), so that they compare with "
                 "each other; start a new run to change them")


def check_initial_eval(cfg: Config) -> None:
    """--initial-eval: the other run evaluated the same model on the same problems in the same way, and
    wrote its step-0 evaluation."""
    row = run_io.initial_eval_row(cfg.initial_eval)
    if row is None:
        sys.exit(f"--initial-eval: {cfg.initial_eval}/metrics.jsonl holds no step-0 evaluation")
    # what that evaluation was made with, as its row records it (a resumed run rewrites config.json with the
    # flags of its last call, --eval-batch-size say); config.json for a row from before that record
    recorded = row.get("evaluated_with") or read_config(os.path.join(cfg.initial_eval, "config.json"))
    other, ours = (run_io.as_compared(run_io.evaluation_settings(s)) for s in (with_every_flag(recorded), vars(cfg)))
    for name in run_io.EVAL_SETTINGS:  # (eval_samples comes before the settings it makes unused)
        if other.get(name) != ours.get(name):
            sys.exit(f"--initial-eval: {cfg.initial_eval} evaluated with {as_typed(name, other.get(name))}, this run "
                     f"with {as_typed(name, ours.get(name))}; its step-0 evaluation is not this run's")


def as_typed(name: str, value) -> str:
    """A setting as it is typed on the command line: --name VALUE, and a boolean as --name or --no-name."""
    flag = name.replace("_", "-")
    return f"--{'' if value else 'no-'}{flag}" if isinstance(value, bool) else f"--{flag} {value!r}"


def model_shape(name: str) -> dict | None:
    """The shape a checkpoint of model `name` must have (run_io.SHAPE_KEYS), or None where its config
    cannot be turned into one (the model load will tell); an unreadable config stops (offline_models.model_config)."""
    from trainer import offline_models

    try:
        return run_io.shape_of(offline_models.model_config(name))
    except Exception:  # noqa: BLE001
        return None


def checked_data(cfg: Config) -> tuple[list, list]:
    """(training, held-out problems) of tasks.load_data, before any model loads: a malformed data file stops
    with its message alone (file:line: what is wrong), and every prompt must fit (check_lengths)."""
    from trainer import tasks

    try:
        train_problems, eval_problems = tasks.load_data(cfg)
    except ValueError as error:  # load_problems: "FILE:LINE: what is wrong"
        sys.exit(f"--{'eval-data' if cfg.eval_data and str(error).startswith(f'{cfg.eval_data}:') else 'data'}: {error}")
    check_lengths(cfg, train_problems, eval_problems)
    return train_problems, eval_problems


def check_lengths(cfg: Config, train_problems: list, eval_problems: list) -> None:
    """Before any model loads: every prompt plus its completion cap fits the model's positions: the student's
    (the question) and the teacher's (which holds the solution too) of a training problem with
    --max-new-tokens, the student's of a held-out one with the evaluation's cap (run_io.eval_cap); else stop
    naming the problem's file and line. A config or tokenizer that cannot be read stops (offline_models); skipped
    where they hold no length to check (no max_position_embeddings, say)."""
    from trainer import offline_models, tasks

    try:
        positions = offline_models.model_config(cfg.model).max_position_embeddings
        with warnings.catch_warnings():  # (its fallbacks' warnings: the model load gives them)
            warnings.simplefilter("ignore")
            tokenizer = offline_models.load_tokenizer(cfg.model)
    except Exception:  # noqa: BLE001 (the model load will tell)
        return
    eval_flag = "--eval-max-new-tokens" if cfg.eval_max_new_tokens else "--max-new-tokens"
    for who, messages, problems, flag, cap in (
            ("student", tasks.student_messages, train_problems, "--max-new-tokens", cfg.max_new_tokens),
            ("teacher", tasks.teacher_messages, train_problems, "--max-new-tokens", cfg.max_new_tokens),
            ("student", tasks.student_messages, eval_problems, eval_flag, run_io.eval_cap(vars(cfg)))):
        if not problems:
            continue
        texts = [tokenizer.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True) for p in problems]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        longest = max(range(len(problems)), key=lengths.__getitem__)
        if lengths[longest] + cap > positions:
            n, solution = lengths[longest], " (its question and solution)" if who == "teacher" else ""
            sys.exit(f"{flag}: the {who}'s prompt{solution} of the problem at {problem_line(cfg, problems[longest])} "
                     f"is {n} tokens; with {flag} {cap} it needs {n + cap} positions, and {cfg.model} has "
                     f"{positions}: expected {flag} ≤ {positions - n}, or leave that problem out")


def problem_line(cfg: Config, problem) -> str:
    """file:line of a problem in the run's data files (found again by its question)."""
    from trainer import tasks

    for path in (cfg.data, cfg.eval_data, *tasks.BUILT_IN.values()):
        with open(path or os.devnull, "rb") as f:
            for number, line in enumerate(f, start=1):
                row = json.loads(line) if line.strip() else {}
                if problem.question in (row.get("problem"), row.get("question")):
                    return f"{path}:{number}"
    return "(not found in the data files)"


def learning_rate_factor(cfg: Config):
    """The schedule as a factor of --lr after `step` optimizer steps, as HF's schedulers: warm-up from 0,
    then constant, or a linear or cosine decay that reaches 0 at --steps."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return step / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return {"constant": 1.0, "linear": max(0.0, 1.0 - progress),
                "cosine": 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))}[cfg.lr_schedule]
    return factor


def score_temperature(cfg) -> float:
    """The temperature of the teacher's and the student's token scores: --score-temperature, else the rollouts'."""
    return cfg.score_temperature or cfg.temperature


def compute_dtype(cfg) -> torch.dtype:
    """bfloat16 on CUDA and float32 on CPU for --dtype auto (`cfg`: a Config, or a run's saved settings)."""
    dtype, device = (cfg["dtype"], cfg["device"]) if isinstance(cfg, dict) else (cfg.dtype, cfg.device)
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def run_bytes(cfg: Config) -> tuple[int, str] | None:
    """The disk a run needs, from the model's config on the meta device (no weights are read): two
    checkpoints, since the last one stays until the next is complete (one more for a resumed run, whose
    checkpoint is on the disk already), and final/. A checkpoint holds the
    float32 weights and their two AdamW moments (12 bytes a parameter), with LoRA only the adapter's;
    final/ holds the model in the compute dtype (with LoRA also the adapter). None where the model's
    model cannot be built from its config on the meta device (an unreadable config stops: offline_models.model_config)."""
    from trainer import lora, offline_models

    try:
        model = offline_models.meta_model(offline_models.model_config(cfg.model))
    except Exception as error:  # noqa: BLE001 (a config of no causal LM, say: the model load will tell)
        print(f"free-space check skipped: no model could be built from the config of {cfg.model!r} ({type(error).__name__})")
        return None
    params = sum(p.numel() for p in model.parameters())
    adapter = lora.adapter_parameters(model, cfg) if cfg.lora_r else 0
    checkpoint = 12 * (adapter or params)
    final = compute_dtype(cfg).itemsize * params + 4 * adapter
    checkpoints = "one more checkpoint" if cfg.resume else "two checkpoints"
    return (1 if cfg.resume else 2) * checkpoint + final, (
        f"{checkpoints} of {run_io.gib(checkpoint)}, {'the adapter' if adapter else 'the weights'} and its AdamW state, "
        f"and final/ of {run_io.gib(final)}")
