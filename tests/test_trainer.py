"""train_min.py end to end, on CPU with the tiny model built in code (trainer/offline_models.py): every
method, token alignment between teacher and student, a learning check, exact resume, Ctrl-C, non-finite
steps, bad flags, bf16 master weights, held-out data files, the token view and the --compare table.
"""

import functools
import importlib.util
import json
import os
import math
import re
import signal
from dataclasses import fields
from pathlib import Path
from statistics import fmean

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import egrsd
import train_min
from trainer import config, decoding, run_io, stats, views
from trainer.config import METHODS
from trainer.offline_models import build_tiny_model, build_tiny_tokenizer
from trainer.tasks import (Problem, built_in_problems, extract_answer, load_data, load_problems, student_messages,
                           teacher_messages)

ROOT = Path(__file__).resolve().parent.parent


TINY = ["--model", "tiny", "--device", "cpu", "--batch-size", "4", "--micro-batch-size", "2",
        "--max-new-tokens", "8", "--train-size", "16", "--eval-size", "4", "--eval-batch-size", "4"]
TIMING_KEYS = {"rollout_tokens_per_s", "generate_s", "score_s", "update_s", "step_s", "peak_gpu_mem_gb"}


def read_metrics(run_dir) -> list[dict]:
    """Every train and eval row as written, in order (a resume's own row left out)."""
    return [row for line in open(Path(run_dir) / "metrics.jsonl") if (row := json.loads(line))["kind"] != "resume"]


def write_metrics(run_dir, rows: list[dict]) -> None:
    (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def unsampled(row: dict) -> dict:
    """An evaluation row as a run with --eval-samples 0 writes it: no avg@K."""
    return {k: v for k, v in row.items() if not k.startswith("eval_sampled_")} | {"eval_samples": 0}


def same_parameters(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_the_tiny_tokenizer_trained_once_a_process_encodes_as_one_trained_afresh_and_each_copy_is_its_own():
    from trainer.offline_models import train_tiny_bpe

    fresh, built = train_tiny_bpe(), build_tiny_tokenizer()
    texts = [p.question + " " + p.solution for p in built_in_problems(20, 0)[0]] + ["<|im_start|>user\nÉté 3½?<|im_end|>"]
    assert fresh.get_vocab() == built.get_vocab() and len(built) == 512
    for text in texts:
        ids = fresh.encode(text).ids
        assert built.encode(text, add_special_tokens=False) == ids
        assert built.decode(ids, skip_special_tokens=False) == fresh.decode(ids, skip_special_tokens=False) == text
    built.add_tokens(["<think>"])  # a caller changes its copy
    assert len(build_tiny_tokenizer()) == 512, "the next copy is untouched"


def test_a_checkpoints_own_sampling_defaults_do_not_leak_into_rollouts(tmp_path):
    """Rollouts must come from the policy whose log-probs are trained: no repetition penalty or other
    sampling default saved with the model may apply."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=2, do_sample=True, temperature=0.3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = train_min.load_model_and_tokenizer(str(tmp_path), "cpu", torch.float32)
    clean, _ = train_min.load_model_and_tokenizer("tiny", "cpu", torch.float32)
    ids, attention = train_min.encode_prompts(tokenizer, [student_messages(p) for p in built_in_problems(3, 1)[0]], "cpu")
    outputs = []
    for model in (loaded, clean):
        torch.manual_seed(0)
        outputs.append(train_min.generate(model, tokenizer, ids, attention, train_min.Config(max_new_tokens=24))[0])
    assert torch.equal(*outputs)
    # final/ generates as the model trained would: with its own defaults again
    train_min.main(["--model", str(tmp_path), "--device", "cpu", "--steps", "0", "--eval-size", "0", "--output-dir", str(tmp_path / "run")])
    final = GenerationConfig.from_pretrained(tmp_path / "run" / "final")
    assert (final.repetition_penalty, final.no_repeat_ngram_size, final.temperature) == (5.0, 2, 0.3)


def test_the_clean_generation_config_keeps_every_eos_id_of_the_checkpoint(tmp_path):
    """Qwen2.5-Instruct's generation config lists <|im_end|> and <|endoftext|>: both must still end rollouts."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.generation_config.update(eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], do_sample=True, temperature=0.3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = train_min.load_model_and_tokenizer(str(tmp_path), "cpu", torch.float32)
    assert loaded.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert train_min.eos_list(loaded) == [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert loaded.generation_config.temperature in (None, 1.0), "no sampling default of the checkpoint"


def test_the_tiny_tokenizer_has_qwens_special_tokens_and_chatml_template_and_decodes_spaces_as_written():
    tokenizer = build_tiny_tokenizer()
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert "<|im_start|>" in tokenizer.all_special_tokens
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")}) == 3
    user = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    own = [{"role": "system", "content": "Be brief."}] + user
    assert tokenizer.apply_chat_template(own, tokenize=False) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    text = "Hi , there . It 's 3 !"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text, "no clean-up of spaces"


def test_the_tiny_model_has_qwen2s_special_ids_tied_grouped_attention_and_is_the_same_for_a_seed_and_dtype():
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    model = build_tiny_model(tokenizer, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG is untouched"
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.pad_token_id}
    for holder in (model.config, model.generation_config):
        assert {k: getattr(holder, k) for k in ids} == ids
    assert model.config.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert same_parameters(model, build_tiny_model(tokenizer, seed=3))
    assert not same_parameters(model, build_tiny_model(tokenizer, seed=4))
    assert next(build_tiny_model(tokenizer, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_the_random_shapes_are_the_papers_models_and_build_in_the_dtype_and_on_the_device_asked():
    """Parameter counts of Qwen2.5-0.5B (494M), Qwen3-4B (4.02B) and Qwen3-8B (8.19B), on the meta device."""
    from trainer import offline_models as om

    tokenizer = build_tiny_tokenizer()
    count = lambda config: sum(p.numel() for p in om.meta_model(config).parameters())  # noqa: E731
    assert count(om.model_config("random-0.5b")) == 494_032_768
    assert om.model_config("random-0.5b").num_key_value_heads == 2
    assert count(om.model_config("random-qwen3-4b")) == 4_022_468_096
    assert count(om.qwen3_config("8b", tokenizer)) == 8_190_735_360
    assert om.is_built_in("random-qwen3-4b") and om.is_built_in("tiny") and not om.is_built_in("Qwen/Qwen2.5-0.5B")
    model = om.build_random_model("random-0.5b", tokenizer, torch.bfloat16, device="meta")
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_a_random_shape_is_built_on_the_device_it_is_loaded_to(monkeypatch):
    """Not built on the CPU and then copied: Qwen3-4B would first take its whole size in host memory."""
    from trainer import offline_models as om

    built = []
    real = om.build_random_model
    monkeypatch.setattr(om, "build_random_model", lambda *args: built.append(args) or real(*args))
    model, tokenizer = om.load_model_and_tokenizer("random-0.5b", "meta", torch.bfloat16)
    assert built[0][2:] == (torch.bfloat16, "meta")
    assert next(model.parameters()).device.type == "meta"
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == ([tokenizer.eos_token_id],
                                                                                          tokenizer.pad_token_id)


def test_eos_list_takes_no_one_or_several_eos_ids():
    model = build_tiny_model(build_tiny_tokenizer())
    for eos, expected in ((None, []), (7, [7]), ([7, 3], [7, 3])):
        model.generation_config.eos_token_id = eos
        assert train_min.eos_list(model) == expected


def test_a_folder_loads_in_the_dtype_asked_and_a_tokenizer_without_pad_or_template_gets_eos_and_chatml(tmp_path):
    from trainer import offline_models as om

    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.pad_token, tokenizer.chat_template = None, None
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning) as caught:
        model, loaded = om.load_model_and_tokenizer(str(tmp_path), "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.chat_template == om.CHATML_TEMPLATE
    assert sum("no pad token" in str(w.message) or "no chat template" in str(w.message) for w in caught) == 2


def test_activation_checkpointing_is_switched_on_without_reentrant_checkpoints():
    from trainer.offline_models import enable_activation_checkpointing

    model = build_tiny_model(build_tiny_tokenizer())
    enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}


def test_the_tiny_corpus_is_distinct_problems_the_same_for_a_seed_whose_solutions_end_on_their_answer():
    from trainer.offline_models import make_arithmetic_problems

    problems = make_arithmetic_problems(2000, seed=1)  # (drawn with repeats: 5 questions among the first 2,000 draws)
    assert len({p.question for p in problems}) == 2000
    assert problems == make_arithmetic_problems(2000, seed=1) and problems[:20] != make_arithmetic_problems(20, seed=2)
    assert all(p.solution.endswith(f"The answer is {p.answer}.") for p in problems)


def test_make_token_view_trains_on_left_padded_chats_without_padding_in_the_loss_then_dumps_one_cl_egrsd_step(tmp_path,
                                                                                                              monkeypatch):
    """tools/make_token_view.py with one training step instead of 600 and the CL-EGRSD run it starts recorded."""
    import builtins
    import runpy

    from trainer import offline_models

    batches, runs, real = [], [], offline_models.build_tiny_model

    def recorded(tokenizer, seed=0):
        model = real(tokenizer, seed=seed)
        model.register_forward_pre_hook(lambda module, args, kwargs: batches.append(kwargs), with_kwargs=True)
        return model

    monkeypatch.setattr(offline_models, "build_tiny_model", recorded)
    monkeypatch.setattr(train_min, "main", runs.append)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "tools" / "make_token_view.py"), init_globals={"range": lambda n: builtins.range(1)})
    (batch,) = batches
    ends = batch["input_ids"][:, -1]
    assert (ends == build_tiny_tokenizer().eos_token_id).all(), "left padded: every row ends on its <|im_end|>"
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0) and (batch["labels"] == -100).any()
    (argv,) = runs
    flags = dict(zip(argv[::2], argv[1::2]))
    assert (flags["--method"], flags["--steps"], flags["--dump-tokens"], flags["--model"]) == ("cl-egrsd", "1", "1", "runs/token_view_model")
    rows = [json.loads(line) for line in (tmp_path / flags["--data"]).read_text().splitlines()]
    first = offline_models.make_arithmetic_problems(11, seed=0)[10]  # the documented view's data: 2,000 after the first 10
    assert len(rows) == 2000 and rows[0] == {"problem": first.question, "solution": first.solution, "answer": first.answer}
    (tmp_path / "runs" / "token_view").mkdir()  # a view made before: refused before any training, not after it
    with pytest.raises(SystemExit, match=r"remove it \(rm -rf runs/token_view\) to make it again"):
        runpy.run_path(str(ROOT / "tools" / "make_token_view.py"), init_globals={"range": lambda n: builtins.range(1)})
    assert len(batches) == 1 and len(runs) == 1


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_two_steps_end_to_end(method, tmp_path):
    student, teacher = train_min.main(TINY + ["--method", method, "--steps", "2", "--output-dir", str(tmp_path)])
    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    expected_keys = {"step", "method", "reward", "accuracy", "length_mean", "length_max", "truncated", "loss",
                     "grad_norm", "gate_mean", "gate_min", "magnitude_mean", "teacher_entropy_mean", "update_rel",
                     "sampler_changed"} | TIMING_KEYS
    assert expected_keys <= set(train_rows[0])
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in train_rows)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    initial = build_tiny_model(build_tiny_tokenizer())
    assert same_parameters(teacher, initial), "the teacher must stay the initial weights"
    assert not same_parameters(student, initial), "the student must have been updated"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert same_parameters(reloaded, student)
    assert AutoTokenizer.from_pretrained(tmp_path / "final").eos_token == "<|im_end|>"


def test_a_lora_run_trains_the_adapter_only_holds_one_copy_of_the_base_and_saves_reloadable_models(tmp_path):
    peft = pytest.importorskip("peft", reason="the optional extra peft is not installed")
    student, teacher = train_min.main(TINY + ["--method", "cl-egrsd", "--steps", "2", "--lora-r", "4",
                                              "--output-dir", str(tmp_path)])
    initial = build_tiny_model(build_tiny_tokenizer())
    assert teacher is student, "the teacher is the student's base model with the adapter off"
    held = {p.data_ptr(): p.numel() for model in (student, teacher) for p in model.parameters()}
    adapter = sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert 0 < adapter < sum(p.numel() for p in initial.parameters()) / 10
    assert sum(held.values()) == sum(p.numel() for p in initial.parameters()) + adapter, "one copy of the base"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), student.disable_adapter():  # the base, that is the teacher, never moved
        assert torch.equal(student(ids).logits, initial(ids).logits)
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == [1, 2]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # plain transformers, no peft
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits, initial(ids).logits), "the adapter moved the student"
    adapted = peft.PeftModel.from_pretrained(build_tiny_model(build_tiny_tokenizer()), tmp_path / "final" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)
    checkpoint = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert "adapter_model.safetensors" in checkpoint and "model.safetensors" not in checkpoint, checkpoint


def test_lora_without_peft_stops_before_any_model_loads_naming_the_flag(monkeypatch, tmp_path):
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match="--lora-r: expected peft installed"):
        train_min.main(TINY + ["--lora-r", "4", "--output-dir", str(tmp_path)])


def test_weighting_in_the_trainer_is_the_library_token_advantage():
    torch.manual_seed(0)
    mask = torch.rand(4, 9) > 0.2
    scores = train_min.Scores(teacher_logp=-torch.rand(4, 9) * 3, student_logp=-torch.rand(4, 9) * 3,
                              teacher_entropy=torch.rand(4, 9) * 4, teacher_hidden=[])
    advantages = torch.tensor([1.5, -0.5, 0.0, 0.7])
    signals = (scores.teacher_logp, scores.student_logp, scores.teacher_entropy, mask)
    expected = {"grpo": advantages[:, None] * mask, "rlsd": egrsd.token_advantages(advantages, *signals, gamma=0.0),
                "egrsd": egrsd.token_advantages(advantages, *signals, gamma=0.3, group=2),
                "cl-egrsd": egrsd.token_advantages(advantages, *signals, gamma=0.3, window=3, group=2)}
    for method, want in expected.items():
        got = train_min.weight_tokens(advantages, scores, mask, train_min.Config(method=method, gate_group=2))
        torch.testing.assert_close(got.advantage, want.float(), msg=method)
        torch.testing.assert_close(got.advantage, advantages[:, None] * got.magnitude * got.gate, msg=method)


def test_completion_mask_includes_the_first_eos_and_not_the_padding():
    eos, pad = 7, 0
    completion = torch.tensor([[3, 4, eos, pad, pad], [eos, pad, pad, pad, pad], [3, 3, 3, 3, 3], [3, eos, 3, eos, pad]])
    mask, finished = train_min.completion_mask(completion, [eos])
    assert mask.tolist() == [[True, True, True, False, False], [True, False, False, False, False],
                             [True] * 5, [True, True, False, False, False]]
    assert finished.tolist() == [True, True, False, True]


def test_teacher_and_student_score_the_same_completion_tokens_at_the_same_positions():
    """Scoring from left-padded batches equals a plain forward of each unpadded [prompt ‖ completion], its
    logits divided by the score temperature."""
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=2)
    cfg = train_min.Config(model="tiny", device="cpu", max_new_tokens=6, micro_batch_size=2, chunk_size=5,
                           score_temperature=1.7)
    problems = built_in_problems(3, 1)[0]
    prompts = {who: train_min.encode_prompts(tokenizer, [messages(p) for p in problems], "cpu")
               for who, messages in (("student", student_messages), ("teacher", teacher_messages))}
    torch.manual_seed(0)
    completion, mask, finished = train_min.generate(student, tokenizer, *prompts["student"], cfg)
    mask[1, 3:] = False  # a row that stops early, as if it had met its EOS
    scores = train_min.score(student, teacher, train_min.Rollouts(*prompts["student"], *prompts["teacher"], completion, mask, finished), cfg)
    for b in range(len(problems)):
        tokens = completion[b][mask[b]]
        for model, who, got in ((student, "student", scores.student_logp), (teacher, "teacher", scores.teacher_logp)):
            ids, attention = prompts[who]
            prompt = ids[b][attention[b].bool()]
            logits = model(torch.cat([prompt, tokens])[None]).logits[0, len(prompt) - 1 : -1] / 1.7
            expected = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
            torch.testing.assert_close(got[b][mask[b]].double(), expected, atol=1e-5, rtol=1e-5)
            assert torch.all(got[b][~mask[b]] == 0)
            if who == "teacher":
                plain_entropy = egrsd.token_entropy(model(torch.cat([prompt, tokens])[None]).logits[0] / 1.7)
                torch.testing.assert_close(scores.teacher_entropy[b][mask[b]], plain_entropy[-len(tokens) - 1 : -1], atol=1e-5, rtol=1e-5)


@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=12), size=st.integers(1, 5))
def test_micro_batches_take_every_row_once_longest_first_and_go_back_to_the_batch_order(lengths, size):
    mask = torch.arange(6) < torch.tensor(lengths)[:, None]  # True up to each row's EOS
    micro = train_min.micro_batches(mask, size)
    order = torch.cat(micro)
    assert sorted(order.tolist()) == list(range(len(lengths))), "a partition of the rows"
    assert [len(rows) for rows in micro[:-1]] == [size] * (len(micro) - 1) and 0 < len(micro[-1]) <= size
    assert mask[order].sum(dim=1).tolist() == sorted(lengths, reverse=True), "longest first"
    values = torch.arange(len(lengths))[:, None] * 10 + torch.arange(6)  # (B, T), each entry its own
    torch.testing.assert_close(train_min.in_batch_order(micro, [values[rows] for rows in micro]), values, rtol=0, atol=0)
    tokens = [values[rows][mask[rows]] for rows in micro]
    torch.testing.assert_close(train_min.rows_to_grid(mask, micro, tokens), values * mask, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["cl-egrsd", "opsd"])
def test_an_update_in_micro_batches_of_like_length_is_the_whole_batchs_gradient(method):
    """Rows of different prompt and completion lengths, in micro-batches each as wide as its own longest
    prompt and completion, give the gradient and the token weights of one plain forward of each unpadded
    [prompt ‖ completion], in float64 (OPSD: the teacher's states pair with the student's by micro-batch)."""
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_tiny_model(tokenizer, seed=1).double(), build_tiny_model(tokenizer, seed=2).double()
    cfg = train_min.Config(model="tiny", device="cpu", dtype="float32", method=method, max_new_tokens=8,
                           micro_batch_size=2, gate_group=0, grad_clip=1e9, score_temperature=1.3)
    problems = built_in_problems(5, 1)[0]
    torch.manual_seed(0)
    batch = train_min.rollouts(student, tokenizer, problems, cfg)
    for row, length in enumerate([8, 3, 8, 1, 5]):  # as if rows had met their EOS at these lengths
        batch.mask[row, length:] = False
    advantages = torch.tensor([1.0, -0.5, 0.25, -2.0, 0.75], dtype=torch.float64)

    def plain_logits(model, ids, attention):  # (B, T, V): each row alone, unpadded, at the score temperature
        grid = torch.zeros(*batch.mask.shape, model.config.vocab_size, dtype=torch.float64)
        for b in range(len(problems)):
            prompt, tokens = ids[b][attention[b].bool()], batch.completion[b][batch.mask[b]]
            grid[b, : len(tokens)] = model(torch.cat([prompt, tokens])[None]).logits[0, len(prompt) - 1 : -1] / 1.3
        return grid

    def sampled(logits):
        return torch.log_softmax(logits, -1).gather(-1, batch.completion[..., None]).squeeze(-1) * batch.mask

    with torch.no_grad():
        teacher_logits = plain_logits(teacher, batch.teacher_ids, batch.teacher_mask)
    student_logits = plain_logits(student, batch.student_ids, batch.student_mask)
    scores = train_min.Scores(sampled(teacher_logits), egrsd.token_entropy(teacher_logits) * batch.mask,
                              sampled(student_logits).detach(), [])
    want = train_min.weight_tokens(advantages, scores, batch.mask, cfg)
    loss = (egrsd.opsd_loss(student_logits, teacher_logits, batch.mask) if method == "opsd"
            else egrsd.policy_loss(sampled(student_logits), want.advantage, batch.mask))
    loss.backward()
    want_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)

    widths, forward = [], student.model.forward
    student.model.forward = lambda input_ids, **kw: widths.append(input_ids.shape[1]) or forward(input_ids=input_ids, **kw)
    before = [p.detach().clone() for p in student.parameters()]
    scores = train_min.score(None, teacher, batch, cfg)
    _, _, got = train_min.update(student, teacher, torch.optim.SGD(student.parameters(), lr=1.0), batch, scores, advantages, cfg)
    for k in ("magnitude", "gate", "advantage"):
        torch.testing.assert_close(getattr(got, k), getattr(want, k), rtol=1e-10, atol=1e-12, msg=k)
    for p, b, g in zip(student.parameters(), before, want_grads):
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-9, atol=1e-12)
    own = [int(batch.student_mask[rows].sum(dim=1).max() + batch.mask[rows].sum(dim=1).max())
           for rows in train_min.micro_batches(batch.mask, 2)]
    full = batch.student_ids.shape[1] + batch.completion.shape[1]
    assert widths == own and min(own) < full, f"each micro-batch as wide as its own rows: {widths}, {own} of {full}"


@pytest.mark.parametrize("method, dtype", [("cl-egrsd", torch.float32), ("rlsd", torch.float32), ("cl-egrsd", torch.bfloat16)])
def test_the_update_weights_tokens_as_a_separate_scoring_pass_of_the_sampler_would(method, dtype):
    """δ and w take the student's log-probs from the update's own forward. In float32 the sampler is the
    student and the weights equal those of a separate scoring pass; in bf16 the update computes over float32
    master weights under autocast and the bf16 sampler differs only by rounding (w within 1%)."""
    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_model(tokenizer, seed=2, dtype=dtype)
    student = build_tiny_model(tokenizer, seed=1).float()
    sampler = student if dtype == torch.float32 else build_tiny_model(tokenizer, seed=1, dtype=dtype)
    train_min.copy_weights(student, sampler)
    cfg = train_min.Config(model="tiny", device="cpu", dtype=str(dtype).removeprefix("torch."), method=method,
                           max_new_tokens=10, micro_batch_size=2, gate_group=2)
    torch.manual_seed(0)
    batch = train_min.rollouts(sampler, tokenizer, built_in_problems(4, 1)[0], cfg)
    advantages = torch.tensor([1.0, -0.5, 0.25, -2.0])
    separate = train_min.weight_tokens(advantages, train_min.score(sampler, teacher, batch, cfg), batch.mask, cfg)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    _, _, weights = train_min.update(student, teacher, optimizer, batch, train_min.score(None, teacher, batch, cfg), advantages, cfg)
    if dtype == torch.float32:
        for k in ("magnitude", "gate", "advantage"):
            torch.testing.assert_close(getattr(weights, k), getattr(separate, k), atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(weights.magnitude, separate.magnitude, atol=0.01, rtol=0)
        assert torch.equal(weights.gate, separate.gate), "the gate is the teacher's alone"


@pytest.fixture(scope="module")
def format_trained_model(tmp_path_factory):
    """A tiny model taught the answer format only: one random digit, then EOS. Correct 1 time in 10."""
    folder = tmp_path_factory.mktemp("sft")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    problems = [Problem(f"Give the secret number ({i}).", "The secret number is 7.", "7") for i in range(64)]
    with open(folder / "data.jsonl", "w") as f:
        for p in problems:
            f.write(json.dumps({"problem": p.question, "solution": p.solution, "answer": p.answer}) + "\n")
    prompts = [tokenizer.apply_chat_template(student_messages(p), tokenize=False, add_generation_prompt=True) for p in problems]
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        digits = torch.randint(0, 10, (32,), generator=generator).tolist()
        texts = [prompts[(32 * step + i) % 64] + f"{d}<|im_end|>" for i, d in enumerate(digits)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        labels = batch["input_ids"].clone()
        labels[:, :-2] = -100  # learn the digit and the EOS (left padding puts them last)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder


def test_on_policy_training_raises_the_reward_on_a_learnable_task(format_trained_model, tmp_path):
    """Signs and masks are right: the reward of a task whose answer is always 7 climbs well above chance."""
    folder = format_trained_model
    train_min.main(["--model", str(folder / "model"), "--data", str(folder / "data.jsonl"), "--method", "egrsd",
                    "--device", "cpu", "--steps", "25", "--batch-size", "32", "--micro-batch-size", "32",
                    "--max-new-tokens", "4", "--lr", "2e-3", "--eval-size", "0", "--save-every", "0",
                    "--advantage-warmup", "5", "--gradient-checkpointing", "off", "--output-dir", str(tmp_path)])
    rewards = [r["reward"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert first < 0.5 and last > first + 0.5, rewards  # from chance (1 in 10 × 1.25) to mostly right


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS | {"eval_s"}}


def stop_after_step(step: int, monkeypatch) -> None:
    """As if Ctrl-C came during `step`: the run checkpoints after it and returns."""
    append_row = train_min.run_io.append_row

    def append_then_interrupt(metrics, row):
        append_row(metrics, row)
        if row["kind"] == "train" and row["step"] == step:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_min.run_io, "append_row", append_then_interrupt)


@pytest.mark.parametrize("dtype, schedule, lora", [
    ("float32", "constant", False),  # (cosine: with LoRA below; linear: in bfloat16)
    ("bfloat16", "linear", False),  # bfloat16: a separate sampler copy to restore
    ("float32", "cosine", True), ("bfloat16", "linear", True)])  # LoRA: the adapter and its optimizer only
def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(dtype, schedule, lora, tmp_path, monkeypatch):
    if lora:
        pytest.importorskip("peft", reason="the optional extra peft is not installed")
    flags = TINY + ["--method", "cl-egrsd", "--eval-every", "1", "--save-every", "0", "--dtype", dtype, "--steps", "3",
                    "--lr-schedule", schedule, "--warmup-steps", "1"] + (["--lora-r", "4"] if lora else [])
    train_min.main(flags + ["--output-dir", str(tmp_path / "straight")])
    with monkeypatch.context() as patch:
        stop_after_step(2, patch)
        train_min.main(flags + ["--output-dir", str(tmp_path / "resumed")])
    before = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    train_min.main(["--resume", str(tmp_path / "resumed")])
    after = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert after.startswith(before), "rows already written must stay as they were"
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [without_timings(r) for r in resumed] == [without_timings(r) for r in straight]
    rates = [r["lr"] for r in straight if r["kind"] == "train"]
    assert rates[0] == 0.0 and rates[1] == 1e-6, "one warm-up step from 0"
    assert rates[2] == {"constant": 1e-6, "linear": 0.5e-6, "cosine": 0.5e-6}[schedule]


def test_a_constant_schedule_can_be_extended_on_resume_and_a_decaying_one_cannot(tmp_path):
    flags = TINY + ["--steps", "1", "--eval-size", "0", "--save-every", "0"]
    train_min.main(flags + ["--lr-schedule", "constant", "--output-dir", str(tmp_path / "constant")])
    train_min.main(["--resume", str(tmp_path / "constant"), "--steps", "2"])
    assert [r["step"] for r in read_metrics(tmp_path / "constant")] == [1, 2]
    train_min.main(flags + ["--lr-schedule", "linear", "--output-dir", str(tmp_path / "linear")])
    with pytest.raises(SystemExit, match="--steps: a resumed run keeps 1, as its decaying learning-rate schedule"):
        train_min.main(["--resume", str(tmp_path / "linear"), "--steps", "2"])
    with pytest.raises(SystemExit, match="--lr-schedule: a resumed run keeps 'linear', as its decaying"):  # the saved
        train_min.main(["--resume", str(tmp_path / "linear"), "--lr-schedule", "constant"])  # one decides
    with pytest.raises(SystemExit, match="--model: a resumed run keeps 'tiny'"):
        train_min.main(["--resume", str(tmp_path / "linear"), "--model", "random-0.5b"])


def test_ctrl_c_checkpoints_after_the_current_step_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    flags = [*TINY, "--steps", "50", "--eval-size", "0", "--save-every", "0", "--lr-schedule", "constant",
             "--output-dir", str(tmp_path)]  # constant: the resume may then stop early
    with monkeypatch.context() as patch:
        stop_after_step(1, patch)  # a real SIGINT to this process, during step 1
        train_min.main(flags)  # returns: no KeyboardInterrupt
    assert "checkpoint saved at step 1" in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    written = [r["step"] for r in read_metrics(tmp_path)]
    assert written == list(range(1, state["step"] + 1)) == [1], "every finished step is logged and checkpointed"
    train_min.main(["--resume", str(tmp_path), "--steps", str(state["step"] + 1)])
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, state["step"] + 2))
    raw = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["kind"], r["step"]) for r in raw] == [("train", 1), ("resume", 1), ("train", 2)], "where the run went on"


def test_rows_of_steps_past_a_resumes_checkpoint_written_before_it_are_of_a_trajectory_the_run_dropped(tmp_path):
    """Killed after the rows of step 3, resumed from the checkpoint of step 2 with --steps 2 (a constant schedule)
    or with evaluations at other steps: the run's rows are those it kept (the last of each step), not step 3's."""
    train = lambda step, reward: {"kind": "train", "step": step, "reward": reward}  # noqa: E731
    evaluation = lambda step, accuracy: {"kind": "eval", "step": step, "method": "egrsd", "eval_accuracy": accuracy,  # noqa: E731
                                         "eval_length": 10.0, "eval_acc_per_1k_tokens": accuracy * 100}
    write_metrics(tmp_path, [evaluation(0, 0.1), train(1, 0.5), train(2, 0.6), evaluation(2, 0.2), train(3, 0.7),
                             evaluation(3, 0.9), {"kind": "resume", "step": 2}, evaluation(2, 0.3),
                             {"kind": "resume", "step": 2}])
    assert [(r["kind"], r["step"], r.get("reward", r.get("eval_accuracy"))) for r in views.read_rows(str(tmp_path))] == [
        ("eval", 0, 0.1), ("train", 1, 0.5), ("eval", 2, 0.3), ("train", 2, 0.6)]


def nan_forward(completion_hidden):
    """completion_hidden whose output is NaN in training mode (the student's update), as after an overflow."""
    return lambda model, *args: completion_hidden(model, *args) * (math.nan if model.training else 1.0)


@pytest.mark.parametrize("where, lora", [("loss", False), ("forward", False), ("forward", True)])
def test_non_finite_steps_are_skipped_and_then_stop_the_run(where, lora, tmp_path, monkeypatch):
    if lora:
        peft = pytest.importorskip("peft", reason="the optional extra peft is not installed")
    if where == "loss":
        monkeypatch.setattr(egrsd, "policy_loss", lambda logp, adv, mask: (logp * float("nan")).sum())
    else:
        monkeypatch.setattr(train_min, "completion_hidden", nan_forward(train_min.completion_hidden))
    flags = TINY + ["--steps", "5", "--max-bad-steps", "2", "--eval-size", "0"] + (["--lora-r", "4"] if lora else [])
    with pytest.raises(SystemExit, match="skipped steps in a row, non-finite or blown up") as stop:
        train_min.main(flags + ["--output-dir", str(tmp_path), "--dump-tokens", "2"])
    assert "This step was skipped" in (tmp_path / "tokens" / "step_2.html").read_text(encoding="utf-8")
    assert f"The last complete checkpoint is {tmp_path}/checkpoint (step 2)" in str(stop.value.code)
    if where == "loss" and not lora:  # --no-save-model: no checkpoint to name
        with pytest.raises(SystemExit, match="(?s)blown up.*No checkpoint was complete yet"):
            train_min.main(flags + ["--no-save-model", "--output-dir", str(tmp_path / "unsaved")])
    rows = read_metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [True, True]
    initial = build_tiny_model(build_tiny_tokenizer())
    if lora:  # an adapter that never moved from its start: B = 0, so the model is the base
        adapted = peft.PeftModel.from_pretrained(build_tiny_model(build_tiny_tokenizer()), tmp_path / "checkpoint")
        assert all((p == 0).all() for name, p in adapted.named_parameters() if "lora_B" in name)
    else:
        checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
        assert same_parameters(checkpoint, initial), "a skipped step changes nothing"


@pytest.mark.parametrize("flag, value", [
    ("--method", "ppo"), ("--window", "-1"), ("--gamma", "-0.5"), ("--eps", "1.5"), ("--eps", "0"),
    ("--floor", "2"), ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--denominator", "max"),
    ("--data", "/no/such/file.jsonl"), ("--top-p", "0"), ("--lr", "-1"), ("--rollout", "static"),
    ("--rollout", "graph"),  # on the CPU device
    ("--eval-data", "/no/such/file.jsonl"), ("--verifier", "exact"),
    ("--lr-schedule", "step"), ("--warmup-steps", "-1"), ("--gate-group", "-1"), ("--score-temperature", "-1"),
    ("--lora-r", "-1"), ("--lora-alpha", "0"), ("--lora-dropout", "1"), ("--lora-target-modules", "q_proj,"),
    ("--train-size", "2001"), ("--eval-max-new-tokens", "-1"), ("--max-bad-steps", "0"), ("--eval-top-p", "0"),
    ("--compile-decode", "--rollout=hf-dynamic"),  # (a flag without a value, then the engine it does not apply to)
])
def test_a_bad_flag_stops_before_any_model_loads_naming_the_flag(flag, value, monkeypatch, tmp_path):
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        train_min.main(["--device", "cpu", flag, value, "--output-dir", str(tmp_path)])
    assert str(stop.value.code).startswith(flag + ":")


def test_help_lists_every_flag_with_its_meaning(capsys):
    with pytest.raises(SystemExit) as stop:
        train_min.main(["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0
    for field in fields(config.Config):
        assert "--" + field.name.replace("_", "-") in text, field.name
    assert "math-verify" in text and "%" in text and "--compare RUN_DIR" in text


def test_the_defaults_are_the_papers_settings_as_docs_method_states_them():
    """docs/METHOD.md, "The paper's settings": 32 prompts × 1 rollout, 100 steps, rollouts at temperature 1.1, top-p
    0.95, top-k 20, up to 1,024 tokens, grad-norm clip 0.1, γ 0.3, W 3 (4B), ε 0.2, floor 0.1, β_L 0.5 and A = r − 0.5
    for 10 steps (§1); evaluation avg@4 at temperature 1.0 and top-p 0.95, no top-k. (The learning rate is not the
    paper's: its 5e-6 is for LoRA; its LoRA's r, α and dropout: test_lora.)"""
    paper = dict(steps=100, batch_size=32, group_size=1, temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=1024,
                 grad_clip=0.1, gamma=0.3, window=3, eps=0.2, floor=0.1, beta_length=0.5, advantage_warmup=10,
                 eval_samples=4, eval_temperature=1.0, eval_top_p=0.95, eval_top_k=0, method="egrsd", lora_alpha=128.0)
    defaults = vars(config.Config())
    assert {name: defaults[name] for name in paper} == paper
    text = " ".join((ROOT / "docs/METHOD.md").read_text().split())
    assert ("32 prompts per step with 1 rollout each, 100 steps, rollouts at temperature 1.1, top-p 0.95, top-k 20, at "
            "most 1,024 completion tokens; γ = 0.3; CL-EGRSD with W = 3 (4B)") in text, "the paper's settings as stated"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_the_default_command_without_cuda_shows_the_cpu_smoke_command(monkeypatch):
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        train_min.main([])
    assert config.SMOKE in str(stop.value.code)
    assert config.SMOKE in (ROOT / "README.md").read_text(), "the README's smoke command is the one the trainer shows"


def test_resume_refuses_another_output_dir_before_any_model_loads(tmp_path, monkeypatch):
    train_min.main(TINY + ["--steps", "1", "--eval-size", "0", "--output-dir", str(tmp_path / "run")])
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        train_min.main(["--resume", str(tmp_path / "run"), "--output-dir", str(tmp_path / "elsewhere")])
    assert str(stop.value.code).startswith("--output-dir:")
    with pytest.raises(SystemExit) as stop:
        train_min.main(["--resume", str(tmp_path / "elsewhere")])
    assert str(stop.value.code).startswith("--resume:")
    with pytest.raises(SystemExit) as stop:  # fewer steps than the checkpoint has done
        train_min.main(["--resume", str(tmp_path / "run"), "--steps", "0"])
    assert str(stop.value.code).startswith("--steps:")


def test_symbolic_answers_load_only_for_the_math_verify_verifier(tmp_path, monkeypatch):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "p", "solution": "s", "answer": "2\\sqrt{2}"}) + "\n")
    with pytest.raises(ValueError, match=":1: field 'answer'.*--verifier math-verify"):
        load_problems(path)
    assert load_problems(path, numeric=False)[0].answer == "2\\sqrt{2}"
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)  # the extra is missing
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match="--verifier: expected math-verify installed"):
        train_min.main(TINY + ["--verifier", "math-verify", "--data", str(path), "--output-dir", str(tmp_path / "run")])


def test_eval_data_is_a_held_out_file_and_data_is_then_all_training(tmp_path, capsys):
    rows = lambda n, tag: "".join(json.dumps({"problem": f"{tag} {i}", "solution": "s", "answer": "1"}) + "\n" for i in range(n))  # noqa: E731
    (tmp_path / "train.jsonl").write_text(rows(10, "train"))
    (tmp_path / "eval.jsonl").write_text(rows(3, "eval"))
    cfg = train_min.Config(data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "eval.jsonl"), eval_size=2)
    train, held_out = load_data(cfg)
    assert [p.question for p in train] == [f"train {i}" for i in range(10)] and [p.question for p in held_out] == ["eval 0", "eval 1"]
    train, held_out = load_data(train_min.Config(data=str(tmp_path / "train.jsonl"), eval_size=2))
    assert len(train) == 8 and [p.question for p in held_out] == ["train 0", "train 1"]  # without it: split off --data
    train, held_out = load_data(train_min.Config(train_size=5, eval_size=3))  # the built-in files
    assert (train, held_out) == built_in_problems(5, 3)


def test_the_held_out_split_of_data_is_a_fifth_at_most_one_problem_at_least_and_leaves_training_problems(tmp_path):
    """Also: --eval-data is read with the run's verifier, as --data is (symbolic answers under math-verify)."""
    rows = lambda n: "".join(json.dumps({"problem": f"p{i}", "solution": "s", "answer": "1"}) + "\n" for i in range(n))  # noqa: E731
    for n, eval_size, held_out in ((20, 10, 4), (4, 2, 1), (20, 0, 0)):
        (tmp_path / "data.jsonl").write_text(rows(n))
        train, evaluated = load_data(train_min.Config(data=str(tmp_path / "data.jsonl"), eval_size=eval_size))
        assert ([p.question for p in evaluated], len(train)) == ([f"p{i}" for i in range(held_out)], n - held_out)
    (tmp_path / "data.jsonl").write_text(rows(1))
    with pytest.raises(SystemExit, match="^" + re.escape(f"--data: {tmp_path}/data.jsonl leaves no training problem after the held-out split")):
        load_data(train_min.Config(data=str(tmp_path / "data.jsonl"), eval_size=2))
    (tmp_path / "math.jsonl").write_text(json.dumps({"problem": "q", "solution": "s", "answer": "2\\sqrt{2}"}) + "\n")
    cfg = train_min.Config(data=str(tmp_path / "data.jsonl"), eval_data=str(tmp_path / "math.jsonl"), verifier="math-verify")
    assert [p.answer for p in load_data(cfg)[1]] == ["2\\sqrt{2}"]


def test_every_rollout_engine_samples_a_valid_batch_and_greedy_engines_agree(compile_step_recorded):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    ids, attention = train_min.encode_prompts(tokenizer, [student_messages(p) for p in built_in_problems(3, 1)[0]], "cpu")
    greedy = {}
    for engine in ("auto", "eager", "hf-static", "hf-dynamic"):
        cfg = train_min.Config(max_new_tokens=12, rollout=engine)
        torch.manual_seed(0)
        completion, mask, finished = train_min.generate(model, tokenizer, ids, attention, cfg)
        assert completion.shape[0] == 3 and completion.shape[1] <= 12 and (completion < len(tokenizer)).all()
        greedy[engine] = train_min.generate(model, tokenizer, ids, attention, cfg, greedy=True)[0]
    assert all(torch.equal(greedy["eager"], g) for g in greedy.values())
    compile_step_recorded.clear()  # --compile-decode reaches the decoder
    for compile_decode in (False, True):
        train_min.generate(model, tokenizer, ids, attention, train_min.Config(max_new_tokens=2, rollout="eager", compile_decode=compile_decode))
    assert compile_step_recorded == [False, True]


def test_bf16_runs_keep_float32_master_weights_and_a_synced_bf16_sampler(tmp_path):
    student, teacher = train_min.main(TINY + ["--dtype", "bfloat16", "--steps", "1", "--eval-size", "0",
                                              "--output-dir", str(tmp_path)])
    assert student.dtype == torch.float32 and teacher.dtype == torch.bfloat16
    sampler = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # the rollout model, saved in bf16
    assert sampler.dtype == torch.bfloat16
    assert same_parameters(sampler, student.to(torch.bfloat16))


def run_checking_the_sampler(flags: list, tmp_path, monkeypatch) -> list[dict]:
    """Run TINY with `flags` (at least three steps); before each step's rollouts, check that the sampler holds
    the student's weights as last updated, in its own dtype (full: the float32 master weights rounded; LoRA:
    the adapter, B scaled by α/r). Returns the training rows."""
    from trainer import lora

    runs, seen, setup, rollouts = [], [], train_min.setup, train_min.rollouts
    monkeypatch.setattr(train_min, "setup", lambda cfg: runs.append(setup(cfg)) or runs[-1])

    def checked(sampler, *args):
        student = runs[-1].student
        if lora.is_adapted(student):
            layers = dict(lora.adapted_layers(student.get_base_model()))
            pairs = [(m.A, layers[name].lora_A["default"].weight) for name, m in sampler.named_modules() if name in layers]
            pairs += [(m.sB, layers[name].lora_B["default"].weight * layers[name].scaling["default"])
                      for name, m in sampler.named_modules() if name in layers]
        else:
            theirs = dict(student.named_parameters())
            pairs = [(p, theirs[name]) for name, p in sampler.named_parameters()]
        seen.append(bool(pairs) and all(torch.equal(ours, theirs.to(ours.dtype)) for ours, theirs in pairs))
        return rollouts(sampler, *args)

    monkeypatch.setattr(train_min, "rollouts", checked)
    train_min.main(TINY + ["--output-dir", str(tmp_path)] + flags)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(seen) == len(rows) >= 3 and all(seen), seen
    device = torch.device(runs[-1].cfg.device).type
    assert runs[-1].sampler.dtype == torch.bfloat16 and next(runs[-1].sampler.parameters()).device.type == device
    assert all(r["update_rel"] > 0 and r["sampler_changed"] > 0 and not r["skipped"] for r in rows), rows
    return rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path of a run needs a GPU")
@pytest.mark.parametrize("lora", [False, True])
def test_a_cuda_run_decodes_through_graphs_from_the_bf16_sampler_as_last_updated(lora, tmp_path, monkeypatch):
    """The path of a GPU run, which the CPU suite cannot take: bf16 by --dtype auto, every rollout and
    evaluation one CUDA graph per decode step (--rollout graph raises where a capture fails), each step
    sampling from the weights of the update before it, and the peak memory recorded."""
    if lora:
        pytest.importorskip("peft", reason="the optional extra peft is not installed")
    calls, captures, generate, capture = [], [], decoding.generate, decoding._Decoder.capture
    monkeypatch.setattr(decoding, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    monkeypatch.setattr(decoding._Decoder, "capture", lambda self: captures.append(1) or capture(self))
    rows = run_checking_the_sampler(["--device", "cuda", "--dtype", "auto", "--rollout", "graph", "--steps", "3", "--lr", "1e-3"]
                                    + (["--lora-r", "4"] if lora else []), tmp_path, monkeypatch)
    assert all(r["peak_gpu_mem_gb"] > 0 for r in rows)
    assert len(captures) == len(calls) >= 3 + 2 * 2, "every rollout and evaluation (greedy, avg@4) decoded through a graph"


@pytest.mark.parametrize("lora", [False, True])
def test_a_bf16_run_on_cpu_samples_from_the_weights_as_last_updated(lora, tmp_path, monkeypatch):
    """The CUDA test's check on the CPU path (no graphs), so that the check itself is known to work here."""
    if lora:
        pytest.importorskip("peft", reason="the optional extra peft is not installed")
    run_checking_the_sampler(["--dtype", "bfloat16", "--steps", "3", "--lr", "1e-3", "--eval-size", "0"]
                             + (["--lora-r", "4"] if lora else []), tmp_path, monkeypatch)


def span_texts(page: str) -> list[list[tuple[int, str]]]:
    """(token id, text) of each token span, per rollout, from the HTML of views.token_html."""
    from html.parser import HTMLParser

    class Spans(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rollouts, self.current = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "pre":
                self.rollouts.append([])
            if tag == "span":
                self.current = [int(dict(attrs)["data-id"]), ""]

        def handle_data(self, data):
            if self.current is not None:
                self.current[1] += data

        def handle_endtag(self, tag):
            if tag == "span":
                self.rollouts[-1].append(tuple(self.current))
                self.current = None

    parser = Spans()
    parser.feed(page)
    return parser.rollouts


@pytest.mark.parametrize("lora", [False, True])
def test_token_view_is_self_contained_and_its_tokens_decode_to_the_completion(lora, tmp_path):
    if lora:
        pytest.importorskip("peft", reason="the optional extra peft is not installed")
    train_min.main(TINY + ["--method", "cl-egrsd", "--steps", "1", "--eval-size", "0", "--dump-tokens", "1",
                           "--max-new-tokens", "16", "--output-dir", str(tmp_path)] + (["--lora-r", "4"] if lora else []))
    page = (tmp_path / "tokens" / "step_1.html").read_text()
    assert "<script" not in page and "<link" not in page and "http" not in page
    tokenizer = build_tiny_tokenizer()
    rollouts = span_texts(page)
    assert len(rollouts) == 4 and page.count("reward ") >= 4
    for spans in rollouts:
        ids, texts = zip(*spans)
        assert "".join(texts) == tokenizer.decode(list(ids))
    assert "Ĥ_CL=" in page and "ω=" in page


def test_the_metrics_of_a_step_take_every_mean_and_share_over_the_valid_tokens_and_the_gate_as_applied():
    """Two rollouts of 3 and 2 valid tokens (5 in all) padded to 4 columns, whose padding holds 0 as the library
    leaves it: the means, the gate's minimum and the regimes' shares are over the 5, the per-regime gate is the
    applied one (EGRSD's plain gate here, not the lookahead), restored_* is lookahead − plain, and a regime
    without tokens has no mean (None, not NaN: metrics.jsonl is JSON)."""
    from types import SimpleNamespace

    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    plain = torch.tensor([[1.0, 0.8, 0.5, 0.0], [0.9, 0.7, 0.0, 0.0]])
    lookahead = torch.tensor([[1.0, 0.95, 0.5, 0.0], [0.9, 0.7, 0.0, 0.0]])
    gates = egrsd.Gates(plain=plain, lookahead=lookahead, normalised=torch.tensor([[0.1, 0.1, 0.9, 0], [0.1, 0.3, 0, 0]]),
                        regimes=torch.tensor([[1, 3, 4, 0], [1, 2, 0, 0]]))  # lock, pivot, fork; lock, mid
    scores = SimpleNamespace(teacher_entropy=torch.tensor([[0.1, 2.0, 3.0, 0.0], [0.2, 1.0, 0.0, 0.0]]))
    weights = SimpleNamespace(gate=plain, magnitude=torch.tensor([[1.0, 1.2, 0.9, 0.0], [1.1, 0.8, 0.0, 0.0]]))
    assert views.regime_stats(scores, weights, mask, gates) == pytest.approx({
        "gate_mean": 0.78, "gate_min": 0.5, "magnitude_mean": 1.0, "teacher_entropy_mean": 1.26,
        "share_lock": 0.4, "gate_lock": 0.95, "restored_lock": 0.0, "share_mid": 0.2, "gate_mid": 0.7, "restored_mid": 0.0,
        "share_pivot": 0.2, "gate_pivot": 0.8, "restored_pivot": 0.15, "share_fork": 0.2, "gate_fork": 0.5, "restored_fork": 0.0})
    locks = egrsd.Gates(plain=plain, lookahead=plain, normalised=gates.normalised, regimes=mask.long())  # every token a lock
    only_locks = views.regime_stats(scores, weights, mask, locks)
    assert only_locks["share_lock"] == 1.0 and only_locks["share_fork"] == 0.0
    assert only_locks["gate_fork"] is None and only_locks["restored_fork"] is None
    nothing = views.regime_stats(scores, weights, torch.zeros_like(mask), egrsd.Gates(plain, lookahead, gates.normalised,
                                                                                     torch.zeros_like(gates.regimes)))
    assert nothing["gate_mean"] is None and nothing["gate_min"] is None and nothing["share_lock"] == 0.0


def test_a_tokens_colour_is_its_advantages_sign_and_its_darkness_its_factor_w_times_omega_on_the_pages_range():
    """Factors w·ω of 0.5, 0.7 and 0.9 on the page: palest (92% lightness), halfway (67%) and darkest (42%); the
    token of the largest w alone (1.4 · 0.5) is not the darkest. Blue for Â > 0, red for Â < 0, grey for Â = 0;
    the title and every token's text escaped, and the hover text each token's own signals."""
    rollouts = [{"title": "rollout <0> & co", "ids": [5, 6], "tokens": ["a", "<b>&"], "entropy": [0.5, 1.5],
                 "entropy_cl": [0.25, 0.75], "gate": [1.0, 0.5], "magnitude": [0.5, 1.4], "advantage": [0.2, 0.28],
                 "regime": ["lock", "fork"]},
                {"title": "rollout 1", "ids": [7, 8], "tokens": ["c", "d"], "entropy": [0.0, 0.1], "entropy_cl": [0.0, 0.05],
                 "gate": [0.9, 1.0], "magnitude": [1.0, 0.5], "advantage": [0.0, -0.1], "regime": ["lock", "lock"]}]
    page = views.token_html(4, rollouts)
    spans = re.findall(r"<span class='t' data-id='(\d+)' style='background:([^']*)' title='([^']*)'>([^<]*)</span>", page)
    assert [(int(i), colour, text) for i, colour, _, text in spans] == [
        (5, "hsl(215, 80%, 92%)", "a"), (6, "hsl(215, 80%, 67%)", "&lt;b&gt;&amp;"),
        (7, "hsl(0, 0%, 42%)", "c"), (8, "hsl(0, 80%, 92%)", "d")]
    assert spans[1][2] == "H=1.500 nats, Ĥ_CL=0.750, ω=0.500, w=1.400, Â=+0.2800, fork"
    assert "<h3>rollout &lt;0&gt; &amp; co</h3>" in page and "(palest 0.500, darkest 0.900 on this page)" in page


def test_a_skipped_steps_page_says_so_and_a_non_finite_token_neither_sets_the_range_nor_gets_a_colour():
    """A NaN factor among finite ones (first on the page, where min and max would take it): the range is the
    finite factors', the NaN token has an outline, no colour (no "nan" in the CSS); a skipped step says so first."""
    nan = math.nan
    rollout = {"title": "r", "ids": [1, 2, 3], "tokens": ["a", "", "c"], "entropy": [1.0] * 3, "entropy_cl": [0.1] * 3,
               "gate": [1.0] * 3, "magnitude": [nan, 0.8, 1.2], "advantage": [0.5] * 3, "regime": ["lock"] * 3}
    page = views.token_html(1, [rollout])
    styles = re.findall(r"<span class='t' data-id='\d+' style='([^']*)'", page)
    assert styles == ["outline:1px dashed #000", "background:hsl(215, 80%, 92%)", "background:hsl(215, 80%, 42%)"]
    assert "palest 0.800, darkest 1.200" in page and "nan%" not in page and "skipped" not in page
    assert "span.t:empty{display:inline-block" in page  # the token "" keeps a box to hover
    skipped = views.token_html(1, [rollout | {"magnitude": [nan] * 3, "advantage": [nan] * 3}], skipped=True)
    assert "This step was skipped" in skipped and skipped.count("outline:1px dashed") == 3


def test_the_token_view_is_written_as_utf8_whatever_the_locale_and_into_the_working_folder(tmp_path, monkeypatch):
    """A locale whose encoding is ASCII (open() without an encoding then takes it) and a path without a folder."""
    from types import SimpleNamespace

    real_open = open
    monkeypatch.setattr(views, "open", lambda *a, **k: real_open(*a, **{"encoding": "ascii", **k}), raising=False)
    monkeypatch.chdir(tmp_path)
    mask = torch.tensor([[True, True]])
    gates = egrsd.Gates(plain=mask.float(), lookahead=mask.float(), normalised=mask.float(), regimes=mask.long())
    weights = SimpleNamespace(gate=mask.float(), magnitude=mask.float(), advantage=mask.float())
    views.dump_tokens("step_1.html", 1, tiny_tokenizer(), SimpleNamespace(mask=mask, completion=torch.tensor([[40, 41]])),
                      SimpleNamespace(teacher_entropy=mask.float()), weights, [1.0], [True], gates)
    assert "Â = A·w·ω" in (tmp_path / "step_1.html").read_text(encoding="utf-8")


def test_the_token_view_of_a_step_shows_each_rollouts_valid_tokens_with_its_regime_and_lookahead_entropy(tmp_path):
    """A batch of two (fewer than the four shown at most): each rollout's tokens up to its mask, no padding; Ĥ_CL
    from the gates' normalised lookahead entropy, not H; each token's regime by its code (1 lock … 4 fork)."""
    from types import SimpleNamespace

    mask = torch.tensor([[True, True, True], [True, False, False]])
    gates = egrsd.Gates(plain=mask.float(), lookahead=mask.float(), normalised=torch.tensor([[0.1, 0.2, 0.3], [0.4, 0, 0]]),
                        regimes=torch.tensor([[1, 3, 4], [2, 0, 0]]))
    scores = SimpleNamespace(teacher_entropy=torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]))
    weights = SimpleNamespace(gate=mask.float(), magnitude=mask.float(), advantage=torch.tensor([[0.5, 0.5, 0.5], [-0.5, 0, 0]]))
    batch = SimpleNamespace(mask=mask, completion=torch.tensor([[40, 41, 42], [43, 44, 44]]))
    page_path = tmp_path / "tokens" / "step_2.html"
    views.dump_tokens(str(page_path), 2, tiny_tokenizer(), batch, scores, weights, [1.25, 0.0], [True, False], gates)
    page = page_path.read_text()
    assert [[i for i, _ in spans] for spans in span_texts(page)] == [[40, 41, 42], [43]]
    titles = re.findall(r"title='([^']*)'", page)
    assert [t.split(", ")[:2] + t.split(", ")[-1:] for t in titles] == [
        ["H=1.000 nats", "Ĥ_CL=0.100", "lock"], ["H=2.000 nats", "Ĥ_CL=0.200", "pivot"], ["H=3.000 nats", "Ĥ_CL=0.300", "fork"],
        ["H=4.000 nats", "Ĥ_CL=0.400", "mid"]]
    assert "<h3>rollout 0: reward 1.250, correct, 3 tokens</h3>" in page and "<h3>rollout 1: reward 0.000, wrong, 1 tokens</h3>" in page


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(3, 511), min_size=1, max_size=12))
def test_token_pieces_join_into_the_decoded_text_also_when_a_character_spans_tokens(ids):
    tokenizer = tiny_tokenizer()
    assert "".join(views.token_texts(tokenizer, ids)) == tokenizer.decode(ids)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    return build_tiny_tokenizer()


def write_run(run_dir, method, seed, start, end, ids, templates, order=None, steps=3):
    """A run's config.json and metrics.jsonl as train_min writes them: greedy 0/1 per problem at steps 0 and
    10, avg@4 equal to greedy, and a training reward that rises by 0.01 a step; `order` permutes the
    problems in the end row (runs pair by id, not by position)."""
    order = order or list(range(len(ids)))
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**vars(config.Config()), "method": method, "seed": seed,
                                                     "output_dir": str(run_dir)}))

    def evaluation(step, correct, order):
        correct, chosen = [correct[i] for i in order], [ids[i] for i in order]
        return {"kind": "eval", "step": step, "method": method, "eval_accuracy": sum(correct) / len(correct),
                "eval_length": 400.0 + step, "eval_acc_per_1k_tokens": 1.0, "eval_truncated": 0.0, "eval_correct": correct,
                "eval_lengths": [400 + step] * len(correct), "eval_ids": chosen, "eval_templates": [templates[i] for i in order],
                "eval_samples": 4, "eval_sampled_accuracy": sum(correct) / len(correct), "eval_sampled_correct": correct,
                "eval_sampled_lengths": [410 + step + 30 * c for c in correct],
                "eval_sampled_length": 410.0 + step + 30 * sum(correct) / len(correct), "eval_sampled_acc_per_1k_tokens": 1.0}
    rows = [evaluation(0, start, list(range(len(ids))))]
    rows += [{"kind": "train", "step": k, "method": method, "reward": 0.2 + 0.01 * k + 0.001 * (k % 2), "step_s": 2.0,
              "peak_gpu_mem_gb": 4.0, "gate_mean": 0.9 + 0.01 * k + 0.1 * seed, "gate_min": 0.5 - 0.1 * k,
              "magnitude_mean": 1.0, "teacher_entropy_mean": 0.3, "share_lock": 0.8, "share_mid": 0.15 + 0.01 * seed,
              "share_pivot": 0.05 - 0.01 * seed, "share_fork": 0.0} for k in range(1, steps + 1)]
    rows.append(evaluation(10, end, order))
    write_metrics(run_dir, rows)


def test_compare_pools_seeds_and_pairs_by_problem_with_template_clustered_intervals(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    ids, templates = [f"p{i}" for i in range(12)], [i // 3 for i in range(12)]  # 4 templates of 3 problems
    start = [0] * 12
    ends = {"grpo": [[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
            "egrsd": [[1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]]}
    dirs = []
    for method, per_seed in ends.items():
        for seed, end in enumerate(per_seed):
            order = list(reversed(range(12))) if seed == 1 else None
            write_run(tmp_path / f"{method}-s{seed}", method, seed, start, end, ids, templates, order)
            dirs.append(str(tmp_path / f"{method}-s{seed}"))
    train_min.main(["--compare", *dirs, dirs[0]])  # a folder named twice counts once
    out = capsys.readouterr().out.splitlines()
    grpo, egrsd_row = out[2].split(), out[3].split()
    assert grpo[:4] == ["grpo", "grpo", "3", "10"] and egrsd_row[:4] == ["egrsd", "egrsd", "3", "10"]
    accuracy, low, high = stats.seed_interval([sum(e) / 12 for e in ends["egrsd"]])
    assert egrsd_row[5:8] == [f"{accuracy:.3f}", f"[{low:.3f},", f"{high:.3f}]"]
    # egrsd minus grpo: per problem, the seeds' mean; then CR2 over the 4 templates, and the seeds' spread
    difference = [sum(e[i] for e in ends["egrsd"]) / 3 - sum(g[i] for g in ends["grpo"]) / 3 for i in range(12)]
    clustered = stats.clustered_mean(difference, templates)
    result = stats.with_seed_spread(clustered, [[sum(e) / 12 for e in ends["egrsd"]], [sum(g) / 12 for g in ends["grpo"]]])
    assert result.se > clustered.se and result.df != clustered.df
    low, high = stats.interval(result.mean, result.se, result.df)
    last = out[-1]
    assert last.startswith("  egrsd") and f"greedy {100 * result.mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] points" in last
    assert "G = 4, n = 12, seeds 3/3, " in last
    assert f"detectable ±{100 * stats.detectable(result.se, result.df):.1f}, p {views.p_value(result):.3f} Holm)" in last, "one comparison: p as is"
    change = [l for l in out if l.startswith("  grpo ") and "reward slope" in l][0]
    assert "reward slope +1.000" in change, "0.01 a step is +1.000 per 100 steps"
    # the sampled completions' length (the paper's): its mean in the table, and its paired difference
    sampled = out[out.index(next(l for l in out if l.startswith("sampled: avg@K"))) + 2].split()  # its egrsd row
    accuracy, low, high = stats.seed_interval([sum(e) / 12 for e in ends["egrsd"]])  # avg@4 equals greedy here
    assert sampled[:5] == ["egrsd", "4", "0.000", f"{accuracy:.3f}", f"[{low:.3f},"]
    assert sampled[7] == f"{fmean(410 + 10 + 30 * fmean(e) for e in ends['egrsd']):.0f}", "the sampled completions' length"
    length = stats.with_seed_spread(stats.clustered_mean([30 * x for x in difference], templates),
                                    [[30 * fmean(e) for e in ends[m]] for m in ("egrsd", "grpo")])
    low, high = stats.interval(length.mean, length.se, length.df)
    assert f"length@K {length.mean:+.1f} [{low:+.1f}, {high:+.1f}] tokens" in last


def test_holm_adjusts_several_p_values_and_the_verdict_follows_it():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 → running maximum 0.02, 0.03, 0.06, 0.06
    assert views.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert views.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and views.holm([0.02]) == pytest.approx([0.02])
    def result(mean, se):
        return stats.Clustered(mean, se, df=10, clusters=11, n=40)

    results = [result(0.1, 0.04), "fewer than two templates", result(0.1, 0.2), result(0.1, 0.0)]  # t = 2.5 on 10 df: p = 0.031 alone
    # the results without an interval (no templates to cluster by, no spread between them) are not compared
    assert views.holm_adjusted(results) == pytest.approx([2 * views.p_value(results[0]), None, views.p_value(results[2]), None])
    assert views.describe(results[1]) == "n/a (fewer than two templates)"
    assert views.describe(results[3]) == "+10.0 points (no interval: no spread between templates; G = 11, n = 40)"
    assert "(excludes 0;" in views.describe(results[0]) and "(excludes 0;" in views.describe(results[0], p=0.031)
    assert "(no detectable difference after Holm's adjustment;" in views.describe(results[0], p=0.062)
    assert "(no detectable difference after Holm's adjustment;" in views.describe(results[0], p=0.05), "below 0.05 only"
    assert "(no detectable difference;" in views.describe(results[2], p=1.0)


def test_the_detectable_difference_of_one_of_several_comparisons_is_that_of_holms_first_step():
    """(t_{1 − 0.05/6} + t_{0.8}) · se on 10 degrees of freedom, from scipy 1.17.1's t.ppf: (2.8701 + 0.8791) · 4 =
    15.0 points; alone, at 0.05: (2.2281 + 0.8791) · 4 = 12.4."""
    result = stats.Clustered(0.1, 0.04, df=10, clusters=11, n=40)
    assert "detectable ±15.0 at 0.05/3, p 0.093 Holm)" in views.describe(result, p=0.093, comparisons=3)
    assert views.describe(result).endswith("detectable ±12.4)")


def test_a_comparison_without_a_p_value_counts_neither_in_holms_adjustment_nor_in_the_detectable_level(tmp_path):
    """cl-egrsd ends as grpo does on every problem (no spread between templates: no p), so egrsd's greedy
    difference is the one comparison of its measure: its p as is, its detectable difference at 0.05."""
    ids, templates = [f"p{i}" for i in range(8)], [i // 2 for i in range(8)]
    ends = {"grpo": [0, 0, 1, 0, 0, 0, 0, 1], "egrsd": [1, 1, 1, 0, 1, 1, 1, 1], "cl-egrsd": [0, 0, 1, 0, 0, 0, 0, 1]}
    for method, end in ends.items():
        write_run(tmp_path / method, method, 0, [0] * 8, end, ids, templates)
    out = views.compare_table([str(tmp_path / method) for method in ends]).splitlines()
    result = stats.clustered_mean([ends["egrsd"][i] - ends["grpo"][i] for i in range(8)], templates)
    minus = out[next(i for i, l in enumerate(out) if l.startswith("Minus grpo")):]
    line = next(l for l in minus if l.startswith("  egrsd ")).split("; avg@K")[0]
    assert line.endswith(f"G = 4, n = 8, detectable ±{100 * stats.detectable(result.se, result.df):.1f}, "
                         f"p {views.p_value(result):.3f} Holm)"), line
    line = next(l for l in minus if l.startswith("  cl-egrsd "))
    assert "greedy +0.0 points (no interval: no spread between templates; G = 4, n = 8)" in line, line


@given(st.lists(st.floats(0, 1), min_size=1, max_size=8))
def test_holm_is_the_running_maximum_of_its_step_down_bonferroni_factors_capped_at_1(p):
    m = len(p)
    naive = [min(1.0, max((m - sum(q < pj for q in p)) * pj for pj in p if pj <= pi)) for pi in p]
    assert views.holm(p) == pytest.approx(naive)


def held_out_row(problems, values, key="eval_correct"):
    """An evaluation row over problem numbers `problems` (ids p0, p1, ...; two problems a template), with
    values[i] for problem i."""
    return {"eval_ids": [f"p{i}" for i in problems], "eval_templates": [i // 2 for i in problems],
            key: [values[i] for i in problems]}


def in_memory(name, *rows_per_seed):
    return [views.Run(f"{name}-s{seed}", {}, [], list(rows)) for seed, rows in enumerate(rows_per_seed)]


def test_compare_takes_each_seeds_mean_over_the_problems_both_settings_share():
    """Seeds of one setting evaluated on different held-out sets: per problem the mean over the seeds that
    recorded the measure (a2 did not), and each seed's mean over the common problems p2..p7 only."""
    key = "eval_sampled_correct"
    a_ends = [[1, 1, 0, 1, 1, 0, 1, 0, 1, 1], [1, 1, 1, 1, 0, 0, 1, 1, 1, 1]]
    b_ends = [[0, 0, 0, 1, 0, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 1, 0, 0, 1, 0]]
    a = in_memory("a", [held_out_row(range(8), a_ends[0], key)], [held_out_row(range(8), a_ends[1], key)],
                  [held_out_row(range(8), [1] * 10)])  # a2: greedy only
    b = in_memory("b", [held_out_row(range(8), b_ends[0], key)], [held_out_row(range(2, 10), b_ends[1], key)])
    common = range(2, 8)
    difference = [fmean([e[i] for e in a_ends]) - fmean([e[i] for e in b_ends]) for i in common]
    clustered = stats.clustered_mean(difference, [i // 2 for i in common])
    expected = stats.with_seed_spread(clustered, [[fmean([e[i] for i in common]) for e in ends] for ends in (a_ends, b_ends)])
    result = views.compared(a, b, key)
    assert result[:3] == pytest.approx(expected[:3]) and result[3:] == (3, 6, (2, 2))


def test_compare_of_a_setting_with_its_start_adds_the_spread_of_each_seeds_change():
    """Seeds that start apart and gain alike: the spread of their changes, not of their starts and ends
    taken as two independent samples."""
    starts = [[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 0, 1, 0, 1, 0]]
    ends = [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 0]]
    runs = in_memory("a", *[[held_out_row(range(6), s), held_out_row(range(6), e)] for s, e in zip(starts, ends)])
    clustered = stats.clustered_mean([fmean([e[i] for e in ends]) - fmean([s[i] for s in starts]) for i in range(6)],
                                     [i // 2 for i in range(6)])
    expected = stats.with_seed_spread(clustered, [[fmean(e) - fmean(s) for s, e in zip(starts, ends)]])
    result = views.compared(runs, runs, "eval_correct", -1, 0)
    assert result[:3] == pytest.approx(expected[:3]) and result.seeds == (3,)


def test_a_seeds_change_from_its_start_is_taken_only_from_seeds_that_recorded_both():
    """avg@K missing at the start of s0 and at the end of s1 (--eval-samples may change on resume): the seeds'
    changes are s2's and s3's, never s0's end minus s1's start."""
    key, start = "eval_sampled_correct", [0, 0, 1, 0, 0, 0]
    ends = [[1, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 1], [1, 1, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]]
    runs = in_memory("a", *[[held_out_row(range(6), start, key if seed != 0 else "eval_correct"),
                             held_out_row(range(6), end, key if seed != 1 else "eval_correct")] for seed, end in enumerate(ends)])
    clustered = views.paired(views.per_problem(runs, -1, key), views.per_problem(runs, 0, key))
    expected = stats.with_seed_spread(clustered, [[fmean(ends[seed]) - fmean(start) for seed in (2, 3)]])
    result = views.compared(runs, runs, key, -1, 0)
    assert result[:3] == pytest.approx(expected[:3]) and result.seeds == (2,)
    # the table pools a measure only where every seed recorded it at that evaluation
    rows = [{"eval_sampled_accuracy": fmean(row[key]), "eval_sampled_length": 100.0 + i} if key in row else {}
            for run in runs for i, row in enumerate(run.evals)]
    for run, (begin, end) in zip(runs, zip(rows[::2], rows[1::2])):
        run.evals = [begin, end]
    assert views.evaluation_columns(runs, "eval_sampled_").split()[:4] == ["n/a", "n/a", "n/a", "n/a"]
    end, low, high = stats.seed_interval([fmean(ends[2]), fmean(ends[3])])
    assert views.evaluation_columns(runs[2:], "eval_sampled_").split()[:6] == [
        f"{fmean(start):.3f}", f"{end:.3f}", f"[{low:.3f},", f"{high:.3f}]", "100", "101"]


def test_seeds_that_agree_get_no_interval_and_seeds_without_a_common_problem_say_so():
    """Two seeds of one end accuracy: no zero-width interval across them. Seeds evaluated on disjoint held-out
    sets: the comparison says why it is missing, not "not recorded"."""
    same = in_memory("a", *[[held_out_row(range(4), [0] * 4), held_out_row(range(4), end)] for end in ([1, 0, 0, 0], [0, 0, 1, 0])])
    for run in same:
        run.evals = [{"eval_accuracy": 0.0, "eval_length": 10.0} | run.evals[0],
                     {"eval_accuracy": 0.25, "eval_length": 12.0, "eval_acc_per_1k_tokens": 1.0, "eval_truncated": 0.0} | run.evals[1]]
    assert views.evaluation_columns(same, "eval_").split()[:3] == ["0.000", "0.250", "(no"]
    apart = in_memory("b", [held_out_row(range(4), [1, 0, 1, 0])], [held_out_row(range(4, 8), [0, 1, 0, 1] * 2)])
    assert views.compared(apart, same, "eval_correct") == "a setting's seeds share no held-out problem"
    assert views.compared(apart, same, "eval_sampled_correct") is None, "not recorded"


def test_compare_with_one_seed_a_side_one_template_or_no_measure_says_so_instead_of_failing():
    one = in_memory("one", [held_out_row(range(6), [1, 0, 1, 1, 0, 0])])
    other = in_memory("other", [held_out_row(range(6), [0, 1, 1, 0, 1, 0])])
    two = in_memory("two", [held_out_row(range(6), [0, 0, 1, 0, 1, 0])], [held_out_row(range(6), [1, 0, 0, 0, 1, 1])])
    plain = views.paired(views.per_problem(one, -1, "eval_correct"), views.per_problem(other, -1, "eval_correct"))
    assert views.compared(one, other, "eval_correct") == plain and plain.seeds == ()  # no spread between seeds to add
    pooled = views.compared(two, one, "eval_correct")  # one seed against two: it takes their spread
    clustered = views.paired(views.per_problem(two, -1, "eval_correct"), views.per_problem(one, -1, "eval_correct"))
    assert pooled == stats.with_seed_spread(clustered, [[2 / 6, 3 / 6], [3 / 6]]) and pooled.seeds == (2, 1)
    assert views.compared(two, one, "eval_sampled_correct") is None
    sampled = in_memory("b", [held_out_row(range(6), [1] * 6, "eval_sampled_correct")])
    assert views.compared(two, sampled, "eval_sampled_correct") is None
    one_template = {f"p{i}": (0, float(i % 2)) for i in range(4)}
    assert views.paired(one_template, {i: (0, 0.0) for i in one_template}) == "fewer than two templates"


def test_compare_holm_adjusts_over_the_settings_and_takes_a_settings_slope_across_its_seeds(tmp_path):
    ids, templates = [f"p{i}" for i in range(8)], [i // 2 for i in range(8)]
    ends = {("grpo", 0): [0, 0, 1, 0, 0, 0, 0, 1], ("grpo", 1): [0, 1, 0, 0, 1, 0, 0, 0],
            ("egrsd", 0): [1, 1, 1, 0, 1, 1, 1, 1], ("cl-egrsd", 0): [1, 0, 1, 0, 1, 1, 0, 1]}
    dirs = []
    for (method, seed), end in ends.items():
        write_run(tmp_path / f"{method}-s{seed}", method, seed, [0] * 8, end, ids, templates)
        dirs.append(str(tmp_path / f"{method}-s{seed}"))
    out = views.compare_table(dirs).splitlines()
    reference = [(ends["grpo", 0][i] + ends["grpo", 1][i]) / 2 for i in range(8)]
    raw = []
    for method in ("egrsd", "cl-egrsd"):  # one seed against GRPO's two: the spread of GRPO's seeds, pooled
        r = stats.clustered_mean([ends[method, 0][i] - reference[i] for i in range(8)], templates)
        r = stats.with_seed_spread(r, [[fmean(ends[method, 0])], [fmean(ends["grpo", seed]) for seed in (0, 1)]])
        raw.append(2 * (1 - stats.t_cdf(abs(r.mean / r.se), r.df)))
    smaller = min(1.0, 2 * min(raw))
    adjusted = [smaller if p == min(raw) else max(smaller, p) for p in raw]
    for method, p in zip(("egrsd", "cl-egrsd"), adjusted):
        line = next(l for l in out if l.startswith(f"  {method} ") and "Holm" in l).split("; length")[0]
        assert "G = 4, n = 8, seeds 1/2, detectable" in line and f" at 0.05/2, p {p:.3f} Holm)" in line, (line, raw)
    change = next(l for l in out if l.startswith("  grpo ") and "reward slope" in l)
    assert "reward slope +1.000 (no interval: no spread between the seeds' slopes)" in change, "two seeds of one slope"


def test_runs_with_different_held_out_sets_pair_over_their_common_problems_by_id_and_say_how_many():
    a = {f"p{i}": (i // 2, float(i % 2)) for i in range(8)}  # 8 problems of 4 templates
    b = {f"p{i}": (i // 2, 0.25 * i) for i in reversed(range(2, 8))}  # the last 6, listed backwards
    expected = stats.clustered_mean([a[f"p{i}"][1] - b[f"p{i}"][1] for i in range(2, 8)], [i // 2 for i in range(2, 8)])
    result = views.paired(a, b)
    assert result[:5] == pytest.approx(expected[:5]) and "G = 3, n = 6, detectable" in views.describe(result)
    assert views.describe(views.paired(a, {"q1": (0, 1.0)})) == "n/a (no held-out problem in common)"
    untemplated = views.paired({i: (None, x) for i, x in enumerate([1.0, 0.0, 1.0, 1.0, 0.0])}, {i: (None, 0.0) for i in range(5)})
    assert untemplated.clusters == 5 and untemplated.se == pytest.approx(math.sqrt(0.3 / 5))  # s² = 0.3


def test_compare_shows_what_the_gate_did_over_every_step_of_every_seed(tmp_path):
    ids, templates = [f"p{i}" for i in range(4)], [0, 0, 1, 1]
    dirs = [tmp_path / f"egrsd-s{seed}" for seed in (0, 1)]
    for seed, run_dir in enumerate(dirs):
        write_run(run_dir, "egrsd", seed, [0] * 4, [1, 0, 0, 1], ids, templates, steps=3)
    out = views.compare_table([str(d) for d in dirs]).splitlines()
    row = out[out.index(next(l for l in out if l.startswith("in training"))) + 1].split()
    # gate mean over steps 1..3 of seeds 0 and 1: 0.92 and 1.02 → 0.970; its minimum 0.5 − 0.3 = 0.2
    assert row == ["egrsd", "0.970", "0.200", "1.000", "0.300", "80.0", "15.5", "4.5", "0.0"], row


def test_a_settings_row_gives_the_end_measures_the_steps_time_past_the_first_and_the_peak_of_every_step_and_seed(tmp_path):
    """Two seeds: Δlen is the end length over the start one (410 / 400: +2.5%), acc/(len/1k) and the truncated share
    are the end evaluation's; s/step leaves out each run's first step (warm-up: 9 s) and averages the others (2, 3,
    3, 4 s); peak GiB is the largest of every step of every seed (seed 1's 7.0)."""
    ids, templates = [f"p{i}" for i in range(4)], [0, 0, 1, 1]
    timings = {0: ([9.0, 2.0, 3.0], [4.0, 6.0, 5.0]), 1: ([9.0, 3.0, 4.0], [7.0, 3.0, 2.0])}
    dirs = []
    for seed, (seconds, peaks) in timings.items():
        run_dir = tmp_path / f"egrsd-s{seed}"
        write_run(run_dir, "egrsd", seed, [0, 1, 0, 1], [1, 1, 0, 1], ids, templates)
        rows = read_metrics(run_dir)
        rows[0] |= {"eval_truncated": 0.5}
        rows[-1] |= {"eval_truncated": 0.25, "eval_acc_per_1k_tokens": 2.0}
        for row, s, peak in zip(rows[1:-1], seconds, peaks):
            row |= {"step_s": s, "peak_gpu_mem_gb": peak}
        write_metrics(run_dir, rows)
        dirs.append(str(run_dir))
    row = views.compare_table(dirs).splitlines()[2].split()
    assert row[-7:] == ["400", "410", "+2.5%", "2.000", "0.250", "3.00", "7.0"], row


def test_the_gate_table_leaves_out_a_skipped_steps_nan_and_a_step_without_valid_tokens():
    """A skipped step's NaN and a step of no valid tokens (its means None, its shares 0) in one run: the means and
    the minimum are over the steps that have them, the shares over every step that has one."""
    good = {"gate_mean": 0.8, "gate_min": 0.4, "magnitude_mean": 1.0, "teacher_entropy_mean": 0.5,
            "share_lock": 0.5, "share_mid": 0.5, "share_pivot": 0.0, "share_fork": 0.0}
    skipped = {k: math.nan for k in good}
    empty = {k: None if not k.startswith("share_") else 0.0 for k in good}
    run = views.Run("egrsd-s0", {}, [good | {"gate_mean": 0.9, "gate_min": 0.6}, skipped, empty, good], [])
    row = views.gate_table([[run]]).splitlines()[1].split()
    assert row == ["egrsd", "0.850", "0.400", "1.000", "0.500", "33.3", "33.3", "0.0", "0.0"], row


def test_compare_stands_anywhere_refuses_an_empty_list_or_other_flags_and_names_runs_without_evaluations(tmp_path, capsys):
    with pytest.raises(SystemExit, match="one or more run directories"):
        train_min.main(["--compare"])
    with pytest.raises(SystemExit, match="--compare: expected run directories only, got --steps"):
        train_min.main(["--compare", str(tmp_path), "--steps", "3"])
    with pytest.raises(SystemExit, match="expected a run directory holding metrics.jsonl, got '.*nowhere'$"):
        train_min.main(["--compare", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    train_min.main([str(tmp_path / "empty"), "--compare"])
    assert "empty            (no evaluation after training yet)" in capsys.readouterr().out
    train_min.main([f"--compare={tmp_path / 'empty'}"])
    assert "empty            (no evaluation after training yet)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="^--compare: write it out"):  # an abbreviation trains nothing either
        train_min.main(["--compa", str(tmp_path / "empty")])


def test_rows_without_problem_ids_are_matched_to_their_held_out_file_in_order():
    """The runs of docs/real_runs predate ids in evaluation rows: their first 128 held-out problems."""
    run = views.load_run(str(ROOT / "docs/real_runs/grpo"))
    problems = load_problems(ROOT / "data/gsm_symbolic_eval.jsonl")[:128]
    assert run.evals[0]["eval_ids"] == [p.id for p in problems]
    assert run.evals[0]["eval_templates"] == [p.template for p in problems]


def test_a_run_whose_evaluations_recorded_neither_problem_ids_nor_per_problem_results_still_reads(tmp_path):
    """The oldest rows hold the summary numbers alone: no ids to match, nothing to pair, but its columns show."""
    write_run(tmp_path / "old", "grpo", 0, [0, 1], [1, 1], ["p0", "p1"], [0, 1])
    rows = read_metrics(tmp_path / "old")
    rows = [{k: v for k, v in r.items() if k not in ("eval_ids", "eval_templates") and not k.endswith(("_correct", "_lengths"))}
            for r in rows]
    write_metrics(tmp_path / "old", rows)
    run = views.load_run(str(tmp_path / "old"))
    assert [e["eval_accuracy"] for e in run.evals] == [0.5, 1.0] and all("eval_ids" not in e for e in run.evals)
    assert views.compare_table([str(tmp_path / "old")]).splitlines()[2].split()[4:6] == ["0.500", "1.000"]


def test_the_curves_of_runs_are_drawn_from_their_metrics_alone(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the optional extra matplotlib is not installed")
    from tools import plot_runs

    figures, close = [], plot_runs.plt.close
    monkeypatch.setattr(plot_runs.plt, "close", lambda figure: figures.append(figure) or close(figure))
    plot_runs.main([str(tmp_path / "curves.png"), str(ROOT / "docs/real_runs/egrsd"), str(ROOT / "docs/real_runs/grpo")])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in figures[0].axes] == ["rollout reward", "rollout length (tokens)", "held-out greedy accuracy"]


def test_the_curves_moving_average_takes_up_to_the_last_width_values_and_the_plot_needs_a_run(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the optional extra matplotlib is not installed")
    from tools import plot_runs

    assert plot_runs.moving_average([1, 2, 3, 4, 5, 6], width=3) == [1, 1.5, 2, 3, 4, 5]
    for arguments in ([str(tmp_path / "curves.png")], ["--tradeoff", str(tmp_path / "figure1.png")]):
        with pytest.raises(SystemExit) as stop:
            plot_runs.main(arguments)
        assert stop.value.code == 2 and "error: the following arguments are required: RUN_DIR" in capsys.readouterr().err


def test_the_tradeoff_figure_pools_seeds_into_one_point_per_setting(tmp_path):
    pytest.importorskip("matplotlib", reason="the optional extra matplotlib is not installed")
    ids, templates = [f"p{i}" for i in range(6)], [i // 2 for i in range(6)]
    dirs = []
    for method in ("grpo", "egrsd"):
        for seed in range(2):
            write_run(tmp_path / f"{method}-s{seed}", method, seed, [0] * 6, [seed, 1, 0, 0, 1, 0], ids, templates)
            dirs.append(str(tmp_path / f"{method}-s{seed}"))
    rows = read_metrics(dirs[0])  # the first run sampled no avg@K at step 0: the untrained point is another's
    rows[0] = unsampled(rows[0])
    write_metrics(dirs[0], rows)
    from tools import plot_runs

    plot_runs.main(["--tradeoff", str(tmp_path / "figure1.png"), *dirs, dirs[0]])
    assert (tmp_path / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(views.group_runs([views.load_run(d) for d in dirs])) == 2, "two settings of two seeds each"


@pytest.mark.parametrize("sampled", [True, False])
def test_the_tradeoff_figure_puts_each_settings_mean_end_accuracy_against_the_length_of_the_same_completions(
        sampled, tmp_path, monkeypatch):
    """avg@K against the sampled length where every run's last evaluation sampled, else greedy against the greedy
    length (write_run: greedy length 410, sampled 420 + 30 · accuracy at the end; 400 and 410 at step 0)."""
    pytest.importorskip("matplotlib", reason="the optional extra matplotlib is not installed")
    from tools import plot_runs

    ids, templates, dirs = [f"p{i}" for i in range(4)], [0, 0, 1, 1], []
    for method, seed, end in (("grpo", 0, [1, 0, 0, 0]), ("grpo", 1, [1, 1, 0, 0]), ("egrsd", 0, [1, 1, 1, 1])):
        write_run(tmp_path / f"{method}-s{seed}", method, seed, [0] * 4, end, ids, templates)
        dirs.append(str(tmp_path / f"{method}-s{seed}"))
    if not sampled:  # one run did not sample at the end: greedy for every point
        rows = read_metrics(tmp_path / "egrsd-s0")
        rows[-1] = unsampled(rows[-1])
        write_metrics(tmp_path / "egrsd-s0", rows)
    axes, subplots = [], plot_runs.plt.subplots
    monkeypatch.setattr(plot_runs.plt, "subplots", lambda *a, **k: (lambda made: axes.append(made[1]) or made)(subplots(*a, **k)))
    plot_runs.main(["--tradeoff", str(tmp_path / "figure1.png"), *dirs])
    (ax,) = axes
    points = sorted(tuple(c.lines[0].get_xydata()[0]) for c in ax.containers)
    start = ax.lines[0].get_xydata()[0].tolist()
    if sampled:
        assert points == [(431.25, 0.375), (450.0, 1.0)] and start == [410.0, 0.0]
        assert ax.get_xlabel() == "sampled mean response length (tokens)" and ax.get_ylabel() == "avg@4 held-out accuracy"
    else:
        assert points == [(410.0, 0.375), (410.0, 1.0)] and start == [400.0, 0.0]
        assert ax.get_xlabel() == "greedy mean response length (tokens)" and ax.get_ylabel() == "greedy held-out accuracy"
    if sampled:  # a setting sampled at another K: the axis names every K
        rows = read_metrics(tmp_path / "egrsd-s0")
        rows[-1] = rows[-1] | {"eval_samples": 2}
        write_metrics(tmp_path / "egrsd-s0", rows)
        plot_runs.main(["--tradeoff", str(tmp_path / "figure1.png"), *dirs])
        assert axes[-1].get_ylabel() == "avg@K (K = 2, 4) held-out accuracy"


def test_runs_pool_into_one_setting_however_their_evaluation_cap_is_written():
    """--eval-max-new-tokens 0 follows --max-new-tokens; a config.json from before the flag has neither."""
    base = {k: v for k, v in vars(config.Config()).items() if k != "eval_max_new_tokens"} | {"max_new_tokens": 512}
    caps = [{}, {"eval_max_new_tokens": 0}, {"eval_max_new_tokens": 512}, {"eval_max_new_tokens": 1024}]
    runs = [views.Run(f"s{i}", base | cap | {"seed": i}, [], []) for i, cap in enumerate(caps)]
    assert [[r.name for r in group] for group in views.group_runs(runs)] == [["s0", "s1", "s2"], ["s3"]]
    # a flag a run predates counts as it ran (config.BEFORE_THESE_FLAGS): greedy and no avg@K before those flags
    older = {k: v for k, v in base.items() if k not in ("eval_greedy", "eval_samples")}
    runs = [views.Run(name, settings, [], []) for name, settings in [("old", older), ("new", base | {"eval_samples": 0}),
                                                                       ("k4", base | {"eval_samples": 4})]]
    assert [[r.name for r in group] for group in views.group_runs(runs)] == [["old", "new"], ["k4"]]


def test_a_run_from_before_many_flags_pools_with_a_new_seed_of_its_setting():
    """docs/real_runs/egrsd predates 20 flags (each taken as it ran); a new seed of its setting differs in flags that
    are no setting (recomputation, the card's index, the sampling settings of an evaluation that samples nothing)."""
    old = json.loads((ROOT / "docs/real_runs/egrsd/config.json").read_text())
    new = vars(config.Config(**{k: v for k, v in old.items() if k in vars(config.Config())} | dict(
        lr_schedule="constant", score_temperature=1.0, eval_samples=0, seed=1, gradient_checkpointing="auto", eval_temperature=0.7)))
    new["device"] = old["device"] + ":1" if old["device"] == "cuda" else old["device"]
    runs = [views.Run("egrsd-s0", old, [], []), views.Run("egrsd-s1", new, [], [])]
    assert len(views.group_runs(runs)) == 1 and views.label(runs) == "egrsd"


def test_settings_are_named_by_their_folders_and_never_share_a_name(tmp_path):
    """A seed suffix is stripped only after a separator (grpo-gs2 is no seed 2 of grpo-g); two settings of one
    name take their parent folder's; one run named by two paths is one run."""
    assert [views.label([views.Run(n, {}, [], [])]) for n in ("grpo-gs2", "bs32", "egrsd-s0", "egrsd_seed3")] == [
        "grpo-gs2", "bs32", "egrsd", "egrsd"]
    def egrsd_run(run_dir, seed, gamma):
        write_run(run_dir, "egrsd", seed, [0] * 4, [1, 0, 1, 0], [f"p{i}" for i in range(4)], [0, 0, 1, 1])
        (run_dir / "config.json").write_text(json.dumps(json.loads((run_dir / "config.json").read_text()) | {"gamma": gamma}))
        return str(run_dir)

    runs = [egrsd_run(tmp_path / parent / "egrsd", 0, gamma) for parent, gamma in (("a", 0.3), ("b", 1.0))]
    relative = os.path.relpath(tmp_path / "a" / "egrsd")  # (from the working directory)
    groups, _ = views.evaluated_settings(runs + [relative])
    assert [(views.label(g), len(g)) for g in groups] == [("a/egrsd", 1), ("b/egrsd", 1)]
    # seeds in one folder, split by a setting: named by it
    runs = [egrsd_run(tmp_path / "c" / f"egrsd-s{seed}", seed, gamma) for seed, gamma in ((0, 0.3), (1, 1.0), (2, 1.0))]
    groups, _ = views.evaluated_settings(runs)
    assert [(views.label(g), len(g)) for g in groups] == [("egrsd gamma=0.3", 1), ("egrsd gamma=1.0", 2)]


def test_runs_without_a_config_in_two_folders_and_three_settings_of_one_name_are_told_apart(tmp_path):
    """Runs without config.json are each a setting of their own, also under one name (a/egrsd, b/egrsd); three
    settings whose first two differing flags name two alike are named by as many flags as it takes."""
    import shutil

    for parent in ("a", "b"):
        shutil.copytree(ROOT / "docs/real_runs/egrsd", tmp_path / parent / "egrsd")
        (tmp_path / parent / "egrsd" / "config.json").unlink()
    groups, _ = views.evaluated_settings([str(tmp_path / p / "egrsd") for p in ("a", "b")])
    assert [(views.label(g), len(g)) for g in groups] == [("a/egrsd", 1), ("b/egrsd", 1)]
    dirs = []
    for seed, changes in enumerate(({"advantage_warmup": 10, "beta_length": 0.5, "gamma": 0.3},
                                    {"advantage_warmup": 10, "beta_length": 0.5, "gamma": 1.0},
                                    {"advantage_warmup": 5, "beta_length": 0.2, "gamma": 0.3})):
        run_dir = tmp_path / "c" / f"egrsd-s{seed}"
        shutil.copytree(ROOT / "docs/real_runs/egrsd", run_dir)
        (run_dir / "config.json").write_text(json.dumps(json.loads((run_dir / "config.json").read_text()) | changes))
        dirs.append(str(run_dir))
    groups, _ = views.evaluated_settings(dirs)
    assert [views.label(g) for g in groups] == [
        "egrsd advantage_warmup=10 beta_length=0.5 gamma=0.3", "egrsd advantage_warmup=10 beta_length=0.5 gamma=1.0",
        "egrsd advantage_warmup=5 beta_length=0.2 gamma=0.3"]


def test_a_run_from_before_problem_ids_on_the_built_in_or_its_own_held_out_problems_is_labelled_from_that_file(tmp_path):
    """Its held-out problems were the first of --eval-data, else of --data (split off it), else of the built-in
    file: their ids and templates, so that it clusters by template and pairs with new runs."""
    built_in = built_in_problems(0, 3)[1]
    assert views.problem_labels({"eval_data": "", "data": ""}, 3) == {
        "eval_ids": [p.id for p in built_in], "eval_templates": [p.template for p in built_in]}
    own = tmp_path / "mine.jsonl"
    own.write_text("".join(json.dumps({"problem": f"q{i}", "solution": "s", "answer": str(i), "template": i % 2}) + "\n"
                           for i in range(5)))
    assert views.problem_labels({"eval_data": "", "data": str(own)}, 2)["eval_templates"] == [0, 1]
    assert views.problem_labels({"eval_data": str(own), "data": ""}, 6) == {"eval_ids": list(range(6)), "eval_templates": [None] * 6}


def test_runs_that_differ_in_any_real_setting_are_apart_and_in_no_setting_flag_pool():
    """Every flag splits the runs (--lr, --lora-r, ...) but those that change neither training nor evaluation:
    the seed, where and when a run writes, and recomputation and batch sizes that compute the same."""
    same = {"seed", "output_dir", "resume", "initial_eval", "time_budget", "save_model", "save_every", "eval_every",
            "dump_tokens", "micro_batch_size", "eval_batch_size", "chunk_size", "rollout", "gradient_checkpointing",
            "max_bad_steps"}

    def changed(value):
        return not value if isinstance(value, bool) else value + 1 if isinstance(value, int) else \
            value * 2 + 1 if isinstance(value, float) else value + "x"

    base = vars(train_min.Config())
    for f in fields(train_min.Config):
        runs = [views.Run("a-s0", dict(base), [], []), views.Run("a-s1", base | {f.name: changed(base[f.name])}, [], [])]
        assert len(views.group_runs(runs)) == (1 if f.name in same else 2), f.name


def test_runs_without_a_config_are_each_a_setting_of_their_own_and_a_step_run_again_keeps_its_last_row(tmp_path):
    assert [[r.name for r in g] for g in views.group_runs([views.Run(n, {}, [], []) for n in ("a-s0", "a-s1")])] == [["a-s0"], ["a-s1"]]
    real = run_io.read_rows(str(ROOT / "docs/real_runs/grpo/metrics.jsonl"))
    train, evaluation = next(r for r in real if r["kind"] == "train"), next(r for r in real if r["kind"] == "eval")
    rows = [train | {"reward": 0.1}, evaluation, train | {"reward": 0.9}]  # a step taken again after a resume
    write_metrics(tmp_path, rows)
    assert [r["reward"] for r in views.read_rows(str(tmp_path)) if r["kind"] == "train"] == [0.9]


def test_a_run_with_only_its_step_0_evaluation_is_listed_apart_not_pooled_with_its_settings_finished_seed(tmp_path):
    import shutil

    for seed in ("grpo-s0", "grpo-s1"):
        shutil.copytree(ROOT / "docs/real_runs/grpo", tmp_path / seed)
    path = tmp_path / "grpo-s1" / "metrics.jsonl"
    start = next(line for line in path.read_text().splitlines() if json.loads(line)["kind"] == "eval")
    path.write_text(start + "\n")  # a seed stopped before its first evaluation after training
    groups, missing = views.evaluated_settings([str(tmp_path / "grpo-s0"), str(tmp_path / "grpo-s1")])
    assert [[r.name for r in g] for g in groups] == [["grpo-s0"]] and missing == ["grpo-s1"]


def test_two_folders_of_one_setting_and_seed_are_refused_not_pooled_as_two_seeds(tmp_path, capsys):
    """A run copied, or one an earlier call left (.NAME.earlier-TIME), is not a second seed: pooled, it made a
    zero-width interval across "2 seeds". Two seeds of the setting still pool; a folder named twice counts once."""
    import shutil

    for name in ("egrsd-s0", ".egrsd-s0.earlier-20261202-113000", "egrsd-s1"):
        shutil.copytree(ROOT / "docs/real_runs/egrsd", tmp_path / name)
    config_path = tmp_path / "egrsd-s1" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"seed": 1}))
    twice = [str(tmp_path / "egrsd-s0"), str(tmp_path / ".egrsd-s0.earlier-20261202-113000")]
    with pytest.raises(SystemExit, match=re.escape(f"--compare: {twice[0]} and {twice[1]} are runs of one setting with "
                                                   "the same --seed 0: a seed counts once")):
        train_min.main(["--compare", str(ROOT / "docs/real_runs/grpo"), *twice])
    pooled = [str(tmp_path / "egrsd-s0"), str(tmp_path / "egrsd-s1"), str(tmp_path / "egrsd-s0")]
    groups, _ = views.evaluated_settings(pooled)
    assert [[r.name for r in g] for g in groups] == [["egrsd-s0", "egrsd-s1"]]


def test_a_settings_name_strips_every_seed_suffix_only_where_its_runs_share_the_rest():
    assert [views.label([views.Run(n, {}, [], [])]) for n in ("egrsd_s1", "egrsd-seed2")] == ["egrsd"] * 2
    assert views.label([views.Run(n, {}, [], []) for n in ("egrsd-s0", "mine-s1")]) == "egrsd-s0", "names differ: the first whole"


def test_the_step_line_of_an_evaluation_that_was_greedy_and_sampled_gives_the_greedy_length():
    row = {"eval_accuracy": 0.5, "eval_length": 100.0, "eval_acc_per_1k_tokens": 5.0, "eval_samples": 4,
           "eval_sampled_accuracy": 0.25, "eval_sampled_length": 300.0, "eval_sampled_acc_per_1k_tokens": 0.833}
    assert views.evaluation_line(row) == "accuracy 0.500, avg@4 0.250, length 100, acc/(len/1000) 5.000"
    sampled = {k: v for k, v in row.items() if not k.startswith("eval_acc") and k != "eval_length"}
    assert views.evaluation_line(sampled) == "avg@4 0.250, length 300, acc/(len/1000) 0.833"


def test_the_real_runs_compare_table_is_the_readmes():
    """docs/real_runs holds the GPU runs of the README; --compare reads them, no model needed."""
    table = views.compare_table([str(ROOT / "docs/real_runs/egrsd"), str(ROOT / "docs/real_runs/grpo")])
    readme = (ROOT / "README.md").read_text()
    for line in table.splitlines()[2:]:
        assert line.strip() in readme, line


def test_copy_weights_copies_every_parameter_into_the_targets_dtype():
    tokenizer = build_tiny_tokenizer()
    source, target = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=2, dtype=torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.rand_like(p))  # the norms too, at 1 in both models as built
    before = {name: p.clone() for name, p in source.named_parameters()}
    train_min.copy_weights(source, target)
    assert all(torch.equal(p, before[name].to(torch.bfloat16)) for name, p in target.named_parameters())
    assert all(torch.equal(p, before[name]) for name, p in source.named_parameters()), "the source is left as it was"


def test_only_skipped_steps_in_a_row_stop_the_run_and_checkpoints_come_every_save_every_steps(tmp_path, monkeypatch):
    """Steps 1 and 3 non-finite, step 2 good: the count starts again at step 2, so --max-bad-steps 2 is never
    reached; --save-every 2 of 3 steps saves at 2 and at the end."""
    steps, saved = [], []
    append_row, hidden, save = train_min.run_io.append_row, train_min.completion_hidden, train_min.save_checkpoint
    monkeypatch.setattr(train_min.run_io, "append_row", lambda metrics, row: append_row(metrics, row) or steps.append(row["step"]))
    monkeypatch.setattr(train_min, "completion_hidden",
                        lambda model, *args: hidden(model, *args) * (math.nan if model.training and len(steps) != 1 else 1.0))
    monkeypatch.setattr(train_min, "save_checkpoint", lambda run, step: saved.append(step) or save(run, step))
    train_min.main(TINY + ["--steps", "3", "--max-bad-steps", "2", "--save-every", "2", "--eval-size", "0",
                           "--no-save-model", "--output-dir", str(tmp_path)])
    assert [r["skipped"] for r in read_metrics(tmp_path)] == [True, False, True]
    assert saved == [2, 3]


def test_skipped_steps_count_again_from_0_on_resume(tmp_path, monkeypatch):
    """--max-bad-steps 2; every step non-finite. A run of one step (1 skipped) resumed for three stops at step 3,
    not 2: a resumption (usually at a lower --lr) gets its own tries."""
    hidden = train_min.completion_hidden
    monkeypatch.setattr(train_min, "completion_hidden", lambda model, *args: hidden(model, *args) * (math.nan if model.training else 1.0))
    flags = TINY + ["--max-bad-steps", "2", "--eval-size", "0", "--lr-schedule", "constant", "--output-dir", str(tmp_path)]
    train_min.main(flags + ["--steps", "1"])
    with pytest.raises(SystemExit, match="^stopped: 2 skipped steps in a row"):
        train_min.main(["--resume", str(tmp_path), "--steps", "4"])
    assert [(r["step"], r["skipped"]) for r in read_metrics(tmp_path)] == [(1, True), (2, True), (3, True)]


def test_scores_are_those_of_the_models_in_eval_mode_whatever_mode_the_update_left_them_in():
    """A model with dropout (the tiny one has none: here 0.5 on its attention) scores deterministically."""
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=2)
    for layer in (*student.model.layers, *teacher.model.layers):
        layer.self_attn.attention_dropout = 0.5
    cfg = train_min.Config(model="tiny", device="cpu", max_new_tokens=6, micro_batch_size=2)
    torch.manual_seed(0)
    batch = train_min.rollouts(student.eval(), tokenizer, built_in_problems(3, 1)[0], cfg)
    want = train_min.score(student, teacher.eval(), batch, cfg)
    got = train_min.score(student.train(), teacher.train(), batch, cfg)
    for k in ("teacher_logp", "teacher_entropy", "student_logp"):
        assert torch.equal(getattr(got, k), getattr(want, k)), k


# ---- proposed by mutation testing -------------------------------------------------------------------------


def test_final_keeps_the_checkpoints_own_generation_config_with_the_eos_ids_rollouts_end_on(tmp_path):
    """The checkpoint lists only <pad> as EOS: final/'s config must list the tokenizer's EOS too, first."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.generation_config.update(eos_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = train_min.load_model_and_tokenizer(str(tmp_path), "cpu", torch.float32)
    expected = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert train_min.eos_list(loaded) == expected
    assert loaded.own_generation_config.eos_token_id == expected and loaded.own_generation_config.temperature == 0.3


def test_evaluation_completes_up_to_its_own_cap_below_or_above_the_rollouts():
    model, tokenizer = train_min.load_model_and_tokenizer("tiny", "cpu", torch.float32)
    problems = built_in_problems(1, 4)[1]
    for rollout_cap, eval_cap in ((12, 4), (4, 12)):
        cfg = train_min.Config(device="cpu", max_new_tokens=rollout_cap, eval_max_new_tokens=eval_cap, eval_batch_size=4)
        lengths = train_min.solve(model, tokenizer, problems, cfg, "eval_", greedy=True)["eval_lengths"]
        assert max(lengths) <= eval_cap and (eval_cap < rollout_cap or max(lengths) > rollout_cap), (rollout_cap, lengths)


def test_a_length_change_reads_n_a_where_a_seed_recorded_the_start_but_not_the_end():
    """--eval-samples may change on resume: every seed sampled at step 0, one not at the end."""
    start = {"eval_sampled_accuracy": 0.5, "eval_sampled_length": 100.0}
    runs = [views.Run(f"s{i}", {}, [], [start, end]) for i, end in enumerate([start | {"eval_sampled_length": 110.0}, {}])]
    assert views.evaluation_columns(runs, "eval_sampled_").split() == ["0.500", "n/a", "100", "n/a", "n/a", "n/a", "n/a"]


def test_a_sampled_table_is_shown_where_only_the_start_sampled_with_n_a_at_the_end(tmp_path):
    """avg@K at step 0 alone (resumed with --eval-samples 0): the sampled table shows its start, the end n/a."""
    write_run(tmp_path / "grpo", "grpo", 0, [0, 1, 0, 1], [1, 1, 0, 1], [f"p{i}" for i in range(4)], [0, 0, 1, 1])
    rows = read_metrics(tmp_path / "grpo")
    rows[-1] = unsampled(rows[-1])
    write_metrics(tmp_path / "grpo", rows)
    out = views.compare_table([str(tmp_path / "grpo")]).splitlines()
    sampled = out.index(next(l for l in out if l.startswith("sampled: avg@K")))
    assert out[sampled + 1].split()[:5] == ["grpo", "0", "0.500", "n/a", "425"], out[sampled + 1]


def test_compare_lists_every_measure_and_a_sampled_table_where_some_evaluation_did_not_sample(tmp_path):
    ids, templates = [f"p{i}" for i in range(8)], [i // 2 for i in range(8)]
    ends = {"grpo": [0, 1, 0, 0, 1, 0, 0, 1], "egrsd": [1, 1, 0, 1, 1, 0, 1, 1], "opsd": [1, 0, 0, 1, 1, 0, 1, 0]}
    dirs = []
    for method, end in ends.items():
        for seed in (0, 1):
            write_run(tmp_path / f"{method}-s{seed}", method, seed, [0] * 8, end, ids, templates)
            dirs.append(tmp_path / f"{method}-s{seed}")
    for run_dir in dirs[2:4]:  # egrsd: greedy only at step 0 (resumed with --eval-samples 4)
        rows = read_metrics(run_dir)
        rows[0] = unsampled(rows[0])
        write_metrics(run_dir, rows)
    for run_dir in dirs[4:]:  # opsd: a run from before the per-problem greedy correctness was recorded
        rows = [{k: v for k, v in r.items() if k != "eval_correct"} for r in read_metrics(run_dir)]
        write_metrics(run_dir, rows)
    out = views.compare_table([str(d) for d in dirs]).splitlines()
    sampled = out.index(next(l for l in out if l.startswith("sampled: avg@K")))
    assert out[sampled + 2].split()[:3] == ["egrsd", "4", "n/a"], "K of the last evaluation; no avg@K at the start"
    minus = {l.split()[0]: l.split(maxsplit=1)[1] for l in out[-2:]}
    measures = lambda line: re.findall(r"(?:^|; )(greedy|avg@K|length|length@K) ", line)  # noqa: E731
    assert measures(minus["egrsd"]) == ["greedy", "avg@K", "length", "length@K"]
    assert measures(minus["opsd"]) == ["greedy", "avg@K", "length", "length@K"]
    assert minus["opsd"].startswith("greedy n/a (not recorded)")


def test_without_greedy_an_evaluation_is_avg_at_k_alone_and_the_step_line_compare_and_curves_read_it(tmp_path, capsys):
    """--no-eval-greedy (Qwen3 in thinking mode): each evaluation samples K completions a problem and makes no
    greedy one; --compare shows greedy as n/a and compares avg@K; the curves draw avg@K."""
    flags = TINY + ["--steps", "1", "--eval-samples", "2"]
    with pytest.raises(SystemExit, match=r"^--eval-samples: expected ≥ 1 under --no-eval-greedy"):
        train_min.main(flags + ["--no-eval-greedy", "--eval-samples", "0", "--output-dir", str(tmp_path / "nothing")])
    train_min.main(flags + ["--no-eval-greedy", "--output-dir", str(tmp_path / "sampled")])
    evals = [r for r in read_metrics(tmp_path / "sampled") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1] and not any("eval_accuracy" in r or "eval_correct" in r for r in evals)
    assert all(len(r["eval_sampled_correct"]) == 4 and r["evaluated_with"]["eval_greedy"] is False for r in evals)
    assert re.search(r"\neval step 1: avg@2 [0-9.]+, length [0-9]+, acc/\(len/1000\) [0-9.]+\n", capsys.readouterr().out)
    train_min.main(flags + ["--output-dir", str(tmp_path / "both")])
    table = views.compare_table([str(tmp_path / "both"), str(tmp_path / "sampled")]).splitlines()
    assert table[3].split()[:5] == ["sampled", "egrsd", "1", "1", "n/a"], table[3]
    assert table[-1].split(maxsplit=1)[1].startswith("greedy n/a (not recorded); avg@K ")
    train_min.main(flags + ["--no-eval-greedy", "--method", "grpo", "--output-dir", str(tmp_path / "grpo")])
    table = views.compare_table([str(tmp_path / "grpo"), str(tmp_path / "sampled")]).splitlines()
    assert table[0].split() == ["run", "method", "seeds", "steps", "s/step", "peak", "GiB"], "no greedy: no columns"
    assert table[5] == "(no greedy evaluation: --no-eval-greedy)" and table[7].startswith("sampled: avg@K"), table
    assert table[-1].split(maxsplit=1)[1].startswith("avg@K "), "nor a greedy difference"
    if importlib.util.find_spec("matplotlib"):
        from tools import plot_runs

        plot_runs.main([str(tmp_path / "curves.png"), str(tmp_path / "both"), str(tmp_path / "sampled")])
    for run, flag in (("sampled", "--eval-greedy"), ("both", "--no-eval-greedy")):  # its evaluations compare
        with pytest.raises(SystemExit, match=f"^{flag}: a resumed run keeps --(no-)?eval-greedy"):
            train_min.main(["--resume", str(tmp_path / run), flag])
    with pytest.raises(SystemExit, match="evaluated with --no-eval-greedy, this run with --eval-greedy;"):
        train_min.main(flags + ["--initial-eval", str(tmp_path / "sampled"), "--output-dir", str(tmp_path / "reuse")])


def test_each_evaluation_writes_what_the_model_wrote_with_the_verdicts_and_lengths_that_the_metrics_hold(tmp_path, monkeypatch):
    """eval/step_N.jsonl: a row per held-out problem (its id, template and reference answer), its greedy completion
    and its K sampled ones, each with its text, the answer read from it, its verdict, length and end. The metrics'
    per-problem verdicts and lengths are these (the sampled ones averaged). A run that reuses another's step-0
    evaluation writes none for step 0."""
    monkeypatch.setattr(train_min, "is_correct", lambda text, answer: len(text) % 2 == 0)  # both verdicts occur,
    monkeypatch.setattr(train_min, "eos_list", lambda model: list(range(0, 512, 4)))  # and rows that end before the cap
    flags = TINY + ["--steps", "1", "--eval-samples", "2"]
    train_min.main(flags + ["--output-dir", str(tmp_path / "run")])
    held_out = built_in_problems(16, 4)[1]
    evals = {r["step"]: r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"}
    assert sorted(os.listdir(tmp_path / "run" / "eval")) == ["step_0.jsonl", "step_1.jsonl"]
    verdicts = []
    for step, row in evals.items():
        written = [json.loads(line) for line in open(tmp_path / "run" / "eval" / f"step_{step}.jsonl")]
        assert [(w["id"], w["template"], w["reference"]) for w in written] == [(p.id, p.template, p.answer) for p in held_out]
        assert [w["id"] for w in written] == row["eval_ids"] and "eval_completions" not in row
        for w in written:
            for c in [w["greedy"], *w["sampled"]]:
                assert c["correct"] == int(c["ended"] and len(c["text"]) % 2 == 0) and c["answer"] == extract_answer(c["text"])
                verdicts.append(c["correct"])
        assert [w["greedy"]["correct"] for w in written] == row["eval_correct"]
        assert [w["greedy"]["length"] for w in written] == row["eval_lengths"]
        assert all(len(w["sampled"]) == 2 for w in written)
        assert [fmean(c["correct"] for c in w["sampled"]) for w in written] == row["eval_sampled_correct"]
        assert [fmean(c["length"] for c in w["sampled"]) for w in written] == row["eval_sampled_lengths"]
    assert 0 < sum(verdicts) < len(verdicts), "both verdicts, so that a mismatch could show"
    train_min.main(flags + ["--initial-eval", str(tmp_path / "run"), "--output-dir", str(tmp_path / "reuse")])
    assert os.listdir(tmp_path / "reuse" / "eval") == ["step_1.jsonl"]


def test_a_step_0_evaluation_is_judged_by_the_settings_its_row_records_not_by_a_rewritten_config(tmp_path):
    """A resumed run rewrites config.json with the flags of its last call (--eval-batch-size 8, say), while its
    step-0 evaluation was made with those of the first (64): --initial-eval goes by what the row records."""
    (tmp_path / "config.json").write_text(json.dumps(vars(config.Config(max_new_tokens=12, eval_batch_size=8))))
    row = {"kind": "eval", "step": 0, "method": "grpo", "eval_accuracy": 0.0, "eval_length": 8.0, "eval_acc_per_1k_tokens": 0.0,
           "evaluated_with": run_io.evaluation_settings(vars(config.Config(max_new_tokens=12, eval_batch_size=64)))}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    config.check_initial_eval(config.Config(initial_eval=str(tmp_path), max_new_tokens=12, eval_batch_size=64))
    with pytest.raises(SystemExit, match="--eval-batch-size 64, this run with --eval-batch-size 8"):
        config.check_initial_eval(config.Config(initial_eval=str(tmp_path), max_new_tokens=12, eval_batch_size=8))
    row["evaluated_with"].pop("eval_greedy")  # a record from before that flag: greedy, as evaluations then were
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    config.check_initial_eval(config.Config(initial_eval=str(tmp_path), max_new_tokens=12, eval_batch_size=64))
    # the card's index is no setting, nor the sampling settings of an evaluation that samples nothing
    row["evaluated_with"] |= {"device": "cuda:0", "eval_samples": 0, "eval_temperature": 0.7}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    config.check_initial_eval(config.Config(initial_eval=str(tmp_path), max_new_tokens=12, eval_batch_size=64,
                                            device="cuda:1", eval_samples=0))
    row["evaluated_with"]["eval_samples"] = 2  # where it sampled, they count
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match="--eval-temperature 0.7, this run with --eval-temperature 1.0"):
        config.check_initial_eval(config.Config(initial_eval=str(tmp_path), max_new_tokens=12, eval_batch_size=64,
                                                device="cuda:1", eval_samples=2))


def test_a_step_0_evaluation_is_reused_however_its_cap_was_written(tmp_path):
    def other(name, **settings):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps(settings))
        row = {"kind": "eval", "step": 0, "method": "grpo", "eval_accuracy": 0.0, "eval_length": 8.0, "eval_acc_per_1k_tokens": 0.0}
        (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        return str(run_dir)

    new = other("new", **vars(config.Config(max_new_tokens=12)))
    old = other("old", **{k: v for k, v in vars(config.Config(max_new_tokens=12)).items()
                          if k not in ("eval_max_new_tokens", "eval_samples")})  # from before those flags
    for initial in (new, old):
        for ours in (dict(max_new_tokens=12), dict(max_new_tokens=8, eval_max_new_tokens=12)):
            config.check_initial_eval(config.Config(initial_eval=initial, eval_samples=0 if initial == old else 4, **ours))
        with pytest.raises(SystemExit, match="--eval-max-new-tokens 12, this run with --eval-max-new-tokens 16"):
            config.check_initial_eval(config.Config(initial_eval=initial, eval_samples=0, max_new_tokens=12, eval_max_new_tokens=16))


def test_a_row_whose_eos_is_in_the_last_column_is_finished():
    """generate trims a batch to its longest row: a row that ends there has its EOS in the last column, and
    is finished (rewarded), not truncated."""
    eos, pad = 7, 0
    completion = torch.tensor([[3, 4, 5, eos], [3, eos, pad, pad], [3, 3, 3, 3]])
    mask, finished = train_min.completion_mask(completion, [eos])
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [True] * 4]
    assert finished.tolist() == [True, True, False]


def test_a_truncated_rollout_is_not_correct_whatever_its_answer():
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("The answer is \\boxed{7}.", return_tensors="pt", add_special_tokens=False)["input_ids"].expand(2, -1)
    mask = torch.ones(ids.shape, dtype=torch.bool)
    texts = train_min.completion_texts(tokenizer, ids, mask)
    correct = train_min.verify(texts, torch.tensor([True, False]), [Problem("q", "s", "7")] * 2, train_min.Config())
    assert correct.tolist() == [True, False]


def test_the_teacher_prompt_holds_the_reference_solution_and_the_student_prompt_the_question_alone():
    tokenizer = build_tiny_tokenizer()
    problems = built_in_problems(2, 0)[0]
    batch = train_min.rollouts(build_tiny_model(tokenizer), tokenizer, problems, train_min.Config(device="cpu", max_new_tokens=1))
    for b, p in enumerate(problems):
        texts = {}
        for who, ids, attention, messages in (("student", batch.student_ids, batch.student_mask, student_messages),
                                              ("teacher", batch.teacher_ids, batch.teacher_mask, teacher_messages)):
            texts[who] = tokenizer.decode(ids[b][attention[b].bool()])
            assert texts[who] == tokenizer.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True)
        assert p.solution in texts["teacher"] and p.solution not in texts["student"]


def test_the_score_temperature_follows_the_rollout_temperature_unless_set():
    assert train_min.score_temperature(train_min.Config(temperature=1.7)) == 1.7
    assert train_min.score_temperature(train_min.Config(temperature=1.7, score_temperature=0.9)) == 0.9


def test_the_update_steps_once_along_the_gradient_clipped_to_grad_clip_and_leaves_no_gradient_behind():
    """SGD at lr 1: the weights move by the gradient scaled to norm --grad-clip (the norm returned is the one
    before clipping), and no gradient is left to add to the next step's."""
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_tiny_model(tokenizer, seed=1).double(), build_tiny_model(tokenizer, seed=2).double()
    cfg = train_min.Config(model="tiny", device="cpu", dtype="float32", method="grpo", max_new_tokens=6, micro_batch_size=2,
                           grad_clip=1e-3)
    torch.manual_seed(0)
    batch = train_min.rollouts(student, tokenizer, built_in_problems(3, 1)[0], cfg)
    advantages = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    before = [p.detach().clone() for p in student.parameters()]
    _, grad_norm, _ = train_min.update(student, teacher, torch.optim.SGD(student.parameters(), lr=1.0), batch,
                                       train_min.score(None, teacher, batch, cfg), advantages, cfg)
    step = float(torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(), before)]).norm())
    assert grad_norm > 10 * cfg.grad_clip, "the clip binds"
    assert step == pytest.approx(cfg.grad_clip, rel=1e-5)
    assert all(p.grad is None for p in student.parameters())


def test_each_rollouts_reward_is_shaped_by_its_own_length_up_to_its_eos(tmp_path, monkeypatch):
    """r = 1 + β (1 − |y_i| / L_max) with |y_i| the row's own length, not the width of the padded batch; the row's
    longest rollout and truncated share (the first row reaches the cap without an EOS)."""
    lengths = torch.tensor([8, 3, 6, 1])

    def ending_at(model, tokenizer, prompt_ids, prompt_mask, cfg, **kw):  # every other row finished at its length
        return torch.randint(10, 100, (len(prompt_ids), 8)), torch.arange(8) < lengths[:, None], lengths < 8

    monkeypatch.setattr(train_min, "generate", ending_at)
    monkeypatch.setattr(train_min, "verify", lambda *args: torch.ones(4, dtype=torch.bool))
    train_min.main(TINY + ["--steps", "1", "--eval-size", "0", "--no-save-model", "--output-dir", str(tmp_path)])
    row = read_metrics(tmp_path)[0]
    assert row["length_mean"] == 4.5 and row["length_max"] == 8 and row["truncated"] == 0.25 and row["accuracy"] == 1.0
    assert row["reward"] == pytest.approx(fmean(1 + 0.5 * (1 - n / 8) for n in lengths.tolist()))


def test_stop_on_signal_asks_at_the_first_signal_aborts_at_the_second_and_puts_back_each_previous_handler():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ours = {signal.SIGINT: lambda *a: None, signal.SIGTERM: lambda *a: None}  # two different handlers
    try:
        for sig, handler in ours.items():
            signal.signal(sig, handler)
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or SIGTERM from a scheduler
            with run_io.StopOnSignal() as stop:
                signal.raise_signal(sig)
                assert stop.requested, sig
                with pytest.raises(KeyboardInterrupt):
                    signal.raise_signal(sig)
            assert {s: signal.getsignal(s) for s in ours} == ours, "each signal's own handler is back"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("setting, value", [
    ("model", "random-0.5b"), ("dtype", "bfloat16"), ("device", "cpu"), ("data", "train.jsonl"), ("eval_data", "held_out.jsonl"),
    ("eval_size", 100), ("eval_max_new_tokens", 16), ("eval_batch_size", 8), ("eval_greedy", False), ("eval_samples", 2),
    ("eval_temperature", 0.7), ("eval_top_p", 0.9), ("eval_top_k", 5), ("eval_seed", 1), ("rollout", "eager"),
    ("verifier", "math-verify")])
def test_a_step_0_evaluation_is_reused_only_where_every_evaluation_setting_is_the_same(setting, value, tmp_path):
    ours = vars(config.Config(max_new_tokens=12))
    row = {"kind": "eval", "step": 0, "method": "grpo", "eval_accuracy": 0.0, "eval_length": 8.0, "eval_acc_per_1k_tokens": 0.0,
           "evaluated_with": run_io.evaluation_settings(ours | {setting: value})}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match=f"^--initial-eval: .* evaluated with --(no-)?{setting.replace('_', '-')}"):
        config.check_initial_eval(config.Config(**ours | {"initial_eval": str(tmp_path)}))
