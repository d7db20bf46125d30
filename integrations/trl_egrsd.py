"""EGRSD, CL-EGRSD and RLSD inside TRL, for runs that outgrow one GPU: multi-GPU and multi-node through
accelerate (DDP, DeepSpeed ZeRO, FSDP), vLLM rollouts, LoRA, and TRL's logging and checkpoints. Every weight
comes from egrsd.py; this file only connects it. Needs the `trl` extra (requirements-extras.txt), TRL 1.16.x:
it overrides private methods of GRPOTrainer, so another minor version stops at import with the range.

    from integrations.trl_egrsd import EGRSDConfig, EGRSDTrainer, correctness_reward, dataset_from_problems
    trainer = EGRSDTrainer(model="Qwen/Qwen3-8B", reward_funcs=correctness_reward, train_dataset=dataset,
                           args=EGRSDConfig(method="cl-egrsd", window=5, gamma=1.0, ...), peft_config=LoraConfig(...))
    trainer.train()

The base class is TRL's `GRPOTrainer` (read in TRL 1.16), for these reasons:
- it already has what a run at the paper's scale needs: rollouts (vLLM included), reward functions, PEFT,
  DeepSpeed/FSDP, gradient accumulation, logging, checkpoints and resume;
- its loss accepts (B, T) advantages from a subclass, and its token-level normalisation ("dapo": the
  tokens of the whole batch, over every process and accumulation step) is the paper's token mean;
- TRL's self-distillation trainers (experimental `SDFTTrainer`, `SDPOTrainer`) distil toward the
  teacher's distribution, OPSD's direction; EGRSD keeps the reward's direction and only weights tokens.

What this subclass changes, and nothing else:
1. `_calculate_rewards` keeps the rewards of the whole batch (TRL gathers them from every process).
2. `_generate_and_score_completions`, after GRPO's rollouts and rewards: the reward becomes the
   length-shaped r (`egrsd.length_shaped_reward`: reward functions return 1 for a correct completion, a
   truncated one earns 0) and the advantage the running one (`egrsd.RunningAdvantage`, fed the gathered
   rewards of every process, so that its state is the same on each and does not depend on how many
   processes share the batch). One generation batch is one step of the running advantage and one batch for
   the entropy normaliser (one optimizer step by default). The frozen teacher scores each completion with
   the privileged prompt of the dataset column `teacher_prompt_column`; the policy's log-probs are TRL's own
   where it has computed them (for vLLM's importance sampling), else one pass of the policy that sampled;
   and Â = `egrsd.token_advantages` replaces GRPO's advantages. The entropy normaliser (Eq. 5) is the
   maximum over the global batch (gathered from every process), unless `gate_group` asks for groups of rows.
   The logs show what is trained: the completions table's advantage is A_i (with each completion's mean Â
   and gate), and GRPO's group diagnostics (`reward_std`, `frac_reward_zero_std`) are dropped.
3. `_compute_loss` is `egrsd.policy_loss`, scaled to TRL's "dapo" normalisation; with vLLM, Â is multiplied
   by TRL's importance-sampling ratio (sampler against trainer), as GRPO's per-token loss is. It logs TRL's
   `entropy` (the policy's).
4. The running advantage's state is saved in TRL's checkpoints (`egrsd_state.json`) and restored on resume.
5. The model card names EGRSD and its paper (arXiv 2605.13255), not GRPO's.

One rollout per prompt, as in the paper, cannot be had: GRPOConfig requires `num_generations` ≥ 2 for its
group baseline. With `num_generations=2` (the default here) the two rollouts of a prompt are simply two
samples: the running advantage replaces the group baseline, which is never used. GRPO settings that this
loss or advantage replaces (`loss_type` other than dapo, `scale_rewards`, entropy masks and bonuses, …) are
refused rather than ignored, and so is LoRA dropout, while the model's own dropout is switched off (its
attention dropout too): w compares two log-prob passes. Also refused: generation batches trained over several
optimizer steps (off-policy) and tools or environments (tokens the policy did not sample, which TRL masks out
of its loss and this one would train). `args` must be an EGRSDConfig (a GRPOConfig lacks the method's settings;
None: EGRSDConfig's defaults), and each dataset given needs the column `teacher_prompt_column`: both are checked
before any weights load, not after the first rollouts.

The teacher is the initial weights, frozen: the weights the policy starts from, never a model it was not (a
copy where needed rather than a refusal: continuing a trained adapter or an edited model is common, and an
adapter's copy costs little).
- PEFT, with the adapter created by the trainer from `peft_config` with LoRA's default initialisation (B = 0:
  it adds nothing until trained): the base model with the adapter switched off (no second copy).
- PEFT otherwise (a PEFT model passed in, whose adapter may already be trained, as an SFT LoRA being continued;
  another initialisation, random or PiSSA; another PEFT method), where switching the adapter off would give a
  model the policy never was: the policy with a frozen copy of its starting adapter, the adapter "teacher", in
  place of the one it trains. That is TRL's own way for its reference model ("ref"); it costs one adapter, not a
  model, and is saved in checkpoints beside the trained adapter (a `teacher/` folder).
- No PEFT, `model` a name or path: loaded from it and prepared as TRL loads its reference model (the same
  `model_init_kwargs`, quantization and device placement).
- No PEFT, `model` an object: a copy of that object before any step, not a reload of its config's path, whose
  files need not hold its weights (a merged adapter, edited weights).
A model object whose copied weights DeepSpeed ZeRO-3 has already partitioned cannot be copied: refused, with what
to do.

Log-probabilities and entropies come from TRL's fused, chunked LM head (never a tokens × vocabulary tensor, and
run inside the wrapped model, so that DeepSpeed ZeRO-3 and FSDP work), at the sampling temperature: the same
log-softmax and entropy as `egrsd.linear_token_logprobs` / `linear_token_entropy` (tested equal), and the same
`score_temperature` as train_min.py (0: follow `temperature`; TRL scores at `temperature` only).

The command line (`main`) is TRL's GRPO script with EGRSD's settings: the same model flags (dtype, attention,
revision, quantization, LoRA) and dataset flags (`--dataset_name`, with the columns that make a problem), or
train_min.py's JSONL files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field

import torch
from packaging.specifiers import SpecifierSet

TRL_RANGE = ("1.16", "1.17")  # requirements-extras.txt: trl>=1.16,<1.17
try:
    import trl
    from accelerate.utils import gather, is_peft_model  # (accelerate comes with trl)
except ModuleNotFoundError as missing:
    needs = (f"integrations/trl_egrsd.py needs trl, an optional extra ({missing}): pip install -r "
             f"requirements-extras.txt, or pip install 'trl>={TRL_RANGE[0]},<{TRL_RANGE[1]}'")
    if __name__ == "__main__":
        sys.exit(needs)  # run as a script: the reason alone, as train_min.py's flags that need an extra say it
    raise ImportError(needs) from missing


def check_trl_version(version: str) -> None:
    """Stop unless TRL is 1.16.x: the private methods overridden here are those of 1.16. The range is read as pip
    reads requirements-extras.txt's `trl>=1.16,<1.17` (PEP 440): 1.16.0 and later 1.16 releases, their post
    releases and 1.16.1+ dev builds pass; 1.17's pre-releases (1.17.0.dev0, which TRL's main branch carries after
    a 1.16 release, and 1.17.0rc1) are refused like 1.17.0, and 1.16.0's own (1.16.0rc1) like 1.15. (Comparing
    Version objects would let 1.17's pre-releases in: they sort below 1.17.)"""
    low, high = TRL_RANGE
    if not SpecifierSet(f">={low},<{high}").contains(version, prereleases=True):
        raise ImportError(f"trl: expected trl>={low},<{high} (integrations/trl_egrsd.py overrides private methods of "
                          f"GRPOTrainer as they are in {low}), got {version}; pip install 'trl>={low},<{high}'")


check_trl_version(trl.__version__)

from trl import GRPOConfig, GRPOTrainer, ModelConfig, ScriptArguments  # noqa: E402
from trl.models import prepare_deepspeed, prepare_fsdp  # noqa: E402
from trl.trainer.utils import (add_fused_lm_head, create_model_from_path, disable_dropout_in_model,  # noqa: E402
                               get_config_model_id, pad, use_adapter)

if not __package__:  # run as a script (accelerate launch integrations/trl_egrsd.py): the repository root is not on
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the path, only this folder
import egrsd  # noqa: E402

STATE_FILE = "egrsd_state.json"
TEACHER_ADAPTER = "teacher"  # a PEFT policy's frozen copy of its starting adapter (module docstring: the teacher)


# GRPO settings that EGRSD's advantage or loss replaces or needs as they are: another value is refused, with why.
REPLACED = {
    "loss_type": ("dapo", "EGRSD's loss is −Σ m·Â·log p / Σ m over the tokens of the batch, TRL's dapo "
                          "normalisation; the other types are GRPO's clipped objectives"),
    "scale_rewards": ("group", "the running advantage replaces GRPO's group baseline and its scaling"),
    "multi_objective_aggregation": ("sum_then_normalize", "the weighted sum of the reward functions says correct "
                                                         "or not; GRPO's normalised advantage is not used"),
    "importance_sampling_level": ("token", "EGRSD's loss has no policy ratio to take per sequence"),
    "top_entropy_quantile": (1.0, "the teacher's entropy gate ω weights the tokens instead"),
    "entropy_coef": (0.0, "EGRSD's loss has no entropy bonus"),
    "use_adaptive_entropy": (False, "EGRSD's loss has no entropy bonus"),
    "off_policy_mask_threshold": (None, "EGRSD trains on-policy (num_iterations 1)"),
    "disable_dropout": (True, "w compares two log-prob passes over the same tokens, which dropout makes random"),
    "mask_truncated_completions": (False, "a truncated rollout earns r = 0 and is trained with its advantage, which "
                                          "is what pushes lengths down; masking it out of the loss is DAPO's rule"),
}


@dataclass
class EGRSDConfig(GRPOConfig):
    """GRPOConfig and the method's settings, with the names and meaning of train_min.py's flags (trainer/config.py).
    The sampling settings, the completion cap (also the reward's L_max) and the grad-norm clip default to the
    paper's values, as train_min.py's do, not to GRPOConfig's (temperature 1, no top-p or top-k, 512, 1.0)."""

    method: str = field(default="egrsd", metadata={"help": "egrsd, cl-egrsd or rlsd (EGRSD with γ = 0)"})
    gamma: float = field(default=0.3, metadata={"help": "γ, strength of the entropy gate"})
    window: int = field(default=3, metadata={"help": "W, the causal lookahead of cl-egrsd"})
    eps: float = field(default=0.2, metadata={"help": "ε, clip range of the likelihood-ratio magnitude"})
    floor: float = field(default=0.1, metadata={"help": "lower bound of the gate"})
    min_denominator: float = field(default=1.0, metadata={"help": "floor, in nats, of the entropy normaliser"})
    denominator: str = field(default="raw", metadata={"help": "cl-egrsd normaliser: raw (Eq. 8) or filtered"})
    gate_group: int = field(default=0, metadata={"help": "rollouts per entropy normaliser; 0: the global batch"})
    beta_length: float = field(default=0.5, metadata={"help": "β_L of the length-shaped reward"})
    advantage_warmup: int = field(default=10, metadata={"help": "steps with A = r − 0.5"})
    teacher_prompt_column: str = field(default="teacher_prompt",
                                       metadata={"help": "dataset column of the teacher's prompt (with the solution)"})
    score_temperature: float = field(default=0.0, metadata={"help": "0: the sampling temperature (the only one here)"})
    num_generations: int | None = field(default=2, metadata={"help": "rollouts per prompt (GRPO requires ≥ 2)"})
    beta: float = field(default=0.0, metadata={"help": "no KL term: the teacher is the anchor"})
    temperature: float = field(default=1.1, metadata={"help": "rollout sampling temperature (the paper's 1.1)"})
    top_p: float = field(default=0.95, metadata={"help": "rollout top-p (the paper's 0.95)"})
    top_k: int = field(default=20, metadata={"help": "rollout top-k (the paper's 20); 0: none"})
    max_completion_length: int = field(default=1024, metadata={
        "help": "most new tokens of a rollout (the paper's 1,024), and L_max of the length-shaped reward"})
    max_grad_norm: float = field(default=0.1, metadata={"help": "grad-norm clip (the paper's 0.1)"})
    disable_dropout: bool = field(default=True, metadata={"help": "must stay True: w needs deterministic log-probs"})

    def __post_init__(self):
        derived_steps = self.steps_per_generation is None and self.generation_batch_size is not None
        super().__post_init__()  # (which derives steps_per_generation from generation_batch_size when only it is given)
        accumulation = self.gradient_accumulation_steps
        on_policy = ("each generation batch trained within one optimizer step (on-policy: EGRSD's loss has no ratio to "
                     "an older policy)")
        on_policy_ok = accumulation % self.steps_per_generation == 0
        if derived_steps:  # the rule names the argument that was given
            rollouts = self.per_device_train_batch_size * self.world_size
            generation = ("generation_batch_size", on_policy_ok, f"per_device_train_batch_size × processes ({rollouts}) "
                          f"times a divisor of gradient_accumulation_steps ({accumulation}): {on_policy}",
                          f"{self.generation_batch_size} (steps_per_generation {self.steps_per_generation})")
        else:
            generation = ("steps_per_generation", on_policy_ok,
                          f"a divisor of gradient_accumulation_steps ({accumulation}): {on_policy}")
        rules = [("method", self.method in ("egrsd", "cl-egrsd", "rlsd"), "egrsd, cl-egrsd or rlsd"),
                 *egrsd.GateSettings.flag_rules(self), ("beta_length", 0 <= self.beta_length < float("inf"), "finite, ≥ 0"),
                 ("advantage_warmup", is_int(self.advantage_warmup) and self.advantage_warmup >= 0, "an int ≥ 0"),
                 ("max_completion_length", is_int(self.max_completion_length) and self.max_completion_length > 0,
                  "a positive int (the rollouts' cap, and L_max of the length-shaped reward)"), generation,
                 ("score_temperature", self.score_temperature in (0, self.temperature), f"0 or temperature ({self.temperature})"),
                 ("beta", self.beta == 0, "0 (EGRSD has no KL term)"), ("num_iterations", self.num_iterations == 1, "1 (on-policy)")]
        rules += [(name, getattr(self, name) == default, f"{default!r} ({why})") for name, (default, why) in REPLACED.items()]
        for name, ok, allowed, *got in rules:
            if not ok:
                raise ValueError(f"{name}: expected {allowed}, got {got[0] if got else repr(getattr(self, name))}")


def is_int(value) -> bool:
    """An int that is not a bool (True is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_no_lora_dropout(peft_config, model) -> None:
    """Stop on LoRA dropout, in the given config or in the adapters of a PEFT model: w = clip(exp(±δ)) takes
    the policy's log-probs of a scoring pass, which dropout would make differ from those the loss trains."""
    adapters = list(model.peft_config.values()) if not isinstance(model, str) and is_peft_model(model) else []
    configs = ([peft_config] if peft_config is not None else []) + adapters
    for config in configs:
        if getattr(config, "lora_dropout", 0):
            raise ValueError(f"lora_dropout: expected 0 (the magnitude w needs deterministic log-probs: with dropout "
                             f"two passes over the same tokens differ), got {config.lora_dropout}")


def check_teacher_column(column: str, train_dataset, eval_dataset) -> None:
    """Stop unless each dataset (a dict of them for evaluation) has the teacher's prompt column, which is read
    only after the first rollouts and rewards. A streamed dataset whose columns are not known yet is not checked."""
    datasets = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):  # (DatasetDict is one)
        datasets += [(f"eval_dataset[{key!r}]", dataset) for key, dataset in eval_dataset.items()]
    else:
        datasets.append(("eval_dataset", eval_dataset))
    for name, dataset in datasets:
        columns = getattr(dataset, "column_names", None)
        if isinstance(columns, list) and column not in columns:
            raise ValueError(f"teacher_prompt_column: expected a column of {name}, one of {columns}, got {column!r}")


def starts_as_base_model(peft_config) -> bool:
    """Whether the adapter of `peft_config`, created by the trainer, adds nothing before it is trained, so that the
    policy with its adapter off is the initial policy: LoRA's default initialisation (B = 0). Not so for a PEFT
    model passed in (no peft_config: its adapter may be trained), other initialisations (random, PiSSA, OLoRA,
    LoftQ: the last three also rewrite the base weights) or other PEFT methods."""
    return peft_config is not None and getattr(peft_config, "init_lora_weights", None) is True


def check_copyable(model) -> None:
    """Stop on a model object whose weights the teacher copies (a PEFT model's: its adapter's) that DeepSpeed ZeRO-3
    has already partitioned (loaded under its `zero.Init`): a copy cannot be taken from partitions."""
    if isinstance(model, str):
        return
    peft = is_peft_model(model)
    copied = [p for name, p in model.named_parameters() if not peft or f".{model.active_adapter}." in name]
    if any(hasattr(p, "ds_id") for p in copied):
        raise ValueError(f"model: expected a name or path, or a model object loaded whole (the frozen teacher copies a "
                         f"model object's initial weights, a PEFT model's adapter, and cannot copy ZeRO-3's partitions), "
                         f"got a {type(model).__name__} partitioned by DeepSpeed ZeRO-3: pass its name or saved folder, "
                         f"or load it whole")


def disable_attention_dropout(model: torch.nn.Module) -> None:
    """Attention dropout that is a probability, not a module (Qwen2, Qwen3, Llama, Mistral: `attention_dropout`
    in the config and on each attention layer, applied in training mode), set to 0: TRL's
    `disable_dropout_in_model` only reaches torch.nn.Dropout modules, and w needs deterministic log-probs. The
    config says 0 too, so the saved model's config.json does."""
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "attention_dropout", None), float):
            config.attention_dropout = 0.0


class EGRSDTrainer(GRPOTrainer):
    """GRPOTrainer whose token advantages are EGRSD's Â = A · w · ω (module docstring)."""

    _tag_names = ["trl", "egrsd"]
    _name = "EGRSD"
    _paper = {
        "title": "Respecting Self-Uncertainty in On-Policy Self-Distillation for Efficient LLM Reasoning",
        "id": "2605.13255",
        "citation": textwrap.dedent("""\
            @article{ke2026respecting,
                title        = {{Respecting Self-Uncertainty in On-Policy Self-Distillation for Efficient LLM Reasoning}},
                author       = {Ke and Wen and Li and He and Zhang},
                year         = 2026,
                eprint       = {arXiv:2605.13255},
            }"""),
    }

    def __init__(self, *args, **kwargs):
        """GRPOTrainer's arguments; `args` an EGRSDConfig (None: its defaults, in `<model name>-EGRSD`, as GRPOTrainer
        names its own). What cannot work is refused here, before any weights load."""
        given = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs).arguments
        del given["self"]
        check_no_lora_dropout(given.get("peft_config"), given["model"])
        for name in ("tools", "environment_factory"):  # their tokens are not sampled by the policy: TRL masks them
            if given.get(name):
                raise ValueError(f"{name}: expected None (EGRSD's weights and loss do not mask tool or environment "
                                 f"tokens out), got {given[name]!r}")
        if given.get("args") is None:
            model = given["model"]
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            given["args"] = EGRSDConfig(f"{name.split('/')[-1]}-EGRSD")
        if not isinstance(given["args"], EGRSDConfig):  # a GRPOConfig lacks the method's settings
            raise ValueError(f"args: expected an EGRSDConfig (GRPOConfig with the method's settings), got "
                             f"{type(given['args']).__name__}")
        check_teacher_column(given["args"].teacher_prompt_column, given.get("train_dataset"), given.get("eval_dataset"))
        check_copyable(given["model"])
        super().__init__(**given)
        self.running_advantage = egrsd.RunningAdvantage(warmup_steps=self.args.advantage_warmup)
        policy = self.accelerator.unwrap_model(self.model)
        disable_attention_dropout(policy)
        self.teacher, self.teacher_adapter = None, None  # a PEFT policy is its own teacher, with `teacher_adapter`
        if not is_peft_model(policy):
            self.teacher = self._frozen_copy(given["model"], given.get("quantization_config"))
        elif not starts_as_base_model(given.get("peft_config")):
            self.teacher_adapter = self._frozen_adapter(policy)

    def _frozen_copy(self, model, quantization_config):
        """The initial weights, frozen. `model` a name or path: loaded from it and prepared as TRL loads its
        reference model (the policy's `model_init_kwargs` and quantization, and device_map None under DDP and
        DeepSpeed: their engines place the weights; transformers refuses ZeRO-3 with a device map). `model` an
        object: a copy of the policy before any step, not a reload of its config's path (its weights need not be
        those of any files: edited, merged, or loaded from another state dict)."""
        policy = self.accelerator.unwrap_model(self.model)
        if isinstance(model, str):
            kwargs = dict(self.args.model_init_kwargs or {})
            if quantization_config is not None:
                kwargs["quantization_config"] = quantization_config
            if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                kwargs["device_map"] = None
            kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            kwargs.setdefault("dtype", policy.dtype)
            kwargs.setdefault("attn_implementation", policy.config._attn_implementation)
            teacher = create_model_from_path(model, **kwargs)
        else:
            teacher = copy.deepcopy(policy)
        teacher.requires_grad_(False).eval()  # never trained: a copy of the policy would keep its training mode
        disable_dropout_in_model(teacher)
        disable_attention_dropout(teacher)
        add_fused_lm_head(teacher, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                          outputs=("log_probs", "entropy"))  # (a bf16 head in float32 gives the policy's cast head's values)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _frozen_adapter(self, policy) -> str:
        """A frozen copy of the PEFT policy's adapter as it is before any step, added beside it as TEACHER_ADAPTER
        (as TRL's GRPO keeps a "ref" copy of a pretrained adapter for its reference model): the teacher is the
        policy with the copy in place of the adapter it trains. Its name."""
        trained = policy.active_adapter
        if not isinstance(trained, str) or TEACHER_ADAPTER in policy.peft_config:
            raise ValueError(f"model: expected a PEFT model with one active adapter, none named {TEACHER_ADAPTER!r} "
                             f"(the teacher's copy of it), got adapters {list(policy.peft_config)}, active {trained!r}")
        config = copy.copy(policy.peft_config[trained])
        if hasattr(config, "init_lora_weights"):  # the weights are copied below; an initialisation that rewrites the
            config.init_lora_weights = True  # base weights (PiSSA, OLoRA, LoftQ) must not run a second time
        trainable = {name: parameter.requires_grad for name, parameter in policy.named_parameters()}
        policy.add_adapter(TEACHER_ADAPTER, config)
        for name, parameter in policy.named_parameters():
            if name in trainable:
                parameter.requires_grad_(trainable[name])
            else:
                source = policy.get_parameter(name.replace(f".{TEACHER_ADAPTER}.", f".{trained}."))
                parameter.data = source.data.detach().clone()  # (its dtype and device too)
                parameter.requires_grad_(False)
        return TEACHER_ADAPTER

    # ------------------------------------------------------------------------------------------------
    # Rewards, advantages and the per-token weights

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._batch_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._batch_rewards  # (all processes' rollouts, reward functions)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if "tool_mask" in output:  # a rollout_func's env_mask: tokens the policy did not sample
            raise ValueError("rollout_func: expected no env_mask (EGRSD's weights and loss do not mask environment tokens out)")
        mode = "train" if self.model.training else "eval"
        completion, mask = output["completion_ids"], output["completion_mask"].bool()
        # ALGO LOGIC: the length-shaped reward and the running advantage, over the whole batch
        lengths = mask.sum(dim=1)
        last = completion.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
        finished = (lengths > 0) & torch.isin(last, torch.tensor(self.eos_token_ids, device=last.device))
        score = (self._batch_rewards * self.reward_weights.to(self._batch_rewards.device)).nansum(dim=1)
        correct = (score > 0.5).cpu() & gather(finished).cpu()
        rewards = egrsd.length_shaped_reward(correct, gather(lengths).cpu(), self.max_completion_length, beta=self.args.beta_length)
        running = self.running_advantage if mode == "train" else copy.deepcopy(self.running_advantage)  # eval: no update
        batch_advantages = running(rewards)
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        advantages = batch_advantages[local].to(completion.device)
        # the teacher (with the reference solution) and the policy that sampled score every completion token;
        # TRL has already scored the policy where it needs it (vLLM's importance sampling, or generation not
        # aligned with optimizer steps): the same pass, reused
        teacher_logp, teacher_entropy = self.teacher_scores([x[self.args.teacher_prompt_column] for x in inputs], completion, mask)
        student_logp = output.get("old_per_token_logps")
        student_logp = self.policy_logps(output) if student_logp is None else student_logp.masked_fill(~mask, 0.0)
        settings = self.gate_settings(teacher_entropy, mask)  # one gather of the normaliser for both
        output["advantages"] = self.token_advantages(advantages, teacher_logp, student_logp, teacher_entropy, mask, settings)
        magnitude = settings.magnitude(teacher_logp, student_logp, torch.sign(advantages), mask)
        self._log_signals(mode, rewards, batch_advantages, output["advantages"], magnitude, teacher_entropy, mask, settings)
        return output

    @torch.no_grad()
    def teacher_scores(self, teacher_prompts: list, completion: torch.Tensor, mask: torch.Tensor):
        """log p_T and H_T (B, T) of each completion token after the teacher's own prompt; 0 off the mask."""
        ids = [torch.tensor(self.processing_class.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                                      return_dict=False, **self.chat_template_kwargs))
               for p in teacher_prompts]
        prompt_ids = pad(ids, padding_value=self.processing_class.pad_token_id, padding_side="left").to(completion.device)
        prompt_mask = pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="left").to(completion.device)
        if self.teacher is not None:
            model, weights = self.teacher, contextlib.nullcontext()
        else:  # a PEFT policy with the teacher's copy of its adapter, or (None) with its adapters off
            model, weights = self.model, use_adapter(self.accelerator.unwrap_model(self.model), self.teacher_adapter)
        with weights:
            logp, entropy, _ = self._get_per_token_logps_and_entropies(
                model, torch.cat([prompt_ids, completion], dim=1), torch.cat([prompt_mask, mask.long()], dim=1),
                completion.size(1), batch_size=self.args.per_device_train_batch_size, compute_entropy=True)
        return logp.masked_fill(~mask, 0.0), entropy.masked_fill(~mask, 0.0)

    @torch.no_grad()
    def policy_logps(self, output: dict) -> torch.Tensor:
        """log p of each completion token under the policy that sampled it (before this batch's updates)."""
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logp, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, attention, output["completion_ids"].size(1),
                                                             batch_size=self.args.per_device_train_batch_size)
        return logp.masked_fill(~output["completion_mask"].bool(), 0.0)

    def gate_settings(self, teacher_entropy, mask) -> egrsd.GateSettings:
        """The method's settings for this batch (egrsd.GateSettings of the flags, γ = 0 for rlsd). The entropy
        normaliser is that of the global batch: its maximum over every process, passed as the normaliser's
        floor (egrsd then divides by exactly it); with `gate_group`, each process's groups of rows."""
        a = self.args
        settings = egrsd.GateSettings.from_flags(a)
        if a.method == "rlsd":
            settings = dataclasses.replace(settings, gamma=0.0)
        if settings.group is None:
            source = teacher_entropy if a.denominator == "raw" else egrsd.lookahead_min(teacher_entropy, mask, self.window)
            settings = dataclasses.replace(settings, min_denominator=self._global_max(source, mask))
        return settings

    def _global_max(self, source, mask) -> float:
        """The largest value of `source` on the mask over every process, floored at `min_denominator`."""
        local_max = source.masked_fill(~mask, 0.0).amax() if mask.numel() else source.new_zeros(())
        return max(self.args.min_denominator, gather(local_max[None]).max().item())

    @property
    def window(self) -> int:
        """W of the gate: the lookahead for cl-egrsd, 0 for egrsd and rlsd."""
        return self.args.window if self.args.method == "cl-egrsd" else 0

    def token_advantages(self, advantages, teacher_logp, student_logp, teacher_entropy, mask, settings=None) -> torch.Tensor:
        """Â = A · w · ω from egrsd.token_advantages, with the gate of the global batch (`gate_settings`)."""
        settings = settings or self.gate_settings(teacher_entropy, mask)
        return settings.token_advantages(advantages, teacher_logp, student_logp, teacher_entropy, mask, window=self.window)

    def _log_signals(self, mode, rewards, batch_advantages, token_adv, magnitude, teacher_entropy, mask, settings) -> None:
        """What was trained, over every process: the signals train_min.py logs (gate mean and min, magnitude,
        teacher entropy, regime shares), Â's mean, min and max; in the completions table, A_i as the
        advantage and each completion's mean Â and gate. GRPO's group diagnostics are dropped: there is no
        group baseline here."""
        regime_settings = settings  # the regimes normalise by the largest raw entropy (Eq. 5), as train_min.py's do
        if settings.group is None and settings.denominator == "filtered":  # the gate's is the largest filtered one
            regime_settings = dataclasses.replace(settings, min_denominator=self._global_max(teacher_entropy, mask))
        gate, regimes = settings.gate(teacher_entropy, mask, window=self.window), regime_settings.regimes(teacher_entropy, mask)
        sums = [gate[mask].sum(), magnitude[mask].sum(), teacher_entropy[mask].sum(), token_adv[mask].sum(),
                *((regimes == c).sum() for c in range(1, 5)), mask.sum()]
        totals = gather(torch.stack([s.float() for s in sums])[None]).sum(dim=0).tolist()
        count = max(totals[-1], 1.0)
        metrics = self._metrics[mode]
        metrics["egrsd/length_shaped_reward"].append(rewards.mean().item())
        metrics["egrsd/gate_mean"].append(totals[0] / count)
        metrics["egrsd/gate_min"].append(self._global_extreme(gate, mask, "min"))
        metrics["egrsd/magnitude_mean"].append(totals[1] / count)
        metrics["egrsd/teacher_entropy_mean"].append(totals[2] / count)
        metrics["egrsd/token_advantage_mean"].append(totals[3] / count)
        metrics["egrsd/token_advantage_min"].append(self._global_extreme(token_adv, mask, "min"))
        metrics["egrsd/token_advantage_max"].append(self._global_extreme(token_adv, mask, "max"))
        for name, total in zip(egrsd.REGIMES, totals[4:8]):
            metrics[f"egrsd/share_{name}"].append(total / count)
        for name in ("reward_std", "frac_reward_zero_std"):
            metrics.pop(name, None)
        # GRPO has just appended its (unused) group advantages of this batch to the table: replace them
        table = self._logs["advantages"]
        for _ in range(min(len(batch_advantages), len(table))):  # (it keeps the last generation_batch_size only)
            table.pop()
        table.extend(batch_advantages.tolist())
        tokens = mask.sum(dim=1).clamp(min=1)
        for column, values in (("token_advantage_mean", token_adv), ("gate_mean", gate)):
            self._logs["extra"][column].extend(gather((values * mask).sum(dim=1) / tokens).tolist())

    def _global_extreme(self, values, mask, which: str) -> float:
        """The min or max of `values` on the mask, over every process."""
        fill, reduce = (float("inf"), torch.amin) if which == "min" else (float("-inf"), torch.amax)
        local = reduce(values.masked_fill(~mask, fill)) if mask.numel() else values.new_tensor(fill)
        return reduce(gather(local[None].float())).item()

    # ------------------------------------------------------------------------------------------------
    # The loss, and the running advantage in checkpoints

    def _compute_loss(self, model, inputs):
        """egrsd.policy_loss (−Σ m·Â·log p / Σ m), rescaled from this micro-batch's tokens to TRL's "dapo"
        normaliser: the tokens of the generation batch over all processes, per accumulation window. With vLLM,
        Â times TRL's importance-sampling ratio, the correction GRPO applies to its per-token loss: the
        rollouts come from vLLM's copy of the policy, whose log-probs differ from the trainer's."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logp, entropy, _ = self._get_per_token_logps_and_entropies(model, ids, attention, inputs["completion_ids"].size(1),
                                                                   compute_entropy=True)
        mask = inputs["completion_mask"].bool()
        token_adv = inputs["advantages"]
        if "importance_sampling_ratio" in inputs:  # (B, T) or (B, 1), present exactly when TRL corrects for vLLM
            token_adv = token_adv * inputs["importance_sampling_ratio"]
        loss = egrsd.policy_loss(logp, token_adv, mask)
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["egrsd/policy_loss"].append(self.accelerator.gather(loss.detach()).mean().item())
        totals = self.accelerator.reduce(torch.stack([entropy.detach()[mask].sum(), mask.sum().float()]), reduction="sum")
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())  # as GRPO logs it
        return loss * mask.sum() / normalizer

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.running_advantage.state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, STATE_FILE)):
            with open(os.path.join(checkpoint, STATE_FILE)) as f:
                self.running_advantage.load_state_dict(json.load(f))


# ----------------------------------------------------------------------------------------------------
# Data and reward for problems (trainer/tasks.py): any dataset with a conversational `prompt`, the teacher's
# prompt and the reward functions' columns will do. The teacher's column holds its whole prompt, not only
# the privileged text (TRL's self-distillation trainers' `privileged_context`): the paper's teacher reads
# the reference solution between the question and the instruction.


def dataset_from_problems(problems):
    """A datasets.Dataset of {prompt, teacher_prompt, answer} rows: the student's and the teacher's chats."""
    from datasets import Dataset

    from trainer.tasks import student_messages, teacher_messages

    return Dataset.from_list([{"prompt": student_messages(p), "teacher_prompt": teacher_messages(p), "answer": p.answer}
                              for p in problems])


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion's answer is right (trainer/tasks.py's verifier), else 0.0."""
    from trainer.tasks import is_correct

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(is_correct(text, reference)) for text, reference in zip(texts, answer)]


@dataclass
class DataArguments(ScriptArguments):
    """TRL's dataset flags (--dataset_name, --dataset_config, --dataset_train_split, --dataset_test_split) and
    the columns that make a problem, or train_min.py's JSONL files; neither: the built-in problems."""

    data: str = field(default="", metadata={"help": "JSONL problems (train_min.py's formats), instead of --dataset_name"})
    eval_data: str = field(default="", metadata={"help": "JSONL held-out problems, evaluated with --eval_strategy"})
    problem_column: str = field(default="problem", metadata={"help": "--dataset_name's column of the question"})
    solution_column: str = field(default="solution", metadata={"help": "its column of the worked reference solution "
                                                               "(the teacher's privileged context)"})
    answer_column: str = field(default="answer", metadata={"help": "its column of the final answer; empty: GSM8K's, "
                                                           "after '#### ' at the end of the solution"})


@dataclass
class EGRSDModelConfig(ModelConfig):
    """TRL's model flags; LoRA dropout defaults to 0 here (and another value is refused: w needs
    deterministic log-probs)."""

    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout: must be 0 (w compares two log-prob passes)"})


def problems_from_dataset(data: DataArguments, split: str, flag: str) -> list:
    """The problems of one split of --dataset_name (a hub name or a local folder `datasets.load_dataset`
    reads), through the same row checks as train_min.py's JSONL files."""
    from datasets import load_dataset

    from trainer.tasks import _parse_row

    splits = load_dataset(data.dataset_name, name=data.dataset_config)
    if split not in splits:
        raise ValueError(f"--{flag}: expected a split of {data.dataset_name!r}, one of {list(splits)}, got {split!r}")
    rows = splits[split]
    for column in ("problem_column", "solution_column") + (("answer_column",) if data.answer_column else ()):
        if getattr(data, column) not in rows.column_names:
            raise ValueError(f"--{column}: expected a column of {data.dataset_name!r} [{split}], one of "
                             f"{rows.column_names}, got {getattr(data, column)!r}")
    if data.answer_column:
        mapped = ({"problem": r[data.problem_column], "solution": r[data.solution_column], "answer": str(r[data.answer_column])}
                  for r in rows)
    else:
        mapped = ({"question": r[data.problem_column], "answer": r[data.solution_column]} for r in rows)
    return [_parse_row(row, f"{data.dataset_name} [{split}] row {i}: ", numeric=True) for i, row in enumerate(mapped)]


def load_datasets(data: DataArguments, evaluate: bool):
    """The training dataset and, when `evaluate`, the held-out one, from --dataset_name, the JSONL files or
    the built-in problems."""
    from trainer.tasks import built_in_problems, load_problems

    rules = [("data", not (data.dataset_name and data.data), "either --dataset_name or --data, not both"),
             ("eval_data", not (data.dataset_name and data.eval_data), "empty with --dataset_name (its --dataset_test_split is evaluated)"),
             ("eval_data", evaluate or not data.eval_data, "empty with --eval_strategy no (it would not be evaluated)"),
             ("eval_data", not (evaluate and data.data and not data.eval_data), "a JSONL file of held-out problems with --data and an --eval_strategy"),
             ("dataset_streaming", not data.dataset_streaming, "false: the problems are read whole, to build both prompts")]
    for name, ok, allowed in rules:
        if not ok:
            raise ValueError(f"--{name}: expected {allowed}, got {getattr(data, name)!r}")
    if data.dataset_name:
        train = problems_from_dataset(data, data.dataset_train_split, "dataset_train_split")
        held_out = problems_from_dataset(data, data.dataset_test_split, "dataset_test_split") if evaluate else None
    else:
        train = load_problems(data.data) if data.data else built_in_problems(2000, 0)[0]
        held_out = (load_problems(data.eval_data) if data.eval_data else built_in_problems(1, 200)[1]) if evaluate else None
    return dataset_from_problems(train), None if held_out is None else dataset_from_problems(held_out)


def parse(argv=None) -> tuple[DataArguments, EGRSDConfig, EGRSDModelConfig]:
    """The command line `argv` (None: sys.argv), and a --config YAML file, as TRL's scripts read them."""
    from trl import TrlParser

    return TrlParser((DataArguments, EGRSDConfig, EGRSDModelConfig)).parse_args_and_config(argv)


def build_trainer(data: DataArguments, args: EGRSDConfig, model_args: EGRSDModelConfig) -> EGRSDTrainer:
    """The trainer of a command line, every flag given to it as TRL's GRPO script (trl/scripts/grpo.py) gives it."""
    from trl import get_peft_config, get_quantization_config

    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path: expected a hub name or a local model directory, got None")
    # the model flags reach the policy and the teacher through model_init_kwargs, as in TRL's script
    args.model_init_kwargs = {**dict(revision=model_args.model_revision, trust_remote_code=args.trust_remote_code,
                                     attn_implementation=model_args.attn_implementation, dtype=model_args.dtype),
                              **(args.model_init_kwargs or {})}
    train, held_out = load_datasets(data, evaluate=args.eval_strategy != "no")
    return EGRSDTrainer(model=model_args.model_name_or_path, reward_funcs=correctness_reward, args=args,
                        train_dataset=train, eval_dataset=held_out, quantization_config=get_quantization_config(model_args),
                        peft_config=get_peft_config(model_args))


def main(argv=None) -> None:
    """accelerate launch integrations/trl_egrsd.py --model_name_or_path ... (README: "Scaling out with TRL");
    trains, saves and pushes as TRL's GRPO script does."""
    data, args, model_args = parse(argv)
    trainer = build_trainer(data, args, model_args)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=data.dataset_name)
    trainer.end()  # the trackers finished and the process group destroyed, after everything that needs them


if __name__ == "__main__":
    main()
