"""The correctness spec of egrsd.py: property-based tests (hypothesis) of every equation and invariant of
docs/METHOD.md. This file imports only torch, hypothesis, pytest and egrsd: copy it with egrsd.py.

Four kinds of test, in this order:
1. reference: each function equals a float64 naive implementation written loop by loop from the paper's
   equations, on generated batches with left and right padding, holes, all-padding rows, zero and large
   entropies, zero advantages, γ up to 2 (so the 0.1 floor binds) and windows 0..8; the full-vocabulary
   functions also on logits shifted per row by up to 1e4, or to float32's largest;
2. invariants: every property of docs/METHOD.md §4, one test each, named for the sentence it states;
3. contract (docs/METHOD.md §3): weights and advantages come back detached, and each kind of bad input
   raises a ValueError that names the argument;
4. beyond the contract: the hidden-state (`linear_*`) functions equal the plain computation, also under
   bf16 autocast; the token regimes hold their definitions; GateSettings computes what the functions do,
   and a bad setting is refused in the words of the table SETTINGS wherever it is given.
The trainer's tests (train_min.py end to end, rollouts, verifier) are in tests/.

The hypothesis profile is fixed (derandomized, no example database), so a run is reproducible and CI never
flakes. Run: python -m pytest -q test_egrsd.py
"""
import copy
import inspect
import math
import re
import statistics
from dataclasses import dataclass, fields
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode  # (torch's own hook on every op, for the memory test)

import egrsd

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


# The settings each function takes by the contract (docs/METHOD.md §3); a naive reference takes those of
# the function it mirrors.
CONTRACT = {
    "length_shaped_reward": {"beta"}, "ratio_magnitude": {"eps"}, "lookahead_min": {"window"},
    "normalised_entropy": {"window", "min_denominator", "denominator", "group"},
    "denominator": {"window", "min_denominator", "denominator", "group"},
    "entropy_gate": {"gamma", "window", "floor", "min_denominator", "denominator", "group"},
    "token_advantages": {"gamma", "window", "eps", "floor", "min_denominator", "denominator", "group"}, "policy_loss": set(),
    "token_logprobs": {"chunk_size"}, "token_entropy": {"chunk_size"}, "opsd_loss": {"chunk_size"},
    "token_regimes": {"window", "tau_low", "tau_high", "min_denominator", "group"},
    "group_advantages": {"eps"},
}
SETTINGS = set().union(*CONTRACT.values())


def call(function, arguments, **settings):
    """Call `function` (library or naive) with the tensors of `arguments` that its parameters name and with
    `settings`. A setting is left out only where the contract gives this function no such setting; one it
    should take but does not (a renamed parameter) fails, rather than silently testing the default."""
    parameters = inspect.signature(function).parameters
    takes = CONTRACT.get(function.__name__.removeprefix("naive_"), set())
    unknown = [name for name in settings if name not in parameters and (name in takes or name not in SETTINGS)]
    if unknown:
        raise TypeError(f"{function.__name__} has no parameter {unknown}: renamed?")
    return function(**{name: value for name, value in arguments.items() if name in parameters},
                    **{name: value for name, value in settings.items() if name in parameters})


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
GROUPS = st.sampled_from([None, None, 1, 2, 3])  # rows per entropy normaliser: the whole batch, or groups


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
        """The batch under the parameter names of docs/METHOD.md §3."""
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
                denominator=draw(st.sampled_from(["raw", "filtered"])), eps=draw(EPS), group=draw(GROUPS))


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
# Naive float64 references, loop by loop from the equations of docs/METHOD.md §2
# --------------------------------------------------------------------------------------------------------

def naive_lookahead_min(entropy, mask, window):
    """Eq. 8: for valid t, min of H[b, j] over valid j in [t, t + W]; 0 off the mask."""
    out = torch.zeros(entropy.shape, dtype=torch.float64)
    for b, t in mask.nonzero().tolist():
        out[b, t] = min(entropy[b, j].item() for j in range(t, min(t + window + 1, mask.shape[1])) if mask[b, j])
    return out


def naive_denominator(entropy, mask, window, min_denominator, denominator, group=None):
    """Eq. 5, per row: the max over valid tokens of the row's group (rows [0, g), [g, 2g), ...; None: the
    whole batch), floored at min_denominator; the max of the raw entropies (Eq. 8) or of the window minima
    (Algorithm 1)."""
    source = entropy.double() if denominator == "raw" else naive_lookahead_min(entropy, mask, window)
    size = group or len(mask)
    return [max([source[j, t].item() for j, t in mask.nonzero().tolist() if j // size == b // size] + [min_denominator])
            for b in range(len(mask))]


def naive_entropy_gate(entropy, mask, gamma=0.3, window=0, floor=0.1, min_denominator=1.0, denominator="raw", group=None):
    """Eq. 6: ω = clip(1 − γ · Ĥ, floor, 1), Ĥ the window minimum over the row's group denominator."""
    numerator = naive_lookahead_min(entropy, mask, window)
    scale = naive_denominator(entropy, mask, window, min_denominator, denominator, group)
    out = torch.zeros(entropy.shape, dtype=torch.float64)
    for b, t in mask.nonzero().tolist():
        out[b, t] = min(max(1 - gamma * numerator[b, t].item() / scale[b], floor), 1.0)
    return out


def naive_ratio_magnitude(teacher_logp, student_logp, direction, mask, eps=0.2):
    """Eq. 2: w = clip(exp(D · δ), 1 − ε, 1 + ε), δ = log p_T − log p_S."""
    out = torch.zeros(teacher_logp.shape, dtype=torch.float64)
    for b, t in mask.nonzero().tolist():
        delta = teacher_logp[b, t].item() - student_logp[b, t].item()
        out[b, t] = min(max(math.exp(direction[b].item() * delta), 1 - eps), 1 + eps)
    return out


def naive_token_advantages(advantages, teacher_logp, student_logp, teacher_entropy, mask, gamma=0.3, window=0,
                           eps=0.2, floor=0.1, min_denominator=1.0, denominator="raw", group=None):
    """Eq. 7: Â = A · w · ω."""
    w = naive_ratio_magnitude(teacher_logp, student_logp, advantages.sign(), mask, eps)
    omega = naive_entropy_gate(teacher_entropy, mask, gamma, window, floor, min_denominator, denominator, group)
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


def naive_group_advantages(rewards, group_size, eps=1e-4):
    """GRPO: A = (r − mean of its group) / (sample std of its group + eps), groups of `group_size` rows."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)
        out += [(r - mean) / (std + eps) for r in group]
    return torch.tensor(out, dtype=torch.float64)


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
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@given(data=st.data())
def test_weighting_matches_naive_reference(function, dtype, data):
    """bfloat16 inputs too: the arithmetic is float32 (the reference reads the same rounded inputs in float64)."""
    batch, settings = data.draw(batches(dtype)), data.draw(gate_settings())
    out = call(function, batch.arguments, **settings)
    assert out.dtype in WIDE_FLOATS
    assert_close(out, call(WEIGHTING[function], batch.arguments, **settings), torch.promote_types(dtype, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@given(data=st.data())
def test_policy_loss_matches_naive_reference(dtype, data):
    """bfloat16 inputs too: the loss is summed in float32 (the reference reads the same rounded inputs in float64)."""
    batch = data.draw(batches(dtype))
    advantages = call(naive_token_advantages, batch.arguments).to(dtype)
    loss = egrsd.policy_loss(batch.student_logp, advantages, batch.mask)
    assert loss.dtype in WIDE_FLOATS
    assert_close(loss, naive_policy_loss(batch.student_logp, advantages, batch.mask), torch.promote_types(dtype, torch.float32))


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


GROUPED_REWARDS = st.integers(2, 4).flatmap(lambda g: st.tuples(
    st.just(g), st.integers(1, 4).flatmap(lambda n: st.lists(REWARDS, min_size=g * n, max_size=g * n))))


@given(GROUPED_REWARDS, st.sampled_from([1e-4, 0.5]))
def test_group_advantages_match_naive_reference(grouped, eps):
    group_size, rewards = grouped
    assert_close(egrsd.group_advantages(as_float64(rewards), group_size, eps=eps),
                 naive_group_advantages(as_float64(rewards), group_size, eps), torch.float64)


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


def test_one_row_of_logits_is_scored_as_a_batch_of_one():
    """logits (V,) is (..., V) with no leading dims: a scalar, the one row of the (1, V) batch."""
    logits, token = torch.randn(1, 7, generator=torch.Generator().manual_seed(0)), torch.tensor([3])
    assert torch.equal(egrsd.token_logprobs(logits[0], token[0]), egrsd.token_logprobs(logits, token)[0])
    assert torch.equal(egrsd.token_entropy(logits[0]), egrsd.token_entropy(logits)[0])


class LargestNewStorage(TorchDispatchMode):
    """The largest storage that any op makes inside the block (views of the given tensors do not count)."""

    def __init__(self, *existing):
        super().__init__()
        self.existing, self.largest = {t.untyped_storage().data_ptr() for t in existing}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("function", [egrsd.token_logprobs, egrsd.token_entropy, egrsd.opsd_loss], ids=lambda f: f.__name__)
def test_shifted_logits_are_read_where_they_lie_never_copied_whole(function):
    """logits[:, :-1], the usual shift, is no contiguous tensor (a reshape copies it whole): the forward makes
    no tensor larger than a chunk's rows (8 of 64 here), and the values and gradients are a copy's."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(4, 17, 50, generator=generator, requires_grad=True) for _ in range(2))
    arguments = dict(logits=student[:, :-1], student_logits=student[:, :-1], teacher_logits=teacher[:, :-1].detach(),
                     tokens=torch.randint(50, (4, 16), generator=generator), mask=torch.ones(4, 16, dtype=torch.bool))
    with LargestNewStorage(student, teacher) as allocations:
        out = call(function, arguments, chunk_size=8)
    assert 0 < allocations.largest <= 8 * 50 * 4, "at most a chunk of float32 logits at once"
    copied = call(function, {k: v.contiguous() for k, v in arguments.items()}, chunk_size=8)
    assert torch.equal(out, copied)
    if out.requires_grad:
        grads = [torch.autograd.grad(x.sum(), student)[0] for x in (out, copied)]
        assert torch.equal(*grads)


FLOAT32_MAX_ULP = 2.0**104  # the spacing of float32 between 2^127 and its largest value, (2^24 − 1) · 2^104


@st.composite
def shifted_logit_batches(draw):
    """(shifted, reference): a LogitBatch whose every row of logits (the student's and the teacher's each
    their own) is a reference row plus a constant, exactly in float32, and the reference rows in float64 with
    their largest finite logit at 0 (softmax is shift-invariant, and subtracting it is exact here).
    The constants: up to ±1e4 on rows of logits on a grid of 2^-9 (every sum exact), or, in a drawn share
    of the rows, a row of whole multiples of 2^104 whose largest logit is float32's largest (3.4e38)."""
    B, T, V = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 30))
    scale, banned_fraction = draw(st.sampled_from([1.0, 5.0, 20.0])), draw(st.sampled_from([0.0, 0.5]))
    offset, huge_share = draw(st.sampled_from([30.0, 1e3, 1e4])), draw(st.sampled_from([0.0, 0.25]))
    generator = draw(random_source())
    tokens = torch.randint(V, (B, T), generator=generator)
    banned = (torch.rand(B, T, V, generator=generator) < banned_fraction).scatter(-1, tokens[..., None], False)

    def shifted_and_reference():
        huge = chance(huge_share, (B, T, 1), generator)
        unit = torch.where(huge, FLOAT32_MAX_ULP, 2.0**-9).double()
        logits = (scale * torch.randn(B, T, V, generator=generator, dtype=torch.float64) / torch.where(huge, 1.0, unit)).round()
        logits = logits.masked_fill(banned, -math.inf)  # whole multiples of the row's unit
        largest = logits.amax(-1, keepdim=True)
        shift = torch.where(huge, 2.0**24 - 1 - largest, (uniform(-offset, offset, (B, T, 1), generator) / unit).round())
        reference, shifted = (logits - largest) * unit, (logits + shift) * unit
        assert torch.equal(shifted.float().double(), shifted), "every shifted logit exact in float32"
        return shifted.float(), reference

    (student, student_reference), (teacher, teacher_reference) = shifted_and_reference(), shifted_and_reference()
    mask = draw(masks(B, T))
    if not mask.any():
        mask[0, 0] = True
    return LogitBatch(student, teacher, tokens, mask), LogitBatch(student_reference, teacher_reference, tokens, mask)


@given(data=st.data())
@settings(max_examples=30)
def test_logits_shifted_by_a_large_constant_per_row_give_the_unshifted_results_forward_and_backward(data):
    """Softmax is shift-invariant, so log-probs, entropies, the OPSD loss and their gradients of logits
    shifted by up to 1e4, or up to float32's largest (3.4e38), per row equal the float64 reference of the
    unshifted logits to float32's precision (log p = (z − max) − log Σ exp(z − max), never z − logsumexp(z),
    which errs by an ulp of |z|: 1e-3 at 1e4, and H([3e38, 3e38]) = 0 instead of ln 2)."""
    (batch, reference), chunking = data.draw(shifted_logit_batches()), data.draw(CHUNKINGS)
    logits, student = batch.student_logits.clone().requires_grad_(), batch.student_logits.clone().requires_grad_()
    logp = egrsd.token_logprobs(logits, batch.tokens, **chunking)
    upstream = torch.linspace(-1, 1, logp.numel()).reshape(logp.shape)
    logp.backward(upstream)
    loss = egrsd.opsd_loss(student, batch.teacher_logits, batch.mask, **chunking)
    loss.backward()
    assert_close(logp, naive_token_logprobs(reference.student_logits, batch.tokens), torch.float32)
    assert_close(logits.grad, naive_token_logprobs_gradient(reference.student_logits, batch.tokens, upstream), torch.float32)
    assert_close(egrsd.token_entropy(batch.teacher_logits, **chunking), naive_token_entropy(reference.teacher_logits),
                 torch.float32)
    assert_close(loss, naive_opsd_loss(reference.student_logits, reference.teacher_logits, batch.mask), torch.float32)
    assert_close(student.grad, naive_opsd_loss_gradient(reference.student_logits, reference.teacher_logits, batch.mask),
                 torch.float32)


# --------------------------------------------------------------------------------------------------------
# 2. Invariants of docs/METHOD.md §4
# --------------------------------------------------------------------------------------------------------

PER_TOKEN = (egrsd.lookahead_min, egrsd.entropy_gate, egrsd.ratio_magnitude, egrsd.token_advantages)


@given(batches(), gate_settings())
def test_gate_lies_between_floor_or_one_minus_gamma_and_one(batch, settings):
    omega = call(egrsd.entropy_gate, batch.arguments, **settings)[batch.mask]
    lowest = max(settings["floor"], 1 - settings["gamma"])
    assert (omega >= lowest - ROUNDING).all() and (omega <= 1).all()


def test_gate_is_clipped_at_one_also_below_zero_entropy():
    """Eq. 6 clips at 1 whatever Ĥ is: an entropy below 0 (refused nowhere: only NaN and ±inf are) gives ω = 1."""
    omega = egrsd.entropy_gate(torch.tensor([[-1.0, 0.5]]), torch.ones(1, 2, dtype=torch.bool))
    assert omega[0, 0] == 1 and omega[0, 1] < 1


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
    """Raise one entropy: no gate rises. The denominator of its group is held fixed (the raised value stays
    at or below it): lifting the group max itself rescales every other token, which is Eq. 5, not a breach."""
    assume(batch.mask.any())
    b, t = data.draw(st.sampled_from(batch.mask.nonzero().tolist()))
    ceiling = max(call(naive_denominator, batch.arguments, **settings)[b], batch.entropy[b, t].item())
    raised = batch.entropy.clone()
    raised[b, t] = data.draw(st.floats(batch.entropy[b, t].item(), ceiling))
    before = call(egrsd.entropy_gate, batch.arguments, **settings)
    after = call(egrsd.entropy_gate, {**batch.arguments, "entropy": raised}, **settings)
    assert (after <= before).all()


def test_raising_the_batchs_largest_entropy_lifts_every_other_gate():
    """Eq. 5's denominator is the batch's largest entropy: H = [2, 1] → [4, 1] raises ω₁ (1 − 0.3·1/2 = 0.85 →
    1 − 0.3·1/4 = 0.925), while the raised token's own gate stays 0.7."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    before, after = (egrsd.entropy_gate(torch.tensor([[h, 1.0]]), mask) for h in (2.0, 4.0))
    assert torch.allclose(before, torch.tensor([[0.7, 0.85]])) and torch.allclose(after, torch.tensor([[0.7, 0.925]]))


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
    """With one normaliser for the whole batch (group None), the order of the rows is immaterial."""
    settings = {**settings, "group": None}
    order = torch.tensor(data.draw(st.permutations(range(batch.mask.shape[0]))))
    shuffled = Batch(*(getattr(batch, field.name)[order] for field in fields(Batch)))
    advantages = call(egrsd.token_advantages, batch.arguments, **settings)
    assert torch.equal(call(egrsd.token_advantages, shuffled.arguments, **settings), advantages[order])


@given(batches(), gate_settings(), st.integers(1, 4))
def test_each_group_of_rollouts_is_gated_as_if_it_were_the_whole_batch(batch, settings, group):
    """gate_group: rows [0, g), [g, 2g), ... share one normaliser. Each group's gates are those of that group
    alone with the whole-batch normaliser; a group of one rollout normalises by its own largest entropy;
    a group of the whole batch (or more) is the default."""
    settings = {key: value for key, value in settings.items() if key not in ("eps", "group")}
    grouped = call(egrsd.entropy_gate, batch.arguments, **settings, group=group)
    for start in range(0, batch.mask.shape[0], group):
        rows = slice(start, start + group)
        alone = Batch(*(getattr(batch, field.name)[rows] for field in fields(Batch)))
        assert torch.equal(grouped[rows], call(egrsd.entropy_gate, alone.arguments, **settings, group=None))
    if group >= batch.mask.shape[0]:
        assert torch.equal(grouped, call(egrsd.entropy_gate, batch.arguments, **settings, group=None))


@given(batches(), gate_settings(), st.data())
def test_smaller_groups_never_gate_less(batch, settings, data):
    """With the raw denominator, a group's maximum is at most the batch's: a smaller group divides by less,
    so its gates are never above the whole batch's (the paper's 4 rollouts per GPU gate more strongly)."""
    settings = {key: value for key, value in settings.items() if key not in ("eps", "group")} | {"denominator": "raw"}
    group = data.draw(st.integers(1, max(batch.mask.shape[0], 1)))
    grouped = call(egrsd.entropy_gate, batch.arguments, **settings, group=group)
    whole = call(egrsd.entropy_gate, batch.arguments, **settings, group=None)
    assert (grouped <= whole + ROUNDING).all()


@pytest.mark.parametrize("B, T", [(2, 0), (0, 3)])
def test_an_empty_batch_gives_empty_weights_and_a_zero_loss(B, T):
    """No completion positions (T = 0) or no rollouts (B = 0): every per-token output is (B, T), the loss 0."""
    entropy, mask = torch.zeros(B, T), torch.zeros(B, T, dtype=torch.bool)
    for group in (None, 2):
        advantages = egrsd.token_advantages(torch.zeros(B), entropy, entropy, entropy, mask, window=2, group=group)
        assert advantages.shape == (B, T) and egrsd.token_regimes(entropy, mask, 2, group=group).shape == (B, T)
    assert egrsd.policy_loss(entropy, entropy, mask).item() == 0.0


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


def test_policy_loss_sends_no_gradient_to_the_token_advantages():
    """Â is a constant of the loss (Eq. 7): a caller's Â that still carries a graph gets no gradient from it."""
    arguments = valid_arguments()
    logp, advantages = arguments["student_logp"].requires_grad_(), arguments["token_advantages"].requires_grad_()
    egrsd.policy_loss(logp, advantages, arguments["mask"]).backward()
    assert advantages.grad is None and logp.grad is not None


@given(graded_rollouts())
def test_reward_is_zero_when_wrong_and_one_when_correct_at_the_length_cap(rollouts):
    reward, correct = egrsd.length_shaped_reward(**rollouts), rollouts["correct"]
    assert (reward[~correct] == 0).all()
    assert (reward[correct & (rollouts["lengths"] == rollouts["max_length"])] == 1).all()


@given(GROUPED_REWARDS)
def test_group_advantages_sum_to_zero_in_each_group_and_vanish_where_its_rewards_are_equal(grouped):
    group_size, rewards = grouped
    advantages = egrsd.group_advantages(as_float64(rewards), group_size).reshape(-1, group_size)
    torch.testing.assert_close(advantages.sum(dim=1), torch.zeros(len(advantages), dtype=torch.float64), atol=1e-9, rtol=0)
    equal = (as_float64(rewards).reshape(-1, group_size).diff(dim=1) == 0).all(dim=1)
    assert (advantages[equal] == 0).all()
    assert (advantages[~equal].abs().amax(dim=1) > 0).all(), "a group with a better rollout has a direction"


@given(st.integers(2, 16), st.integers(1, 2048), st.data())
def test_a_group_of_equal_rewards_has_no_direction_also_in_float32(group_size, max_length, data):
    """The rewards a trainer hands over are length_shaped_reward's float32, whose group mean may round: equal
    ones still give A = 0, not one ulp over a std of one ulp (a common sign of about 1e-3)."""
    length = data.draw(st.integers(0, max_length))
    rewards = egrsd.length_shaped_reward(torch.ones(group_size, dtype=torch.bool), torch.full((group_size,), length), max_length)
    assert (egrsd.group_advantages(rewards, group_size) == 0).all()
    assert (egrsd.group_advantages(as_float64([0.1] * group_size), group_size) == 0).all()


@given(WARMUPS, REWARD_STEPS, st.integers(0, 14))
def test_running_advantage_resumes_from_its_state_dict(warmup, steps, saved_after):
    running = egrsd.RunningAdvantage(**warmup)
    for rewards in map(as_float64, steps[:saved_after]):
        running(rewards)
    resumed = egrsd.RunningAdvantage()  # made with the defaults: the state carries the warm-up settings too
    resumed.load_state_dict(copy.deepcopy(running.state_dict()))  # as if saved to disk and loaded
    for rewards in map(as_float64, steps[saved_after:]):
        assert torch.equal(resumed(rewards), running(rewards))


def test_running_advantage_where_earlier_rewards_are_all_equal_is_reward_minus_their_mean():
    """σ_r = 0 after the warm-up: A = r − r̄ (not r, not a division by 0)."""
    running = egrsd.RunningAdvantage(warmup_steps=1)
    running(as_float64([1.25, 1.25]))  # the warm-up call; r̄ = 1.25, σ_r = 0
    assert torch.equal(running(as_float64([0.0, 1.25, 1.5])), as_float64([-1.25, 0.0, 0.25]))


def test_running_advantage_without_warm_up_normalises_from_its_second_call():
    """warmup_steps = 0 is allowed: the second call is (r − r̄) / σ_r over the first call's rewards."""
    running = egrsd.RunningAdvantage(warmup_steps=0)
    running(as_float64([0.0, 1.0]))  # r̄ = 0.5, σ_r = 0.5
    assert torch.equal(running(as_float64([1.0, 0.0, 0.5])), as_float64([1.0, -1.0, 0.0]))


# --------------------------------------------------------------------------------------------------------
# 3. Detachment and bad input (docs/METHOD.md §3)
# --------------------------------------------------------------------------------------------------------

def valid_arguments():
    """One small valid batch (B = 2, T = 3, V = 5) under every parameter name of docs/METHOD.md §3."""
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
            "lengths": torch.tensor([10, 32]), "max_length": 32, "window": 1, "group_size": 2}


def run(function, **overrides):
    """Call the egrsd function named `function` on the valid batch, with `overrides` replacing arguments."""
    arguments = {**valid_arguments(), **overrides}
    if function == "RunningAdvantage":
        return egrsd.RunningAdvantage()(arguments["rewards"])
    return call(getattr(egrsd, function), arguments)


OUTPUT_SHAPES = {  # of each function on the valid batch: (B, T) per token, (B,) per sequence, () a loss
    "token_logprobs": (2, 3), "token_entropy": (2, 3), "length_shaped_reward": (2,), "RunningAdvantage": (2,),
    "group_advantages": (2,), "lookahead_min": (2, 3), "normalised_entropy": (2, 3), "entropy_gate": (2, 3),
    "ratio_magnitude": (2, 3), "token_advantages": (2, 3), "policy_loss": (), "opsd_loss": (), "token_regimes": (2, 3)}


@pytest.mark.parametrize("function", OUTPUT_SHAPES)
def test_valid_arguments_are_accepted(function):
    """The control of the bad-input tests below: the same calls with nothing replaced return finite values
    of the right shape, so that each bad-input case fails for its one bad argument alone."""
    out = run(function)
    assert out.shape == OUTPUT_SHAPES[function] and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("function", [
    "lookahead_min", "entropy_gate", "ratio_magnitude", "token_advantages", "RunningAdvantage", "group_advantages"])
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
    *[case(function, "group", group) for function in ["normalised_entropy", "entropy_gate", "token_advantages"]
      for group in [0, -1, 1.5, True]],
    *[case("token_logprobs", "tokens", first_entry(token), token) for token in [-1, 5]],
    case("token_logprobs", "tokens", torch.Tensor.float, "float ids"),
    *[case("opsd_loss", argument, lambda x: x.index_put((torch.tensor(0), torch.tensor(2)), torch.tensor(math.nan)),
           "NaN in a padded row") for argument in ["student_logits", "teacher_logits"]],
    *[case("ratio_magnitude", "direction", first_entry(d), d) for d in [0.5, 2.0]],  # not a sign
    *[case("token_regimes", "tau_high", tau) for tau in [0.2, 0.1]],  # not above tau_low = 0.2
    case("token_regimes", "tau_low", -0.1),
    case("normalised_entropy", "mask", torch.Tensor.float, "float"),
    case("normalised_entropy", "window", -1),
    case("normalised_entropy", "denominator", "max"),
    case("normalised_entropy", "min_denominator", 0.0),
    *[case("length_shaped_reward", "max_length", max_length) for max_length in [0, -5]],
    case("length_shaped_reward", "beta", -0.1),  # a negative bonus: negative rewards
    *[case("group_advantages", "group_size", size) for size in [1, 0, 2.0, True]],
    case("group_advantages", "rewards", lambda x: torch.cat([x, x[:1]]), "not a multiple of group_size"),
    case("group_advantages", "rewards", first_entry(math.nan), "NaN"),
    *[case("group_advantages", "eps", eps) for eps in [0.0, -1.0]],
    *[case("length_shaped_reward", "lengths", first_entry(length), length) for length in [-1, 33]],
    case("length_shaped_reward", "lengths", lambda x: first_entry(math.nan)(x.double()), "NaN"),
    case("length_shaped_reward", "correct", torch.Tensor.long, "int verdicts"),
]


@pytest.mark.parametrize("function, argument, bad", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(function, argument, bad):
    value = bad(valid_arguments()[argument]) if callable(bad) else bad
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        run(function, **{argument: value})


@pytest.mark.parametrize("argument, bad", [("warmup_steps", -1), ("warmup_steps", 1.5), ("warmup_baseline", math.nan)])
def test_running_advantage_rejects_bad_settings_naming_them(argument, bad):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        egrsd.RunningAdvantage(**{argument: bad})


def test_running_advantage_refuses_a_state_that_is_not_its_own():
    with pytest.raises(ValueError, match=r"^state\b"):
        egrsd.RunningAdvantage().load_state_dict({"steps": 3})


# --------------------------------------------------------------------------------------------------------
# 4. Beyond the contract: scoring from hidden states, the token regimes, GateSettings
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
def test_the_fused_teacher_pass_equals_the_naive_log_probs_and_entropy(dtype, data):
    """One pass over the teacher's logits gives log p(y_t) and H, as the two separate computations."""
    batch, chunking = data.draw(hidden_batches(dtype)), data.draw(CHUNKINGS)
    logp, entropy = egrsd.linear_token_logprobs_and_entropy(batch.teacher_hidden, batch.teacher_weight, batch.tokens, **chunking)
    logits = plain_logits(batch.teacher_hidden, batch.teacher_weight)
    assert logp.dtype in WIDE_FLOATS and entropy.dtype in WIDE_FLOATS and not logp.requires_grad
    assert_close_to_scale(logp, naive_token_logprobs(logits, batch.tokens), dtype)
    assert_close_to_scale(entropy, naive_token_entropy(logits), dtype)
    separate = egrsd.linear_token_logprobs(batch.teacher_hidden, batch.teacher_weight, batch.tokens, **chunking)
    assert torch.equal(logp, separate.detach()), "the same chunks, the same rounding"


def test_the_fused_teacher_pass_gives_a_minus_inf_logit_p_log_p_0_as_linear_token_entropy_does():
    """A logit that overflows to −inf (hidden · weight beyond float32) has p = 0 and adds 0, not 0 · (−inf) = NaN."""
    hidden, weight, tokens = torch.tensor([[1e30]]), torch.tensor([[-1e30], [1.0]]), torch.tensor([1])  # logits [−inf, 1e30]
    logp, entropy = egrsd.linear_token_logprobs_and_entropy(hidden, weight, tokens)
    assert logp.item() == 0.0 and entropy.item() == 0.0 and torch.equal(entropy, egrsd.linear_token_entropy(hidden, weight))


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


@st.composite
def shifted_hidden_batches(draw):
    """(hidden, weight, teacher_hidden, teacher_weight, tokens, reference student and teacher logits): hidden
    states and LM heads whose logits are shifted per row by a constant up to ±1e4, through a last hidden
    feature that is the constant and a last weight column of ones; every entry a multiple of 2^-4 in [−2, 2],
    so that every float32 sum of the products (multiples of 2^-8) is exact in any order. The reference: the
    unshifted logits in float64, with their largest at 0."""
    N, D, V = draw(st.integers(1, 8)), draw(st.integers(1, 6)), draw(st.integers(2, 30))
    offset, generator = draw(st.sampled_from([30.0, 1e3, 1e4])), draw(random_source())

    def head(rows):
        h, w = (torch.randint(-32, 33, shape, generator=generator).double() / 16 for shape in [(rows, D), (V, D)])
        shift = (uniform(-offset, offset, (rows, 1), generator) * 256).round() / 256
        reference = h @ w.T
        hidden, weight = torch.cat([h, shift], 1), torch.cat([w, torch.ones(V, 1, dtype=torch.float64)], 1)
        assert torch.equal((hidden @ weight.T).float().double(), reference + shift), "every shifted logit exact"
        return hidden.float(), weight.float(), reference - reference.amax(-1, keepdim=True)

    (hidden, weight, reference), (teacher_hidden, teacher_weight, teacher_reference) = head(N), head(N)
    tokens = torch.randint(V, (N,), generator=generator)
    return hidden, weight, teacher_hidden, teacher_weight, tokens, reference, teacher_reference


@given(data=st.data())
@settings(max_examples=30)
def test_linear_functions_of_logits_shifted_by_a_large_constant_per_row_give_the_unshifted_results(data):
    """As for the logits themselves: log p, H (alone and from the fused teacher pass), the OPSD loss and the
    gradients through the LM head of logits shifted by up to 1e4 per row equal the float64 reference of the
    unshifted logits to float32's precision (to the gradients' scale, as every linear_* test)."""
    (hidden, weight, teacher_hidden, teacher_weight, tokens, reference, teacher_reference), chunking = \
        data.draw(shifted_hidden_batches()), data.draw(CHUNKINGS)
    upstream = torch.linspace(-1, 1, len(tokens))

    def through_the_head(dz, h, w):
        """d loss / d (hidden, weight) from d loss / d logits, in float64."""
        return dz @ w.double(), dz.T @ h.double()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = egrsd.linear_token_logprobs(h, w, tokens, **chunking)
    (logp * upstream).sum().backward()
    assert_close_to_scale(logp, naive_token_logprobs(reference, tokens), torch.float32)
    dz = naive_token_logprobs_gradient(reference, tokens, upstream)
    for got, want in zip([h.grad, w.grad], through_the_head(dz, hidden, weight)):
        assert_close_to_scale(got, want, torch.float32)
    assert_close_to_scale(egrsd.linear_token_entropy(teacher_hidden, teacher_weight, **chunking),
                          naive_token_entropy(teacher_reference), torch.float32)
    teacher_logp, entropy = egrsd.linear_token_logprobs_and_entropy(teacher_hidden, teacher_weight, tokens, **chunking)
    assert_close_to_scale(teacher_logp, naive_token_logprobs(teacher_reference, tokens), torch.float32)
    assert_close_to_scale(entropy, naive_token_entropy(teacher_reference), torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = egrsd.linear_opsd_loss(h, w, teacher_hidden, teacher_weight, **chunking)
    loss.backward()
    every_row = torch.ones(len(tokens), dtype=torch.bool)
    assert_close_to_scale(loss, naive_opsd_loss(reference, teacher_reference, every_row), torch.float32)
    dz = naive_opsd_loss_gradient(reference, teacher_reference, every_row)
    for got, want in zip([h.grad, w.grad], through_the_head(dz, hidden, weight)):
        assert_close_to_scale(got, want, torch.float32)


def test_logits_at_float32s_largest_are_scored_by_their_differences():
    """Two logits of 3e38, as logits or as hidden state times LM head, are a fair coin: H = ln 2,
    log p = −ln 2, d log p / dz = (1/2, −1/2), and KL to itself 0 with gradient 0."""
    logits = torch.tensor([[3e38, 3e38]], requires_grad=True)
    hidden, weight = torch.tensor([[3e38]], requires_grad=True), torch.tensor([[1.0], [1.0]], requires_grad=True)
    token = torch.tensor([0])
    assert_close(egrsd.token_entropy(logits), [math.log(2)], torch.float32)
    assert_close(egrsd.linear_token_entropy(hidden, weight), [math.log(2)], torch.float32)
    fused = egrsd.linear_token_logprobs_and_entropy(hidden, weight, token)
    assert_close(torch.stack(fused), [[-math.log(2)], [math.log(2)]], torch.float32)
    egrsd.token_logprobs(logits, token).sum().backward()
    egrsd.linear_token_logprobs(hidden, weight, token).sum().backward()
    assert_close(logits.grad, [[0.5, -0.5]], torch.float32)
    assert_close(weight.grad, [[1.5e38], [-1.5e38]], torch.float32)
    assert_close(hidden.grad, [[0.0]], torch.float32)
    student = logits.detach()[None].clone().requires_grad_()
    loss = egrsd.opsd_loss(student, student.detach(), torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(student.grad == 0)


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
    ("linear_token_logprobs_and_entropy", lambda h, w, t: (h, w, t[:-1]), "tokens"),
    ("linear_token_logprobs_and_entropy", lambda h, w, t: (h, w.T, t), "hidden"),
    ("linear_opsd_loss", lambda h, w, t: (h, w, h[:-1], w), "teacher_hidden"),
    ("linear_opsd_loss", lambda h, w, t: (h, w, h, w[:-1]), "teacher_weight"),  # two vocabulary sizes
    ("linear_opsd_loss", lambda h, w, t: (h[None], w, h[None], w), "student_hidden"),
])
def test_linear_functions_reject_bad_input_naming_the_argument(function, arguments, argument):
    h, w, t = torch.randn(4, 3), torch.randn(7, 3), torch.randint(7, (4,))
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        getattr(egrsd, function)(*arguments(h, w, t))


def naive_token_regimes(entropy, mask, window, tau_low, tau_high, min_denominator=1.0, group=None):
    """Each valid token's regime from the definitions, one at a time, over its row's raw denominator (Eq. 5);
    0 off the mask."""
    normaliser = naive_denominator(entropy, mask, window, min_denominator, "raw", group)
    lookahead = naive_lookahead_min(entropy, mask, window)
    codes = torch.zeros(mask.shape, dtype=torch.long)
    for b, t in mask.nonzero().tolist():
        h, h_cl = entropy[b, t].item() / normaliser[b], lookahead[b, t].item() / normaliser[b]
        codes[b, t] = 1 if h <= tau_low else 3 if h >= tau_high and h_cl <= tau_low else \
            4 if h >= tau_high and h_cl >= tau_high else 2
    return codes


THRESHOLDS = st.sampled_from([(0.2, 0.5), (0.1, 0.9), (0.45, 0.5)]).map(lambda t: dict(tau_low=t[0], tau_high=t[1]))


@given(batches(), WINDOWS, THRESHOLDS, st.sampled_from([1.0, 0.5, 4.0]), GROUPS)
def test_token_regimes_match_naive_reference(batch, window, thresholds, min_denominator, group):
    got = egrsd.token_regimes(batch.entropy, batch.mask, window, **thresholds, min_denominator=min_denominator, group=group)
    assert torch.equal(got, naive_token_regimes(batch.entropy, batch.mask, window, **thresholds,
                                                min_denominator=min_denominator, group=group))


@given(batches(), WINDOWS, THRESHOLDS)
def test_every_valid_token_is_in_the_one_regime_its_normalised_entropies_define(batch, window, thresholds):
    """The codes agree with `normalised_entropy` at W = 0 and at W: one regime per valid token, 0 off it."""
    codes = egrsd.token_regimes(batch.entropy, batch.mask, window, **thresholds)
    h, h_cl = (egrsd.normalised_entropy(batch.entropy, batch.mask, w) for w in (0, window))
    low, high = thresholds["tau_low"], thresholds["tau_high"]
    regimes = {"lock": h <= low, "pivot": (h >= high) & (h_cl <= low), "fork": (h >= high) & (h_cl >= high)}
    regimes["mid"] = ~(regimes["lock"] | regimes["pivot"] | regimes["fork"])
    for name, where in regimes.items():
        assert torch.equal(codes == 1 + egrsd.REGIMES.index(name), where & batch.mask), name
        if (where & batch.mask).any():
            event(f"has {name} tokens")
    assert (codes[~batch.mask] == 0).all()


@pytest.mark.parametrize("window, expected", [
    (0, ["fork", "fork", "lock", "fork", "fork", "fork", "mid"]),  # W = 0: no pivots
    (1, ["fork", "pivot", "lock", "fork", "fork", "mid", "mid"]),
    (2, ["pivot", "pivot", "lock", "fork", "mid", "mid", "mid"]),
])
def test_a_spike_resolved_within_the_window_is_a_pivot_and_a_sustained_span_a_fork(window, expected):
    """Worked by hand: H = [4, 4, 0, 4, 4, 4, 1.2] nats, so Ĥ = H / 4 (the largest), τ = (0.2, 0.5). A
    confident token within W tokens AFTER an uncertain one makes it a pivot; the token after that confident
    one stays a fork (the lookahead is causal, it never looks back); one only partly resolved is mid."""
    entropy, mask = torch.tensor([[4.0, 4.0, 0.0, 4.0, 4.0, 4.0, 1.2]]), torch.ones(1, 7, dtype=torch.bool)
    codes = egrsd.token_regimes(entropy, mask, window, tau_low=0.2, tau_high=0.5)
    assert [egrsd.REGIMES[c - 1] for c in codes[0].tolist()] == expected


@pytest.mark.parametrize("window, expected", [(0, ["fork", "lock", "fork", "fork", "lock"]),
                                              (1, ["pivot", "lock", "fork", "pivot", "lock"])])
def test_regime_thresholds_are_inclusive(window, expected):
    """Ĥ exactly at τ: H ≤ 0.5 nat, so Ĥ = H / 1 nat exactly (binary fractions); Ĥ = τ_low is lock, Ĥ = τ_high
    is high, Ĥ^CL = τ_low makes a pivot and Ĥ^CL = τ_high a fork (≤ and ≥ as the definitions say)."""
    entropy, mask = torch.tensor([[0.5, 0.25, 0.5, 0.5, 0.25]]), torch.ones(1, 5, dtype=torch.bool)
    codes = egrsd.token_regimes(entropy, mask, window, tau_low=0.25, tau_high=0.5)
    assert [egrsd.REGIMES[c - 1] for c in codes[0].tolist()] == expected


@given(batches(), gate_settings(), THRESHOLDS)
def test_gate_settings_compute_what_the_functions_compute(batch, settings, thresholds):
    """GateSettings is the functions with its settings filled in, and `gates` is each of them once."""
    gate = egrsd.GateSettings(**settings)
    keywords = {name: value for name, value in settings.items() if name != "window"}
    window = settings["window"]
    assert torch.equal(gate.magnitude(batch.teacher_logp, batch.student_logp, batch.direction, batch.mask),
                       call(egrsd.ratio_magnitude, batch.arguments, **settings))
    assert torch.equal(gate.token_advantages(batch.advantages, batch.teacher_logp, batch.student_logp, batch.entropy,
                                             batch.mask, window=0), call(egrsd.token_advantages, batch.arguments, **keywords))
    gates = gate.gates(batch.entropy, batch.mask, **thresholds)
    assert torch.equal(gates.plain, call(egrsd.entropy_gate, batch.arguments, **keywords, window=0))
    assert torch.equal(gates.lookahead, call(egrsd.entropy_gate, batch.arguments, **settings))
    assert torch.equal(gates.normalised, call(egrsd.normalised_entropy, batch.arguments, **settings))
    assert torch.equal(gates.regimes, egrsd.token_regimes(batch.entropy, batch.mask, window, **thresholds,
                                                          min_denominator=settings["min_denominator"], group=settings["group"]))


SETTING_CASES = [(name, bad) for name, values in {
    "gamma": [-0.1, math.inf, "0.3", True], "eps": [0.0, 1.0, -0.1, 1.5], "floor": [-0.1, 1.5, math.nan, True],
    "min_denominator": [0.0, -1.0], "window": [-1, 1.5, True], "denominator": ["max", None],
    "group": [0, -1, 1.5, True]}.items() for bad in values]


@pytest.mark.parametrize("name, bad", SETTING_CASES)
def test_a_setting_out_of_range_is_refused_in_the_words_of_the_table_everywhere(name, bad):
    """check_settings, GateSettings and the functions say the same thing of a bad setting: the table's."""
    message = rf"^{name}: expected {re.escape(egrsd.SETTINGS[name].expected)}, got {re.escape(repr(bad))}$"
    for refuse in (lambda: egrsd.check_settings(**{name: bad}), lambda: egrsd.GateSettings(**{name: bad}),
                   lambda: run("token_advantages", **{name: bad})):
        with pytest.raises(ValueError, match=message):
            refuse()


PAPER_DEFAULTS = {  # docs/METHOD.md §2-3: called without settings, every function uses the paper's
    "length_shaped_reward": {"beta": 0.5}, "group_advantages": {"eps": 1e-4}, "ratio_magnitude": {"eps": 0.2},
    "RunningAdvantage": {"warmup_steps": 10, "warmup_baseline": 0.5},
    "normalised_entropy": {"window": 0, "min_denominator": 1.0, "denominator": "raw", "group": None},
    "entropy_gate": {"window": 0, "gamma": 0.3, "floor": 0.1, "min_denominator": 1.0, "denominator": "raw", "group": None},
    "token_advantages": {"window": 0, "gamma": 0.3, "eps": 0.2, "floor": 0.1, "min_denominator": 1.0,
                         "denominator": "raw", "group": None},
    "token_regimes": {"tau_low": 0.2, "tau_high": 0.5, "min_denominator": 1.0, "group": None},
    "GateSettings": {"eps": 0.2, "gamma": 0.3, "floor": 0.1, "min_denominator": 1.0, "denominator": "raw",
                     "group": None, "window": 0},
}


@pytest.mark.parametrize("function", PAPER_DEFAULTS)
def test_the_defaults_are_the_papers_settings(function):
    parameters = inspect.signature(getattr(egrsd, function)).parameters
    assert {name: parameters[name].default for name in PAPER_DEFAULTS[function]} == PAPER_DEFAULTS[function]


CONTRACT_ORDER = {  # docs/METHOD.md §3: what each function takes by position, in this order
    "token_logprobs": ["logits", "tokens"], "token_entropy": ["logits"],
    "length_shaped_reward": ["correct", "lengths", "max_length", "beta"],
    "RunningAdvantage": ["warmup_steps", "warmup_baseline"], "lookahead_min": ["entropy", "mask", "window"],
    "entropy_gate": ["entropy", "mask", "gamma", "window", "floor", "min_denominator", "denominator"],
    "ratio_magnitude": ["teacher_logp", "student_logp", "direction", "mask", "eps"],
    "token_advantages": ["advantages", "teacher_logp", "student_logp", "teacher_entropy", "mask", "gamma", "window", "eps",
                         "floor", "min_denominator", "denominator"],
    "policy_loss": ["student_logp", "token_advantages", "mask"], "opsd_loss": ["student_logits", "teacher_logits", "mask"],
}


@pytest.mark.parametrize("function", CONTRACT_ORDER)
def test_a_call_in_the_contracts_order_means_what_it_says(function):
    """The contract's positional order, so that entropy_gate(H, mask, 1) is γ = 1 (not W = 1 and γ = 0.3)."""
    positional = [p.name for p in inspect.signature(getattr(egrsd, function)).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == CONTRACT_ORDER[function]


def test_gate_settings_from_flags_reads_each_flag_and_gate_group_zero_as_the_whole_batch():
    flags = dict(gamma=1.0, window=5, eps=0.1, floor=0.2, min_denominator=2.0, denominator="filtered", gate_group=0)
    settings = dict(gamma=1.0, window=5, eps=0.1, floor=0.2, min_denominator=2.0, denominator="filtered")
    assert egrsd.GateSettings.from_flags(SimpleNamespace(**flags)) == egrsd.GateSettings(**settings, group=None)
    assert egrsd.GateSettings.from_flags(SimpleNamespace(**flags | {"gate_group": 4})) == egrsd.GateSettings(**settings, group=4)
    assert all(allowed for _, allowed, _ in egrsd.GateSettings.flag_rules(SimpleNamespace(**flags)))
    assert [name for name, allowed, _ in egrsd.GateSettings.flag_rules(SimpleNamespace(**flags | {"gate_group": -1}))
            if not allowed] == ["gate_group"]
    for name, bad in SETTING_CASES:  # every flag is checked: each bad value is refused under its own name alone
        if name != "group":
            assert [flag for flag, allowed, _ in egrsd.GateSettings.flag_rules(SimpleNamespace(**flags | {name: bad}))
                    if not allowed] == [name]
