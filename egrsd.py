"""EGRSD / CL-EGRSD: per-token weights for on-policy self-distillation, as pure tensor functions.

Paper: "Respecting Self-Uncertainty in On-Policy Self-Distillation for Efficient LLM Reasoning"
(Ke, Wen, Li, He, Zhang; arXiv 2605.13255); docs/METHOD.md restates it. A student samples a rollout y_i;
a frozen copy of the initial model that also sees the reference solution (the teacher) scores it token
by token. Each completion token gets the token advantage (Eq. 7)

    Â_{i,t} = A_i · w_{i,t} · ω_{i,t}

- A_i      reward direction and scale: the running-normalised, length-shaped reward (App. B);
- w_{i,t}  magnitude: clip(exp(sign(A_i) · (log p_T − log p_S)), 1 − ε, 1 + ε)               (Eq. 2);
- ω_{i,t}  confidence: clip(1 − γ · H_T / max(max_batch H_T, 1 nat), floor, 1), the teacher-entropy gate
           (Eq. 4-6);
           CL-EGRSD replaces H_T in the numerator by its minimum over [t, t + W]               (Eq. 8).

and the loss is −Σ m · Â · log p_θ / Σ m. γ = 0 gives RLSD; γ = 0 and ε → 0 gives GRPO's A_i.

The file reads in the paper's order: the settings and their ranges (one table), reward and advantage,
log-probs and the magnitude, the teacher's entropy, the gate and its lookahead, Â, the losses, the token
regimes, and GateSettings, the settings in one object for a trainer. Each public function shows its
equation's arithmetic in its own body, after its checks. Below them, under their own headers, are the
chunked full-vocabulary kernels and the input checks: machinery a reader of the method can skip.

Conventions: per-token tensors are (B, T), `mask` is a (B, T) bool tensor (True on completion tokens
that count, EOS included), per-sequence tensors are (B,). Tensors and the mask come first. The functions of
docs/METHOD.md §3's contract then take the method's settings in its order, positional or keyword
(`entropy_gate(H, mask, 0.3, 3)` is γ = 0.3, W = 3); `normalised_entropy` and `token_regimes` take theirs
after `window` by keyword only, and extras (`group`, `chunk_size`, `group_advantages`' `eps`) are keyword-only
everywhere. Arithmetic is in float32 or wider whatever the input dtype. Every
per-token output is exactly 0 where `mask` is False, and every weight or advantage is detached. Each
public call checks its input, then computes (a function that uses another equation calls that equation's
function, which checks its own input again); bad input raises ValueError naming the argument. This file
depends on torch only: copy it into your trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, NamedTuple

import torch

__all__ = [
    "SETTINGS",
    "check_settings",
    "length_shaped_reward",
    "RunningAdvantage",
    "group_advantages",
    "token_logprobs",
    "linear_token_logprobs",
    "ratio_magnitude",
    "token_entropy",
    "linear_token_entropy",
    "linear_token_logprobs_and_entropy",
    "lookahead_min",
    "normalised_entropy",
    "entropy_gate",
    "token_advantages",
    "policy_loss",
    "opsd_loss",
    "linear_opsd_loss",
    "REGIMES",
    "token_regimes",
    "GateSettings",
    "Gates",
]

DEFAULT_CHUNK_SIZE = 1024  # rows of logits processed at once: extra memory is O(chunk_size × V)


# ----------------------------------------------------------------------------------------------------
# The method's settings: what each may be, in one table, checked by one call.


class Setting(NamedTuple):
    """One row of SETTINGS: a setting of the method, what it may be and what it means."""

    expected: str  # what an error message says is allowed
    allowed: Callable[[object], bool]  # the test of a value
    meaning: str


SETTINGS = {
    "gamma": Setting("a finite number ≥ 0", lambda x: _is_number(x) and x >= 0,
                     "γ, the strength of the entropy gate ω (Eq. 6); 0 gives RLSD"),
    "eps": Setting("a number in (0.0, 1.0)", lambda x: _is_number(x) and 0 < x < 1,
                   "ε, the clip range of the magnitude w (Eq. 2)"),
    "floor": Setting("a number in [0.0, 1.0]", lambda x: _is_number(x) and 0 <= x <= 1,
                     "the lower bound of the gate ω (Eq. 6): above 0, every token keeps a nonzero weight"),
    "min_denominator": Setting("a finite number > 0", lambda x: _is_number(x) and x > 0,
                               "the floor, in nats, of the entropy normaliser (Eq. 5)"),
    "window": Setting("a non-negative int", lambda x: _is_int(x) and x >= 0,
                      "W, the causal lookahead of CL-EGRSD (Eq. 8); 0 is EGRSD"),
    "denominator": Setting("'raw' (Eq. 8) or 'filtered' (Algorithm 1)", lambda x: x in ("raw", "filtered"),
                           "what the lookahead entropy is normalised by: the largest raw or filtered entropy"),
    "group": Setting("None (the whole batch) or a positive int (rows per normaliser)",
                     lambda x: x is None or (_is_int(x) and x >= 1),
                     "rows [0, g), [g, 2g), ... that share one entropy normaliser (Eq. 5); None: the whole batch"),
}


def check_settings(**settings) -> None:
    """Raise ValueError "name: expected ..., got ..." for the first of `settings` (names of SETTINGS) that
    SETTINGS does not allow."""
    for name, value in settings.items():
        if not SETTINGS[name].allowed(value):
            _fail(name, SETTINGS[name].expected, repr(value))


# ----------------------------------------------------------------------------------------------------
# Reward and sequence-level advantage (App. B).


def length_shaped_reward(correct: torch.Tensor, lengths: torch.Tensor, max_length: int, beta: float = 0.5) -> torch.Tensor:
    """r_i = 1[correct_i] · (1 + β · (1 − lengths_i / max_length)), float32 (B,).

    correct (B,) bool: verified correct (a truncated rollout must be passed as not correct);
    lengths (B,) completion lengths in tokens, in [0, max_length]; max_length > 0 is the completion cap;
    β ≥ 0 the bonus for brevity. Wrong answers get 0; there are no negative rewards.
    """
    _per_seq("correct", correct, floating=False, bool_=True)
    _per_seq("lengths", lengths, batch=correct.shape[0], floating=False)
    _all_finite(lengths=lengths)
    if not (_is_int(max_length) and max_length > 0):
        _fail("max_length", "a positive int", repr(max_length))
    if lengths.numel() and (float(lengths.min()) < 0 or float(lengths.max()) > max_length):
        _fail("lengths", f"values in [0, max_length={max_length}]", f"[{lengths.min().item()}, {lengths.max().item()}]")
    beta = _number("beta", beta, 0.0, math.inf)
    shaped = 1.0 + beta * (1.0 - lengths.to(torch.float64) / max_length)
    return torch.where(correct, shaped, 0.0).to(torch.float32)


class RunningAdvantage:
    """A_i = (r_i − r̄) / σ_r with r̄, σ_r the running mean and population std of all rewards of earlier
    calls (App. B). During the first `warmup_steps` calls A_i = r_i − `warmup_baseline`; where σ_r = 0,
    A_i = r_i − r̄. This call's rewards are folded in (Welford, float64) after they are used.

        advantage = RunningAdvantage()
        A = advantage(rewards)        # rewards (B,) → A (B,), float32 or wider, detached
    """

    def __init__(self, warmup_steps: int = 10, warmup_baseline: float = 0.5):
        if not (_is_int(warmup_steps) and warmup_steps >= 0):
            _fail("warmup_steps", "a non-negative int", repr(warmup_steps))
        self.warmup_steps = int(warmup_steps)
        self.warmup_baseline = _number("warmup_baseline", warmup_baseline, -math.inf, math.inf)
        self.steps, self.count, self.mean, self.m2 = 0, 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        _all_finite(rewards=_per_seq("rewards", rewards))
        r = rewards.detach().to(torch.float64)
        if self.steps < self.warmup_steps:
            adv = r - self.warmup_baseline
        elif self.std > 0:
            adv = (r - self.mean) / self.std
        else:
            adv = r - self.mean
        for x in r.tolist():  # Welford: exact for constant rewards, so σ = 0 stays exactly 0
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)
        self.steps += 1
        return adv.to(_float_dtype(rewards.dtype))

    def state_dict(self) -> dict:
        return {"steps": self.steps, "count": self.count, "mean": self.mean, "m2": self.m2,
                "warmup_steps": self.warmup_steps, "warmup_baseline": self.warmup_baseline}

    def load_state_dict(self, state: dict) -> None:
        missing = {"steps", "count", "mean", "m2", "warmup_steps", "warmup_baseline"} - set(state)
        if missing:
            _fail("state", "a RunningAdvantage.state_dict()", f"a dict without {sorted(missing)}")
        self.steps, self.count = int(state["steps"]), int(state["count"])
        self.mean, self.m2 = float(state["mean"]), float(state["m2"])
        self.warmup_steps, self.warmup_baseline = int(state["warmup_steps"]), float(state["warmup_baseline"])


def group_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantage, the alternative to the running one when each problem has several
    rollouts: rows [0, G), [G, 2G), ... are the G rollouts of one problem, and

        A_i = (r_i − mean_g r) / (std_g r + eps)

    with std_g the sample (n − 1) standard deviation of the group, as in GRPO and TRL's GRPOTrainer. A group
    whose rewards are all equal gets A = 0: it carries no direction. The paper uses one rollout per problem
    and the running advantage instead; this serves as the control that users of TRL know.
    rewards (B,) with B a multiple of `group_size` ≥ 2 → A (B,), float32 or wider, detached."""
    _all_finite(rewards=_per_seq("rewards", rewards))
    if not (_is_int(group_size) and group_size >= 2):
        _fail("group_size", "an int ≥ 2 (rollouts per problem)", repr(group_size))
    if len(rewards) % group_size:
        _fail("rewards", f"a length that is a multiple of group_size = {group_size}", f"length {len(rewards)}")
    eps = _number("eps", eps, 0.0, math.inf, low_open=True)
    r = rewards.detach().to(_float_dtype(rewards.dtype)).reshape(-1, group_size)  # (problems, G)
    advantages = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    # Equal rewards whose mean rounds (0.1, or a float32 length-shaped reward) leave one ulp over a std of about
    # one ulp: a common sign of 1e-3 for the whole group. Such a group has no direction: exactly 0.
    equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return advantages.masked_fill(equal, 0.0).reshape(-1)


# ----------------------------------------------------------------------------------------------------
# Log-probs of the sampled tokens and the magnitude w (Eq. 2).


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log p(tokens) = log_softmax(logits)[..., tokens], in float32 (float64 for float64 input).

    logits (..., V), tokens (...) integer ids in [0, V). Differentiable w.r.t. `logits`. Computed in
    chunks of `chunk_size` rows, each row's largest logit subtracted first (as torch.log_softmax does: exact
    however large the logits); the backward recomputes each chunk, so no second full (..., V) float32 tensor
    is ever held (a shifted slice such as logits[:, :-1] is read where it lies, not copied). Entries of −inf
    (masked vocabulary) are allowed, a whole row of them is not.
    """
    _logits("logits", logits)
    ids = _token_ids(tokens, logits.shape[-1], logits.shape[:-1])
    return _TokenLogprobs.apply(_rows(logits), None, ids, _chunk_size(chunk_size), "logits").reshape(tokens.shape)


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """`token_logprobs(hidden @ weight.T, tokens)` without ever holding the (..., V) logits.

    hidden (..., D) final hidden states, weight (V, D) the LM-head weight (same dtype), tokens (...).
    Differentiable w.r.t. both hidden and weight; each chunk of `chunk_size` rows is recomputed in
    the backward, so peak extra memory is O(chunk_size × V) plus one float32 (V, D) gradient buffer.
    """
    _hidden_and_weight("hidden", hidden, "weight", weight)
    ids = _token_ids(tokens, weight.shape[0], hidden.shape[:-1])
    return _TokenLogprobs.apply(_rows(hidden), weight, ids, _chunk_size(chunk_size), "hidden").reshape(tokens.shape)


def ratio_magnitude(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, direction: torch.Tensor, mask: torch.Tensor, eps: float = 0.2
) -> torch.Tensor:
    """Magnitude w (Eq. 2): w = clip(exp(D_i · δ_{i,t}), 1 − ε, 1 + ε), δ = log p_T − log p_S, (B, T).

    teacher_logp, student_logp (B, T) log-probs of the sampled tokens; direction (B,) = sign(A_i) in
    {−1, 0, +1}. The teacher agreeing more than the student (δ > 0) raises the weight of a rewarded
    rollout and lowers it for a penalised one. D = 0 or δ = 0 gives w = 1. 0 off the mask; detached.
    """
    _per_token("teacher_logp", teacher_logp)
    _per_token("student_logp", student_logp, teacher_logp.shape)
    _per_seq("direction", direction, batch=teacher_logp.shape[0])
    _all_finite(teacher_logp=teacher_logp, student_logp=student_logp, direction=direction)
    if not bool(((direction == -1) | (direction == 0) | (direction == 1)).all()):
        _fail("direction", "values in {-1, 0, +1} (the sign of the advantage)", f"{direction.tolist()}")
    mask = _mask(mask, teacher_logp.shape)
    check_settings(eps=eps)
    dtype = _float_dtype(torch.promote_types(teacher_logp.dtype, student_logp.dtype))
    delta = teacher_logp.detach().to(dtype) - student_logp.detach().to(dtype)
    w = torch.exp(direction.detach().to(dtype)[:, None] * delta).clamp(1.0 - eps, 1.0 + eps)
    return w.masked_fill(~mask, 0.0)


# ----------------------------------------------------------------------------------------------------
# The teacher's entropy (Eq. 4).


def token_entropy(logits: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dim (Eq. 4): H = −Σ_v p_v log p_v.

    logits (..., V) → (...) in float32 (float64 for float64 input), computed in chunks of
    `chunk_size` rows (extra memory O(chunk_size × V)). No gradient: it scores the frozen teacher.
    Vocabulary entries at −inf have p = 0 and contribute 0.
    """
    _logits("logits", logits)
    return _entropy(_rows(logits), None, _chunk_size(chunk_size), "logits").reshape(logits.shape[:-1])


def linear_token_entropy(hidden: torch.Tensor, weight: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """`token_entropy(hidden @ weight.T)` without ever holding the (..., V) logits; no gradient."""
    _hidden_and_weight("hidden", hidden, "weight", weight)
    return _entropy(_rows(hidden), weight, _chunk_size(chunk_size), "hidden").reshape(hidden.shape[:-1])


def linear_token_logprobs_and_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`linear_token_logprobs`, `linear_token_entropy`) of the same rows in ONE pass over the logits,
    each chunk computed once: what the frozen teacher needs (δ of Eq. 2, H of Eq. 4). No gradient."""
    _hidden_and_weight("hidden", hidden, "weight", weight)
    ids = _token_ids(tokens, weight.shape[0], hidden.shape[:-1])
    logp, entropy = _logprobs_and_entropy(_rows(hidden), weight, ids, _chunk_size(chunk_size), "hidden")
    return logp.reshape(tokens.shape), entropy.reshape(tokens.shape)


# ----------------------------------------------------------------------------------------------------
# The confidence gate ω (Eq. 5, 6) and its causal lookahead (Eq. 8).


def normalised_entropy(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    window: int = 0,
    *,
    min_denominator: float = 1.0,
    denominator: str = "raw",
    group: int | None = None,
) -> torch.Tensor:
    """Ĥ of Eq. 5 (window = 0) or Eq. 8 (window > 0), (B, T), 0 off the mask:

        Ĥ_{i,t} = H'_{i,t} / max(max over valid (j, k) of the group of row i of D_{j,k}, min_denominator),

    H' = lookahead_min(entropy, mask, window) (H' = H for window = 0), and D is
      - "raw":      the raw entropies H, as Eq. 8 of the paper is written (default);
      - "filtered": the lookahead minima H', as the paper's Algorithm 1 computes it (it overwrites H
                    with the windowed minimum before normalising). The two agree for window = 0.
    One denominator per group of rows (not per token, not log|V|), floored at `min_denominator` nats so
    that a group of confident tokens is not blown up. `group` rows share it: rows [0, g), [g, 2g), ... (the
    last group may be shorter); None, the default, is the whole batch. The paper's "minibatch" is an
    open choice: one normaliser over the 32 rollouts of a step (the default) or per GPU, 4 of them on each
    of its 8 GPUs (group=4), which normalises by a smaller maximum and so gates more strongly.
    """
    _check_entropy(entropy, mask)
    check_settings(min_denominator=min_denominator, denominator=denominator, group=group)
    numerator = lookahead_min(entropy, mask, window)  # H' (H itself for window = 0), 0 off the mask
    source = numerator if denominator == "filtered" else entropy.detach().to(numerator.dtype).masked_fill(~mask, 0.0)
    # the largest valid value of each row (0 for a row without one: below the floor min_denominator > 0) ...
    row_max = torch.nn.functional.pad(source, (0, 1)).amax(dim=1)  # (B,)
    # ... and of each group of rows, which is every row's normaliser
    size = group or max(len(row_max), 1)  # rows per normaliser
    group_max = torch.empty_like(row_max)
    for start in range(0, len(row_max), size):
        group_max[start : start + size] = row_max[start : start + size].max()
    return numerator / group_max.clamp(min=min_denominator)[:, None]


def entropy_gate(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.3,
    window: int = 0,
    floor: float = 0.1,
    min_denominator: float = 1.0,
    denominator: str = "raw",
    *,
    group: int | None = None,
) -> torch.Tensor:
    """Confidence gate ω (Eq. 5, 6; Eq. 8 for window > 0): ω = clip(1 − γ · Ĥ, floor, 1), (B, T).

    Ĥ = normalised_entropy(entropy, mask, window, ...): the teacher entropy (its minimum over [t, t + W]
    for CL-EGRSD) over the largest of the batch (or of the row's `group`), floored at `min_denominator`
    nats. Since Ĥ ≤ 1 (raw denominator), every valid token keeps a weight ≥ max(floor, 1 − γ), nonzero
    unless floor = 0 and γ ≥ 1; ω = 1 where H' = 0 and everywhere when γ = 0; 0 off the mask.
    """
    check_settings(gamma=gamma, floor=floor)
    h_hat = normalised_entropy(entropy, mask, window, min_denominator=min_denominator, denominator=denominator, group=group)
    return torch.clamp(1.0 - gamma * h_hat, min=floor, max=1.0).masked_fill(~mask, 0.0)


def lookahead_min(entropy: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Causal lookahead (Eq. 8): for valid t, min of entropy[b, j] over valid j in [t, t + window].

    entropy (B, T), mask (B, T) bool, window W ≥ 0 (W = 0 returns the entropy itself). Positions
    outside the mask are skipped inside the window and are 0 in the output. Always ≤ entropy on
    valid positions, so the CL gate is never below the plain gate (with the raw denominator).
    """
    _check_entropy(entropy, mask)
    check_settings(window=window)
    h = entropy.detach().to(_float_dtype(entropy.dtype))
    h = h.masked_fill(~mask, math.inf)  # invalid positions never win the min
    padded = torch.nn.functional.pad(h, (0, window), value=math.inf)  # (B, T + W)
    mins = h
    for k in range(1, window + 1):  # W shifted minima: mins[:, t] = min_{0 ≤ k ≤ W} h[:, t + k]
        mins = torch.minimum(mins, padded[:, k : k + h.shape[1]])
    return mins.masked_fill(~mask, 0.0)


# ----------------------------------------------------------------------------------------------------
# The token advantage Â (Eq. 7) and the losses.


def token_advantages(
    advantages: torch.Tensor,
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    teacher_entropy: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.3,
    window: int = 0,
    eps: float = 0.2,
    floor: float = 0.1,
    min_denominator: float = 1.0,
    denominator: str = "raw",
    *,
    group: int | None = None,
) -> torch.Tensor:
    """Token advantage (Eq. 7): Â_{i,t} = A_i · w_{i,t} · ω_{i,t}, (B, T), detached, 0 off the mask.

    advantages (B,) sequence advantages A_i; teacher_logp, student_logp, teacher_entropy (B, T).
    w is `ratio_magnitude` with direction sign(A_i), ω is `entropy_gate`. γ = 0 gives RLSD, window > 0
    gives CL-EGRSD. Â has the sign of A_i and |Â| ≤ |A_i| · (1 + ε).
    """
    _per_token("teacher_logp", teacher_logp)
    _per_token("student_logp", student_logp, teacher_logp.shape)
    _per_token("teacher_entropy", teacher_entropy, teacher_logp.shape)
    _per_seq("advantages", advantages, batch=teacher_logp.shape[0])
    _all_finite(teacher_logp=teacher_logp, student_logp=student_logp, teacher_entropy=teacher_entropy, advantages=advantages)
    mask = _mask(mask, teacher_logp.shape)
    adv = advantages.detach()
    w = ratio_magnitude(teacher_logp, student_logp, torch.sign(adv), mask, eps=eps)  # Eq. 2
    omega = entropy_gate(teacher_entropy, mask, gamma=gamma, window=window, floor=floor, min_denominator=min_denominator,
                         denominator=denominator, group=group)  # Eq. 6 (8)
    dtype = torch.promote_types(w.dtype, _float_dtype(adv.dtype))
    return (adv.to(dtype)[:, None] * w.to(dtype) * omega.to(dtype)).masked_fill(~mask, 0.0)


def policy_loss(student_logp: torch.Tensor, token_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L = −(1 / Σ m) · Σ_{i,t} m_{i,t} · Â_{i,t} · log p_θ(y_{i,t}) (Eq. 7 with the token mean).

    student_logp (B, T) with gradient; token_advantages (B, T) constants (detached here);
    mask (B, T) bool. Gradient w.r.t. student_logp is exactly −m · Â / Σ m. An empty mask gives
    exactly 0.0, still differentiable, with zero gradient.
    """
    _per_token("student_logp", student_logp)
    _per_token("token_advantages", token_advantages, student_logp.shape)
    _all_finite(student_logp=student_logp.detach(), token_advantages=token_advantages)
    mask = _mask(mask, student_logp.shape)
    dtype = _float_dtype(torch.promote_types(student_logp.dtype, token_advantages.dtype))
    weights = torch.where(mask, token_advantages.detach().to(dtype), 0.0)
    count = mask.sum().clamp(min=1).to(dtype)
    return (-weights * student_logp.to(dtype)).sum() / count


def opsd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """OPSD (Eq. 1): token mean over `mask` of KL(p_T ‖ p_θ) over the full vocabulary.

    student_logits, teacher_logits (B, T, V); mask (B, T) bool. Returns a float32 scalar,
    differentiable w.r.t. `student_logits` only (the teacher is frozen). Only masked rows are read,
    `chunk_size` rows at a time; the backward recomputes each chunk. Exactly 0.0 (zero gradient) when
    the mask is empty. Rows off the mask are checked for NaN only (their ±inf is never read).
    """
    _logits("student_logits", student_logits)
    _logits("teacher_logits", teacher_logits)
    if student_logits.dim() != 3:
        _fail("student_logits", "shape (B, T, V)", f"shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        _fail("teacher_logits", f"shape {tuple(student_logits.shape)} like student_logits (same vocab)",
              f"shape {tuple(teacher_logits.shape)}")
    rows = _mask(mask, student_logits.shape[:2]).reshape(-1).nonzero().squeeze(-1)
    chunk_size = _chunk_size(chunk_size)
    _no_nan("student_logits", student_logits.detach(), chunk_size)
    _no_nan("teacher_logits", teacher_logits.detach(), chunk_size)
    return _MeanKL.apply(student_logits, None, teacher_logits.detach(), None, rows, chunk_size)


def linear_opsd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """`opsd_loss` over rows given as hidden states: mean over the N rows of KL(p_T ‖ p_θ), Eq. 1.

    student_hidden, teacher_hidden (N, D) (the completion positions only), student_weight,
    teacher_weight (V, D). Differentiable w.r.t. the student's hidden states and weight; the logits
    exist one chunk at a time. Exactly 0.0 when N = 0.
    """
    _hidden_and_weight("student_hidden", student_hidden, "student_weight", student_weight)
    _hidden_and_weight("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    if student_hidden.dim() != 2:
        _fail("student_hidden", "shape (N, D)", f"shape {tuple(student_hidden.shape)}")
    if teacher_hidden.shape != student_hidden.shape:
        _fail("teacher_hidden", f"shape {tuple(student_hidden.shape)}, the student's", f"{tuple(teacher_hidden.shape)}")
    if teacher_weight.shape != student_weight.shape:
        _fail("teacher_weight", f"shape {tuple(student_weight.shape)}, the student's (one vocabulary)",
              f"{tuple(teacher_weight.shape)}")
    rows = torch.arange(student_hidden.shape[0], device=student_hidden.device)
    return _MeanKL.apply(student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(),
                         rows, _chunk_size(chunk_size))


# ----------------------------------------------------------------------------------------------------
# The token regimes: which kind of token the gate down-weights (diagnostics, not part of the loss).

REGIMES = ("lock", "mid", "pivot", "fork")  # token_regimes codes 1, 2, 3, 4; 0 is off the mask


def token_regimes(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    window: int,
    *,
    tau_low: float = 0.2,
    tau_high: float = 0.5,
    min_denominator: float = 1.0,
    group: int | None = None,
) -> torch.Tensor:
    """The paper's token regimes, (B, T) int64 codes into REGIMES (1-based), 0 off the mask.

    With Ĥ = normalised_entropy(H, mask, 0) and Ĥ^CL = normalised_entropy(H, mask, window), both over the
    largest raw entropy of the batch (or of the row's `group`) floored at `min_denominator` (Eq. 5 and 8):
      lock  (1)  Ĥ ≤ τ_low                        the teacher is sure: the gate barely touches it;
      pivot (3)  Ĥ ≥ τ_high and Ĥ^CL ≤ τ_low      uncertainty that resolves within W tokens (CL restores it);
      fork  (4)  Ĥ ≥ τ_high and Ĥ^CL ≥ τ_high     uncertainty that persists (stays down-weighted);
      mid   (2)  every other valid token.
    Needs 0 ≤ τ_low < τ_high; then every valid token is in exactly one regime, and window = 0 has no pivots.
    """
    tau_low = _number("tau_low", tau_low, 0.0, math.inf)
    tau_high = _number("tau_high", tau_high, tau_low, math.inf, low_open=True)
    h_hat, h_cl = (normalised_entropy(entropy, mask, w, min_denominator=min_denominator, group=group) for w in (0, window))
    codes = torch.full(h_hat.shape, 2, dtype=torch.long, device=h_hat.device)  # mid
    high = h_hat >= tau_high
    codes[h_hat <= tau_low] = 1
    codes[high & (h_cl <= tau_low)] = 3
    codes[high & (h_cl >= tau_high)] = 4
    return codes.masked_fill(~mask, 0)


# ----------------------------------------------------------------------------------------------------
# The settings in one object, for a trainer: built once from its flags, handed to everything that weights
# tokens or reports on the gate.


@dataclass(frozen=True)
class Gates:
    """What the gate makes of one batch, computed once (`GateSettings.gates`): the trainer applies `plain`
    (EGRSD) or `lookahead` (CL-EGRSD), its metrics and token view read all four. Each (B, T), 0 off the mask."""

    plain: torch.Tensor  # ω with W = 0 (Eq. 6)
    lookahead: torch.Tensor  # ω with the settings' W (Eq. 8)
    normalised: torch.Tensor  # Ĥ^CL, the lookahead entropy over its normaliser (Eq. 8), with the settings' denominator
    regimes: torch.Tensor  # token_regimes codes at the settings' W


@dataclass(frozen=True)
class GateSettings:
    """The keyword settings of ratio_magnitude, entropy_gate, token_advantages and token_regimes, and W, in
    one object, checked against SETTINGS when it is made:

        settings = GateSettings(gamma=1.0, window=5, group=4)     # or GateSettings.from_flags(cfg)
        token_adv = settings.token_advantages(A, teacher_logp, student_logp, teacher_entropy, mask)
        gates = settings.gates(teacher_entropy, mask)              # ω at W = 0 and at W, Ĥ^CL, the regimes

    `window` is the configured W: a method without the lookahead (EGRSD) passes window=0 to `gate` and
    `token_advantages`, while `gates` and `regimes` report what the lookahead would do at W."""

    # in the order of the equations: w (Eq. 2), ω (Eq. 6), its normaliser (Eq. 5), the lookahead (Eq. 8)
    eps: float = 0.2
    gamma: float = 0.3
    floor: float = 0.1
    min_denominator: float = 1.0
    denominator: str = "raw"
    group: int | None = None
    window: int = 0

    def __post_init__(self):
        check_settings(**vars(self))

    @classmethod
    def from_flags(cls, flags) -> GateSettings:
        """From a trainer's flags (train_min's Config, the TRL config): the same names, and gate_group for
        `group`, 0 meaning the whole batch."""
        return cls(gamma=flags.gamma, window=flags.window, eps=flags.eps, floor=flags.floor,
                   min_denominator=flags.min_denominator, denominator=flags.denominator, group=flags.gate_group or None)

    @staticmethod
    def flag_rules(flags) -> list[tuple[str, bool, str]]:
        """(flag, allowed, what is expected) for each flag `from_flags` reads, from SETTINGS: a trainer's
        check of its flags, before it stops with its own words."""
        names = ("gamma", "window", "eps", "floor", "min_denominator", "denominator")
        rules = [(name, SETTINGS[name].allowed(getattr(flags, name)), SETTINGS[name].expected) for name in names]
        return rules + [("gate_group", SETTINGS["group"].allowed(flags.gate_group or None), "≥ 0 (0: the whole batch)")]

    @property
    def normaliser(self) -> dict:
        """The keyword settings of normalised_entropy (Eq. 5)."""
        return dict(min_denominator=self.min_denominator, denominator=self.denominator, group=self.group)

    def magnitude(self, teacher_logp, student_logp, direction, mask) -> torch.Tensor:
        """w (Eq. 2): `ratio_magnitude` with ε."""
        return ratio_magnitude(teacher_logp, student_logp, direction, mask, eps=self.eps)

    def gate(self, entropy, mask, *, window: int | None = None) -> torch.Tensor:
        """ω (Eq. 6, 8): `entropy_gate` at `window` (None: the settings' W)."""
        window = self.window if window is None else window
        return entropy_gate(entropy, mask, gamma=self.gamma, window=window, floor=self.floor, **self.normaliser)

    def token_advantages(self, advantages, teacher_logp, student_logp, teacher_entropy, mask, *,
                         window: int | None = None) -> torch.Tensor:
        """Â (Eq. 7): `token_advantages` at `window` (None: the settings' W)."""
        window = self.window if window is None else window
        return token_advantages(advantages, teacher_logp, student_logp, teacher_entropy, mask, gamma=self.gamma,
                                window=window, eps=self.eps, floor=self.floor, **self.normaliser)

    def regimes(self, entropy, mask, *, tau_low: float = 0.2, tau_high: float = 0.5) -> torch.Tensor:
        """`token_regimes` at the settings' W, with their normaliser."""
        return token_regimes(entropy, mask, self.window, tau_low=tau_low, tau_high=tau_high,
                             min_denominator=self.min_denominator, group=self.group)

    def gates(self, entropy, mask, *, tau_low: float = 0.2, tau_high: float = 0.5) -> Gates:
        """The gate of one batch at W = 0 and at W, Ĥ^CL and the regimes: computed once a step, then handed
        to whatever applies or reports them."""
        return Gates(plain=self.gate(entropy, mask, window=0), lookahead=self.gate(entropy, mask),
                     normalised=normalised_entropy(entropy, mask, self.window, **self.normaliser),
                     regimes=self.regimes(entropy, mask, tau_low=tau_low, tau_high=tau_high))


# ====================================================================================================
# Machinery below: a reader of the method can stop here.
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# Full-vocabulary kernels, chunked over rows.
#
# Each works on rows of logits given either as the logits themselves (`weight` None) or as hidden
# states x and an LM-head weight W (logits = x @ Wᵀ, never materialised for more than one chunk).
# Forward passes keep only each row's largest logit m and s = log Σ exp(z − m) (log p = (z − m) − s, exact
# whatever the logits' size); backward passes recompute each chunk, so the extra memory is O(chunk_size × V)
# whatever the number of rows.


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., V) with at least one leading dim; its rows are those of x.reshape(-1, V), in that order, but
    read where they lie (`_at`): reshaping a slice such as logits[:, :-1] would copy all of it."""
    return x if x.dim() > 1 else x[None]


def _row_count(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _at(x: torch.Tensor, idx: torch.Tensor) -> tuple:
    """The index of rows `idx` (row-major over x's leading dims): x[_at(x, idx)] is (len(idx), V)."""
    return (idx,) if x.dim() == 2 else torch.unravel_index(idx, x.shape[:-1])


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor | None, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `idx` of the logits, in `dtype`: those rows of x itself, or of x @ weightᵀ."""
    rows = x[_at(x, idx)]
    return (rows if weight is None else rows @ weight.T).to(dtype)


def _backprop_chunk(dz, x, weight, idx, grad_x, grad_w) -> None:
    """Accumulate d(loss)/d(logits rows) = dz into the gradients of x and weight."""
    dz = dz.to(x.dtype)
    if grad_x is not None:  # (the casts matter under autocast, which may run matmuls in lower precision)
        grad_x[_at(grad_x, idx)] = (dz if weight is None else dz @ weight).to(grad_x.dtype)
    if grad_w is not None:
        grad_w += (dz.T @ x[_at(x, idx)]).to(grad_w.dtype)


def _chunks(rows: torch.Tensor, chunk_size: int):
    return (rows[start : start + chunk_size] for start in range(0, rows.numel(), chunk_size))


def _row_chunks(x: torch.Tensor, chunk_size: int):
    """The indices of every row of x (..., V), `chunk_size` at a time."""
    return _chunks(torch.arange(_row_count(x), device=x.device), chunk_size)


def _save_autocast(ctx, x) -> None:
    """Remember the autocast state of the forward: the backward recomputes each chunk of logits, and
    must round it exactly as the forward did (bf16 logits under autocast), or the softmax it rebuilds
    from the forward's m and s no longer sums to 1."""
    ctx.device_type = x.device.type
    ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
    ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)


def _autocast_as_forward(ctx):
    return torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast)


def _grad_buffers(ctx, x, weight, dtype):
    grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if weight is not None and ctx.needs_input_grad[1] else None
    return grad_x, grad_w


def _subtract_row_max_(z: torch.Tensor) -> torch.Tensor:
    """z (chunk, V) ← z − m in place, m the (chunk,) largest logit of each row, returned. The kernels then take
    log p = (z − m) − s with s = log Σ_v exp(z_v − m) ∈ [0, log V], as torch.log_softmax does: exact to a few
    ulps of log p however large the logits, where z − logsumexp(z) in one subtraction errs by an ulp of |z|
    (1e-3 nats at 1e4). A row whose max is not finite (all −inf, or ±inf/NaN in it) gets m = 0, so that m + s
    is still its log-sum-exp, −inf, +inf or NaN, for `_check_lse`."""
    m = z.amax(dim=-1)
    m = torch.where(torch.isfinite(m), m, 0.0)
    z.sub_(m[:, None])
    return m


def _entropy_of_chunk_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m, s and H = −Σ p log p of each row of z (chunk, V), with z ← max(z − m, the most negative finite number)
    in place: its −inf entries become finite, so that they add e · (z − m) = 0 · finite = 0, not 0 · (−inf) = NaN.
    With e = exp(z − m) and S = Σ e: H = s − Σ e · (z − m) / S, two non-negative terms (no cancellation).
    Two (chunk × V) tensors at most: z and e."""
    m = _subtract_row_max_(z)
    z.clamp_(min=torch.finfo(z.dtype).min)
    e = torch.exp(z)
    total = e.sum(-1)
    s = total.log()
    return m, s, s - e.mul_(z).sum(-1) / total


def _logprob_of_chunk_(z: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m, s and log p(tokens) = (z − m)[token] − s of each row of z (chunk, V), which it overwrites: the one
    (chunk × V) tensor."""
    m = _subtract_row_max_(z)
    picked = z.gather(-1, tokens[:, None]).squeeze(-1)
    s = z.exp_().sum(-1).log_()
    return m, s, picked - s


def _kl_of_chunk_(z_s: torch.Tensor, z_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """m_s, s_s, m_t, s_t and KL(p_T ‖ p_S) of each row of the student's and teacher's z (chunk, V), which it
    overwrites with their log-probs (z − m) − s: three (chunk × V) tensors at most (z_s, z_t and p_T)."""
    m_s, m_t = _subtract_row_max_(z_s), _subtract_row_max_(z_t)
    s_s, s_t = torch.exp(z_s).sum(-1).log_(), torch.exp(z_t).sum(-1).log_()
    logp_s, logp_t = z_s.sub_(s_s[:, None]), z_t.sub_(s_t[:, None])
    p_t = logp_t.exp()
    # p_T · (log p_T − log p_S), in place in logp_s; 0 where p_T = 0, whatever log p_S is (not 0 · ∞ = NaN)
    return m_s, s_s, m_t, s_t, logp_s.sub_(logp_t).mul_(p_t).neg_().masked_fill_(p_t == 0, 0.0).sum(-1)


def _softmax_(z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, scale) -> torch.Tensor:
    """scale · softmax(z) of rows z (chunk, V) whose m and s the forward saved, in z: exp(z − m) · scale / exp(s)."""
    return z.sub_(m[:, None]).exp_().mul_(scale * torch.exp(-s[:, None]))


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[token] per row; backward: d/dz = g · (onehot(token) − softmax(z))."""

    @staticmethod
    def forward(ctx, x, weight, tokens, chunk_size, name):
        dtype = _float_dtype(x.dtype)
        m = torch.empty(_row_count(x), dtype=dtype, device=x.device)
        s, logp = torch.empty_like(m), torch.empty_like(m)
        for idx in _row_chunks(x, chunk_size):
            m[idx], s[idx], logp[idx] = _logprob_of_chunk_(_chunk_logits(x, weight, idx, dtype), tokens[idx])
        _check_lse(name, m + s)
        ctx.save_for_backward(x, weight, tokens, m, s)
        ctx.chunk_size = chunk_size
        _save_autocast(ctx, x)
        return logp

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, tokens, m, s = ctx.saved_tensors
        grad_x, grad_w = _grad_buffers(ctx, x, weight, m.dtype)
        for idx in _row_chunks(x, ctx.chunk_size):
            g = grad_out[idx, None].to(m.dtype)
            with _autocast_as_forward(ctx):  # g · (onehot(token) − softmax(z)), in the recomputed chunk, named by no
                # variable: it is gone before the next chunk is made
                _backprop_chunk(_softmax_(_chunk_logits(x, weight, idx, m.dtype), m[idx], s[idx], -g)
                                .scatter_add_(-1, tokens[idx, None], g), x, weight, idx, grad_x, grad_w)
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


class _MeanKL(torch.autograd.Function):
    """Mean over `rows` of KL(p_T ‖ p_S); backward: d KL / d z_S = softmax(z_S) − p_T. The teacher is a
    constant (no gradient)."""

    @staticmethod
    def forward(ctx, x_s, w_s, x_t, w_t, rows, chunk_size):
        dtype = _float_dtype(x_s.dtype)
        m_s = torch.empty(rows.numel(), dtype=dtype, device=x_s.device)
        s_s, m_t, s_t, kl = (torch.empty_like(m_s) for _ in range(4))
        for start, idx in zip(range(0, rows.numel(), chunk_size), _chunks(rows, chunk_size)):
            sl = slice(start, start + idx.numel())
            m_s[sl], s_s[sl], m_t[sl], s_t[sl], kl[sl] = _kl_of_chunk_(_chunk_logits(x_s, w_s, idx, dtype),
                                                                      _chunk_logits(x_t, w_t, idx, dtype))
        _check_lse("student_logits" if w_s is None else "student_hidden", m_s + s_s)
        _check_lse("teacher_logits" if w_t is None else "teacher_hidden", m_t + s_t)
        ctx.save_for_backward(x_s, w_s, x_t, w_t, rows, m_s, s_s, m_t, s_t)
        ctx.chunk_size = chunk_size
        _save_autocast(ctx, x_s)
        return kl.sum() / max(rows.numel(), 1)

    @staticmethod
    def backward(ctx, grad_out):
        x_s, w_s, x_t, w_t, rows, m_s, s_s, m_t, s_t = ctx.saved_tensors
        grad_x, grad_w = _grad_buffers(ctx, x_s, w_s, m_s.dtype)
        scale = grad_out.to(m_s.dtype) / max(rows.numel(), 1)
        for start, idx in zip(range(0, rows.numel(), ctx.chunk_size), _chunks(rows, ctx.chunk_size)):
            sl = slice(start, start + idx.numel())
            with _autocast_as_forward(ctx):  # scale · (softmax(z_S) − p_T), in the recomputed chunks (as above)
                _backprop_chunk(_softmax_(_chunk_logits(x_s, w_s, idx, m_s.dtype), m_s[sl], s_s[sl], scale)
                                .sub_(_softmax_(_chunk_logits(x_t, w_t, idx, m_t.dtype), m_t[sl], s_t[sl], scale)),
                                x_s, w_s, idx, grad_x, grad_w)
        return grad_x, None if grad_w is None else grad_w.to(w_s.dtype), None, None, None, None


@torch.no_grad()
def _entropy(x: torch.Tensor, weight: torch.Tensor | None, chunk_size: int, name: str) -> torch.Tensor:
    dtype = _float_dtype(x.dtype)
    out = torch.empty(_row_count(x), dtype=dtype, device=x.device)
    for idx in _row_chunks(x, chunk_size):
        m, s, out[idx] = _entropy_of_chunk_(_chunk_logits(x, weight, idx, dtype))
        _check_lse(name, m + s)
    return out


@torch.no_grad()
def _logprobs_and_entropy(x, weight, tokens, chunk_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(tokens) and H of each row from one pass over its chunk of logits."""
    dtype = _float_dtype(x.dtype)
    logp = torch.empty(_row_count(x), dtype=dtype, device=x.device)
    entropy = torch.empty_like(logp)
    for idx in _row_chunks(x, chunk_size):
        z = _chunk_logits(x, weight, idx, dtype)
        m, s, entropy[idx] = _entropy_of_chunk_(z)  # z ← z − m (−inf entries clamped, as in _entropy)
        _check_lse(name, m + s)
        logp[idx] = z.gather(-1, tokens[idx, None]).squeeze(-1) - s
    return logp, entropy


# ----------------------------------------------------------------------------------------------------
# Input checks: one small set of helpers, used once at the top of every public function.


def _fail(name: str, expected: str, got: str) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _tensor(name: str, x, dims: int | None = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        _fail(name, "a torch.Tensor", type(x).__name__)
    if dims is not None and x.dim() != dims:
        _fail(name, f"a {dims}-D tensor", f"shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        _fail(name, "a floating-point tensor", f"dtype {x.dtype}")
    return x


def _finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Reject NaN and ±inf (entropies, log-probs, advantages, rewards)."""
    if not bool(torch.isfinite(x).all()):
        what = "NaN" if bool(torch.isnan(x).any()) else "±inf"
        _fail(name, "finite values", f"{what} in it")
    return x


def _all_finite(**named: torch.Tensor) -> None:
    """Reject NaN and ±inf in several floating tensors with one read back to the host (a sync on GPU)."""
    names = [n for n, x in named.items() if x.is_floating_point()]
    if names and not all(torch.stack([torch.isfinite(named[n]).all() for n in names]).tolist()):
        for n in names:
            _finite(n, named[n])


def _per_token(name: str, x, shape: torch.Size | None = None) -> torch.Tensor:
    """A (B, T) floating tensor (of `shape`); the caller checks it is finite (`_all_finite`)."""
    _tensor(name, x, dims=2)
    if shape is not None and x.shape != shape:
        _fail(name, f"shape {tuple(shape)} (B, T) like its partners", f"shape {tuple(x.shape)}")
    return x


def _per_seq(name: str, x, batch: int | None = None, floating: bool = True, bool_: bool = False) -> torch.Tensor:
    """A (B,) tensor (of length `batch`, bool if `bool_`); the caller checks it is finite (`_all_finite`)."""
    _tensor(name, x, dims=1, floating=floating)
    if bool_ and x.dtype != torch.bool:
        _fail(name, "a bool tensor", f"dtype {x.dtype}")
    if batch is not None and x.shape[0] != batch:
        _fail(name, f"shape ({batch},) (B,) matching the per-token tensors", f"shape {tuple(x.shape)}")
    return x


def _mask(mask, shape: torch.Size) -> torch.Tensor:
    _tensor("mask", mask, dims=2, floating=False)
    if mask.dtype != torch.bool:
        _fail("mask", "a bool tensor", f"dtype {mask.dtype}")
    if mask.shape != shape:
        _fail("mask", f"shape {tuple(shape)} like the per-token tensors", f"shape {tuple(mask.shape)}")
    return mask


def _is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _number(name: str, x, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """A finite number between low and high (a setting outside the table SETTINGS)."""
    if not (_is_number(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        _fail(name, f"a number in {interval}", repr(x))
    return float(x)


def _check_entropy(entropy, mask) -> None:
    _per_token("entropy", entropy)
    _all_finite(entropy=entropy)
    _mask(mask, entropy.shape)


def _chunk_size(chunk_size) -> int:
    if not (_is_int(chunk_size) and chunk_size >= 1):
        _fail("chunk_size", "a positive int", repr(chunk_size))
    return int(chunk_size)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the input already is."""
    return torch.promote_types(dtype, torch.float32)


def _logits(name: str, logits) -> torch.Tensor:
    _tensor(name, logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        _fail(name, "a tensor of shape (..., V) with V ≥ 1", f"shape {tuple(logits.shape)}")
    return logits


def _check_lse(name: str, lse: torch.Tensor) -> None:
    """Validate logits through their log-sum-exp (O(rows), no (rows × V) temporaries):
    NaN in a row makes it NaN, +inf makes it +inf, and a whole row of -inf makes it -inf."""
    if not bool(torch.isfinite(lse).all()):
        if bool(torch.isnan(lse).any()):
            _fail(name, "no NaN", "NaN in it")
        if bool((lse == math.inf).any()):
            _fail(name, "no +inf", "+inf in it")
        _fail(name, "at least one finite logit per row", "a row that is all -inf")


def _token_ids(tokens, vocab: int, shape: torch.Size) -> torch.Tensor:
    _tensor("tokens", tokens, floating=False)
    if tokens.dtype == torch.bool or tokens.is_complex() or tokens.is_floating_point():
        _fail("tokens", "an integer tensor", f"dtype {tokens.dtype}")
    if tokens.shape != shape:
        _fail("tokens", f"shape {tuple(shape)} (the leading dims of its partner)", f"shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        _fail("tokens", f"ids in [0, {vocab})", f"ids in [{int(tokens.min())}, {int(tokens.max())}]")
    return tokens.reshape(-1).long()


def _no_nan(name: str, x: torch.Tensor, chunk_size: int) -> None:
    """NaN anywhere in x (..., V), also in rows that are not read, checked `chunk_size` rows at a time."""
    for idx in _row_chunks(x, chunk_size):
        if bool(torch.isnan(x[_at(x, idx)]).any()):
            _fail(name, "no NaN", "NaN in it")


def _hidden_and_weight(hidden_name: str, hidden, weight_name: str, weight) -> None:
    _tensor(hidden_name, hidden)
    _tensor(weight_name, weight, dims=2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1] or weight.shape[0] == 0:
        _fail(hidden_name, f"shape (..., {weight.shape[1]}) to match {weight_name} (V, D)", f"shape {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        _fail(weight_name, f"dtype {hidden.dtype} like {hidden_name}", f"dtype {weight.dtype}")
