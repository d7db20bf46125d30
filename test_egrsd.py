"""The correctness spec of EGRSD-min: property-based tests (hypothesis) of SPEC §2-§4, then the trainer.

Six kinds of test, in this order:
1. reference: each function equals a float64 naive implementation written loop by loop from the paper's
   equations, on generated batches with left and right padding, holes, all-padding rows, zero and large
   entropies, zero advantages, γ up to 2 (so the 0.1 floor binds) and windows 0..8;
2. invariants: every property of SPEC §4, one test each, named for the sentence it states;
3. contract (SPEC §3): weights and advantages come back detached, and each kind of bad input raises a
   ValueError that names the argument;
4. beyond the contract: the hidden-state (`linear_*`) functions equal the plain computation, also under
   bf16 autocast, and the token regimes hold their definitions;
5. train_min.py end to end on CPU with the tiny model built in code: every method, token alignment, a
   learning check, resume, Ctrl-C, non-finite steps, bad flags and files, bf16, the token view;
6. decoding.py: the same tokens as HF `generate` (greedy), the same sampling distribution as HF's
   temperature → top-k → top-p warpers (float64 reference, and the frequencies of real draws), and a
   decode step that has no host sync (the condition for replaying it as a CUDA graph).

The hypothesis profile is fixed (derandomized, no example database), so a run is reproducible and CI never
flakes. Run: python -m pytest -q
"""
import copy
import functools
import inspect
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

import decoding
import egrsd
import train_min
import views
from offline_models import build_tiny_model, build_tiny_tokenizer
from tasks import Problem, built_in_problems, is_correct, is_correct_symbolic, load_problems, student_messages, teacher_messages

settings.register_profile(
    "egrsd", derandomize=True, database=None, deadline=None, max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("egrsd")

WIDE_FLOATS = (torch.float32, torch.float64)  # "arithmetic in float32 or wider, whatever the input dtype"
TOLERANCE = {  # (rtol, atol) of arithmetic in each precision; bfloat16 only for gradients stored in it
    torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-5)}
ROUNDING = 1e-12  # slack for bounds that hold in exact arithmetic


def assert_close(actual, expected, precision):
    """`actual` equals the float64 `expected` to the precision of arithmetic in `precision`."""
    rtol, atol = TOLERANCE[precision]
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


def call(function, arguments, **settings):
    """Call `function` (library or naive) with those of `arguments` and `settings` that its parameters name."""
    parameters = inspect.signature(function).parameters
    return function(**{name: value for name, value in {**arguments, **settings}.items() if name in parameters})


# --------------------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------------------

SHARES = st.sampled_from([0.0, 0.25, 0.5])  # of the edge case in a batch: exact zeros, ties, holes
REWARDS = st.one_of(st.just(0.0), st.integers(0, 1024).map(lambda length: 1 + 0.5 * (1 - length / 1024)))
PADDING_ENTROPIES = st.sampled_from([0.0, 50.0])  # below and above every real entropy
PADDING_LOG_PROBS = st.sampled_from([0.0, -50.0])
WINDOWS = st.integers(0, 8)
EPS = st.one_of(st.just(0.2), st.floats(0.01, 0.99))
CHUNKINGS = st.sampled_from([{}, {"chunk_size": 1}, {"chunk_size": 3}])  # default, and chunks < rows


def tensors(elements, shape, dtype=torch.float64):
    """A tensor of `shape` whose entries are drawn from `elements`."""
    n = math.prod(shape)
    return st.lists(elements, min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=dtype).reshape(shape))


@st.composite
def random_source(draw):
    """A torch generator seeded by hypothesis: the values of a batch, reproducible from the example."""
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


def chance(share, shape, generator):
    """A bool tensor, True with probability `share`."""
    return torch.rand(shape, generator=generator) < share


def uniform(low, high, shape, generator):
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


@st.composite
def masks(draw, rows, length):
    """(rows, length) bool: each row a completion of 0..length tokens after some left padding, the rest
    right padding, with holes in a drawn share of its positions; 0 tokens: a row of padding only."""
    generator, holes = draw(random_source()), draw(st.sampled_from([0.0, 0.2]))
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for row in range(rows):
        tokens = torch.randint(length + 1, (), generator=generator)
        left = torch.randint(length - tokens + 1, (), generator=generator)
        mask[row, left:left + tokens] = True
    return mask & ~chance(holes, (rows, length), generator)


@dataclass
class Batch:
    """What the trainer hands the weighting functions for B rollouts of T completion positions."""
    entropy: torch.Tensor  # (B, T) teacher entropy H, nats
    mask: torch.Tensor  # (B, T) bool, True on completion tokens
    teacher_logp: torch.Tensor  # (B, T) log p_T(y_t)
    student_logp: torch.Tensor  # (B, T) log p_S(y_t)
    advantages: torch.Tensor  # (B,) A_i

    @property
    def direction(self):  # (B,) D_i = sign(A_i)
        return self.advantages.sign()

    @property
    def arguments(self):
        """The batch under the parameter names of SPEC §3."""
        return dict(entropy=self.entropy, teacher_entropy=self.entropy, mask=self.mask,
                    teacher_logp=self.teacher_logp, student_logp=self.student_logp,
                    advantages=self.advantages, direction=self.direction)


@st.composite
def batches(draw, dtype=torch.float64):
    """B in 1..5 rollouts of T in 1..12 positions, with drawn shares of the edge cases: entropies exactly 0,
    all below the 1-nat floor or up to 12 nats (log of a 150k vocabulary), teacher and student log-probs
    equal (δ = 0), advantages exactly 0."""
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 12))
    generator, top_entropy = draw(random_source()), draw(st.sampled_from([1.0, 12.0]))
    entropy = uniform(0, top_entropy, (B, T), generator).masked_fill(chance(draw(SHARES), (B, T), generator), 0.0)
    teacher_logp = uniform(-30, 0, (B, T), generator)
    student_logp = teacher_logp.where(chance(draw(SHARES), (B, T), generator), uniform(-30, 0, (B, T), generator))
    advantages = uniform(-3, 3, (B,), generator).masked_fill(chance(draw(SHARES), (B,), generator), 0.0)
    return Batch(entropy.to(dtype), draw(masks(B, T)), teacher_logp.to(dtype), student_logp.to(dtype), advantages.to(dtype))


@st.composite
def gate_settings(draw, floors=st.one_of(st.just(0.1), st.floats(0, 1))):
    """Keyword arguments of entropy_gate and token_advantages; γ up to 2, so the floor binds (γ > 0.9)."""
    return dict(gamma=draw(st.one_of(st.just(0.0), st.just(0.3), st.floats(0, 2))), window=draw(WINDOWS),
                floor=draw(floors), min_denominator=draw(st.sampled_from([1.0, 0.5, 4.0])),
                denominator=draw(st.sampled_from(["raw", "filtered"])), eps=draw(EPS))


@dataclass
class LogitBatch:
    """Teacher and student logits over the rollout; −inf marks banned vocabulary entries (both models)."""
    student_logits: torch.Tensor  # (B, T, V)
    teacher_logits: torch.Tensor  # (B, T, V)
    tokens: torch.Tensor  # (B, T) the rollout's tokens, never banned
    mask: torch.Tensor  # (B, T) bool, at least one True (the KL token-mean needs one)

    @property
    def arguments(self):
        return dict(logits=self.student_logits, student_logits=self.student_logits,
                    teacher_logits=self.teacher_logits, tokens=self.tokens, mask=self.mask)


@st.composite
def logit_batches(draw, dtype):
    """Random normal logits of scale 0.1..20 (peaked softmax at 20), a fraction of them −inf."""
    B, T, V = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 40))
    scale, banned_fraction = draw(st.sampled_from([0.1, 1.0, 5.0, 20.0])), draw(st.sampled_from([0.0, 0.3, 0.9]))
    generator = draw(random_source())
    tokens = torch.randint(V, (B, T), generator=generator)
    banned = (torch.rand(B, T, V, generator=generator) < banned_fraction).scatter(-1, tokens[..., None], False)
    student, teacher = ((scale * torch.randn(B, T, V, generator=generator, dtype=torch.float64))
                        .masked_fill(banned, -math.inf).to(dtype) for _ in range(2))
    mask = draw(masks(B, T))
    if not mask.any():
        mask[0, 0] = True
    return LogitBatch(student, teacher, tokens, mask)


# --------------------------------------------------------------------------------------------------------
# Naive float64 references, loop by loop from the equations of SPEC §2
# --------------------------------------------------------------------------------------------------------

def naive_lookahead_min(entropy, mask, window):
    """Eq. 8: for valid t, min of H[b, j] over valid j in [t, t + W]; 0 off the mask."""
    out = torch.zeros(entropy.shape, dtype=torch.float64)
    for b, t in mask.nonzero().tolist():
        out[b, t] = min(entropy[b, j].item() for j in range(t, min(t + window + 1, mask.shape[1])) if mask[b, j])
    return out


def naive_denominator(entropy, mask, window, min_denominator, denominator):
    """Eq. 5: the max over valid tokens of the whole batch, floored at min_denominator; the max of the raw
    entropies (Eq. 8) or of the window minima (Algorithm 1)."""
    source = entropy.double() if denominator == "raw" else naive_lookahead_min(entropy, mask, window)
    return max([source[b, t].item() for b, t in mask.nonzero().tolist()] + [min_denominator])


def naive_entropy_gate(entropy, mask, gamma=0.3, window=0, floor=0.1, min_denominator=1.0, denominator="raw"):
    """Eq. 6: ω = clip(1 − γ · Ĥ, floor, 1), Ĥ the window minimum over the batch denominator."""
    numerator = naive_lookahead_min(entropy, mask, window)
    scale = naive_denominator(entropy, mask, window, min_denominator, denominator)
    out = torch.zeros(entropy.shape, dtype=torch.float64)
    for b, t in mask.nonzero().tolist():
        out[b, t] = min(max(1 - gamma * numerator[b, t].item() / scale, floor), 1.0)
    return out


def naive_ratio_magnitude(teacher_logp, student_logp, direction, mask, eps=0.2):
    """Eq. 2: w = clip(exp(D · δ), 1 − ε, 1 + ε), δ = log p_T − log p_S."""
    out = torch.zeros(teacher_logp.shape, dtype=torch.float64)
    for b, t in mask.nonzero().tolist():
        delta = teacher_logp[b, t].item() - student_logp[b, t].item()
        out[b, t] = min(max(math.exp(direction[b].item() * delta), 1 - eps), 1 + eps)
    return out


def naive_token_advantages(advantages, teacher_logp, student_logp, teacher_entropy, mask, gamma=0.3, window=0,
                           eps=0.2, floor=0.1, min_denominator=1.0, denominator="raw"):
    """Eq. 7: Â = A · w · ω."""
    w = naive_ratio_magnitude(teacher_logp, student_logp, advantages.sign(), mask, eps)
    omega = naive_entropy_gate(teacher_entropy, mask, gamma, window, floor, min_denominator, denominator)
    return advantages.double()[:, None] * w * omega


def naive_policy_loss(student_logp, token_advantages, mask):
    """−Σ m·Â·log p / Σ m; 0 on an empty mask."""
    terms = [token_advantages[b, t].item() * student_logp[b, t].item() for b, t in mask.nonzero().tolist()]
    return -sum(terms) / len(terms) if terms else 0.0


def naive_length_shaped_reward(correct, lengths, max_length, beta=0.5):
    """App. B: r = 1[correct] · (1 + β (1 − |y| / L_max))."""
    return torch.tensor([float(c) * (1 + beta * (1 - n / max_length)) for c, n in zip(correct.tolist(), lengths.tolist())],
                        dtype=torch.float64)


class NaiveRunningAdvantage:
    """App. B by the letter: A = (r − mean) / std over all rewards of earlier calls (population std, warm-up
    rewards included); r − mean where that std is 0; r − baseline during the first `warmup_steps` calls."""

    def __init__(self, warmup_steps=10, warmup_baseline=0.5):
        self.warmup_steps, self.warmup_baseline, self.calls, self.earlier = warmup_steps, warmup_baseline, 0, []

    def __call__(self, rewards):
        if self.calls < self.warmup_steps:
            advantages = [r - self.warmup_baseline for r in rewards.tolist()]
        else:
            mean, std = statistics.fmean(self.earlier), statistics.pstdev(self.earlier)
            advantages = [(r - mean) / std if std > 0 else r - mean for r in rewards.tolist()]
        self.calls, self.earlier = self.calls + 1, self.earlier + rewards.tolist()
        return torch.tensor(advantages, dtype=torch.float64)


def naive_log_softmax(logits):
    """z − log Σ_v exp z_v in float64, by the definition (−inf entries stay −inf)."""
    z = logits.double()
    return z - z.exp().sum(-1, keepdim=True).log()


def naive_token_logprobs(logits, tokens):
    return naive_log_softmax(logits).gather(-1, tokens[..., None]).squeeze(-1)


def naive_token_logprobs_gradient(logits, tokens, upstream):
    """d(Σ g · log p[token]) / dz = g · (onehot(token) − softmax(z))."""
    one_hot = torch.nn.functional.one_hot(tokens, logits.shape[-1]).double()
    return upstream.double()[..., None] * (one_hot - naive_log_softmax(logits).exp())


def naive_token_entropy(logits):
    """Eq. 4: −Σ_v p log p, with 0 · log 0 = 0."""
    log_p = naive_log_softmax(logits)
    return -torch.where(log_p > -math.inf, log_p.exp() * log_p, 0.0).sum(-1)


def naive_opsd_loss(student_logits, teacher_logits, mask):
    """Eq. 1: token-mean over the mask of KL(p_T ‖ p_θ) = Σ_v p_T (log p_T − log p_θ)."""
    log_teacher, log_student = naive_log_softmax(teacher_logits), naive_log_softmax(student_logits)
    kl = torch.where(log_teacher > -math.inf, log_teacher.exp() * (log_teacher - log_student), 0.0).sum(-1)
    return kl[mask].mean()


def naive_opsd_loss_gradient(student_logits, teacher_logits, mask):
    """dL / dz_θ = m · (p_θ − p_T) / Σ m."""
    p_student, p_teacher = naive_log_softmax(student_logits).exp(), naive_log_softmax(teacher_logits).exp()
    return mask[..., None] * (p_student - p_teacher) / mask.sum()


# --------------------------------------------------------------------------------------------------------
# 1. The library equals the naive references
# --------------------------------------------------------------------------------------------------------

WEIGHTING = {  # library function: its naive reference
    egrsd.lookahead_min: naive_lookahead_min, egrsd.entropy_gate: naive_entropy_gate,
    egrsd.ratio_magnitude: naive_ratio_magnitude, egrsd.token_advantages: naive_token_advantages,
}


@pytest.mark.parametrize("function", WEIGHTING, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@given(data=st.data())
def test_weighting_matches_naive_reference(function, dtype, data):
    batch, settings = data.draw(batches(dtype)), data.draw(gate_settings())
    assert_close(call(function, batch.arguments, **settings), call(WEIGHTING[function], batch.arguments, **settings), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@given(data=st.data())
def test_policy_loss_matches_naive_reference(dtype, data):
    batch = data.draw(batches(dtype))
    advantages = call(naive_token_advantages, batch.arguments).to(dtype)
    loss = egrsd.policy_loss(batch.student_logp, advantages, batch.mask)
    assert_close(loss, naive_policy_loss(batch.student_logp, advantages, batch.mask), dtype)


@st.composite
def graded_rollouts(draw):
    """Arguments of length_shaped_reward: verdicts and lengths of B rollouts, some at the length cap."""
    B, max_length = draw(st.integers(1, 8)), draw(st.integers(1, 2048))
    lengths = st.one_of(st.just(max_length), st.integers(0, max_length))
    return dict(correct=draw(tensors(st.booleans(), (B,), torch.bool)), lengths=draw(tensors(lengths, (B,), torch.int64)),
                max_length=max_length, beta=draw(st.one_of(st.just(0.5), st.floats(0, 2))))


@given(graded_rollouts())
def test_length_shaped_reward_matches_naive_reference(rollouts):
    reward = egrsd.length_shaped_reward(**rollouts)
    assert reward.dtype in WIDE_FLOATS
    assert_close(reward, naive_length_shaped_reward(**rollouts), reward.dtype)


def as_float64(rewards):
    return torch.tensor(rewards, dtype=torch.float64)


REWARD_STEPS = st.lists(st.lists(REWARDS, min_size=1, max_size=4), min_size=1, max_size=14)
WARMUPS = st.sampled_from([{}, {"warmup_steps": 1}, {"warmup_steps": 3, "warmup_baseline": 0.0}])


@given(WARMUPS, REWARD_STEPS)
def test_running_advantage_matches_naive_reference(warmup, steps):
    running, naive = egrsd.RunningAdvantage(**warmup), NaiveRunningAdvantage(**warmup)
    for rewards in map(as_float64, steps):
        assert_close(running(rewards), naive(rewards), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@given(data=st.data())
def test_token_logprobs_match_naive_reference_forward_and_backward(dtype, data):
    batch, chunking = data.draw(logit_batches(dtype)), data.draw(CHUNKINGS)
    logits = batch.student_logits.requires_grad_()
    logp = egrsd.token_logprobs(logits, batch.tokens, **chunking)
    upstream = torch.linspace(-1, 1, logp.numel()).reshape(logp.shape)
    logp.backward(upstream.to(logp.dtype))
    assert logp.dtype in WIDE_FLOATS
    assert_close(logp, naive_token_logprobs(logits.detach(), batch.tokens), torch.float32)
    assert_close(logits.grad, naive_token_logprobs_gradient(logits.detach(), batch.tokens, upstream), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@given(data=st.data())
def test_token_entropy_matches_naive_reference(dtype, data):
    batch, chunking = data.draw(logit_batches(dtype)), data.draw(CHUNKINGS)
    entropy = egrsd.token_entropy(batch.teacher_logits, **chunking)
    assert entropy.dtype in WIDE_FLOATS
    assert_close(entropy, naive_token_entropy(batch.teacher_logits), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@given(data=st.data())
def test_opsd_loss_matches_naive_reference_forward_and_backward(dtype, data):
    batch, chunking = data.draw(logit_batches(dtype)), data.draw(CHUNKINGS)
    student = batch.student_logits.requires_grad_()
    loss = egrsd.opsd_loss(student, batch.teacher_logits, batch.mask, **chunking)
    loss.backward()
    assert loss.dtype in WIDE_FLOATS
    assert_close(loss, naive_opsd_loss(student.detach(), batch.teacher_logits, batch.mask), torch.float32)
    assert_close(student.grad, naive_opsd_loss_gradient(student.detach(), batch.teacher_logits, batch.mask), dtype)


@pytest.mark.parametrize("function", [egrsd.token_logprobs, egrsd.token_entropy, egrsd.opsd_loss],
                         ids=lambda f: f.__name__)
@given(batch=logit_batches(torch.float32))
def test_chunking_changes_nothing(function, batch):
    assert_close(call(function, batch.arguments, chunk_size=1), call(function, batch.arguments), torch.float32)


# --------------------------------------------------------------------------------------------------------
# 2. Invariants of SPEC §4
# --------------------------------------------------------------------------------------------------------

PER_TOKEN = (egrsd.lookahead_min, egrsd.entropy_gate, egrsd.ratio_magnitude, egrsd.token_advantages)


@given(batches(), gate_settings())
def test_gate_lies_between_floor_or_one_minus_gamma_and_one(batch, settings):
    omega = call(egrsd.entropy_gate, batch.arguments, **settings)[batch.mask]
    lowest = max(settings["floor"], 1 - settings["gamma"])
    assert (omega >= lowest - ROUNDING).all() and (omega <= 1).all()


@given(batches(), gate_settings())
def test_gate_is_one_where_entropy_is_zero(batch, settings):
    omega = call(egrsd.entropy_gate, batch.arguments, **settings)
    assert (omega[batch.mask & (batch.entropy == 0)] == 1).all()


@given(batches(), gate_settings())
def test_gate_is_one_everywhere_when_gamma_is_zero(batch, settings):
    """... so that γ = 0 gives RLSD: Â = A · w."""
    rlsd = {**settings, "gamma": 0.0}
    assert (call(egrsd.entropy_gate, batch.arguments, **rlsd)[batch.mask] == 1).all()
    w = call(egrsd.ratio_magnitude, batch.arguments, **rlsd)
    assert torch.equal(call(egrsd.token_advantages, batch.arguments, **rlsd), batch.advantages[:, None] * w)


@given(batches(), gate_settings(), st.data())
def test_gate_is_non_increasing_in_entropy(batch, settings, data):
    """Raise one entropy: no gate rises. The batch denominator is held fixed (the raised value stays at or
    below it): lifting the batch max itself rescales every other token, which is Eq. 5, not a breach."""
    assume(batch.mask.any())
    b, t = data.draw(st.sampled_from(batch.mask.nonzero().tolist()))
    ceiling = max(call(naive_denominator, batch.arguments, **settings), batch.entropy[b, t].item())
    raised = batch.entropy.clone()
    raised[b, t] = data.draw(st.floats(batch.entropy[b, t].item(), ceiling))
    before = call(egrsd.entropy_gate, batch.arguments, **settings)
    after = call(egrsd.entropy_gate, {**batch.arguments, "entropy": raised}, **settings)
    assert (after <= before).all()


@given(batches(), EPS)
def test_magnitude_lies_within_one_minus_eps_and_one_plus_eps(batch, eps):
    w = call(egrsd.ratio_magnitude, batch.arguments, eps=eps)[batch.mask]
    assert ((1 - eps <= w) & (w <= 1 + eps)).all()


@given(batches(), EPS)
def test_magnitude_is_one_where_log_ratio_or_direction_is_zero(batch, eps):
    w = call(egrsd.ratio_magnitude, batch.arguments, eps=eps)
    neutral = batch.mask & ((batch.teacher_logp == batch.student_logp) | (batch.direction[:, None] == 0))
    assert (w[neutral] == 1).all()


@given(batches(), EPS)
def test_magnitude_is_unchanged_by_flipping_both_direction_and_log_ratio(batch, eps):
    flipped = {**batch.arguments, "teacher_logp": batch.student_logp, "student_logp": batch.teacher_logp,
               "direction": -batch.direction}
    assert torch.equal(call(egrsd.ratio_magnitude, flipped, eps=eps), call(egrsd.ratio_magnitude, batch.arguments, eps=eps))


@given(batches(), gate_settings())
def test_lookahead_is_conservative(batch, settings):
    """lookahead_min ≤ H, so under the raw denominator of Eq. 8 the lookahead gate ω^CL ≥ ω of EGRSD. (Under
    the filtered denominator the batch max can fall, and a gate with it.)"""
    raw = {**settings, "denominator": "raw"}
    assert (call(egrsd.lookahead_min, batch.arguments, **raw) <= batch.entropy)[batch.mask].all()
    lookahead, plain = (call(egrsd.entropy_gate, batch.arguments, **{**raw, "window": w}) for w in (raw["window"], 0))
    assert (lookahead >= plain).all()


@given(batches(), gate_settings())
def test_window_zero_is_plain_egrsd(batch, settings):
    """W = 0: the window minimum is H itself, and the two denominators (raw, filtered) coincide."""
    egrsd_settings = {**settings, "window": 0}
    assert torch.equal(call(egrsd.lookahead_min, batch.arguments, window=0), batch.entropy.where(batch.mask, 0.0))
    raw, filtered = (call(egrsd.entropy_gate, batch.arguments, **{**egrsd_settings, "denominator": d})
                     for d in ("raw", "filtered"))
    assert torch.equal(raw, filtered)


@given(batches(), WINDOWS, st.data())
def test_lookahead_is_causal(batch, window, data):
    """Position t sees only [t, t + W] of its own row: changing H anywhere else leaves it unchanged, and so
    does the gate once the batch denominator is pinned (min_denominator above every entropy)."""
    B, T = batch.mask.shape
    b, t = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, T - 1))
    outside = torch.ones(B, T, dtype=torch.bool)
    outside[b, t:t + window + 1] = False
    elsewhere = batch.entropy.where(~outside, uniform(0, 12, (B, T), data.draw(random_source())).to(batch.entropy.dtype))
    for function, pinned in ((egrsd.lookahead_min, {}), (egrsd.entropy_gate, {"min_denominator": 100.0})):
        before = call(function, batch.arguments, window=window, **pinned)
        after = call(function, {**batch.arguments, "entropy": elsewhere}, window=window, **pinned)
        assert after[b, t] == before[b, t]


@given(batches(), gate_settings(), st.data())
def test_padding_never_changes_a_valid_output(batch, settings, data):
    shape = batch.mask.shape
    refilled = Batch(entropy=batch.entropy.where(batch.mask, data.draw(tensors(PADDING_ENTROPIES, shape))),
                     mask=batch.mask,
                     teacher_logp=batch.teacher_logp.where(batch.mask, data.draw(tensors(PADDING_LOG_PROBS, shape))),
                     student_logp=batch.student_logp.where(batch.mask, data.draw(tensors(PADDING_LOG_PROBS, shape))),
                     advantages=batch.advantages)
    for function in PER_TOKEN:
        assert torch.equal(call(function, refilled.arguments, **settings), call(function, batch.arguments, **settings))


@given(batches(), gate_settings())
def test_per_token_outputs_are_zero_off_the_mask(batch, settings):
    for function in PER_TOKEN:
        assert (call(function, batch.arguments, **settings)[~batch.mask] == 0).all()


@given(batches(), gate_settings(floors=st.floats(0.01, 1)))
def test_token_advantage_has_the_sign_of_the_sequence_advantage(batch, settings):
    """With a positive floor every token keeps a nonzero weight, so Â_{i,t} has the sign of A_i."""
    signs = call(egrsd.token_advantages, batch.arguments, **settings).sign()
    assert torch.equal(signs[batch.mask], batch.direction[:, None].expand_as(signs)[batch.mask])


@given(batches(), gate_settings())
def test_token_advantage_is_at_most_advantage_times_one_plus_eps(batch, settings):
    advantages = call(egrsd.token_advantages, batch.arguments, **settings)
    bound = batch.advantages.abs()[:, None] * (1 + settings["eps"]) * (1 + ROUNDING)
    assert (advantages.abs() <= bound).all()


@given(batches(), gate_settings(), st.integers(1, 4), st.data())
def test_padding_columns_change_nothing(batch, settings, extra, data):
    B, T = batch.mask.shape

    def widened(x, padding):
        return torch.cat([x, data.draw(tensors(padding, (B, extra), x.dtype))], dim=1)

    wider = Batch(entropy=widened(batch.entropy, PADDING_ENTROPIES), mask=widened(batch.mask, st.just(False)),
                  teacher_logp=widened(batch.teacher_logp, PADDING_LOG_PROBS),
                  student_logp=widened(batch.student_logp, PADDING_LOG_PROBS), advantages=batch.advantages)
    advantages = call(egrsd.token_advantages, wider.arguments, **settings)
    assert torch.equal(advantages[:, :T], call(egrsd.token_advantages, batch.arguments, **settings))
    assert (advantages[:, T:] == 0).all()


@given(batches(), gate_settings(), st.data())
def test_row_permutation_permutes_output(batch, settings, data):
    order = torch.tensor(data.draw(st.permutations(range(batch.mask.shape[0]))))
    shuffled = Batch(*(getattr(batch, field.name)[order] for field in fields(Batch)))
    advantages = call(egrsd.token_advantages, batch.arguments, **settings)
    assert torch.equal(call(egrsd.token_advantages, shuffled.arguments, **settings), advantages[order])


@given(batches())
def test_policy_loss_gradient_is_minus_masked_advantage_over_count(batch):
    assume(batch.mask.any())  # the empty mask has its own test
    advantages = call(naive_token_advantages, batch.arguments)
    logp = batch.student_logp.clone().requires_grad_()
    egrsd.policy_loss(logp, advantages, batch.mask).backward()
    m = batch.mask.double()
    assert_close(logp.grad, -m * advantages / m.sum(), torch.float64)  # exact up to float64 rounding


@given(batches())
def test_policy_loss_is_zero_with_zero_gradient_on_empty_mask(batch):
    logp = batch.student_logp.clone().requires_grad_()
    loss = egrsd.policy_loss(logp, call(naive_token_advantages, batch.arguments), torch.zeros_like(batch.mask))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))


@given(graded_rollouts())
def test_reward_is_zero_when_wrong_and_one_when_correct_at_the_length_cap(rollouts):
    reward, correct = egrsd.length_shaped_reward(**rollouts), rollouts["correct"]
    assert (reward[~correct] == 0).all()
    assert (reward[correct & (rollouts["lengths"] == rollouts["max_length"])] == 1).all()


@given(WARMUPS, REWARD_STEPS, st.integers(0, 14))
def test_running_advantage_resumes_from_its_state_dict(warmup, steps, saved_after):
    running = egrsd.RunningAdvantage(**warmup)
    for rewards in map(as_float64, steps[:saved_after]):
        running(rewards)
    resumed = egrsd.RunningAdvantage(**warmup)
    resumed.load_state_dict(copy.deepcopy(running.state_dict()))  # as if saved to disk and loaded
    for rewards in map(as_float64, steps[saved_after:]):
        assert torch.equal(resumed(rewards), running(rewards))


# --------------------------------------------------------------------------------------------------------
# 3. Detachment and bad input (SPEC §3)
# --------------------------------------------------------------------------------------------------------

def valid_arguments():
    """One small valid batch (B = 2, T = 3, V = 5) under every parameter name of SPEC §3."""
    generator = torch.Generator().manual_seed(0)
    batch = Batch(entropy=torch.tensor([[0.5, 1.0, 2.0], [0.0, 3.0, 1.0]]),
                  mask=torch.tensor([[True, True, False], [False, True, True]]),
                  teacher_logp=torch.tensor([[-0.1, -2.0, -0.5], [-1.0, -0.3, -4.0]]),
                  student_logp=torch.tensor([[-0.3, -1.0, -0.5], [-2.0, -0.1, -3.0]]),
                  advantages=torch.tensor([1.0, -0.5]))
    logits = LogitBatch(student_logits=torch.randn(2, 3, 5, generator=generator),
                        teacher_logits=torch.randn(2, 3, 5, generator=generator),
                        tokens=torch.randint(5, (2, 3), generator=generator), mask=batch.mask)
    return {**batch.arguments, **logits.arguments, "token_advantages": batch.advantages[:, None].repeat(1, 3),
            "rewards": torch.tensor([0.0, 1.25]), "correct": torch.tensor([True, False]),
            "lengths": torch.tensor([10, 32]), "max_length": 32, "window": 1}


def run(function, **overrides):
    """Call the egrsd function named `function` on the valid batch, with `overrides` replacing arguments."""
    arguments = {**valid_arguments(), **overrides}
    if function == "RunningAdvantage":
        return egrsd.RunningAdvantage()(arguments["rewards"])
    return call(getattr(egrsd, function), arguments)


FUNCTIONS = ["token_logprobs", "token_entropy", "length_shaped_reward", "RunningAdvantage", "lookahead_min",
             "normalised_entropy", "entropy_gate", "ratio_magnitude", "token_advantages", "policy_loss", "opsd_loss"]


@pytest.mark.parametrize("function", FUNCTIONS)
def test_valid_arguments_are_accepted(function):
    run(function)


@pytest.mark.parametrize("function", [
    "lookahead_min", "entropy_gate", "ratio_magnitude", "token_advantages", "RunningAdvantage"])
def test_weights_and_advantages_are_detached(function):
    tracked = {name: x.requires_grad_() for name, x in valid_arguments().items()
               if torch.is_tensor(x) and x.is_floating_point()}
    assert not run(function, **tracked).requires_grad


def first_entry(value):
    """The argument with its first entry replaced by `value`."""
    def replaced(x):
        x = x.clone()
        x.view(-1)[0] = value
        return x
    return replaced


def first_row_all_minus_inf(x):
    """Logits whose first row is −inf over the whole vocabulary."""
    x = x.clone()
    x[0, 0] = -math.inf
    return x


def case(function, argument, bad, why=None):
    """One bad call: `function` with `argument` replaced by `bad` (a value, or a function of the valid one)."""
    return pytest.param(function, argument, bad, id=f"{function}-{argument}-{why or bad}")


MASKED = ["lookahead_min", "entropy_gate", "ratio_magnitude", "token_advantages", "policy_loss", "opsd_loss"]
BAD_INPUTS = [
    # shapes that are not (B, T) / (B,) / (..., V), or that do not match their partners
    case("lookahead_min", "entropy", lambda x: x[:, 0], "(B,) for (B, T)"),
    case("entropy_gate", "mask", lambda x: x[:, :-1], "shorter than entropy"),
    case("ratio_magnitude", "direction", lambda x: x[:, None].repeat(1, 3), "(B, T) for (B,)"),
    case("ratio_magnitude", "student_logp", lambda x: x[:, :-1], "shorter than teacher_logp"),
    case("token_advantages", "advantages", lambda x: x[:, None].repeat(1, 3), "(B, T) for (B,)"),
    case("token_advantages", "advantages", lambda x: x[:-1], "B - 1 rows"),
    case("token_advantages", "teacher_entropy", lambda x: x[:, :-1], "shorter than teacher_logp"),
    case("policy_loss", "token_advantages", lambda x: x[:, 0], "(B,) for (B, T)"),
    case("policy_loss", "mask", lambda x: x[:, :-1], "shorter than student_logp"),
    case("token_logprobs", "tokens", lambda x: x[:, :-1], "shorter than logits"),
    case("opsd_loss", "teacher_logits", lambda x: x[..., :-1], "two vocab sizes"),
    case("opsd_loss", "mask", lambda x: x[:, :-1], "shorter than logits"),
    case("length_shaped_reward", "lengths", lambda x: x[:-1], "B - 1 rows"),
    case("length_shaped_reward", "correct", lambda x: x[:, None].repeat(1, 3), "(B, T) for (B,)"),
    case("RunningAdvantage", "rewards", lambda x: x[:, None].repeat(1, 3), "(B, T) for (B,)"),
    # a mask that is not bool
    *[case(function, "mask", torch.Tensor.float, "float") for function in MASKED],
    # NaN anywhere
    *[case(function, argument, first_entry(math.nan), "NaN") for function, argument in [
        ("lookahead_min", "entropy"), ("entropy_gate", "entropy"), ("ratio_magnitude", "teacher_logp"),
        ("ratio_magnitude", "student_logp"), ("ratio_magnitude", "direction"), ("token_advantages", "advantages"),
        ("token_advantages", "teacher_entropy"), ("policy_loss", "student_logp"), ("policy_loss", "token_advantages"),
        ("token_logprobs", "logits"), ("token_entropy", "logits"), ("opsd_loss", "student_logits"),
        ("opsd_loss", "teacher_logits"), ("RunningAdvantage", "rewards")]],
    # ±inf in entropies, log-probs, advantages or rewards
    *[case(function, argument, first_entry(value), value) for function, argument, value in [
        ("lookahead_min", "entropy", math.inf), ("entropy_gate", "entropy", math.inf),
        ("token_advantages", "teacher_entropy", math.inf), ("ratio_magnitude", "teacher_logp", -math.inf),
        ("ratio_magnitude", "student_logp", -math.inf), ("token_advantages", "teacher_logp", -math.inf),
        ("token_advantages", "advantages", math.inf), ("token_advantages", "advantages", -math.inf),
        ("policy_loss", "student_logp", -math.inf), ("policy_loss", "token_advantages", math.inf),
        ("RunningAdvantage", "rewards", math.inf)]],
    # a whole row of −inf logits (−inf entries within a row are fine)
    *[case(function, argument, first_row_all_minus_inf, "row of -inf") for function, argument in [
        ("token_logprobs", "logits"), ("token_entropy", "logits"), ("opsd_loss", "student_logits"),
        ("opsd_loss", "teacher_logits")]],
    # settings out of range
    *[case(function, "window", window) for function in ["lookahead_min", "entropy_gate", "token_advantages"]
      for window in [-1, 1.5]],
    *[case(function, "gamma", -0.1) for function in ["entropy_gate", "token_advantages"]],
    *[case(function, "eps", eps) for function in ["ratio_magnitude", "token_advantages"] for eps in [0.0, 1.0, -0.1, 1.5]],
    *[case(function, "floor", floor) for function in ["entropy_gate", "token_advantages"] for floor in [-0.1, 1.5]],
    *[case(function, "min_denominator", d) for function in ["entropy_gate", "token_advantages"] for d in [0.0, -1.0]],
    *[case(function, "denominator", "max") for function in ["entropy_gate", "token_advantages"]],
    *[case("token_logprobs", "tokens", first_entry(token), token) for token in [-1, 5]],
    case("token_logprobs", "tokens", torch.Tensor.float, "float ids"),
    case("opsd_loss", "student_logits", lambda x: x.index_put((torch.tensor(0), torch.tensor(2)), torch.tensor(math.nan)),
         "NaN in a padded row"),
    case("normalised_entropy", "mask", torch.Tensor.float, "float"),
    case("normalised_entropy", "window", -1),
    case("normalised_entropy", "denominator", "max"),
    case("normalised_entropy", "min_denominator", 0.0),
    *[case("length_shaped_reward", "max_length", max_length) for max_length in [0, -5]],
    *[case("length_shaped_reward", "lengths", first_entry(length), length) for length in [-1, 33]],
]


@pytest.mark.parametrize("function, argument, bad", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(function, argument, bad):
    value = bad(valid_arguments()[argument]) if callable(bad) else bad
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        run(function, **{argument: value})


# --------------------------------------------------------------------------------------------------------
# 4. Beyond the contract: scoring from hidden states, and the token regimes
# --------------------------------------------------------------------------------------------------------

@dataclass
class HiddenBatch:
    """Final hidden states of N completion tokens and LM-head weights, for student and teacher."""
    hidden: torch.Tensor  # (N, D) the student's
    weight: torch.Tensor  # (V, D)
    teacher_hidden: torch.Tensor  # (N, D)
    teacher_weight: torch.Tensor  # (V, D)
    tokens: torch.Tensor  # (N,)


@st.composite
def hidden_batches(draw, dtype):
    N, D, V = draw(st.integers(0, 12)), draw(st.integers(1, 8)), draw(st.integers(2, 40))
    scale, generator = draw(st.sampled_from([0.1, 1.0, 4.0])), draw(random_source())
    h, w, h_t, w_t = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)
                      for shape in [(N, D), (V, D), (N, D), (V, D)])
    return HiddenBatch(h.to(dtype), w.to(dtype), h_t.to(dtype), w_t.to(dtype), torch.randint(V, (N,), generator=generator))


def assert_close_to_scale(actual, expected, precision):
    """assert_close with the absolute tolerance scaled by the largest |expected|: sums over rows of
    hidden states carry rounding in proportion to their terms. bfloat16: within 2 of its ulps (2^-7)."""
    rtol, atol = (2**-7, 2**-7) if precision == torch.bfloat16 else TOLERANCE[precision]
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale)


def plain_logits(hidden, weight):
    """The (N, V) logits the linear_* functions never hold; float64 for a float32 input (the naive
    reference), the input's own dtype otherwise (the plain bf16 computation, rounded the same way)."""
    return hidden.double() @ weight.double().T if hidden.dtype == torch.float32 else (hidden @ weight.T).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@given(data=st.data())
def test_linear_token_logprobs_equal_the_plain_computation_forward_and_backward(dtype, data):
    batch, chunking = data.draw(hidden_batches(dtype)), data.draw(CHUNKINGS)
    ours = [batch.hidden.clone().requires_grad_(), batch.weight.clone().requires_grad_()]
    plain = [batch.hidden.clone().requires_grad_(), batch.weight.clone().requires_grad_()]
    upstream = torch.linspace(-1, 1, len(batch.tokens))
    logp = egrsd.linear_token_logprobs(*ours, batch.tokens, **chunking)
    (logp * upstream).sum().backward()
    expected = torch.log_softmax(plain_logits(*plain), -1).gather(-1, batch.tokens[:, None]).squeeze(-1)
    (expected * upstream.to(expected.dtype)).sum().backward()
    assert logp.dtype in WIDE_FLOATS
    assert_close_to_scale(logp, expected.detach(), dtype)
    for got, want in zip(ours, plain):
        assert_close_to_scale(got.grad, want.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@given(data=st.data())
def test_linear_token_entropy_equals_the_plain_computation(dtype, data):
    batch, chunking = data.draw(hidden_batches(dtype)), data.draw(CHUNKINGS)
    entropy = egrsd.linear_token_entropy(batch.teacher_hidden, batch.teacher_weight, **chunking)
    expected = naive_token_entropy(plain_logits(batch.teacher_hidden, batch.teacher_weight))
    assert_close_to_scale(entropy, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@given(data=st.data())
def test_linear_opsd_loss_equals_the_plain_computation_forward_and_backward(dtype, data):
    batch, chunking = data.draw(hidden_batches(dtype)), data.draw(CHUNKINGS)
    ours = [batch.hidden.clone().requires_grad_(), batch.weight.clone().requires_grad_()]
    plain = [batch.hidden.clone().requires_grad_(), batch.weight.clone().requires_grad_()]
    loss = egrsd.linear_opsd_loss(*ours, batch.teacher_hidden, batch.teacher_weight, **chunking)
    loss.backward()
    teacher = torch.log_softmax(plain_logits(batch.teacher_hidden, batch.teacher_weight), -1)
    kl = (teacher.exp() * (teacher - torch.log_softmax(plain_logits(*plain), -1))).sum(-1)
    expected = kl.mean() if len(kl) else kl.sum()
    expected.backward()
    assert_close_to_scale(loss, expected.detach(), dtype)
    for got, want in zip(ours, plain):
        assert_close_to_scale(got.grad, want.grad, dtype)


@pytest.mark.parametrize("function", ["linear_token_logprobs", "linear_opsd_loss"])
def test_linear_gradients_under_bf16_autocast_are_as_accurate_as_the_plain_computation(function):
    """The trainer's setting: float32 weights, bf16 autocast, confident tokens (p ≈ 0.999), where 1 − p
    is tiny and a backward that rounded its logits unlike the forward would be off many times over."""
    generator = torch.Generator().manual_seed(0)
    weight = 0.5 * torch.randn(2000, 64, generator=generator)
    tokens = torch.randint(2000, (256,), generator=generator)
    hidden, teacher_hidden = (1.5 * weight[tokens] + 0.3 * torch.randn(256, 64, generator=generator) for _ in range(2))

    def gradients(h, w, plain, autocast):
        """d loss / d (hidden, weight), through the project's function or the plain full-logits formula."""
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        teacher, teacher_weight = teacher_hidden.to(h.dtype), weight.to(h.dtype)
        log_softmax = lambda x, v: torch.log_softmax((x @ v.T).to(h.dtype), -1)  # noqa: E731
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if function == "linear_token_logprobs" and plain:
                loss = -log_softmax(h, w).gather(-1, tokens[:, None]).mean()
            elif function == "linear_token_logprobs":
                loss = -egrsd.linear_token_logprobs(h, w, tokens, chunk_size=64).mean()
            elif plain:
                logp_t = log_softmax(teacher, teacher_weight)
                loss = (logp_t.exp() * (logp_t - log_softmax(h, w))).sum(-1).mean()
            else:
                loss = egrsd.linear_opsd_loss(h, w, teacher, teacher_weight, chunk_size=64)
        loss.backward()
        return torch.cat([h.grad.double().flatten(), w.grad.double().flatten()])

    exact = gradients(hidden.double(), weight.double(), plain=True, autocast=False)
    error = {plain: ((gradients(hidden, weight, plain, True) - exact).norm() / exact.norm()).item() for plain in (True, False)}
    assert error[False] <= 2 * error[True] + 1e-3, error


def test_opsd_loss_is_zero_with_zero_gradient_on_empty_mask():
    student = torch.randn(2, 3, 5, requires_grad=True)
    loss = egrsd.opsd_loss(student, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(student.grad == 0)


@pytest.mark.parametrize("function, arguments, argument", [
    ("linear_token_logprobs", lambda h, w, t: (h[:, :-1], w, t), "hidden"),
    ("linear_token_logprobs", lambda h, w, t: (h, w.double(), t), "weight"),
    ("linear_token_logprobs", lambda h, w, t: (h, w, t + 100), "tokens"),
    ("linear_token_entropy", lambda h, w, t: (h.int(), w), "hidden"),
    ("linear_opsd_loss", lambda h, w, t: (h, w, h[:-1], w), "teacher_hidden"),
    ("linear_opsd_loss", lambda h, w, t: (h[None], w, h[None], w), "student_hidden"),
])
def test_linear_functions_reject_bad_input_naming_the_argument(function, arguments, argument):
    h, w, t = torch.randn(4, 3), torch.randn(7, 3), torch.randint(7, (4,))
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        getattr(egrsd, function)(*arguments(h, w, t))


def naive_token_regimes(entropy, mask, window, tau_low, tau_high):
    """Each valid token's regime from the definitions, one at a time; 0 off the mask."""
    valid = [entropy[b, t].item() for b in range(len(mask)) for t in range(len(mask[b])) if mask[b, t]]
    normaliser = max(valid + [1.0])
    lookahead = naive_lookahead_min(entropy, mask, window)
    codes = torch.zeros(mask.shape, dtype=torch.long)
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
        h, h_cl = entropy[b, t].item() / normaliser, lookahead[b, t].item() / normaliser
        codes[b, t] = 1 if h <= tau_low else 3 if h >= tau_high and h_cl <= tau_low else \
            4 if h >= tau_high and h_cl >= tau_high else 2
    return codes


THRESHOLDS = st.sampled_from([(0.2, 0.5), (0.1, 0.9), (0.45, 0.5)])


@given(batches(), WINDOWS, THRESHOLDS)
def test_token_regimes_match_naive_reference(batch, window, thresholds):
    got = egrsd.token_regimes(batch.entropy, batch.mask, window, *thresholds)
    assert torch.equal(got, naive_token_regimes(batch.entropy, batch.mask, window, *thresholds))


@given(batches(), WINDOWS, THRESHOLDS)
def test_every_valid_token_is_in_exactly_one_regime(batch, window, thresholds):
    codes = egrsd.token_regimes(batch.entropy, batch.mask, window, *thresholds)
    assert torch.all((codes >= 1) & (codes <= len(egrsd.REGIMES)) == batch.mask)


@given(batches(), THRESHOLDS)
def test_window_zero_has_no_pivots(batch, thresholds):
    codes = egrsd.token_regimes(batch.entropy, batch.mask, 0, *thresholds)
    assert not (codes == 1 + egrsd.REGIMES.index("pivot")).any()


@given(batches(), WINDOWS, THRESHOLDS, st.floats(0, 1))
def test_raising_a_later_entropy_never_turns_a_fork_into_a_pivot(batch, window, thresholds, fraction):
    """With the batch normaliser fixed: raising an entropy past the batch max rescales every token."""
    fork, pivot = 1 + egrsd.REGIMES.index("fork"), 1 + egrsd.REGIMES.index("pivot")
    before = egrsd.token_regimes(batch.entropy, batch.mask, window, *thresholds)
    normaliser = max([1.0] + batch.entropy[batch.mask].tolist())
    for b, t in torch.nonzero(before == fork).tolist():
        for later in range(t + 1, min(batch.entropy.shape[1], t + window + 2)):  # the window, and one past it
            if batch.mask[b, later]:
                raised = batch.entropy.clone()
                raised[b, later] += fraction * (normaliser - raised[b, later])
                assert egrsd.token_regimes(raised, batch.mask, window, *thresholds)[b, t] != pivot


# --------------------------------------------------------------------------------------------------------
# 5. train_min.py end to end, on CPU with the tiny model built in code (tasks.py, offline_models.py)
# --------------------------------------------------------------------------------------------------------

TINY = ["--model", "tiny", "--device", "cpu", "--batch-size", "4", "--micro-batch-size", "2",
        "--max-new-tokens", "8", "--train-size", "16", "--eval-size", "4", "--eval-batch-size", "4"]
TIMING_KEYS = {"rollout_tokens_per_s", "generate_s", "score_s", "update_s", "step_s", "peak_gpu_mem_gb"}


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def same_parameters(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


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


@pytest.mark.parametrize("method", train_min.METHODS)
def test_each_method_runs_two_steps_end_to_end(method, tmp_path):
    student, teacher = train_min.main(TINY + ["--method", method, "--steps", "2", "--output-dir", str(tmp_path)])
    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    expected_keys = {"step", "method", "reward", "accuracy", "length_mean", "length_max", "truncated", "loss",
                     "grad_norm", "gate_mean", "gate_min", "magnitude_mean", "teacher_entropy_mean"} | TIMING_KEYS
    assert expected_keys <= set(train_rows[0])
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in train_rows)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    initial = build_tiny_model(build_tiny_tokenizer())
    assert same_parameters(teacher, initial), "the teacher must stay the initial weights"
    assert not same_parameters(student, initial), "the student must have been updated"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert same_parameters(reloaded, student)
    assert AutoTokenizer.from_pretrained(tmp_path / "final").eos_token == "<|im_end|>"


def test_weighting_in_the_trainer_is_the_library_token_advantage():
    torch.manual_seed(0)
    mask = torch.rand(4, 9) > 0.2
    scores = {"teacher_logp": -torch.rand(4, 9) * 3, "student_logp": -torch.rand(4, 9) * 3,
              "teacher_entropy": torch.rand(4, 9) * 4}
    advantages = torch.tensor([1.5, -0.5, 0.0, 0.7])
    signals = (scores["teacher_logp"], scores["student_logp"], scores["teacher_entropy"], mask)
    expected = {"grpo": advantages[:, None] * mask, "rlsd": egrsd.token_advantages(advantages, *signals, gamma=0.0),
                "egrsd": egrsd.token_advantages(advantages, *signals, gamma=0.3),
                "cl-egrsd": egrsd.token_advantages(advantages, *signals, gamma=0.3, window=3)}
    for method, want in expected.items():
        got, _ = train_min.weight_tokens(advantages, scores, mask, train_min.Config(method=method))
        torch.testing.assert_close(got, want.float(), msg=method)


def test_completion_mask_includes_the_first_eos_and_not_the_padding():
    eos, pad = 7, 0
    completion = torch.tensor([[3, 4, eos, pad, pad], [eos, pad, pad, pad, pad], [3, 3, 3, 3, 3], [3, eos, 3, eos, pad]])
    mask, finished = train_min.completion_mask(completion, [eos])
    assert mask.tolist() == [[True, True, True, False, False], [True, False, False, False, False],
                             [True] * 5, [True, True, False, False, False]]
    assert finished.tolist() == [True, True, False, True]


def test_teacher_and_student_score_the_same_completion_tokens_at_the_same_positions():
    """Scoring from left-padded batches equals a plain forward of each unpadded [prompt ‖ completion]."""
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=2)
    cfg = train_min.Config(model="tiny", device="cpu", max_new_tokens=6, micro_batch_size=2, chunk_size=5)
    problems = built_in_problems(3, 1)[0]
    rollout = {}
    rollout["student_ids"], rollout["student_mask"] = train_min.encode_prompts(tokenizer, [student_messages(p) for p in problems], "cpu")
    rollout["teacher_ids"], rollout["teacher_mask"] = train_min.encode_prompts(tokenizer, [teacher_messages(p) for p in problems], "cpu")
    torch.manual_seed(0)
    completion, mask, _ = train_min.generate(student, tokenizer, rollout["student_ids"], rollout["student_mask"], cfg)
    mask[1, 3:] = False  # a row that stops early, as if it had met its EOS
    rollout["completion"], rollout["mask"] = completion, mask
    scores = train_min.score(student, teacher, rollout, cfg)
    for b in range(len(problems)):
        tokens = completion[b][mask[b]]
        for model, prefix, key in ((student, "student", "student_logp"), (teacher, "teacher", "teacher_logp")):
            prompt = rollout[f"{prefix}_ids"][b][rollout[f"{prefix}_mask"][b].bool()]
            logits = model(torch.cat([prompt, tokens])[None]).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
            torch.testing.assert_close(scores[key][b][mask[b]].double(), expected, atol=1e-5, rtol=1e-5)
            assert torch.all(scores[key][b][~mask[b]] == 0)
        plain_entropy = egrsd.token_entropy(teacher(torch.cat([rollout["teacher_ids"][b][rollout["teacher_mask"][b].bool()], tokens])[None]).logits[0])
        torch.testing.assert_close(scores["teacher_entropy"][b][mask[b]], plain_entropy[-len(tokens) - 1 : -1], atol=1e-5, rtol=1e-5)


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
                    "--advantage-warmup", "5", "--no-gradient-checkpointing", "--output-dir", str(tmp_path)])
    rewards = [r["reward"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert first < 0.5 and last > first + 0.5, rewards  # from chance (1 in 10 × 1.25) to mostly right


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: a separate sampler copy to restore
def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(dtype, tmp_path):
    flags = TINY + ["--method", "cl-egrsd", "--eval-every", "1", "--save-every", "0", "--dtype", dtype]
    train_min.main(flags + ["--steps", "3", "--output-dir", str(tmp_path / "straight")])
    train_min.main(flags + ["--steps", "2", "--output-dir", str(tmp_path / "resumed")])
    before = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    train_min.main(["--resume", str(tmp_path / "resumed"), "--steps", "3"])
    after = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert after.startswith(before), "rows already written must stay as they were"
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [without_timings(r) for r in resumed] == [without_timings(r) for r in straight]


def test_ctrl_c_checkpoints_after_the_current_step_and_the_run_resumes(tmp_path):
    command = [sys.executable, "train_min.py", *TINY, "--steps", "50", "--eval-size", "0", "--save-every", "0",
               "--output-dir", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=Path(__file__).parent)
    for line in process.stdout:
        if line.startswith("step 1/"):
            process.send_signal(signal.SIGINT)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "checkpoint saved at step" in output
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    written = [r["step"] for r in read_metrics(tmp_path)]
    assert written == list(range(1, state["step"] + 1)), "every finished step is logged and checkpointed"
    train_min.main(["--resume", str(tmp_path), "--steps", str(state["step"] + 1)])
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, state["step"] + 2))


def nan_forward(completion_hidden):
    """completion_hidden whose output is NaN in training mode (the student's update), as after an overflow."""
    return lambda model, *args: completion_hidden(model, *args) * (math.nan if model.training else 1.0)


@pytest.mark.parametrize("where", ["loss", "forward"])
def test_non_finite_steps_are_skipped_and_then_stop_the_run(where, tmp_path, monkeypatch):
    if where == "loss":
        monkeypatch.setattr(egrsd, "policy_loss", lambda logp, adv, mask: (logp * float("nan")).sum())
    else:
        monkeypatch.setattr(train_min, "completion_hidden", nan_forward(train_min.completion_hidden))
    with pytest.raises(SystemExit, match="non-finite steps in a row"):
        train_min.main(TINY + ["--steps", "5", "--max-bad-steps", "2", "--eval-size", "0", "--output-dir", str(tmp_path)])
    rows = read_metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [True, True]
    checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert same_parameters(checkpoint, build_tiny_model(build_tiny_tokenizer())), "a skipped step changes nothing"


@pytest.mark.parametrize("flag, value", [
    ("--method", "ppo"), ("--window", "-1"), ("--gamma", "-0.5"), ("--eps", "1.5"), ("--eps", "0"),
    ("--floor", "2"), ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--denominator", "max"),
    ("--data", "/no/such/file.jsonl"), ("--top-p", "0"), ("--lr", "-1"), ("--rollout", "static"),
    ("--rollout", "graph"),  # on the CPU device
    ("--eval-data", "/no/such/file.jsonl"), ("--verifier", "exact"),
])
def test_a_bad_flag_stops_before_any_model_loads_naming_the_flag(flag, value, monkeypatch, tmp_path):
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        train_min.main(["--device", "cpu", flag, value, "--output-dir", str(tmp_path)])
    assert str(stop.value.code).startswith(flag + ":")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_the_default_command_without_cuda_shows_the_cpu_smoke_command(monkeypatch):
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        train_min.main([])
    assert "--model tiny --device cpu" in str(stop.value.code)


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


@pytest.mark.parametrize("completion, answer, correct", [
    ("So the answer is \\boxed{42}.", "42", True),
    ("first \\boxed{3}, then \\boxed{4}", "4", True),  # the last box counts
    ("\\boxed{\\frac{1}{2}}", "0.5", True),  # nested braces
    ("\\boxed{1,000}", "1000", True), ("\\boxed{$18.00}", "18", True),
    ("she has 5 apples, then 7\n#### 12", "12", True),  # GSM8K's marker before the last number
    ("3 + 4 = 7", "7", True), ("3 + 4 = 7", "8", False),  # else the last number
    ("\\boxed{-3}", "-3", True), ("\\boxed{-3}", "3", False),
    ("no number at all", "7", False), ("\\boxed{seven}", "7", False),
])
def test_the_verifier_reads_the_last_box_then_the_marker_then_the_last_number(completion, answer, correct):
    assert is_correct(completion, answer) is correct


# What real models write in the box, with the verdict a careful grader gives (answer, then the completion's end).
DECIMAL_ANSWER = re.compile(r"-?\d+(\.\d+)?")
GRADED = [
    # currency, in and around the box
    ("12", r"The total is \boxed{\$12}.", True), ("12", r"\boxed{\$12.00}", True), ("12", r"\boxed{\text{\$}12}", True),
    ("1250.5", r"\boxed{\$1,250.50}", True), ("12", r"\boxed{12 \text{ dollars}}", True), ("12", r"\boxed{\$13}", False),
    # units, degrees, percent
    ("18", r"\boxed{18 apples}", True), ("18", r"\boxed{18\text{ apples}}", True), ("7", r"\boxed{7 \mathrm{cm}}", True),
    ("-3", r"\boxed{-3^\circ}", True), ("25", r"\boxed{25^{\circ}\text{C}}", True), ("25", r"\boxed{25°}", True),
    ("10", r"\boxed{10\%}", True), ("10", r"\boxed{10 \%}", True), ("10", r"\boxed{11\%}", False),
    # minus signs and spacing
    ("-3", "\\boxed{\u22123}", True), ("-3", "\\boxed{\u2212 3}", True), ("3", "\\boxed{\u22123}", False),
    ("1234", r"\boxed{1\,234}", True), ("12000", "\\boxed{12\u202f000}", True), ("1234", r"\boxed{1{,}234}", True),
    # fractions: \frac12, \dfrac, \tfrac, a sign before them, a/b
    ("0.5", r"\boxed{\frac12}", True), ("0.5", r"\boxed{\dfrac12}", True), ("0.75", r"\boxed{\tfrac{3}{4}}", True),
    ("-0.75", r"\boxed{-\frac{3}{4}}", True), ("0.75", r"\boxed{-\frac{3}{4}}", False), ("0.75", r"\boxed{3/4}", True),
    ("0.5", r"\boxed{\frac{1}{0}}", False),
    # nested braces and wrappers, "x = 5", a final period
    ("5", r"\boxed{{5}}", True), ("5", r"\boxed{{{5}}}", True), ("42", r"\boxed{\textbf{42}}", True),
    ("5", r"\boxed{x = 5}", True), ("42", r"\boxed{42.}", True), ("7", r"\boxed {7}", True), ("7", r"\fbox{7}", True),
    # thousands separators against lists
    ("1000", r"\boxed{1,000}", True), ("1234567", r"\boxed{1,234,567}", True), ("12", r"\boxed{1, 2}", False),
    ("12", r"\boxed{1,2}", False), ("12", r"\boxed{1 2}", False), ("1000", r"\boxed{1,0000}", False),
    # symbolic references (MATH-500 style): the built-in verifier refuses to load them, math-verify grades them
    (r"2\sqrt{2}", r"\boxed{2\sqrt{2}}", True), (r"2\sqrt{2}", r"\boxed{2 \sqrt{2}}", True), (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", True),
    (r"2\sqrt{2}", r"\boxed{\sqrt{6}}", False), (r"\frac{\pi}{2}", r"\boxed{\pi/2}", True), (r"x^2+1", r"\boxed{1 + x^2}", True),
    (r"\{1,2\}", r"\boxed{\{2, 1\}}", True), (r"(1, 2)", r"\boxed{(2, 1)}", False),
]
NUMERIC = [row for row in GRADED if DECIMAL_ANSWER.fullmatch(row[0])]


@pytest.mark.parametrize("answer, completion, correct", NUMERIC)
def test_the_verifier_grades_what_models_write_as_a_careful_grader(answer, completion, correct):
    assert is_correct("Let me think step by step. 3 + 4 = 7. " + completion, answer) is correct


@pytest.mark.parametrize("answer, completion, correct", GRADED)
def test_the_math_verify_verifier_grades_numbers_and_symbols_as_a_careful_grader(answer, completion, correct):
    pytest.importorskip("math_verify", reason="the optional extra math-verify is not installed")
    assert is_correct_symbolic("Let me think step by step. 3 + 4 = 7. " + completion, answer) is correct


def test_symbolic_answers_load_only_for_the_math_verify_verifier(tmp_path, monkeypatch):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "p", "solution": "s", "answer": "2\\sqrt{2}"}) + "\n")
    with pytest.raises(ValueError, match=":1: field 'answer'.*--verifier math-verify"):
        load_problems(path)
    assert load_problems(path, numeric=False)[0].answer == "2\\sqrt{2}"
    monkeypatch.setattr(train_min.importlib.util, "find_spec", lambda name: None)  # the extra is missing
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match="--verifier: expected math-verify installed"):
        train_min.main(TINY + ["--verifier", "math-verify", "--data", str(path), "--output-dir", str(tmp_path / "run")])


def test_eval_data_is_a_held_out_file_and_data_is_then_all_training(tmp_path, capsys):
    rows = lambda n, tag: "".join(json.dumps({"problem": f"{tag} {i}", "solution": "s", "answer": "1"}) + "\n" for i in range(n))  # noqa: E731
    (tmp_path / "train.jsonl").write_text(rows(10, "train"))
    (tmp_path / "eval.jsonl").write_text(rows(3, "eval"))
    cfg = train_min.Config(data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "eval.jsonl"), eval_size=2)
    train, held_out = train_min.load_data(cfg)
    assert [p.question for p in train] == [f"train {i}" for i in range(10)] and [p.question for p in held_out] == ["eval 0", "eval 1"]
    train, held_out = train_min.load_data(train_min.Config(data=str(tmp_path / "train.jsonl"), eval_size=2))
    assert len(train) == 8 and [p.question for p in held_out] == ["train 0", "train 1"]  # without it: split off --data
    train, held_out = train_min.load_data(train_min.Config(train_size=5, eval_size=3))  # the built-in files
    assert (train, held_out) == built_in_problems(5, 3)


def test_data_files_of_both_formats_load_into_problems(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "How many?", "answer": "4 * 3 = <<4*3=12>>12\n#### 1,200"}) + "\n\n"
                    + json.dumps({"problem": "p", "solution": "s", "answer": " 7 "}) + "\n")
    gsm8k, own = load_problems(path)
    assert (gsm8k.question, gsm8k.solution, gsm8k.answer) == ("How many?", "4 * 3 = 12", "1200")
    assert (own.question, own.solution, own.answer) == ("p", "s", "7")


def test_built_in_problems_hold_out_whole_templates_and_are_solved_by_their_own_solutions():
    train, held_out = built_in_problems(2000, 400)
    assert (len(train), len(held_out)) == (2000, 400)
    train_templates, held_out_templates = {p.template for p in train}, {p.template for p in held_out}
    assert None not in train_templates | held_out_templates
    assert len(held_out_templates) >= 15 and not train_templates & held_out_templates
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert all(is_correct(p.solution, p.answer) for p in train + held_out)  # the worked solution ends "#### N"
    assert built_in_problems(3, 2) == (train[:3], held_out[:2])


@pytest.mark.parametrize("content, message", [
    ("", "no problems"), ('{"question": "q"\n', ":1: "), ('[1, 2]\n', ":1: "),
    ('{"problem": "p", "solution": "s"}\n', "answer"), ('{"question": "q", "answer": "no marker"}\n', "####"),
    ('{"problem": "p", "solution": "s", "answer": "7"}\n{"problem": "p", "solution": "s", "answer": "seven"}\n', ":2: "),
])
def test_a_bad_data_file_names_the_file_line_and_field(content, message, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        load_problems(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_every_rollout_engine_samples_a_valid_batch_and_greedy_engines_agree():
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


def test_bf16_runs_keep_float32_master_weights_and_a_synced_bf16_sampler(tmp_path):
    student, teacher = train_min.main(TINY + ["--dtype", "bfloat16", "--steps", "1", "--eval-size", "0",
                                              "--output-dir", str(tmp_path)])
    assert student.dtype == torch.float32 and teacher.dtype == torch.bfloat16
    sampler = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # the rollout model, saved in bf16
    assert sampler.dtype == torch.bfloat16
    assert same_parameters(sampler, student.to(torch.bfloat16))


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


def test_token_view_is_self_contained_and_its_tokens_decode_to_the_completion(tmp_path):
    train_min.main(TINY + ["--method", "cl-egrsd", "--steps", "1", "--eval-size", "0", "--dump-tokens", "1",
                           "--max-new-tokens", "16", "--output-dir", str(tmp_path)])
    page = (tmp_path / "tokens" / "step_1.html").read_text()
    assert "<script" not in page and "<link" not in page and "http" not in page
    tokenizer = build_tiny_tokenizer()
    rollouts = span_texts(page)
    assert len(rollouts) == 4 and page.count("reward ") >= 4
    for spans in rollouts:
        ids, texts = zip(*spans)
        assert "".join(texts) == tokenizer.decode(list(ids))
    assert "Ĥ_CL=" in page and "ω=" in page


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(3, 511), min_size=1, max_size=12))
def test_token_pieces_join_into_the_decoded_text_also_when_a_character_spans_tokens(ids):
    tokenizer = tiny_tokenizer()
    assert "".join(views.token_texts(tokenizer, ids)) == tokenizer.decode(ids)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    return build_tiny_tokenizer()


def test_compare_prints_the_accuracy_length_table_from_metrics_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_min, "load_model_and_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    start = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    for name, method, end in (("a", "grpo", [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]), ("b", "cl-egrsd", [1, 1, 1, 1, 1, 1, 0, 0, 0, 0])):
        (tmp_path / name).mkdir()
        rows = [{"kind": "eval", "step": 0, "method": method, "eval_accuracy": 0.30, "eval_length": 400.0,
                 "eval_acc_per_1k_tokens": 0.75, "eval_truncated": 0.1, "eval_correct": start},
                {"kind": "train", "step": 1, "method": method, "step_s": 9.0, "peak_gpu_mem_gb": 3.0},  # warm-up: not timed
                {"kind": "train", "step": 2, "method": method, "step_s": 2.0, "peak_gpu_mem_gb": 4.0},
                {"kind": "train", "step": 3, "method": method, "step_s": 4.0, "peak_gpu_mem_gb": 3.5},
                {"kind": "eval", "step": 10, "method": method, "eval_accuracy": 0.0, "eval_length": 1.0,
                 "eval_acc_per_1k_tokens": 0.0},  # then resumed: the last row of a step wins
                {"kind": "eval", "step": 10, "method": method, "eval_accuracy": sum(end) / 10, "eval_length": 500.0,
                 "eval_acc_per_1k_tokens": sum(end) / 5, "eval_truncated": 0.0, "eval_correct": end}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_min.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    table = capsys.readouterr().out.splitlines()
    assert table[2].split() == ["a", "grpo", "10", "0.300", "0.400", "400", "500", "+25.0%", "0.800", "0.000", "3.00", "4.0"]
    # b − a on the same ten problems: +2 of 10, differences (0 ×8, +1 ×2): sd 0.42, 95% interval ±1.96·0.42/√10
    assert table[3].split()[:12] == ["b", "cl-egrsd", "10", "0.300", "0.600", "400", "500", "+25.0%", "1.200", "0.000", "3.00", "4.0"]
    assert " ".join(table[3].split()[12:]) == "+20.0 [-6.1, +46.1] points (no detectable difference)"


def test_the_curves_of_runs_are_drawn_from_their_metrics_alone(tmp_path):
    pytest.importorskip("matplotlib", reason="the optional extra matplotlib is not installed")
    root = Path(__file__).resolve().parent
    subprocess.run([sys.executable, str(root / "docs/real_runs/plot.py"), str(tmp_path / "curves.png"),
                    str(root / "docs/real_runs/egrsd"), str(root / "docs/real_runs/grpo")], check=True)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_real_runs_compare_table_is_the_readmes():
    """docs/real_runs holds the GPU runs of the README; --compare reads them, no model needed."""
    root = Path(__file__).resolve().parent
    table = views.compare_table([str(root / "docs/real_runs/egrsd"), str(root / "docs/real_runs/grpo")])
    readme = (root / "README.md").read_text()
    for line in table.splitlines()[2:]:
        assert line.strip() in readme, line


# --------------------------------------------------------------------------------------------------------
# 6. decoding.py: HF generate's tokens and sampling distribution, faster
# --------------------------------------------------------------------------------------------------------


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


def test_sample_draws_each_candidate_at_its_probability():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]]).expand(200_000, 5)
    ids = torch.tensor([[7, 3, 9, 1, 4]]).expand(200_000, 5)
    torch.manual_seed(0)
    drawn = decoding.sample(probs, ids)
    counts = torch.stack([(drawn == i).sum() for i in (7, 3, 9, 1, 4)]).double()
    expected = probs[0].double() * len(drawn)
    assert counts[-1] == 0, "a candidate of probability 0 is never drawn"
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs[0])).sqrt()).all(), counts  # 5 sigma


def sharp_tiny_model(tokenizer, attention="sdpa"):
    """The tiny model with large random weights: attention far from uniform and logits far apart, so that a
    wrong position, a visible padding token or a stale cache entry changes the greedy tokens."""
    model = build_tiny_model(tokenizer).eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.3)
    model.config._attn_implementation = attention
    return model


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
    correct = train_min.verify(tokenizer, completion, mask, finished, built_in_problems(5, 0)[0], cfg)
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


def test_the_decode_step_has_no_host_sync():
    """CUDA graphs replay GPU work only: a step that reads a value back to Python (.item(), a branch on a
    tensor) or keeps a Python counter would be captured wrongly. Dynamo with fullgraph=True fails on the
    first, and with error_on_recompile on the second (its guard on the counter fails); checked on CPU."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).eval()
    ids, mask = left_padded_prompts(tokenizer)
    for greedy in (False, True):
        decoder = decoding._Decoder(model, ids, mask, 6, eos_ids=[40], pad_id=tokenizer.pad_token_id,
                                   pick=lambda logits: decoding.next_tokens(logits, greedy, 1.1, 20, 0.95))
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            decoder.prefill(ids, mask)
            step = torch.compile(decoder.step, backend="eager", fullgraph=True)
            step(), step(), step()  # a Python value that changed between steps would force a recompile
        torch._dynamo.reset()
        assert (decoder.slot == ids.shape[1] + 3).all() and (decoder.out[:, 4:] == tokenizer.pad_token_id).all()


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
    (dict(attention="flash_attention_2"), "model: decoding.generate supports sdpa or eager"),
    (dict(layers="sliding_attention"), "model: decoding.generate supports decoders whose layers all use full"),
])
def test_bad_rollout_input_names_the_argument(change, message):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    ids, mask = left_padded_prompts(tokenizer)
    change = dict(change)
    if change.get("prompt_mask") == "right":
        change["prompt_mask"] = mask.flip(-1)
    elif change.get("prompt_mask") == "short":
        change["prompt_mask"] = mask[:, 1:]
    if "attention" in change:
        model.config._attn_implementation = change.pop("attention")
    if "layers" in change:
        model.config.layer_types = [change.pop("layers")] * model.config.num_hidden_layers
    arguments = {**dict(prompt_ids=ids, prompt_mask=mask, max_new_tokens=4, eos_id=1, pad_id=tokenizer.pad_token_id), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        decoding.generate(model, **arguments)
