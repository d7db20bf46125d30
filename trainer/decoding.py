"""Fast rollouts for train_min.py: a static KV cache, top-k before top-p sampling, no host sync per token,
and on CUDA the whole decode step (forward, sampling, bookkeeping) replayed as one CUDA graph.

    completion = decoding.generate(model, prompt_ids, prompt_mask, max_new_tokens=1024, eos_id=..., pad_id=...,
                                   temperature=1.1, top_k=20, top_p=0.95)
    baseline = decoding.hf_generate(...the same arguments..., static=False)   # HF `generate`, for comparison

Returns what HF `model.generate` returns after the prompt columns, sampled from the same distribution
(temperature, then top-k, then top-p); greedy decoding gives HF's tokens (tested in float32 on CPU; in
bf16 other attention kernels may break a near tie differently, which bench_egrsd.py counts). Faster than
HF `generate` because of:
- a static cache, so no per-step concatenation of the KV tensors;
- top-p on the top-k candidates only (HF sorts the whole 151,936-token vocabulary every step), and no
  float32 copy of the full logits;
- sampling by the exponential race (argmax of p / E, E ~ Exp(1)), which needs no host sync;
- the stop test (every row has produced EOS) reads the GPU only every `check_every` steps;
- grouped-query attention of the one new token without copying the cache once per query-head group;
- on CUDA one graph per decode step: the ~500 kernel launches of a 24-layer step become one replay;
- optionally (`compile_step=True`) the decode step's model forward compiled by torch.compile, which fuses
  the norms, rotary embeddings, activations and residual adds into fewer kernels (inside the graph on CUDA).
The model is driven through its own forward (a static cache of full-attention layers, explicit positions,
a ready-made 4D attention mask: boolean for sdpa, additive for eager, and `logits_to_keep` for the logits
of the last position only). Importing this module registers one attention function with HF (`decode_sdpa`);
a decode step switches the model's attention implementation to it and back.

Supported, each tested against HF `generate` (transformers 5.17 and 5.24): Llama, Mistral, Qwen2 and Qwen3
causal LMs, or a PEFT wrapper of one, with sdpa or eager attention and every layer full attention; a
Mistral sliding window that covers prompt + new tokens is full attention. Any other model (another family,
sliding-window or other layer types, a shorter window, another attention implementation, a forward without
the arguments above: `unsupported` says which) is decoded by `hf_generate` (HF `generate`, dynamic cache)
instead, with one warning per model naming its type and the reason: the same tokens greedily, the same
distribution sampled, only slower. Bad arguments raise for every model.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
import weakref

import torch
from transformers import AttentionInterface

from trainer import run_io

TIE_MARGIN = 32  # extra candidates taken so that logits tied with the k-th one are kept, as HF keeps them
COMPILE_BACKEND = "inductor"  # of compile_step (the CPU tests use "eager", dynamo's trace alone: inductor's C++ build takes ~30 s)
no_graphs: weakref.WeakSet = weakref.WeakSet()  # models whose capture failed: graph=None stops trying them


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k: expected ≥ 0 (0 = the whole vocabulary), got {top_k}")


def candidates(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution of HF's warpers (temperature → top-k → top-p) on a few candidates.

    logits (B, V) in any float dtype → probs (B, C) float32 or wider, summing to 1, largest first, and ids
    (B, C) their token ids; C = k + TIE_MARGIN (or V). top_k = 0 means the whole vocabulary; top_p = 1 means
    no nucleus cut (top_k = 0 sorts the whole vocabulary every step: slow, like HF's top-p). As in HF:
    tokens tied with the k-th largest logit stay candidates (common with bf16 logits; up to TIE_MARGIN of
    them, where HF keeps all), and a candidate is kept when the probability of the candidates ranked above
    it is below top_p (HF drops a token when the ascending cumulative probability up to and including it is
    ≤ 1 - top_p: the same set). Only the C candidates are ever cast or divided, never the (B, V) logits.
    """
    check_sampling(temperature, top_k, top_p)
    vocab = logits.shape[-1]
    k = vocab if top_k == 0 else min(top_k, vocab)
    values, ids = torch.topk(logits, min(k + TIE_MARGIN, vocab), dim=-1)  # sorted, largest first
    values = values.to(torch.promote_types(values.dtype, torch.float32)) / temperature  # as HF: float32, then T
    if k < values.shape[-1]:
        values = values.masked_fill(values < values[:, k - 1 : k], -math.inf)  # below the k-th: out
    probs = values.softmax(dim=-1)
    if top_p < 1:  # (at top_p = 1 a float cumsum that reaches 1 early would wrongly cut the tail)
        above = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(above >= top_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, ids


def sample(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One token per row with probability `probs` (B, k): argmax of p / E with E ~ Exp(1), no host sync."""
    race = probs / torch.empty_like(probs).exponential_().clamp_min_(1e-20)
    return ids.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)


def next_tokens(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits → (B,) token ids: argmax when greedy (the first of tied maxima, as HF), else a sample
    of `candidates`."""
    if greedy:
        return logits.argmax(dim=-1)
    return sample(*candidates(logits, temperature, top_k, top_p))


@contextlib.contextmanager
def _evaluating(model):
    """The model in eval mode inside the block, in its own mode again after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


DECODE_ATTENTION = "egrsd_decode_sdpa"


def decode_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """sdpa of ONE query token against a grouped-query cache, registered as an HF attention function.

    query (B, H, 1, D), key and value (B, H_kv, L, D), attention_mask (B, 1, 1, L) boolean or None. The
    H / H_kv query heads that share a key/value head become that many query rows, so the cache is read as
    it is (transformers 5.17's sdpa path copies it H / H_kv times, per layer and step, with a mask).
    Returns (B, 1, H, D) and no weights, as every HF attention function."""
    batch, heads, length, dim = query.shape
    if length != 1:
        raise ValueError(f"query: expected one token (B, H, 1, D), got {tuple(query.shape)}")
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_sdpa)


@contextlib.contextmanager
def _attention(config, implementation: str | None):
    """The model's attention implementation set to `implementation` inside the block (None: unchanged)."""
    if implementation is None:
        yield
        return
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def _cache_kwarg(model) -> str | None:
    """The forward's cache argument: `past_key_values` in transformers 5.17, `cache` in 5.24; None if neither."""
    parameters = _forward_parameters(model)
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _forward_parameters(model):
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper's model
    return inspect.signature(core.forward).parameters


# The families tested against HF generate (tests/test_decoding.py). Each one's model turns a ready 4D
# attention mask into every layer's mask as it is (create_causal_mask, or Mistral's sliding-window variant,
# return a 4D mask unchanged), calls its attention function as decode_sdpa expects, and takes explicit
# position ids; another family may build its masks or positions otherwise, so it is not assumed to.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
FORWARD_ARGUMENTS = ("input_ids", "attention_mask", "position_ids", "use_cache", "logits_to_keep")
told: weakref.WeakSet = weakref.WeakSet()  # models whose fallback to HF generate was announced


def unsupported(model, length: int) -> str | None:
    """Why the static decoder cannot decode `model` to `length` = prompt + new tokens, or None if it can."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"not one of the supported families ({', '.join(SUPPORTED_MODEL_TYPES)})"
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager"):
        return f"attention implementation {implementation!r} is not sdpa or eager"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # per-layer kinds (Qwen2, Qwen3); their sliding_window applies to sliding layers only
        others = sorted(set(layer_types) - {"full_attention"})
        if others:
            return f"layers of type {', '.join(others)}, not only full attention"
    else:  # one window for every layer (Mistral): full attention when it covers every earlier token
        window = getattr(config, "sliding_window", None)
        if window is not None and window < length:
            return f"sliding window {window} is shorter than prompt + new tokens ({length})"
    missing = [name for name in FORWARD_ARGUMENTS if name not in _forward_parameters(model)]
    if _cache_kwarg(model) is None:
        missing.append("cache or past_key_values")
    if missing:
        return f"its forward takes no {', '.join(missing)}"
    return None


class _Decoder:
    """All the state of one generate call in fixed tensors, so that `step` can be captured as a CUDA graph."""

    def __init__(self, model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, pick, compile_step=False):
        from transformers.cache_utils import Cache, StaticLayer

        self.model, self.pick, self.pad_id = model, pick, pad_id
        self.decode_forward = compiled_step_forward() if compile_step else _Decoder.step_forward
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.long, device=prompt_ids.device)
        batch, self.prompt_len = prompt_ids.shape
        self.length = self.prompt_len + max_new_tokens
        device = prompt_ids.device
        self.dtype = next(model.parameters()).dtype
        implementation = getattr(model.config, "_attn_implementation", None) or "eager"  # sdpa or eager: `unsupported`
        self.additive = implementation == "eager"  # eager adds the mask to the scores; sdpa takes a boolean one
        self.decode_attention = DECODE_ATTENTION if implementation == "sdpa" else None
        # Full-attention cache layers, built here: HF's StaticCache(config) gives a Mistral whose config has a
        # sliding window sliding layers, which count tokens in a Python int (a value that a CUDA graph would
        # freeze). `unsupported` admits only windows that cover the whole sequence: full attention.
        self.cache = Cache(layers=[StaticLayer(max_cache_len=self.length) for _ in range(model.config.num_hidden_layers)])
        self.cache_kwarg = _cache_kwarg(model)
        self.slots = torch.arange(self.length, device=device)
        # the fixed tensors that the step reads and writes in place
        self.visible = torch.zeros(batch, self.length, dtype=torch.bool, device=device)  # keys a query may see
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the token fed next
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # its position id
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # its cache slot
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)

    def _forward(self, ids, mask, positions, keep=1):
        # a 4D mask: every supported family uses it as it is, for every layer, without building its own
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=keep, **{self.cache_kwarg: self.cache}).logits[:, -1]  # (B, V), the model's dtype

    def is_eos(self, tokens):
        return (tokens[..., None] == self.eos_ids).any(-1)

    def step_forward(self, mask) -> torch.Tensor:
        """The decode step's forward: `tokens` at `positions`, the logits (B, V) of the next token."""
        return self._forward(self.tokens, mask, self.positions)

    def _mask(self, visible):
        if not self.additive:
            return visible
        return torch.zeros(visible.shape, dtype=self.dtype, device=visible.device).masked_fill(~visible, torch.finfo(self.dtype).min)

    def prefill_visible(self) -> torch.Tensor:
        """(B, P, length) bool: prompt query i sees the real prompt keys 0..i, and a padding query sees
        itself (a fully masked row is NaN in some attention kernels, and NaN spreads through 0 · NaN)."""
        p = self.prompt_len
        causal = self.slots[:p, None] >= self.slots[None, :]
        itself = self.slots[:p, None] == self.slots[None, :]
        return causal & self.visible[:, None, :] | itself

    def prefill(self, prompt_ids, prompt_mask) -> None:
        """Reset every state tensor in place, run the prompts, and sample the first completion token."""
        self.cache.reset()
        p, prompt = self.prompt_len, prompt_mask.bool()
        self.visible.zero_()
        self.visible[:, :p] = prompt
        mask = self._mask(self.prefill_visible())[:, None]  # (B, 1, P, length)
        positions = (prompt.long().cumsum(-1) - 1).clamp_min(0)  # left padding: the first real token is 0
        # The last position as an index tensor, not logits_to_keep=1: that slice of (B, P, D) is a strided view, and
        # torch's matmul of such a view with a weight that needs no gradient (the sampler's, the frozen base's)
        # expands the (V, D) LM head to (B, D, V) and copies it (4 s for 8 rows of Qwen2.5-0.5B on CPU); the index
        # gives the head a contiguous (B, 1, D).
        last = torch.tensor([p - 1], device=prompt_ids.device)
        first = self.pick(self._forward(prompt_ids, mask, positions, keep=last))
        self.out.fill_(self.pad_id)
        self.out[:, 0] = first
        self.finished.copy_(self.is_eos(first))
        self.tokens.copy_(first[:, None])
        self.positions.copy_(positions[:, -1:] + 1)
        self.slot.fill_(p)

    def step(self) -> None:
        """Feed `tokens` at `slot`, pick the next token, write it to `out`; no host sync (graph-safe)."""
        self.visible.index_fill_(1, self.slot, True)
        mask = self._mask(self.visible)[:, None, None, :]  # (B, 1, 1, length)
        with _attention(self.model.config, self.decode_attention):
            picked = self.pick(self.decode_forward(self, mask))
        picked = torch.where(self.finished, self.pad_id, picked)
        self.out.index_copy_(1, self.slot - self.prompt_len + 1, picked[:, None])
        self.finished |= self.is_eos(picked)
        self.tokens.copy_(picked[:, None])
        self.positions += 1
        self.slot += 1

    def capture(self) -> torch.cuda.CUDAGraph:
        """Record `step` as a CUDA graph, after one warm-up step on the same side stream (so that lazy
        allocations, such as a cuBLAS workspace, happen outside the capture). The warm-up moves the state
        on: `prefill` must follow. capture_begin/end rather than torch.cuda.graph, which empties the
        allocator's cache at every capture (here: every rollout batch)."""
        stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                self.step()
                graph.capture_begin()
                try:
                    self.step()
                except BaseException:
                    with contextlib.suppress(RuntimeError):  # (an invalidated capture: the first error tells why)
                        graph.capture_end()
                    raise
                graph.capture_end()
        finally:
            torch.cuda.current_stream().wait_stream(stream)
        return graph


_compiled: dict = {}  # backend → the compiled step forward: one per process, so that its compilations are kept


def compiled_step_forward():
    """`_Decoder.step_forward` compiled (COMPILE_BACKEND, one graph, dynamic shapes from the start): one
    compilation serves every batch size above 1 and every prompt length of one model configuration; a batch of one
    row (dynamo specialises sizes 0 and 1), another class, layer count, dtype or attention implementation compiles
    again. Dynamo keeps `torch._dynamo.config.recompile_limit` (8) compilations of it a process; past that the
    step fails (FailOnRecompileLimitHit, in the compile_step error): a training run uses one or two."""
    if COMPILE_BACKEND not in _compiled:
        _compiled[COMPILE_BACKEND] = torch.compile(_Decoder.step_forward, backend=COMPILE_BACKEND, fullgraph=True, dynamic=True)
    return _compiled[COMPILE_BACKEND]


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
             eos_id: int | list[int], pad_id: int, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, graph: bool | None = None, check_every: int = 32, progress: str = "",
             compile_step: bool = False) -> torch.Tensor:
    """Complete left-padded prompts (B, P): returns the completions (B, T), T ≤ max_new_tokens, with `pad_id`
    after each row's EOS and T the longest row (up to its EOS), as HF `generate` returns after the prompt.

    eos_id: one token id or several; a row ends at the first of them.
    graph: replay each decode step as one CUDA graph: True (raise if capture fails), False, or None (the
    default: on CUDA; if capture fails for this model, warn once and decode it without graphs from then
    on, see `no_graphs`). Each call captures its own graph (milliseconds: one warm-up step, the capture
    and the prompts run again). Sampling uses torch's default generator of the device, so
    `torch.manual_seed` makes it reproducible.
    check_every: steps between two reads of "has every row finished?" (each read waits for the GPU).
    progress: a description to show the decode steps' progress under (`run_io.progress`); "" shows none.
    compile_step: compile the decode step's model forward with torch.compile (`compiled_step_forward`), then
    capture that in the graph as before. The first call of a process pays the compilation (tens of seconds);
    a compilation that fails raises, naming compile_step. Greedy tokens are the uncompiled step's in float32;
    in bf16 a fused kernel keeps float32 where the eager ops round each result to bf16, so near ties may break
    otherwise (bench_egrsd.py counts the equal rows).
    A model that `unsupported` rejects is decoded by `hf_generate` instead (one warning per model), where
    `graph`, `check_every` and `compile_step` do not apply.
    """
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids, prompt_mask: expected two (B, P) tensors, got {tuple(prompt_ids.shape)} "
                         f"and {tuple(prompt_mask.shape)}")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompt_mask: expected left padding (every row's last position a real token)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected ≥ 1, got {max_new_tokens}")
    if check_every < 1:
        raise ValueError(f"check_every: expected ≥ 1, got {check_every}")
    if graph and not prompt_ids.is_cuda:
        raise ValueError("graph: CUDA graphs need the prompts and model on a CUDA device")
    eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    if not eos_ids or not all(isinstance(i, int) for i in eos_ids):
        raise ValueError(f"eos_id: expected a token id or a non-empty list of them, got {eos_id!r}")
    if not greedy:
        check_sampling(temperature, top_k, top_p)
    reason = unsupported(model, prompt_ids.shape[1] + max_new_tokens)
    if reason is not None:
        if model not in told:
            told.add(model)
            model_type = getattr(model.config, "model_type", None) or type(model).__name__
            warnings.warn(f"decoding: {model_type} model, {reason}: decoding it with HF generate (dynamic cache) instead")
        return hf_generate(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, greedy=greedy,
                           temperature=temperature, top_k=top_k, top_p=top_p)
    use_graph = graph if graph is not None else prompt_ids.is_cuda and model not in no_graphs

    decoder = _Decoder(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id,
                       pick=lambda logits: next_tokens(logits, greedy, temperature, top_k, top_p), compile_step=compile_step)
    # graphs use the default generator of the current device: make the prompts' device the current one
    on_device = torch.cuda.device(prompt_ids.device) if prompt_ids.is_cuda else contextlib.nullcontext()
    with on_device, _evaluating(model):
        if compile_step and max_new_tokens > 1:  # compile (or find compiled) here, outside any graph capture, with
            # the generator's state put back after it: the sampled tokens are then the uncompiled step's
            with torch.random.fork_rng(devices=[prompt_ids.device] if prompt_ids.is_cuda else []):
                decoder.prefill(prompt_ids, prompt_mask)
                try:
                    decoder.step()
                except torch.OutOfMemoryError:  # the card's state, not the compiler's
                    raise
                except Exception as error:  # (dynamo's and inductor's errors: a missing C++ compiler or Triton, say)
                    raise RuntimeError(f"compile_step (train_min.py --compile-decode): torch.compile of the decode step "
                                       f"failed; decode without it ({type(error).__name__}: {error})") from error
        decoder.prefill(prompt_ids, prompt_mask)
        replay = decoder.step
        if use_graph and max_new_tokens > 1:
            try:
                replay = decoder.capture().replay
            except torch.OutOfMemoryError:  # (a RuntimeError too): not the model's fault, so not a reason to stop graphs
                raise
            except RuntimeError as error:  # a model or torch build whose step cannot be captured
                if graph:
                    raise
                no_graphs.add(model)
                warnings.warn(f"decoding: CUDA graph capture failed, decoding this model without graphs from now on ({error})")
            decoder.prefill(prompt_ids, prompt_mask)  # the warm-up moved the state on: start again
        steps = range(1, max_new_tokens)
        for step in run_io.progress(steps, progress, len(steps)) if progress else steps:
            if step % check_every == 0 and bool(decoder.finished.all()):
                break
            replay()
    out, finished = decoder.out, decoder.is_eos(decoder.out)
    # trim to the longest row, as HF does: a finished row ends at its EOS, an unfinished one at the last column
    ends = torch.where(finished.any(-1), finished.int().argmax(-1) + 1, out.shape[1])
    return out[:, : int(ends.max())].clone()


@torch.no_grad()
def hf_generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                eos_id: int | list[int], pad_id: int, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, static: bool = False) -> torch.Tensor:
    """The same call through HF `model.generate`, the baseline: a dynamic cache, or a static one (compiled
    on CUDA; it recompiles per shape, so the prompts are left-padded to a multiple of 64 tokens). Only what
    is set here and in the model's own generation config applies (train_min.py loads a clean one)."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                              cache_implementation="static" if static else None, **sampling)
    if static:
        extra = -prompt_ids.shape[1] % 64
        prompt_ids = torch.nn.functional.pad(prompt_ids, (extra, 0), value=pad_id)
        prompt_mask = torch.nn.functional.pad(prompt_mask, (extra, 0))
    with _evaluating(model):
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    return out[:, prompt_ids.shape[1]:]
