"""trainer/decoding.py: the same tokens as HF `generate` (greedy), the same sampling distribution as HF's
temperature → top-k → top-p warpers (float64 reference, and the frequencies of real draws), every EOS id
ending a row, a decode step without host syncs (the condition for replaying it as a CUDA graph), graph
replay equal to eager decoding on CUDA, and errors that name the argument.
"""

import math
import re
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import egrsd
import train_min
from test_egrsd import assert_close
from trainer import decoding
from trainer.offline_models import TINY_VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer
from trainer.tasks import built_in_problems


def hf_warped_probs(logits, temperature, top_k, top_p):
    """The sampling distribution of HF generate: its own warpers, in its order, then a softmax."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)


def candidate_probs(logits, temperature, top_k, top_p):
    """decoding.candidates scattered back to the whole vocabulary (B, V)."""
    probs, ids = decoding.candidates(logits, temperature, top_k, top_p)
    return torch.zeros(logits.shape, dtype=probs.dtype).scatter(-1, ids, probs)


@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 60), temperature=st.floats(0.05, 4.0),
       top_k=st.integers(0, 70), top_p=st.sampled_from([1.0, 0.999, 0.95, 0.7, 0.3, 1e-3]), ties=st.booleans())
def test_candidates_are_hfs_warped_distribution_in_float64(seed, vocab, temperature, top_k, top_p, ties):
    """With ties (logits on a grid of 0.5, as bf16 logits often are) every token tied with the k-th stays,
    as in HF; which of several tied tokens a top-p cut drops is arbitrary in both, so with ties the kept
    probabilities are compared as a sorted list per row."""
    logits = 3 * torch.randn(4, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if ties:
        logits = torch.round(2 * logits) / 2
    ours, expected = candidate_probs(logits, temperature, top_k, top_p), hf_warped_probs(logits, temperature, top_k, top_p)
    if ties:
        ours, expected = ours.sort(dim=-1).values, expected.sort(dim=-1).values
    assert_close(ours, expected, torch.float64)
    assert ours.dtype == torch.float64


def test_candidates_keep_the_tokens_tied_with_the_kth_in_bf16():
    logits = torch.tensor([[4.0, 3.0, 3.0, 3.0, 1.0, 3.0]], dtype=torch.bfloat16)
    probs, ids = decoding.candidates(logits, 1.0, top_k=2, top_p=1.0)
    assert sorted(ids[0][probs[0] > 0].tolist()) == [0, 1, 2, 3, 5]
    assert_close(candidate_probs(logits, 1.0, 2, 1.0), hf_warped_probs(logits.float(), 1.0, 2, 1.0), torch.float32)


def test_a_candidate_goes_where_those_above_it_hold_exactly_top_p_as_in_hf():
    """Four equal logits at top_p 0.5: the first two hold exactly 0.5 (float sums of quarters are exact), so
    the other two go, as HF drops a token whose ascending cumulative probability is ≤ 1 − top_p."""
    logits = torch.zeros(1, 4)
    ours = candidate_probs(logits, 1.0, 0, 0.5)
    assert sorted(ours[0].tolist()) == [0.0, 0.0, 0.5, 0.5]
    assert_close(ours.sort(dim=-1).values, hf_warped_probs(logits, 1.0, 0, 0.5).sort(dim=-1).values, torch.float32)


def test_sample_draws_each_candidate_at_its_probability():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]]).expand(200_000, 5)
    ids = torch.tensor([[7, 3, 9, 1, 4]]).expand(200_000, 5)
    torch.manual_seed(0)
    drawn = decoding.sample(probs, ids)
    counts = torch.stack([(drawn == i).sum() for i in (7, 3, 9, 1, 4)]).double()
    expected = probs[0].double() * len(drawn)
    assert counts[-1] == 0, "a candidate of probability 0 is never drawn"
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs[0])).sqrt()).all(), counts  # 5 sigma


def sharpened(model, attention="sdpa"):
    """`model` with large random weights: attention far from uniform and logits far apart, so that a wrong
    position, a visible padding token or a stale cache entry changes the greedy tokens."""
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.3)
    model.config._attn_implementation = attention
    return model


def sharp_tiny_model(tokenizer, attention="sdpa"):
    return sharpened(build_tiny_model(tokenizer), attention)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def family_model(family, attention="sdpa", **config):
    """A random 2-layer model of `family` (hidden 64, 4 query heads sharing 2 key/value heads) with the tiny
    vocabulary, sharpened; `config` overrides its config's fields."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if family == "gpt2":  # a family decoding.py does not know
        settings = dict(vocab_size=TINY_VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        return sharpened(AutoModelForCausalLM.from_config(GPT2Config(**settings, **config)), attention)
    kind = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    settings = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    return sharpened(AutoModelForCausalLM.from_config(kind(**settings, **config)), attention)


def left_padded_prompts(tokenizer, rows=5, length=20):
    ids = torch.randint(3, len(tokenizer), (rows, length), generator=torch.Generator().manual_seed(rows))
    attention = torch.ones_like(ids)
    for row, padding in enumerate([0, 3, 7, 0, 12][:rows]):
        ids[row, :padding], attention[row, :padding] = tokenizer.pad_token_id, 0
    return ids, attention


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("max_new_tokens", [1, 6, 40])
def test_greedy_rollouts_are_hf_generates_tokens(attention, max_new_tokens):
    """Left padding of different lengths; EOS chosen so that some rows stop early and the output is trimmed."""
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer, attention)
    ids, mask = left_padded_prompts(tokenizer)
    free = decoding.generate(model, ids, mask, max_new_tokens, eos_id=-1, pad_id=tokenizer.pad_token_id, greedy=True)
    for eos in {-1, int(free[0, max_new_tokens // 2]), int(free[3, -1])}:  # never, mid-row, last column
        hf = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id)
        for rows in (slice(None), slice(0, 1)):  # with row 0 alone, every row stops before the last column
            expected = model.generate(input_ids=ids[rows], attention_mask=mask[rows], generation_config=hf)
            ours = decoding.generate(model, ids[rows], mask[rows], max_new_tokens, eos, tokenizer.pad_token_id,
                                    greedy=True, check_every=4)
            assert torch.equal(ours, expected[:, ids.shape[1]:]), (eos, ours, expected)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_rollouts_of_every_supported_family_are_hf_generates_tokens(family, attention):
    """Llama, Mistral, Qwen2 and Qwen3 through the static decoder (no fallback, no warning), left padding of
    different lengths, an EOS that ends row 0 halfway. Mistral's sliding window is exactly prompt + new
    tokens: it covers every earlier token, so it is full attention (HF applies it, decoding.py does not)."""
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer()
    ids, mask = left_padded_prompts(tokenizer)
    new = 12
    window = dict(sliding_window=ids.shape[1] + new) if family == "mistral" else {}
    model = family_model(family, attention, **window)
    assert decoding.unsupported(model, ids.shape[1] + new) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        free = decoding.generate(model, ids, mask, new, eos_id=-1, pad_id=tokenizer.pad_token_id, greedy=True)
        eos = int(free[0, new // 2])
        ours = decoding.generate(model, ids, mask, new, eos, tokenizer.pad_token_id, greedy=True, check_every=4)
    hf = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=hf)[:, ids.shape[1]:]
    assert torch.equal(ours, expected), (ours, expected)


@pytest.mark.parametrize("family, config, notice", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
     "qwen2 model, layers of type sliding_attention, not only full attention"),
    ("mistral", dict(sliding_window=6), "mistral model, sliding window 6 is shorter than prompt + new tokens (30)"),
    ("gpt2", {}, "gpt2 model, not one of the supported families (llama, mistral, qwen2, qwen3)"),
], ids=["qwen2-sliding-layers", "mistral-short-window", "gpt2"])
def test_an_unsupported_model_decodes_with_hf_generate_and_says_so_once(family, config, notice, monkeypatch):
    """Greedy and sampled rollouts equal HF generate's (sampled: with the same seed), one notice for the
    model. For the sliding windows the static decoder would be wrong: forced to decode, it differs."""
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer()
    model = family_model(family, **config)
    ids, mask = left_padded_prompts(tokenizer)
    hf = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=hf)[:, ids.shape[1]:]
    torch.manual_seed(0)
    sampled = decoding.hf_generate(model, ids, mask, 10, -1, tokenizer.pad_token_id, temperature=1.5, top_k=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        greedy = decoding.generate(model, ids, mask, 10, -1, tokenizer.pad_token_id, greedy=True)
        torch.manual_seed(0)
        assert torch.equal(decoding.generate(model, ids, mask, 10, -1, tokenizer.pad_token_id, temperature=1.5, top_k=5), sampled)
    assert torch.equal(greedy, expected)
    assert [str(w.message) for w in caught if str(w.message).startswith("decoding:")] == [
        f"decoding: {notice}: decoding it with HF generate (dynamic cache) instead"]
    if family != "gpt2":
        monkeypatch.setattr(decoding, "unsupported", lambda model, length: None)
        assert not torch.equal(decoding.generate(model, ids, mask, 10, -1, tokenizer.pad_token_id, greedy=True), expected)


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM behind a forward that takes only ids and a mask, as some wrappers do."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("change, reason", [
    (dict(), None),
    (dict(attention="flash_attention_2"), "attention implementation 'flash_attention_2' is not sdpa or eager"),
    (dict(sliding_window=31), "sliding window 31 is shorter than prompt + new tokens (32)"),
    (dict(sliding_window=32), None),
    (dict(sliding_window=None), None),
    (dict(wrap=True), "its forward takes no position_ids, use_cache, logits_to_keep, cache or past_key_values"),
], ids=["supported", "flash-attention", "window-31", "window-32", "no-window", "wrapped-forward"])
def test_unsupported_names_what_the_static_decoder_cannot_do(change, reason):
    """For a length of 32 (prompt + new tokens), on a Mistral."""
    change = dict(change)
    wrap = change.pop("wrap", False)
    model = family_model("mistral", change.pop("attention", "sdpa"), **change)
    assert decoding.unsupported(NoLogitsToKeep(model) if wrap else model, 32) == reason


def test_a_row_ends_at_the_first_of_several_eos_ids_as_in_hf():
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer)
    ids, mask = left_padded_prompts(tokenizer)
    free = decoding.generate(model, ids, mask, 20, eos_id=-1, pad_id=tokenizer.pad_token_id, greedy=True)
    eos = [int(free[0, 12]), int(free[2, 4])]
    hf = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=hf)[:, ids.shape[1]:]
    ours = decoding.generate(model, ids, mask, 20, eos, tokenizer.pad_token_id, greedy=True, check_every=3)
    assert torch.equal(ours, expected)
    assert (ours[0, 13:] == tokenizer.pad_token_id).all() and (ours[2, 5:] == tokenizer.pad_token_id).all(), "both ids end rows"


@pytest.mark.parametrize("rollout", ["eager", "hf-dynamic"])
def test_a_row_ending_on_the_second_eos_id_is_finished_masked_up_to_it_and_rewarded(rollout, monkeypatch):
    """Qwen2.5-Instruct's generation config ends a turn on <|im_end|> or <|endoftext|>: a rollout that ends
    on the second is finished (not truncated), its mask stops there, and it earns its reward."""
    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer)
    ids, attention = left_padded_prompts(tokenizer)
    cfg = train_min.Config(device="cpu", max_new_tokens=20, rollout=rollout)
    model.generation_config.eos_token_id = [10**9]  # unreachable: every row runs to the cap
    free = train_min.generate(model, tokenizer, ids, attention, cfg, greedy=True)[0]
    second = int(free[0, 6])
    end = int((free[0] == second).nonzero()[0])  # where row 0 meets it first
    assert tokenizer.eos_token_id not in free[0, : end + 1].tolist()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    completion, mask, finished = train_min.generate(model, tokenizer, ids, attention, cfg, greedy=True)
    assert finished[0] and mask[0].tolist() == [True] * (end + 1) + [False] * (completion.shape[1] - end - 1)
    monkeypatch.setattr(train_min, "is_correct", lambda text, answer: True)  # every finished row is right
    correct = train_min.verify(train_min.completion_texts(tokenizer, completion, mask), finished, built_in_problems(5, 0)[0], cfg)
    rewards = egrsd.length_shaped_reward(correct, mask.sum(dim=1), cfg.max_new_tokens)
    assert correct[0] and rewards[0] == 1 + 0.5 * (1 - (end + 1) / 20)


def test_sampled_rollouts_follow_hfs_distribution_of_the_first_token():
    """One prompt 4,000 times: the frequency of each first token is its probability under HF's warpers."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).eval()
    ids, mask = left_padded_prompts(tokenizer, rows=1)
    with torch.no_grad():
        expected = hf_warped_probs(model(input_ids=ids).logits[0, -1:].double(), 1.3, 8, 0.9)[0]
    torch.manual_seed(0)
    rows = 4000
    first = decoding.generate(model, ids.expand(rows, -1), mask.expand(rows, -1), 1, -1, tokenizer.pad_token_id,
                             temperature=1.3, top_k=8, top_p=0.9)[:, 0]
    counts = torch.bincount(first, minlength=len(expected)).double()
    assert counts[expected == 0].sum() == 0, "no token outside HF's top-k / top-p set"
    assert ((counts - rows * expected).abs() <= 5 * (rows * expected * (1 - expected)).sqrt() + 1).all()


def test_sampled_rollouts_are_reproducible_and_padded_after_eos():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).eval()
    ids, mask = left_padded_prompts(tokenizer)
    torch.manual_seed(3)
    eos = int(decoding.generate(model, ids, mask, 30, -1, tokenizer.pad_token_id, temperature=1.5)[0, 10])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)  # the same draws as above up to row 0's token 10, now an EOS
        runs.append(decoding.generate(model, ids, mask, 30, eos, tokenizer.pad_token_id, temperature=1.5))
    assert torch.equal(*runs)
    completion, ended = runs[0], (runs[0] == eos).int().cumsum(-1)
    assert ended[0, 10] > 0
    after = (ended - (completion == eos).int()) > 0  # strictly after the first EOS
    assert after.any() and (completion[after] == tokenizer.pad_token_id).all()


def test_decode_attention_equals_grouped_query_attention_in_float64():
    """decode_sdpa against attention written out: each query head h uses key/value head h // (H / H_kv)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 14, 1, 8, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(3, 2, 11, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    visible = torch.rand(3, 1, 1, 11, generator=generator) > 0.3
    visible[..., 0] = True
    out, weights = decoding.decode_sdpa(None, query, key, value, visible, scaling=0.3)
    assert weights is None and out.shape == (3, 1, 14, 8)
    for b in range(3):
        for h in range(14):
            scores = 0.3 * key[b, h // 7] @ query[b, h, 0]
            probs = scores.masked_fill(~visible[b, 0, 0], -math.inf).softmax(-1)
            assert_close(out[b, 0, h], probs @ value[b, h // 7], torch.float64)


def test_prefill_leaves_no_query_without_keys_and_hides_padding():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).eval()
    ids, mask = left_padded_prompts(tokenizer)
    decoder = decoding._Decoder(model, ids, mask, 4, 40, tokenizer.pad_token_id, pick=lambda logits: logits.argmax(-1))
    decoder.prefill(ids, mask)
    visible, real = decoder.prefill_visible(), mask.bool()
    assert visible.any(-1).all(), "every query sees at least one key"
    p = ids.shape[1]
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    assert torch.equal(visible[:, :, :p] & real[:, :, None], causal & real[:, None, :] & real[:, :, None])
    assert not visible[:, :, p:].any(), "no prompt query sees a completion slot"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lm_head_reads_contiguous_hidden_states_of_a_frozen_model(family):
    """A strided (B, 1, D) view of the prompt's last position, times a weight that needs no gradient, makes
    torch's matmul expand the LM head to (B, D, V) and copy it: seconds per prefill at Qwen2.5's vocabulary.
    The sampler and a LoRA base are frozen, so the head must get a contiguous input every step."""
    tokenizer = build_tiny_tokenizer()
    model = family_model(family).requires_grad_(False)
    seen = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    try:
        decoding.generate(model, *left_padded_prompts(tokenizer), 3, eos_id=-1, pad_id=tokenizer.pad_token_id, greedy=True)
    finally:
        hook.remove()
    assert seen == [True] * 3, seen


@pytest.mark.parametrize("max_new_tokens", [2, 3, 40])
def test_prefill_resets_every_state_a_step_moved_on(max_new_tokens):
    """The CUDA-graph path runs a warm-up step and then prefills again: what follows must equal a fresh
    rollout, also when it stops halfway (columns not yet written are padding). Two warm-up steps here, so
    that a stale cache slot, visible key or output column would show."""
    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer)
    ids, mask = left_padded_prompts(tokenizer)
    runs, seen = [], []  # seen: the logits of every pick, so that a small stale contribution shows too

    def pick(logits):
        seen.append(logits.clone())
        return logits.argmax(-1)

    for warm_up in (0, min(2, max_new_tokens - 1)):
        decoder = decoding._Decoder(model, ids, mask, max_new_tokens, 40, tokenizer.pad_token_id, pick=pick)
        with torch.no_grad():
            decoder.prefill(ids, mask)
            for _ in range(warm_up):
                decoder.step()
            seen.clear()
            decoder.prefill(ids, mask)
            for _ in range(max_new_tokens // 2):
                decoder.step()
        runs.append((decoder.out.clone(), torch.stack(seen)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("family", ["qwen2", "mistral", "lora sampler"])
def test_the_decode_step_has_no_host_sync(family):
    """CUDA graphs replay GPU work only: a step that reads a value back to Python (.item(), a branch on a
    tensor) or keeps a Python counter would be captured wrongly. Dynamo with fullgraph=True fails on the
    first, and with error_on_recompile on the second (its guard on the counter fails); checked on CPU.
    Mistral with a sliding window as long as the sequence: HF's sliding cache layers count in Python. The
    LoRA sampler: a Qwen2 whose linear layers carry the adapter (trainer/lora.py). The sampled step: a greedy one
    differs only by an argmax in place of the sampling."""
    tokenizer = build_tiny_tokenizer()
    ids, mask = left_padded_prompts(tokenizer)
    if family == "lora sampler":
        pytest.importorskip("peft", reason="the optional extra peft is not installed")
        from trainer import lora

        model = lora.sampler(lora.attach(build_tiny_model(tokenizer), train_min.Config(lora_r=4))).eval()
    else:
        model = build_tiny_model(tokenizer).eval() if family == "qwen2" else family_model(family, sliding_window=ids.shape[1] + 6)
    decoder = decoding._Decoder(model, ids, mask, 6, eos_ids=[40], pad_id=tokenizer.pad_token_id,
                               pick=lambda logits: decoding.next_tokens(logits, False, 1.1, 20, 0.95))
    try:
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            decoder.prefill(ids, mask)
            step = torch.compile(decoder.step, backend="eager", fullgraph=True)
            step(), step(), step()  # a Python value that changed between steps would force a recompile
    finally:
        torch._dynamo.reset()
    assert (decoder.slot == ids.shape[1] + 3).all() and (decoder.out[:, 4:] == tokenizer.pad_token_id).all()


def test_a_compiled_decode_step_gives_the_uncompiled_tokens_and_compiles_once(compiled_by_dynamo_alone):
    """The same greedy tokens and, from the same seed, the same samples (the compilation's warm-up step puts
    the generator back); another batch size, prompt length, completion length and model of the same class
    reuse the one compilation (dynamic shapes from the start; a batch of one row would compile again)."""
    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer)
    ids, mask = left_padded_prompts(tokenizer)
    for greedy in (True, False):
        runs = []
        for compile_step in (False, True):
            torch.manual_seed(0)
            runs.append(decoding.generate(model, ids, mask, 12, 40, tokenizer.pad_token_id, greedy=greedy,
                                          temperature=1.5, top_k=20, top_p=0.9, compile_step=compile_step))
        assert torch.equal(*runs), greedy
    other = sharp_tiny_model(tokenizer)
    with torch.no_grad():
        other.model.norm.weight.mul_(-1.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for model_, rows, cut, new in ((model, 3, 2, 20), (other, 4, 0, 9)):
            decode = lambda c: decoding.generate(model_, ids[:rows, cut:], mask[:rows, cut:], new, 40,  # noqa: E731
                                                 tokenizer.pad_token_id, greedy=True, compile_step=c)
            assert torch.equal(decode(False), decode(True))
    assert len(compiled_by_dynamo_alone) == 1, "one compilation for every shape and both models"


def test_a_compile_step_that_fails_to_compile_says_so(monkeypatch):
    def broken(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(decoding, "COMPILE_BACKEND", broken)
    monkeypatch.setattr(decoding, "_compiled", {})
    tokenizer = build_tiny_tokenizer()
    ids, mask = left_padded_prompts(tokenizer)
    try:
        with pytest.raises(RuntimeError, match="(?s)compile_step \\(train_min.py --compile-decode\\): torch.compile of the decode step failed.*no C\\+\\+ compiler"):
            decoding.generate(build_tiny_model(tokenizer), ids, mask, 4, 40, tokenizer.pad_token_id, greedy=True, compile_step=True)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("decode", [decoding.generate, decoding.hf_generate], ids=["static", "hf"])
def test_rollouts_run_in_eval_mode_and_leave_the_model_in_its_own_mode(decode):
    """With attention dropout, a forward in training mode would make greedy rollouts random; a model that
    was training (the student of full fine-tuning) trains again after its rollouts, one in eval mode stays so."""
    tokenizer = build_tiny_tokenizer()
    model = family_model("qwen2", attention_dropout=0.9)
    ids, mask = left_padded_prompts(tokenizer)
    expected = decode(model, ids, mask, 6, -1, tokenizer.pad_token_id, greedy=True)
    modes = []
    hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    try:
        got = decode(model.train(), ids, mask, 6, -1, tokenizer.pad_token_id, greedy=True)
        assert model.training, "a training model trains again"
        decode(model.eval(), ids, mask, 2, -1, tokenizer.pad_token_id, greedy=True)
        assert not model.training, "an evaluated model stays in eval mode"
    finally:
        hook.remove()
    assert torch.equal(got, expected) and modes and not any(modes), modes


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_decode_steps_of_an_sdpa_model_use_decode_sdpa_and_then_give_its_implementation_back(attention):
    """The prefill runs the model's own attention, each later step decode_sdpa (sdpa models) or eager as it is."""
    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer, attention)
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    try:
        decoding.generate(model, *left_padded_prompts(tokenizer), 4, -1, tokenizer.pad_token_id, greedy=True)
    finally:
        hook.remove()
    step = decoding.DECODE_ATTENTION if attention == "sdpa" else "eager"
    assert seen == [attention] + [step] * 3 and model.config._attn_implementation == attention


def test_a_peft_wrapped_model_decodes_with_the_static_decoder():
    """A PEFT wrapper's forward takes **kwargs: its base model's forward says what it accepts."""
    pytest.importorskip("peft", reason="the optional extra peft is not installed")
    from trainer import lora

    tokenizer = build_tiny_tokenizer()
    model = lora.attach(build_tiny_model(tokenizer), train_min.Config(lora_r=4)).eval()
    ids, mask = left_padded_prompts(tokenizer)
    assert decoding.unsupported(model, ids.shape[1] + 5) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback notice
        ours = decoding.generate(model, ids, mask, 5, -1, tokenizer.pad_token_id, greedy=True)
    assert torch.equal(ours, decoding.hf_generate(model, ids, mask, 5, -1, tokenizer.pad_token_id, greedy=True))


def test_each_token_is_fed_at_hfs_position_with_an_additive_mask_in_the_models_dtype():
    """Left padding: position 0 is a row's first real token, as in HF generate (RoPE's relative positions
    hide a constant shift per row, a rope type that reads absolute positions would not). Eager attention adds
    the mask to its scores: a bf16 model gets a bf16 mask, so that its scores stay bf16 as in HF."""
    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer, "eager").to(torch.bfloat16)
    ids, mask = left_padded_prompts(tokenizer, rows=3)
    fed = {decoding.generate: [], decoding.hf_generate: []}
    for decode, seen in fed.items():
        hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
            (kwargs["position_ids"].clone(), kwargs["attention_mask"].dtype)), with_kwargs=True)
        try:
            decode(model, ids, mask, 4, -1, tokenizer.pad_token_id, greedy=True)
        finally:
            hook.remove()
    ours, hf = fed.values()
    assert len(ours) == len(hf) == 4 and all(torch.equal(a, b) for (a, _), (b, _) in zip(ours, hf))
    assert all(dtype == torch.bfloat16 for _, dtype in ours)


def test_hf_generate_with_a_static_cache_pads_the_prompts_on_the_left_to_a_multiple_of_64():
    """The baseline's static cache is compiled per shape on CUDA: its prompts are left-padded to 64 tokens
    here, ids and mask alike, and it returns the tokens of the static decoder."""
    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer)
    ids, mask = left_padded_prompts(tokenizer)
    expected = decoding.generate(model, ids, mask, 5, -1, tokenizer.pad_token_id, greedy=True)
    widths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        ours = decoding.hf_generate(model, ids, mask, 5, -1, tokenizer.pad_token_id, greedy=True, static=True)
    finally:
        hook.remove()
    assert torch.equal(ours, expected) and widths[0] == 64, widths


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_rollouts_equal_eager_rollouts_on_cuda(monkeypatch):
    monkeypatch.setattr(decoding, "no_graphs", type(decoding.no_graphs)())
    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer).cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts(tokenizer))
    run = lambda **kw: decoding.generate(model, ids, mask, 40, 40, tokenizer.pad_token_id, **kw)  # noqa: E731
    assert torch.equal(run(greedy=True, graph=False), run(greedy=True, graph=True))
    torch.manual_seed(0)
    first = run(temperature=1.5, graph=True)
    torch.manual_seed(0)
    assert torch.equal(first, run(temperature=1.5, graph=True))
    # a step that cannot be captured: graph=True raises; the default warns once, then decodes without trying
    captures = []
    monkeypatch.setattr(decoding._Decoder, "capture", lambda self: captures.append(1) or (_ for _ in ()).throw(RuntimeError("no capture")))
    with pytest.raises(RuntimeError, match="no capture"):
        run(greedy=True, graph=True)
    with pytest.warns(UserWarning, match="capture failed"):
        assert torch.equal(run(greedy=True), run(greedy=True, graph=False))
    assert model in decoding.no_graphs and len(captures) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(greedy=True)
    assert len(captures) == 2, "no second attempt for the same model"
    # out of memory in the capture is the card's state, not the model's: raised, and graphs stay on for others
    monkeypatch.setattr(decoding, "no_graphs", type(decoding.no_graphs)())
    monkeypatch.setattr(decoding._Decoder, "capture", lambda self: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")))
    with pytest.raises(torch.OutOfMemoryError):
        run(greedy=True)
    assert model not in decoding.no_graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llama", "mistral", "lora sampler"])
def test_llama_mistral_and_lora_sampler_decode_steps_are_captured_as_graphs_on_cuda(family, monkeypatch):
    """graph=True raises if capture fails; the graph's tokens are the eager loop's. Mistral keeps its
    config's default sliding window (4,096), longer than the rollout. The LoRA sampler (trainer/lora.py):
    a Qwen2 whose adapted layers add the adapter, B random so that it acts."""
    monkeypatch.setattr(decoding, "no_graphs", type(decoding.no_graphs)())
    tokenizer = build_tiny_tokenizer()
    if family == "lora sampler":
        pytest.importorskip("peft", reason="the optional extra peft is not installed")
        from trainer import lora

        adapted = lora.attach(sharp_tiny_model(tokenizer).cuda(), train_min.Config(lora_r=4))  # (the sampler
        with torch.no_grad():  # shares the student's weights: it is built on the device, never moved there)
            for name, p in adapted.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
        model = lora.sampler(adapted)
    else:
        model = family_model(family).cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts(tokenizer))
    run = lambda graph: decoding.generate(model, ids, mask, 20, -1, tokenizer.pad_token_id, greedy=True, graph=graph)  # noqa: E731
    assert torch.equal(run(False), run(True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["qwen2", "lora sampler"])
def test_an_inductor_compiled_step_inside_the_graph_gives_the_graphs_tokens_on_cuda(family, monkeypatch):
    """compile_step as train_min.py --compile-decode runs it: inductor's kernels captured in the CUDA graph;
    float32, so that the fused kernels round as the eager ones do to well within the sharpened logits' gaps."""
    monkeypatch.setattr(decoding, "no_graphs", type(decoding.no_graphs)())
    monkeypatch.setattr(decoding, "_compiled", {})
    tokenizer = build_tiny_tokenizer()
    model = sharp_tiny_model(tokenizer).cuda()
    if family == "lora sampler":
        pytest.importorskip("peft", reason="the optional extra peft is not installed")
        from trainer import lora

        adapted = lora.attach(model, train_min.Config(lora_r=4))
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
        model = lora.sampler(adapted)
    ids, mask = (t.cuda() for t in left_padded_prompts(tokenizer))
    run = lambda c: decoding.generate(model, ids, mask, 20, -1, tokenizer.pad_token_id, greedy=True, graph=True, compile_step=c)  # noqa: E731
    try:
        assert torch.equal(run(False), run(True))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("change, message", [
    (dict(prompt_mask="right"), "prompt_mask: expected left padding"),
    (dict(prompt_mask="short"), "prompt_ids, prompt_mask: expected two (B, P) tensors"),
    (dict(max_new_tokens=0), "max_new_tokens: expected ≥ 1"),
    (dict(check_every=0), "check_every: expected ≥ 1"),
    (dict(eos_id=[]), "eos_id: expected a token id or a non-empty list"),
    (dict(temperature=0.0), "temperature: expected > 0"),
    (dict(top_p=0.0), "top_p: expected in (0, 1]"),
    (dict(top_k=-1), "top_k: expected ≥ 0"),
    (dict(graph=True), "graph: CUDA graphs need"),
])
@pytest.mark.parametrize("supported", [True, False])
def test_bad_rollout_input_names_the_argument(change, message, supported):
    """Also for a model that would decode through HF generate: a bad argument is an error, not a fallback."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    if not supported:
        model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    ids, mask = left_padded_prompts(tokenizer)
    change = dict(change)
    if change.get("prompt_mask") == "right":
        change["prompt_mask"] = mask.flip(-1)
    elif change.get("prompt_mask") == "short":
        change["prompt_mask"] = mask[:, 1:]
    arguments = {**dict(prompt_ids=ids, prompt_mask=mask, max_new_tokens=4, eos_id=1, pad_id=tokenizer.pad_token_id), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        decoding.generate(model, **arguments)
