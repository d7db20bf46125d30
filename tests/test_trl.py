"""integrations/trl_egrsd.py: EGRSD inside TRL's GRPOTrainer computes the trainer's token advantages and loss
and logs them, keeps its running advantage in checkpoints, gives the same token advantages with 1 and with 2
processes (torchrun, gloo, on CPU: accelerate 1.15's and 1.16's `launch --cpu` start a single process), applies TRL's
vLLM importance sampling, honours TRL's model and dataset flags, scores with a teacher that is the policy's
starting weights however the model is given (a name, an object changed after loading, a PEFT model whose adapter
starts non-zero), refuses what it would ignore or cannot run before any weights load, and runs the README's
command."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="the optional extra trl is not installed")

import egrsd  # noqa: E402
import train_min  # noqa: E402
from integrations import trl_egrsd  # noqa: E402
from trainer.offline_models import build_tiny_model  # noqa: E402
from trainer.tasks import student_messages, teacher_messages  # noqa: E402
from trl_run import fixed_rollouts, problems, recorded_run, tiny_trainer, tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model and its tokenizer saved as a hub model is: what the command line loads."""
    path = tmp_path_factory.mktemp("model")
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
    correct = train_min.verify(train_min.completion_texts(tokenizer, completion, mask), finished, [problems[i // 2] for i in range(4)], cfg)
    advantages = egrsd.RunningAdvantage()(egrsd.length_shaped_reward(correct, mask.sum(1), 32))
    weights = train_min.weight_tokens(advantages, scores, mask, cfg)
    expected = weights.advantage
    torch.testing.assert_close(output["advantages"].double(), expected.double(), rtol=1e-5, atol=1e-6)
    # the logs show what was trained: A_i in the completions table, Â summarised, no GRPO group diagnostics
    logged = trainer._metrics["train"]
    assert list(trainer._logs["advantages"]) == pytest.approx(advantages.tolist()) and advantages.abs().min() > 0.3
    per_row = ((expected * mask).sum(1) / mask.sum(1)).tolist()
    assert list(trainer._logs["extra"]["token_advantage_mean"]) == pytest.approx(per_row, rel=1e-5, abs=1e-6)
    assert logged["egrsd/token_advantage_mean"] == pytest.approx([expected[mask].mean().item()], rel=1e-5, abs=1e-6)
    assert logged["egrsd/token_advantage_min"] == pytest.approx([expected[mask].min().item()], rel=1e-5, abs=1e-6)
    assert logged["egrsd/token_advantage_max"] == pytest.approx([expected[mask].max().item()], rel=1e-5, abs=1e-6)
    assert "reward_std" not in logged and "frac_reward_zero_std" not in logged
    # and the signals train_min.py logs: ω's mean and min, w's mean (with A's sign), the regimes' shares
    assert logged["egrsd/gate_mean"] == pytest.approx([weights.gate[mask].mean().item()], rel=1e-5)
    assert logged["egrsd/gate_min"] == pytest.approx([weights.gate[mask].min().item()], rel=1e-5)
    assert logged["egrsd/magnitude_mean"] == pytest.approx([weights.magnitude[mask].mean().item()], rel=1e-5)
    regimes = train_min.step_gates(scores.teacher_entropy, mask, cfg).regimes[mask]
    shares = [(regimes == code).float().mean().item() for code in range(1, 5)]
    assert [logged[f"egrsd/share_{name}"][0] for name in egrsd.REGIMES] == pytest.approx(shares)
    gate_per_row = ((weights.gate * mask).sum(1) / mask.sum(1)).tolist()
    assert list(trainer._logs["extra"]["gate_mean"]) == pytest.approx(gate_per_row, rel=1e-5)
    model.train()
    hidden = train_min.completion_hidden(model, output["prompt_ids"], output["prompt_mask"], completion, mask) / 1.1
    logp = train_min.to_grid(mask, egrsd.linear_token_logprobs(hidden, train_min.lm_head(model), completion[mask]))
    trainer.current_gradient_accumulation_steps = 1  # as TRL's training loop sets it
    loss = trainer._compute_loss(trainer.model, output)
    torch.testing.assert_close(loss.double(), egrsd.policy_loss(logp, expected, mask).double(), rtol=1e-5, atol=1e-6)
    entropy = egrsd.linear_token_entropy(hidden, train_min.lm_head(model)).mean().item()
    assert logged["entropy"] == pytest.approx([entropy], rel=1e-5), "TRL's entropy of the policy, as GRPO logs it"


def test_the_logged_regimes_normalise_by_the_global_batchs_largest_raw_entropy(tmp_path, monkeypatch):
    """With the "filtered" normaliser the gate divides by the largest lookahead entropy of the global batch, but
    the regimes (as train_min.py logs them) by the largest raw one: a second process, simulated by a gather
    that adds a copy of every value doubled, makes that 8 here, where this process alone would say 4."""
    trainer = tiny_trainer(tmp_path, method="cl-egrsd", window=3, denominator="filtered", min_denominator=0.1)
    monkeypatch.setattr(trl_egrsd, "gather", lambda t: torch.cat([t, 2 * t]))
    entropy = torch.tensor([[4.0, 0.5, 0.5, 0.5], [2.5, 0.4, 0.4, 0.4]])
    mask = torch.ones_like(entropy, dtype=torch.bool)
    settings = trainer.gate_settings(entropy, mask)
    assert settings.min_denominator == 1.0  # the gate's: 2 × the largest lookahead minimum (0.5), above the floor 0.1
    ones = torch.ones(2)
    trainer._log_signals("train", ones, ones, entropy, torch.ones_like(entropy), entropy, mask, settings)
    regimes = egrsd.token_regimes(entropy, mask, 3, min_denominator=8.0)
    logged = trainer._metrics["train"]
    assert [logged[f"egrsd/share_{name}"][-1] for name in egrsd.REGIMES] == [
        (regimes == code).float().mean().item() for code in range(1, 5)]
    assert logged["egrsd/share_pivot"][-1] == 1 / 8, "2.5 / 8 is mid; over this process's 4 it would be a pivot"


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


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    """One process here, two started by torchrun."""
    one = recorded_run(str(tmp_path / "one"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "tests" / "trl_run.py"),
               str(tmp_path / "two")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
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
    assert trainer.teacher is None and trainer.teacher_adapter is None, "no second copy of the weights or the adapter"
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


@pytest.mark.parametrize("given", ["model", "peft_config"])
def test_with_an_adapter_that_starts_non_zero_the_teacher_is_the_policy_with_a_frozen_copy_of_it(given, tmp_path):
    """A PeftModel passed in with a trained adapter (an SFT LoRA continued), or a LoRA initialised non-zero (here
    init_lora_weights=False; PiSSA and OLoRA too): with the adapter off the teacher would be a model the policy never
    was. Before any step it scores as the policy; as the policy's adapter moves, the teacher's copy does not, and
    only the policy's adapter trains."""
    peft = pytest.importorskip("peft", reason="the optional extra peft is not installed")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    if given == "model":
        trainer = tiny_trainer(tmp_path, model=peft.get_peft_model(build_tiny_model(tokenizer), config))
    else:
        trainer = tiny_trainer(tmp_path, peft_config=config)
    assert trainer.teacher is None and trainer.teacher_adapter == "teacher", "a copy of the adapter, not the model"
    prompts = trainer.train_dataset["teacher_prompt"][:2]
    completion = torch.randint(3, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.bool)
    prompt_ids, prompt_mask = train_min.encode_prompts(tokenizer, prompts, "cpu")
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion, "completion_mask": mask.long()}
    before = trainer.teacher_scores(prompts, completion, mask)
    torch.testing.assert_close(before[0], trainer.policy_logps(batch), rtol=0, atol=1e-6)  # adapter off: 0.2-0.5 apart
    policy = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():  # as training moves the policy's adapter
        for name, parameter in policy.named_parameters():
            if ".default." in name:
                parameter.mul_(1.5)
    torch.testing.assert_close(trainer.teacher_scores(prompts, completion, mask), before, rtol=0, atol=0)
    assert not torch.allclose(trainer.policy_logps(batch), before[0], atol=1e-3), "the policy's adapter moved"
    trainable = [name for name, parameter in policy.named_parameters() if parameter.requires_grad]
    assert trainable and all(".default." in name for name in trainable), "the policy's adapter alone, after scoring"


def test_the_settings_are_train_mins_and_what_would_be_ignored_is_refused(tmp_path, monkeypatch):
    from dataclasses import fields
    shared = ("eps", "floor", "gamma", "window", "min_denominator", "denominator", "gate_group", "score_temperature",
              "beta_length", "advantage_warmup")
    ours = {f.name: f.default for f in fields(trl_egrsd.EGRSDConfig)}
    theirs = {f.name: f.default for f in fields(train_min.Config)}
    assert {name: ours.get(name) for name in shared} == {name: theirs[name] for name in shared}
    paper = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_completion_length": "max_new_tokens",
             "max_grad_norm": "grad_clip", "weight_decay": "weight_decay"}  # TRL's name: train_min's
    assert {name: ours[name] for name in paper} == {name: theirs[flag] for name, flag in paper.items()}
    assert ours["num_generations"] == 2, "the fewest rollouts per prompt GRPO allows (the paper samples one)"
    from trl import GRPOConfig
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    for name, value in [("loss_type", "grpo"), ("scale_rewards", "batch"), ("top_entropy_quantile", 0.2),
                        ("mask_truncated_completions", True),
                        ("disable_dropout", False), ("eps", 1.5), ("window", -1), ("denominator", "max"), ("gate_group", -1),
                        ("beta_length", float("inf")), ("advantage_warmup", 1.5), ("advantage_warmup", -1),
                        ("advantage_warmup", True), ("max_completion_length", None), ("max_completion_length", 0),
                        ("multi_objective_aggregation", "normalize_then_sum"), ("importance_sampling_level", "sequence"),
                        ("entropy_coef", 0.01), ("use_adaptive_entropy", True), ("off_policy_mask_threshold", 0.5),
                        ("beta", 0.04), ("num_iterations", 2), ("score_temperature", 0.7), ("method", "grpo")]:
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            trl_egrsd.EGRSDConfig(**base, **{name: value})
    with pytest.raises(ValueError, match=r"^steps_per_generation: expected a divisor of gradient_accumulation_steps \(1\)"):
        trl_egrsd.EGRSDConfig(**base, steps_per_generation=4)  # one generation, 4 optimizer steps: off-policy
    trl_egrsd.EGRSDConfig(**base, gradient_accumulation_steps=4, steps_per_generation=2)
    with pytest.raises(ValueError, match=r"^generation_batch_size: expected per_device_train_batch_size × processes \(4\) "
                                         r"times a divisor of gradient_accumulation_steps \(1\).* got 16 \(steps_per_generation 4\)$"):
        trl_egrsd.EGRSDConfig(**base, per_device_train_batch_size=4, generation_batch_size=16)  # the argument given is named
    trl_egrsd.EGRSDConfig(**base, per_device_train_batch_size=4, gradient_accumulation_steps=2, generation_batch_size=8)
    # the trainer's arguments, refused before any weights load (the model "unused" would not load)
    with pytest.raises(ValueError, match="^args: expected an EGRSDConfig .*got GRPOConfig$"):  # a GRPO script's config
        trl_egrsd.EGRSDTrainer(model="unused", reward_funcs=trl_egrsd.correctness_reward, args=GRPOConfig(**base))
    paired = trl_egrsd.dataset_from_problems(problems[:2])
    unpaired = paired.remove_columns("teacher_prompt")
    for datasets, where in [(dict(train_dataset=unpaired), "train_dataset"),
                            (dict(train_dataset=paired, eval_dataset={"held_out": unpaired}), r"eval_dataset\['held_out'\]")]:
        with pytest.raises(ValueError, match=rf"^teacher_prompt_column: expected a column of {where}, one of "
                                             r"\['prompt', 'answer'\], got 'teacher_prompt'$"):
            trl_egrsd.EGRSDTrainer(model="unused", reward_funcs=trl_egrsd.correctness_reward,
                                   args=trl_egrsd.EGRSDConfig(**base), **datasets)
    with pytest.raises(ValueError, match="^tools: expected None"):  # tool tokens: not sampled, not masked out here
        trl_egrsd.EGRSDTrainer(model="unused", reward_funcs=trl_egrsd.correctness_reward, tools=[len])
    with pytest.raises(ValueError, match="^environment_factory: expected None"):
        trl_egrsd.EGRSDTrainer(model="unused", reward_funcs=trl_egrsd.correctness_reward, environment_factory=object)
    peft = pytest.importorskip("peft", reason="the optional extra peft is not installed")
    with pytest.raises(ValueError, match="lora_dropout: expected 0 .*deterministic log-probs"):
        tiny_trainer(tmp_path, peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.05))
    adapted = peft.get_peft_model(build_tiny_model(tokenizer), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.05))
    with pytest.raises(ValueError, match="lora_dropout: expected 0"):  # a PEFT model's own adapter, no peft_config
        trl_egrsd.check_no_lora_dropout(None, adapted)
    # no args: EGRSDConfig's defaults (bf16, which this CPU is made to report), named after the model as GRPO's are
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda *a, **k: True)
    model = build_tiny_model(tokenizer)
    model.config._name_or_path = "tiny"
    trainer = trl_egrsd.EGRSDTrainer(model=model, reward_funcs=trl_egrsd.correctness_reward, train_dataset=paired,
                                     processing_class=tokenizer)
    assert type(trainer.args) is trl_egrsd.EGRSDConfig and trainer.args.output_dir == "tiny-EGRSD"
    for version in ("1.15.2", "1.16.0rc1", "1.17.0.dev0", "1.17.0rc1", "1.17.0"):  # 1.17's pre-releases: TRL's main
        with pytest.raises(ImportError, match=r"trl>=1\.16,<1\.17 .* got " + re.escape(version)):
            trl_egrsd.check_trl_version(version)
    for version in ("1.16.0", "1.16.1", "1.16.1.post1", "1.16.3"):
        trl_egrsd.check_trl_version(version)


def test_with_vllm_trls_policy_logps_are_reused_and_its_importance_sampling_weights_the_loss(tmp_path, monkeypatch):
    """The rollout function returns per-token log-probs of the sampler, as vLLM's generation does."""
    trainer = tiny_trainer(tmp_path, vllm_importance_sampling_mode="token_truncate")
    rows = [row for row in trainer.train_dataset.select(range(2)) for _ in range(2)]
    trainer.model.train()
    plain = trainer._generate_and_score_completions(rows)
    mask = plain["completion_mask"].bool()
    offset = torch.tensor([0.0, 0.5, -0.5, 2.0])[torch.arange(mask.size(1)) % 4].expand(mask.shape)  # e^2 > the clip, 3
    sampler = trainer.policy_logps(plain) - offset
    sampled = [sampler[i, mask[i]].tolist() for i in range(len(rows))]
    trainer.rollout_func = lambda prompts, t: {**fixed_rollouts(prompts, t), "logprobs": sampled}
    trainer.use_vllm, trainer._last_loaded_step = True, trainer.state.global_step  # vLLM, its weights in sync
    monkeypatch.setattr(trainer, "policy_logps", lambda output: pytest.fail("the policy scored twice"))
    vllm = trainer._generate_and_score_completions(rows)
    torch.testing.assert_close(vllm["advantages"], plain["advantages"])  # w from TRL's own policy log-probs
    ratio = offset.exp().clamp(max=trainer.args.vllm_importance_sampling_clip_max)
    torch.testing.assert_close(vllm["importance_sampling_ratio"][mask], ratio[mask])
    ids = torch.cat([vllm["prompt_ids"], vllm["completion_ids"]], dim=1)
    attention = torch.cat([vllm["prompt_mask"], vllm["completion_mask"]], dim=1)
    logp = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, mask.size(1))[0]
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, vllm)
    torch.testing.assert_close(loss, egrsd.policy_loss(logp, vllm["advantages"] * ratio, mask))
    assert not torch.isclose(loss, egrsd.policy_loss(logp, vllm["advantages"], mask)), "a ratio that matters"


def test_the_command_lines_model_and_dataset_flags_reach_the_policy_and_the_teacher(tmp_path, model_dir, monkeypatch):
    """--dtype, --attn_implementation and --model_revision load both models (the saved model keeps the dtype),
    the teacher is loaded as TRL loads its reference model (device_map None under DeepSpeed and DDP, the
    quantization config), --dataset_name gives the problems of its columns, and the model card is EGRSD's."""
    dataset = tmp_path / "dataset"  # a local folder that datasets.load_dataset reads as it reads a hub dataset
    dataset.mkdir()
    for split, rows in (("train", problems[:4]), ("test", problems[4:6])):
        (dataset / f"{split}.jsonl").write_text("".join(json.dumps({"q": p.question, "s": p.solution, "a": int(p.answer)}) + "\n"
                                                        for p in rows))
    loads = []
    load = trl_egrsd.create_model_from_path
    monkeypatch.setattr(trl_egrsd, "create_model_from_path", lambda name, **kwargs: loads.append(kwargs) or load(name, **kwargs))
    data, args, model_args = trl_egrsd.parse([
        "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "run"), "--use_cpu", "--report_to", "none",
        "--dtype", "bfloat16", "--attn_implementation", "eager", "--model_revision", "main", "--max_completion_length", "8",
        "--dataset_name", str(dataset), "--problem_column", "q", "--solution_column", "s", "--answer_column", "a",
        "--eval_strategy", "steps", "--eval_steps", "1", "--per_device_train_batch_size", "2"])
    args.model_init_kwargs = {"use_safetensors": True}  # given in the config: kept beside the model flags
    trainer = trl_egrsd.build_trainer(data, args, model_args)
    for model in (trainer.model, trainer.teacher):
        assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    loaded_with = dict(revision="main", dtype="bfloat16", attn_implementation="eager")
    assert loaded_with.items() <= trainer.args.model_init_kwargs.items() and loaded_with.items() <= loads[0].items()
    assert loads[0]["use_safetensors"] is True
    trainer.save_model(str(tmp_path / "final"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as saved:
        assert {saved.get_slice(k).get_dtype() for k in saved.keys()} == {"BF16"}
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "EGRSD" in card and "2605.13255" in card and "DeepSeekMath" not in card
    assert trainer.train_dataset["prompt"] == [student_messages(p) for p in problems[:4]]
    assert trainer.train_dataset["teacher_prompt"] == [teacher_messages(p) for p in problems[:4]]
    assert trainer.eval_dataset["answer"] == [p.answer for p in problems[4:6]]  # integers in the dataset
    # under DeepSpeed, as TRL's reference model: no device map, and the policy's quantization
    from transformers import BitsAndBytesConfig
    monkeypatch.setattr(trainer.args, "distributed_state", SimpleNamespace(distributed_type="DEEPSPEED"))
    monkeypatch.setattr(trl_egrsd, "create_model_from_path", lambda name, **kwargs: loads.append(kwargs) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer._frozen_copy(str(model_dir), BitsAndBytesConfig(load_in_4bit=True))
    assert loads[-1]["device_map"] is None and loads[-1]["quantization_config"].load_in_4bit
    assert loads[-1]["dtype"] == "bfloat16" and loads[-1]["revision"] == "main"
    monkeypatch.setattr(trainer.args, "distributed_state", SimpleNamespace(distributed_type="MULTI_GPU"))  # DDP, too
    with pytest.raises(ZeroDivisionError):
        trainer._frozen_copy(str(model_dir), None)
    assert loads[-1]["device_map"] is None
    with pytest.raises(ValueError, match="^--model_name_or_path: expected a hub name"):
        trl_egrsd.build_trainer(trl_egrsd.DataArguments(), trainer.args, trl_egrsd.EGRSDModelConfig())
    data = trl_egrsd.DataArguments(dataset_name=str(dataset), problem_column="q", solution_column="s", answer_column="a",
                                   dataset_test_split="validation")
    with pytest.raises(ValueError, match=r"^--dataset_test_split: expected a split of .*\['train', 'test'\], got 'validation'"):
        trl_egrsd.load_datasets(data, evaluate=True)
    with pytest.raises(ValueError, match="^--data: expected either --dataset_name or --data"):
        trl_egrsd.load_datasets(trl_egrsd.DataArguments(dataset_name=str(dataset), data="problems.jsonl"), evaluate=False)
    data = trl_egrsd.DataArguments(dataset_name=str(dataset), problem_column="question")
    with pytest.raises(ValueError, match=r"--problem_column: expected a column of .*\['q', 's', 'a'\], got 'question'"):
        trl_egrsd.load_datasets(data, evaluate=False)
    gsm8k = tmp_path / "gsm8k"  # GSM8K's columns: the final answer ends the solution, after '#### '
    gsm8k.mkdir()
    (gsm8k / "train.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}) + "\n")
    data = trl_egrsd.DataArguments(dataset_name=str(gsm8k), problem_column="question", solution_column="answer", answer_column="")
    train, held_out = trl_egrsd.load_datasets(data, evaluate=False)
    assert held_out is None and train["answer"] == ["2"] and "1 + 1 = 2" in train["teacher_prompt"][0][0]["content"]


def readme_command(start: str = "accelerate launch", **changes) -> list[str]:
    """The README's TRL command (section "Scaling out with TRL") whose first line starts with `start`, its flags after
    the script; `changes` set flags (True: a flag without a value) or drop them (None)."""
    text = README.read_text()
    lines = iter(text[text.index("## Scaling out with TRL"):].splitlines())
    line = next(line for line in lines if line.strip().startswith(start))
    command = [line]
    while command[-1].rstrip().endswith("\\"):
        command.append(next(lines))
    words = shlex.split(" ".join(line.rstrip().rstrip("\\") for line in command))
    words = words[words.index("integrations/trl_egrsd.py") + 1:]
    flags, name = {}, None
    for word in words:
        if word.startswith("--"):
            name = word
            flags[name] = []
        else:
            flags[name].append(word)
    for key, value in changes.items():
        flags["--" + key] = None if value is None else [] if value is True else [str(value)]
    return [word for key, values in flags.items() if values is not None for word in (key, *values)]


def test_the_readmes_command_trains_with_the_papers_lora_and_saves_the_adapter(tmp_path, model_dir, capfd):
    """The script's main() on the README's flags (in this process: a second one would import it all again), as its
    CPU form gives them (that form's model and output folders aside)."""
    pytest.importorskip("peft", reason="the optional extra peft is not installed")
    cpu = dict(use_vllm=None, vllm_mode=None, use_cpu=True, report_to="none", max_steps=1, max_completion_length=8)
    assert readme_command("python integrations/trl_egrsd.py") == readme_command(
        model_name_or_path="runs/tiny", output_dir="runs/trl-tiny", **cpu), "the README's CPU form is the one run here"
    flags = readme_command(model_name_or_path=model_dir, output_dir=tmp_path / "run", **cpu)
    trl_egrsd.main(flags)
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (64, 128, 0.0), "the paper's LoRA"
    assert "egrsd/token_advantage_mean" in "".join(capfd.readouterr()), "the first step was logged"


def test_an_environment_mask_is_refused_and_an_evaluation_batch_larger_than_a_generation_batch_evaluates(tmp_path, monkeypatch):
    """A rollout_func's env_mask marks tokens the policy did not sample, which EGRSD would train: refused. An
    evaluation batch of 4 against a generation batch of 2 (GRPO's advantage table keeps 2) used to pop 4."""
    import trl_run

    def with_env_mask(prompts, trainer):
        rollouts = fixed_rollouts(prompts, trainer)
        return rollouts | {"env_mask": [[1] * len(c) for c in rollouts["completion_ids"]]}

    trainer = tiny_trainer(tmp_path / "eval", per_device_train_batch_size=2, per_device_eval_batch_size=4, max_steps=1)
    trainer.eval_dataset = trl_egrsd.dataset_from_problems(problems[:4])
    assert "eval_loss" in trainer.evaluate()
    monkeypatch.setattr(trl_run, "fixed_rollouts", with_env_mask)
    with pytest.raises(ValueError, match="^rollout_func: expected no env_mask"):
        tiny_trainer(tmp_path / "env").train()


def test_a_teacher_loaded_from_the_policys_path_scores_as_the_policy_with_its_head_in_float32(tmp_path, model_dir):
    """cast_lm_head_to_fp32 with bf16 weights: TRL casts the policy's LM head; the teacher, loaded from the same
    path, must score the same tokens to the same log-probs before any step (before, its head ran in bf16)."""
    args = trl_egrsd.EGRSDConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], cast_lm_head_to_fp32=True,
                                 model_init_kwargs={"dtype": "bfloat16"}, per_device_train_batch_size=2, max_completion_length=8)
    trainer = trl_egrsd.EGRSDTrainer(model=str(model_dir), reward_funcs=trl_egrsd.correctness_reward, args=args,
                                     train_dataset=trl_egrsd.dataset_from_problems(problems), processing_class=tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    policy, teacher = (trainer._get_per_token_logps_and_entropies(model, ids, torch.ones_like(ids), 6, batch_size=2)[0]
                       for model in (trainer.model, trainer.teacher))
    assert trainer.teacher.dtype == torch.bfloat16 and torch.equal(policy, teacher)


def test_the_reward_is_length_shaped_with_beta_length_a_truncated_completion_earns_0_and_evaluation_keeps_the_state(tmp_path):
    """With β_L = 0 a right, finished completion earns exactly 1 (A = r − 0.5 in the warmup); without its EOS it
    earns 0 (truncated) however right; an evaluation batch leaves the running advantage as it was."""
    trainer = tiny_trainer(tmp_path, method="egrsd", beta_length=0.0, advantage_warmup=3)
    assert trainer.running_advantage.warmup_steps == 3
    rows = [row for row in trainer.train_dataset.select(range(2)) for _ in range(2)]  # problem 0 right, 1 wrong
    trainer.model.train()
    trainer._generate_and_score_completions(rows)
    assert list(trainer._logs["advantages"])[-4:] == [0.5, 0.5, -0.5, -0.5]
    state = trainer.running_advantage.state_dict()
    trainer.model.eval()
    trainer._generate_and_score_completions(rows)
    assert trainer.running_advantage.state_dict() == state, "evaluation does not update the running statistics"
    trainer.model.train()
    trainer.rollout_func = lambda prompts, t: (lambda r: {**r, "completion_ids": [c[:-1] for c in r["completion_ids"]]})(
        fixed_rollouts(prompts, t))  # the same completions, cut before their EOS
    trainer._generate_and_score_completions(rows)
    assert list(trainer._logs["advantages"])[-4:] == [-0.5] * 4


def test_without_lora_the_teacher_scores_with_its_frozen_copy_not_the_policy(tmp_path):
    """The policy moves (as after a step); the teacher's log-probs and entropies do not. The teacher, a copy of a
    model built in code (in training mode), is in eval mode."""
    trainer = tiny_trainer(tmp_path)
    assert not trainer.teacher.training
    prompts = [trainer.train_dataset[i]["teacher_prompt"] for i in range(2)]
    completion = torch.randint(3, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.bool)
    before = trainer.teacher_scores(prompts, completion, mask)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.mul_(1.5)
    after = trainer.teacher_scores(prompts, completion, mask)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_teacher_reads_its_prompt_from_teacher_prompt_column(tmp_path):
    from datasets import Dataset
    data = Dataset.from_list([{**row, "privileged": row["teacher_prompt"], "teacher_prompt": row["prompt"]}  # a decoy in
                              for row in trl_egrsd.dataset_from_problems(problems)])                 # the default column
    trainer = tiny_trainer(tmp_path, teacher_prompt_column="privileged", train_dataset=data)
    rows = [row for row in trainer.train_dataset.select(range(2)) for _ in range(2)]
    seen, scores = [], trainer.teacher_scores
    trainer.teacher_scores = lambda prompts, completion, mask: seen.extend(prompts) or scores(prompts, completion, mask)
    trainer.model.train()
    trainer._generate_and_score_completions(rows)
    assert seen == [row["privileged"] for row in rows] and seen[0] != rows[0]["prompt"]


def test_the_gates_normaliser_is_the_masked_batch_maximum_of_its_denominator_floored_at_min_denominator(tmp_path):
    trainer = tiny_trainer(tmp_path, method="cl-egrsd", window=2)
    entropy = torch.tensor([[1.5, 3.0, 2.0, 9.0], [2.5, 0.5, 2.5, 2.5]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])  # 9.0 is padding
    assert trainer.gate_settings(entropy, mask).min_denominator == 3.0  # raw (Eq. 8)
    trainer.args.denominator = "filtered"
    filtered = egrsd.lookahead_min(entropy, mask, 2)[mask].max().item()
    assert filtered < 3.0 and trainer.gate_settings(entropy, mask).min_denominator == pytest.approx(filtered)
    trainer.args.min_denominator = 5.0  # a floor above the batch's maximum
    assert trainer.gate_settings(entropy, mask).min_denominator == 5.0


@pytest.mark.parametrize("accumulation, per_generation", [(2, 2), (4, 2), (2, 1)])
def test_with_steps_per_generation_each_optimizer_step_is_the_mean_of_its_generation_batches_token_means(
        accumulation, per_generation, tmp_path):
    """An optimizer step of `accumulation` micro-batches spans accumulation / per_generation generation batches:
    TRL's "dapo" divides each by its own tokens and the step averages them, so a generation batch whose loss is
    taken in one call gives its token mean times per_generation / accumulation."""
    trainer = tiny_trainer(tmp_path, gradient_accumulation_steps=accumulation, steps_per_generation=per_generation)
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    batch = {"prompt_ids": torch.randint(3, len(tokenizer), (2, 3), generator=generator), "prompt_mask": torch.ones(2, 3, dtype=torch.long),
             "completion_ids": torch.randint(3, len(tokenizer), (2, 4), generator=generator), "completion_mask": mask,
             "advantages": torch.randn(2, 4, generator=generator), "num_items_in_batch": mask.sum()}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    logp = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.cat([batch["prompt_mask"], mask], dim=1), 4)[0]
    loss = trainer._compute_loss(trainer.model, batch)
    token_mean = egrsd.policy_loss(logp, batch["advantages"], mask.bool())
    torch.testing.assert_close(loss, token_mean * per_generation / accumulation)


def test_a_policy_passed_as_a_loaded_model_gets_a_frozen_copy_of_its_own_weights_in_its_dtype_and_attention(tmp_path, model_dir):
    """A model loaded from a folder, then changed in memory (as a merged adapter or another state dict changes it):
    the teacher is a copy of the weights the policy starts from, not the folder's, in the policy's dtype and
    attention. A model object already partitioned by DeepSpeed ZeRO-3 cannot be copied: refused, before training."""
    from transformers import AutoModelForCausalLM
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="eager")
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)).to(parameter.dtype))
    args = trl_egrsd.EGRSDConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    trainer = trl_egrsd.EGRSDTrainer(model=policy, reward_funcs=trl_egrsd.correctness_reward, args=args,
                                     train_dataset=trl_egrsd.dataset_from_problems(problems), processing_class=tokenizer)
    assert trainer.teacher is not policy and trainer.teacher.dtype == torch.bfloat16
    assert trainer.teacher.config._attn_implementation == "eager"
    assert not any(p.requires_grad for p in trainer.teacher.parameters()), "the teacher is frozen"
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    scores = [trainer._get_per_token_logps_and_entropies(model, ids, torch.ones_like(ids), 6, batch_size=2)[0]
              for model in (trainer.model, trainer.teacher)]
    torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=0)  # the folder's weights differ by about 0.7
    partitioned = build_tiny_model(tokenizer)
    next(partitioned.parameters()).ds_id = 0  # as DeepSpeed's zero.Init marks a partitioned parameter
    peft = pytest.importorskip("peft", reason="the optional extra peft is not installed")
    adapted = peft.get_peft_model(build_tiny_model(tokenizer), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    next(p for name, p in adapted.named_parameters() if ".default." in name).ds_id = 0  # its adapter is copied
    for model, kind in ((partitioned, "Qwen2ForCausalLM"), (adapted, "PeftModel")):
        with pytest.raises(ValueError, match="^model: expected a name or path, or a model object loaded whole .*got a "
                                             f"{kind} partitioned by DeepSpeed ZeRO-3"):
            trl_egrsd.EGRSDTrainer(model=model, reward_funcs=trl_egrsd.correctness_reward, args=args,
                                   train_dataset=trl_egrsd.dataset_from_problems(problems), processing_class=tokenizer)


def test_main_resumes_from_the_checkpoint_flag_then_saves_and_ends(tmp_path, monkeypatch):
    calls = []
    trainer = SimpleNamespace(train=lambda **kw: calls.append(("train", kw)), save_model=lambda d: calls.append(("save", d)),
                              end=lambda: calls.append(("end",)))
    monkeypatch.setattr(trl_egrsd, "build_trainer", lambda data, args, model_args: trainer)
    trl_egrsd.main(["--model_name_or_path", "unused", "--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none",
                    "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")])
    assert calls == [("train", {"resume_from_checkpoint": str(tmp_path / "checkpoint-2")}), ("save", str(tmp_path)), ("end",)]


def test_attention_dropout_of_the_config_is_off_for_the_policy_and_the_teacher(tmp_path):
    """Qwen2's attention dropout is a probability applied in training mode, not a torch.nn.Dropout that TRL's
    disable_dropout reaches. A checkpoint saved with 0.5: the policy and the teacher, each loaded from it, score
    deterministically (the policy in training mode, the teacher in eval mode), with 0 in their config too."""
    model = build_tiny_model(tokenizer)
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    args = trl_egrsd.EGRSDConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    trainer = trl_egrsd.EGRSDTrainer(model=str(tmp_path / "model"), reward_funcs=trl_egrsd.correctness_reward, args=args,
                                     train_dataset=trl_egrsd.dataset_from_problems(problems), processing_class=tokenizer)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    for loaded in (policy, trainer.teacher):
        rates = [m.attention_dropout for m in loaded.modules() if hasattr(m, "attention_dropout")]
        assert rates and set(rates) == {0.0} and loaded.config.attention_dropout == 0.0
    assert not trainer.teacher.training
    trainer.model.train()
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"prompt_ids": ids[:, :6], "prompt_mask": torch.ones(2, 6, dtype=torch.long), "completion_ids": ids[:, 6:],
             "completion_mask": torch.ones(2, 6, dtype=torch.long)}
    assert torch.equal(trainer.policy_logps(batch), trainer.policy_logps(batch))
    prompts, mask = [trainer.train_dataset[i]["teacher_prompt"] for i in range(2)], torch.ones(2, 6, dtype=torch.bool)
    assert torch.equal(trainer.teacher_scores(prompts, ids[:, 6:], mask)[0], trainer.teacher_scores(prompts, ids[:, 6:], mask)[0])
