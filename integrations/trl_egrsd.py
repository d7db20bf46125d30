"""EGRSD, CL-EGRSD and RLSD inside TRL, for runs that outgrow one GPU: multi-GPU and multi-node through
accelerate (DDP, DeepSpeed ZeRO, FSDP), vLLM rollouts, LoRA, and TRL's logging and checkpoints. Every weight
comes from egrsd.py; this file only connects it. Needs the `trl` extra (requirements-extras.txt).

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
   processes share the batch). The frozen teacher scores each completion with the privileged prompt of the
   dataset column `teacher_prompt_column`; the policy that sampled scores it too; and
   Â = `egrsd.token_advantages` replaces GRPO's advantages. The entropy normaliser (Eq. 5) is the maximum
   over the global batch (gathered from every process), unless `gate_group` asks for groups of rows.
3. `_compute_loss` is `egrsd.policy_loss`, scaled to TRL's "dapo" normalisation.
4. The running advantage's state is saved in TRL's checkpoints (`egrsd_state.json`) and restored on resume.

One rollout per prompt, as in the paper, cannot be had: GRPOConfig requires `num_generations` ≥ 2 for its
group baseline. With `num_generations=2` (the default here) the two rollouts of a prompt are simply two
samples: the running advantage replaces the group baseline, which is never used.

The teacher is the initial weights, frozen: with PEFT the base model with the adapter switched off (no
second copy); otherwise a copy loaded and prepared like TRL's reference model. Log-probabilities and
entropies come from TRL's fused, chunked LM head (never a tokens × vocabulary tensor, and run inside the
wrapped model, so that DeepSpeed ZeRO-3 and FSDP work), at the sampling temperature: the same
log-softmax and entropy as `egrsd.linear_token_logprobs` / `linear_token_entropy` (tested equal), and the
same `score_temperature` as train_min.py (0: follow `temperature`; TRL scores at `temperature` only).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather, is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model, pad, use_adapter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import egrsd  # noqa: E402

STATE_FILE = "egrsd_state.json"


@dataclass
class EGRSDConfig(GRPOConfig):
    """GRPOConfig and the method's settings; their meaning is that of train_min.py's flags of the same name."""

    method: str = field(default="egrsd", metadata={"help": "egrsd, cl-egrsd or rlsd (EGRSD with γ = 0)"})
    gamma: float = field(default=0.3, metadata={"help": "γ, strength of the entropy gate"})
    window: int = field(default=3, metadata={"help": "W, the causal lookahead of cl-egrsd"})
    magnitude_eps: float = field(default=0.2, metadata={"help": "ε, clip range of the likelihood-ratio magnitude"})
    gate_floor: float = field(default=0.1, metadata={"help": "lower bound of the gate"})
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

    def __post_init__(self):
        super().__post_init__()
        rules = [("method", self.method in ("egrsd", "cl-egrsd", "rlsd"), "egrsd, cl-egrsd or rlsd"),
                 ("gamma", self.gamma >= 0, "≥ 0"), ("window", self.window >= 0, "≥ 0"),
                 ("magnitude_eps", 0 < self.magnitude_eps < 1, "in (0, 1)"), ("gate_floor", 0 <= self.gate_floor <= 1, "in [0, 1]"),
                 ("min_denominator", self.min_denominator > 0, "> 0"), ("denominator", self.denominator in ("raw", "filtered"), "raw or filtered"),
                 ("gate_group", self.gate_group >= 0, "≥ 0"), ("beta_length", self.beta_length >= 0, "≥ 0"),
                 ("advantage_warmup", self.advantage_warmup >= 0, "≥ 0"),
                 ("score_temperature", self.score_temperature in (0, self.temperature), f"0 or temperature ({self.temperature})"),
                 ("beta", self.beta == 0, "0 (EGRSD has no KL term)"), ("num_iterations", self.num_iterations == 1, "1 (on-policy)")]
        for name, ok, allowed in rules:
            if not ok:
                raise ValueError(f"{name}: expected {allowed}, got {getattr(self, name)!r}")


class EGRSDTrainer(GRPOTrainer):
    """GRPOTrainer whose token advantages are EGRSD's Â = A · w · ω (module docstring)."""

    _tag_names = ["trl", "egrsd"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running_advantage = egrsd.RunningAdvantage(warmup_steps=self.args.advantage_warmup)
        self.teacher = None if is_peft_model(self.accelerator.unwrap_model(self.model)) else self._frozen_copy()

    def _frozen_copy(self):
        """The initial weights, frozen, prepared for DeepSpeed or FSDP as TRL prepares its reference model."""
        policy = self.accelerator.unwrap_model(self.model)
        name = policy.config._name_or_path
        if name and (os.path.isdir(name) or "/" in name):  # loadable: load it as TRL loads its reference model
            teacher = create_model_from_path(name, dtype=policy.dtype, attn_implementation=policy.config._attn_implementation)
        else:  # a model built in code: copy it, before any step
            teacher = copy.deepcopy(policy)
        teacher.requires_grad_(False)
        disable_dropout_in_model(teacher)
        add_fused_lm_head(teacher, temperature=self.temperature, outputs=("log_probs", "entropy"))
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ------------------------------------------------------------------------------------------------
    # Rewards, advantages and the per-token weights

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._batch_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._batch_rewards  # (all processes' rollouts, reward functions)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
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
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        advantages = running(rewards)[local].to(completion.device)
        # the teacher (with the reference solution) and the policy that sampled score every completion token
        teacher_logp, teacher_entropy = self.teacher_scores([x[self.args.teacher_prompt_column] for x in inputs], completion, mask)
        student_logp = self.policy_logps(output)
        settings = self.gate_settings(teacher_entropy, mask)  # one gather of the normaliser for both
        output["advantages"] = self.token_advantages(advantages, teacher_logp, student_logp, teacher_entropy, mask, settings)
        magnitude = egrsd.ratio_magnitude(teacher_logp, student_logp, torch.sign(advantages), mask, eps=self.args.magnitude_eps)
        self._log_signals(mode, rewards, magnitude, teacher_entropy, mask, settings)
        return output

    @torch.no_grad()
    def teacher_scores(self, teacher_prompts: list, completion: torch.Tensor, mask: torch.Tensor):
        """log p_T and H_T (B, T) of each completion token after the teacher's own prompt; 0 off the mask."""
        ids = [torch.tensor(self.processing_class.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                                      return_dict=False, **self.chat_template_kwargs))
               for p in teacher_prompts]
        prompt_ids = pad(ids, padding_value=self.processing_class.pad_token_id, padding_side="left").to(completion.device)
        prompt_mask = pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="left").to(completion.device)
        model = self.model if self.teacher is None else self.teacher
        adapter_off = use_adapter(self.accelerator.unwrap_model(model), None) if self.teacher is None else contextlib.nullcontext()
        with adapter_off:
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

    def gate_settings(self, teacher_entropy, mask) -> dict:
        """The keyword settings of egrsd.entropy_gate for this batch. The entropy normaliser is that of the
        global batch: its maximum over every process, passed as the normaliser's floor (egrsd then divides
        by exactly it); with `gate_group`, each process's groups of rows."""
        a = self.args
        settings = dict(gamma=0.0 if a.method == "rlsd" else a.gamma, floor=a.gate_floor, min_denominator=a.min_denominator,
                        denominator=a.denominator, group=a.gate_group or None)
        if settings["group"] is None:
            source = teacher_entropy if a.denominator == "raw" else egrsd.lookahead_min(teacher_entropy, mask, self.window)
            local_max = source.masked_fill(~mask, 0.0).amax() if mask.numel() else source.new_zeros(())
            settings["min_denominator"] = max(a.min_denominator, gather(local_max[None]).max().item())
        return settings

    @property
    def window(self) -> int:
        """W of the gate: the lookahead for cl-egrsd, 0 for egrsd and rlsd."""
        return self.args.window if self.args.method == "cl-egrsd" else 0

    def token_advantages(self, advantages, teacher_logp, student_logp, teacher_entropy, mask, settings=None) -> torch.Tensor:
        """Â = A · w · ω from egrsd.token_advantages, with the gate of the global batch (`gate_settings`)."""
        settings = settings or self.gate_settings(teacher_entropy, mask)
        return egrsd.token_advantages(advantages, teacher_logp, student_logp, teacher_entropy, mask, self.window,
                                      eps=self.args.magnitude_eps, **settings)

    def _log_signals(self, mode, rewards, magnitude, teacher_entropy, mask, settings) -> None:
        """The signals train_min.py logs: gate (mean, min), magnitude, teacher entropy and the regime shares,
        over every process."""
        a = self.args
        gate = egrsd.entropy_gate(teacher_entropy, mask, self.window, **settings)
        regimes = egrsd.token_regimes(teacher_entropy, mask, a.window, min_denominator=settings["min_denominator"],
                                      group=settings["group"])
        sums = [gate[mask].sum(), magnitude[mask].sum(), teacher_entropy[mask].sum(),
                *((regimes == c).sum() for c in range(1, 5)), mask.sum()]
        totals = gather(torch.stack([s.float() for s in sums])[None]).sum(dim=0).tolist()
        lowest = gather(gate.masked_fill(~mask, 1.0).amin()[None].float() if mask.numel() else torch.ones(1)).min().item()
        count = max(totals[-1], 1.0)
        self._metrics[mode]["egrsd/length_shaped_reward"].append(rewards.mean().item())
        self._metrics[mode]["egrsd/gate_mean"].append(totals[0] / count)
        self._metrics[mode]["egrsd/gate_min"].append(lowest)
        self._metrics[mode]["egrsd/magnitude_mean"].append(totals[1] / count)
        self._metrics[mode]["egrsd/teacher_entropy_mean"].append(totals[2] / count)
        for name, total in zip(egrsd.REGIMES, totals[3:7]):
            self._metrics[mode][f"egrsd/share_{name}"].append(total / count)

    # ------------------------------------------------------------------------------------------------
    # The loss, and the running advantage in checkpoints

    def _compute_loss(self, model, inputs):
        """egrsd.policy_loss (−Σ m·Â·log p / Σ m), rescaled from this micro-batch's tokens to TRL's "dapo"
        normaliser: the tokens of the generation batch over all processes, per accumulation window."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logp, _, _ = self._get_per_token_logps_and_entropies(model, ids, attention, inputs["completion_ids"].size(1))
        mask = inputs["completion_mask"].bool()
        loss = egrsd.policy_loss(logp, inputs["advantages"], mask)
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["egrsd/policy_loss"].append(self.accelerator.gather(loss.detach()).mean().item())
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
# Data and reward for the built-in problems (trainer/tasks.py): any dataset with a conversational `prompt`,
# a `teacher_prompt` and the reward functions' columns will do.


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
class DataArguments:
    data: str = field(default="", metadata={"help": "JSONL problems (train_min.py's formats); empty: the built-in ones"})


def main() -> None:
    """accelerate launch integrations/trl_egrsd.py --model_name_or_path ... (README: "Scaling out with TRL")."""
    from trl import ModelConfig, TrlParser, get_peft_config

    from trainer.tasks import built_in_problems, load_problems

    args, model_args, data_args = TrlParser((EGRSDConfig, ModelConfig, DataArguments)).parse_args_and_config()
    problems = load_problems(data_args.data) if data_args.data else built_in_problems(2000, 0)[0]
    trainer = EGRSDTrainer(model=model_args.model_name_or_path, reward_funcs=correctness_reward, args=args,
                           train_dataset=dataset_from_problems(problems), peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
