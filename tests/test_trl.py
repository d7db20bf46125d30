"""integrations/trl_egrsd.py: EGRSD inside TRL's GRPOTrainer computes the trainer's token advantages and loss,
keeps its running advantage in checkpoints, and gives the same first-step token advantages with 1 and with 2
processes (torchrun, gloo, on CPU: accelerate 1.15's `launch --cpu` starts a single process)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the optional extra trl is not installed")

import egrsd  # noqa: E402
import train_min  # noqa: E402
from trainer.offline_models import build_tiny_model  # noqa: E402
from trainer.tasks import teacher_messages  # noqa: E402
from trl_run import fixed_rollouts, problems, tiny_trainer, tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("method", ["egrsd", "cl-egrsd", "rlsd"])
def test_token_advantages_and_loss_in_trl_are_the_trainers(method, tmp_path):
    """The same 4 rollouts through TRL and through train_min.score / weight_tokens / egrsd.policy_loss, with a
    float64 model. TRL's fused LM head computes log-probs and entropies in float32 whatever the model's dtype
    (6.5e-7 apart from the float64 ones here), so the two agree to float32 rounding, not to float64's."""
    trainer = tiny_trainer(tmp_path, dtype=torch.float64, method=method, gate_group=2 if method == "egrsd" else 0)
    rows = [row for row in trainer.train_dataset.select(range(2)) for _ in range(2)]  # 2 prompts × 2 rollouts
    trainer.model.train()
    output = trainer._generate_and_score_completions(rows)
    cfg = train_min.Config(method=method, temperature=1.1, micro_batch_size=4, chunk_size=5, max_new_tokens=32,
                           gate_group=2 if method == "egrsd" else 0)
    completion, mask = output["completion_ids"], output["completion_mask"].bool()
    teacher_ids, teacher_mask = train_min.encode_prompts(tokenizer, [teacher_messages(problems[i // 2]) for i in range(4)], "cpu")
    finished = torch.ones(4, dtype=torch.bool)
    batch = train_min.Rollouts(output["prompt_ids"], output["prompt_mask"], teacher_ids, teacher_mask, completion, mask, finished)
    model = trainer.accelerator.unwrap_model(trainer.model)
    scores = train_min.score(model, trainer.teacher, batch, cfg)
    correct = train_min.verify(tokenizer, completion, mask, finished, [problems[i // 2] for i in range(4)], cfg)
    advantages = egrsd.RunningAdvantage()(egrsd.length_shaped_reward(correct, mask.sum(1), 32))
    expected = train_min.weight_tokens(advantages, scores, mask, cfg).advantage
    torch.testing.assert_close(output["advantages"].double(), expected.double(), rtol=1e-5, atol=1e-6)
    model.train()
    hidden = train_min.completion_hidden(model, output["prompt_ids"], output["prompt_mask"], completion, mask)[mask] / 1.1
    logp = train_min.to_grid(mask, egrsd.linear_token_logprobs(hidden, train_min.lm_head(model), completion[mask]))
    trainer.current_gradient_accumulation_steps = 1  # as TRL's training loop sets it
    loss = trainer._compute_loss(trainer.model, output)
    torch.testing.assert_close(loss.double(), egrsd.policy_loss(logp, expected, mask).double(), rtol=1e-5, atol=1e-6)


def test_the_running_advantage_is_saved_with_trls_checkpoints_and_restored(tmp_path):
    straight = tiny_trainer(tmp_path / "straight", max_steps=3)
    straight.train()
    first = tiny_trainer(tmp_path / "resumed", max_steps=3, save_strategy="steps", save_steps=2)
    first.train()
    saved = json.loads((tmp_path / "resumed" / "checkpoint-2" / "egrsd_state.json").read_text())
    assert saved["steps"] == 2 and saved["count"] == 8
    resumed = tiny_trainer(tmp_path / "resumed", max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert resumed.running_advantage.state_dict() == straight.running_advantage.state_dict()


def run(out: Path, processes: int):
    command = [sys.executable, str(ROOT / "tests" / "trl_run.py"), str(out)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *command[1:]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(processes)]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    (one,), two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    for step in range(2):
        expected = [a[m] for a, m in zip(one["advantages"][step], one["masks"][step])]
        got = [a[m] for rank in two for a, m in zip(rank["advantages"][step], rank["masks"][step])]
        assert len(got) == len(expected) == 4
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        assert any((e != 0).any() for e in expected), "a batch that checks something"
    for rank in two:
        assert all(torch.isfinite(torch.tensor(rank["losses"]))) and any(loss != 0 for loss in rank["losses"])
    # the mean over ranks is the loss of the whole batch (DDP averages the gradients over the processes)
    torch.testing.assert_close(torch.tensor([sum(r["losses"][0] for r in two) / 2]), torch.tensor([one["losses"][0]]))
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final") is not None


def test_with_lora_the_teacher_is_the_base_model_with_the_adapter_off(tmp_path):
    peft = pytest.importorskip("peft", reason="the optional extra peft is not installed")
    trainer = tiny_trainer(tmp_path, max_steps=1, learning_rate=1e-1, method="egrsd",
                           peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.teacher is None, "no second copy of the weights"
    trainer.train()  # the adapter moves (a large learning rate), the teacher must not
    rows = [row for row in trainer.train_dataset.select(range(2)) for _ in range(2)]
    completion = fixed_rollouts([row["prompt"] for row in rows], trainer)["completion_ids"]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(c) for c in completion], batch_first=True,
                                          padding_value=tokenizer.pad_token_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(c), dtype=torch.bool) for c in completion], batch_first=True)
    logp, entropy = trainer.teacher_scores([row["teacher_prompt"] for row in rows], ids, mask)
    initial = build_tiny_model(tokenizer)
    teacher_ids, teacher_mask = train_min.encode_prompts(tokenizer, [row["teacher_prompt"] for row in rows], "cpu")
    cfg = train_min.Config(temperature=1.1, micro_batch_size=4, chunk_size=5)
    batch = train_min.Rollouts(teacher_ids, teacher_mask, teacher_ids, teacher_mask, ids, mask, mask.any(1))
    expected = train_min.score(initial, initial, batch, cfg)
    torch.testing.assert_close(logp, expected.teacher_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected.teacher_entropy, rtol=1e-5, atol=1e-5)
    policy = trainer.policy_logps({"prompt_ids": teacher_ids, "prompt_mask": teacher_mask, "completion_ids": ids,
                                   "completion_mask": mask.long()})
    assert not torch.allclose(policy, expected.student_logp, atol=1e-3), "the adapter is on for the policy"


def test_the_command_line_trains_with_lora_and_saves_the_adapter(tmp_path):
    pytest.importorskip("peft", reason="the optional extra peft is not installed")
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    done = subprocess.run([sys.executable, "integrations/trl_egrsd.py", "--model_name_or_path", str(tmp_path / "model"),
                           "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "4",
                           "--max_completion_length", "8", "--use_cpu", "--bf16", "false", "--report_to", "none",
                           "--method", "cl-egrsd", "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
