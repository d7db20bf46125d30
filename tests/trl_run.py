"""A short EGRSD run inside TRL on the tiny model, for tests/test_trl.py; run by one process or by several:

    python tests/trl_run.py OUT_DIR [--method cl-egrsd]
    python -m torch.distributed.run --nproc_per_node 2 tests/trl_run.py OUT_DIR   # (accelerate's --cpu starts one)

Completions are fixed (a rollout_func), so runs with 1 and 2 processes see the same batch of 4 rollouts per
step (2 problems × 2, one right and one wrong) and must give the same token advantages, also at the second
step, whose advantages come from the running statistics of the first step's rewards of every process. Each process writes what the test checks:
OUT_DIR/rank{r}.pt (its rows' token advantages and masks at each step, its losses), and rank 0 saves the model.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from integrations.trl_egrsd import EGRSDConfig, EGRSDTrainer, correctness_reward, dataset_from_problems  # noqa: E402
from trainer.offline_models import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from trainer.tasks import built_in_problems, student_messages  # noqa: E402

GLOBAL_BATCH = 4  # rollouts per step over all processes

tokenizer = build_tiny_tokenizer()


def fixed_rollouts(prompts, trainer):
    """A completion per prompt that depends on the prompt alone: right for every other problem, wrong for
    the rest, of different lengths."""
    prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts]
    completions = []
    for prompt in prompts:
        index = INDEX[prompt[-1]["content"]]
        text = f"So the answer is \\boxed{{{problems[index].answer}}}." if index % 2 == 0 else "I think it is 3."
        completions.append(tokenizer.encode(" ok" * (index % 3) + text, add_special_tokens=False) + [tokenizer.eos_token_id])
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}


class Recording(EGRSDTrainer):
    """Keeps each step's token advantages and masks, and the losses, of this process."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record = {"advantages": [], "masks": [], "losses": []}

    def token_advantages(self, advantages, teacher_logp, student_logp, teacher_entropy, mask, settings=None):
        token_adv = super().token_advantages(advantages, teacher_logp, student_logp, teacher_entropy, mask, settings)
        self.record["advantages"].append(token_adv.cpu())
        self.record["masks"].append(mask.cpu())
        return token_adv

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.record["losses"].append(loss.item())
        return loss


def tiny_trainer(out, cls=EGRSDTrainer, dtype=torch.float32, peft_config=None, model=None, train_dataset=None,
                 **settings) -> EGRSDTrainer:
    """A trainer of these runs on the tiny model (or `model`) and the problems (or `train_dataset`) with the fixed
    rollouts; `settings` override the config."""
    args = EGRSDConfig(**{**dict(output_dir=str(out), per_device_train_batch_size=GLOBAL_BATCH, num_generations=2,
                                 max_completion_length=32, max_steps=2, learning_rate=1e-3, use_cpu=True, bf16=False,
                                 report_to=[], save_strategy="no", temperature=1.1, seed=0, shuffle_dataset=False,
                                 method="cl-egrsd"), **settings})
    return cls(model=build_tiny_model(tokenizer, dtype=dtype) if model is None else model, reward_funcs=correctness_reward,
               args=args, train_dataset=dataset_from_problems(problems) if train_dataset is None else train_dataset,
               processing_class=tokenizer, rollout_func=fixed_rollouts, peft_config=peft_config)


problems = built_in_problems(8, 0)[0]
INDEX = {student_messages(p)[-1]["content"]: i for i, p in enumerate(problems)}


def recorded_run(out: str, processes: int = 1, method: str = "cl-egrsd", steps: int = 2) -> dict:
    """Trains as one of `processes` processes; writes OUT/rank{r}.pt (rank 0 also saves the model) and returns it."""
    trainer = tiny_trainer(out, Recording, per_device_train_batch_size=GLOBAL_BATCH // processes, max_steps=steps,
                           method=method, logging_steps=1, advantage_warmup=1)  # step 2 uses the running statistics
    trainer.train()
    torch.save(trainer.record, os.path.join(out, f"rank{trainer.accelerator.process_index}.pt"))
    trainer.save_model(os.path.join(out, "final"))
    return trainer.record


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--method", default="cl-egrsd")
    parser.add_argument("--steps", type=int, default=2)
    cli = parser.parse_args()
    recorded_run(cli.out, int(os.environ.get("WORLD_SIZE", "1")), cli.method, cli.steps)
