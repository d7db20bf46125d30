"""Models and tokenizers built in code, so tests and speed checks never touch the Hugging Face hub.

- `build_tiny_tokenizer()`: a byte-level BPE (512 tokens) trained in code on generated problems (once a process), with
  Qwen2.5's special tokens (`<|endoftext|>` pad, `<|im_end|>` end of turn) and a ChatML chat template.
- `build_tiny_model(tokenizer)`: a random 2-layer Qwen2 that generates fast on CPU.
- `build_random_model(name, tokenizer, dtype)`: Qwen2.5-0.5B's (`random-0.5b`) or Qwen3-4B's
  (`random-qwen3-4b`) exact architecture with random weights, for timing and memory runs only.
- `load_model_and_tokenizer(name, device, dtype)`: "tiny", "random-0.5b", "random-qwen3-4b", or a hub name
  / local folder; `load_tokenizer(name)` its tokenizer alone.
- `make_arithmetic_problems(n, seed)`: the tiny tokenizer's corpus, short generated word problems.
"""

import functools
import random
import warnings

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config)

from trainer.tasks import Problem, student_messages, teacher_messages

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TINY_VOCAB_SIZE = 512
# Qwen2's pre-tokenizer split. transformers 5 loads any folder whose config says "qwen2" with its
# Qwen2Tokenizer, which rebuilds NFC + this split + ByteLevel around the saved vocab: the tiny tokenizer
# uses the same pipeline so that it encodes the same after save_pretrained/from_pretrained.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# ChatML as Qwen2 writes it, without tools: a default system turn unless the chat opens with one (Qwen2's "You are a
# helpful assistant."; Qwen2.5's own template names Qwen in it). The fallback of a tokenizer without a template.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _render_chatml(messages: list[dict]) -> str:
    """A chat in the text form of CHATML_TEMPLATE (a training corpus for the tiny BPE)."""
    turns = [{"role": "system", "content": "You are a helpful assistant."}] + messages
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in turns)


def train_tiny_bpe() -> Tokenizer:
    """The tiny tokenizer's byte-level BPE, trained here (deterministic): Qwen2's pipeline around 512 tokens."""
    corpus = []
    for problem in make_arithmetic_problems(300, seed=0):
        corpus += [_render_chatml(student_messages(problem)), _render_chatml(teacher_messages(problem)),
                   problem.solution + "\nSo the answer is \\boxed{" + problem.answer + "}."]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer=trainer)
    return bpe


@functools.lru_cache(maxsize=1)
def _tiny_bpe_json() -> str:
    """train_tiny_bpe() serialised, trained once a process (it took 14% of a 3-step tiny run)."""
    return train_tiny_bpe().to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE in Qwen2's pipeline: ASCII text round-trips, encode adds no BOS/EOS. A new
    object each call (changing one changes no other)."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_bpe_json()), eos_token=IM_END, pad_token=PAD,
                                   additional_special_tokens=[IM_START], chat_template=CHATML_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def _special_token_ids(tokenizer) -> dict:
    """Qwen2's config ids: EOS = end of turn, pad = BOS = `<|endoftext|>` (Qwen2 never inserts a BOS)."""
    return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.pad_token_id}


def tiny_config(tokenizer) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
                       tie_word_embeddings=True, **_special_token_ids(tokenizer))


def build_tiny_model(tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """A random Qwen2 (hidden 64, 2 layers), the same for the same seed and dtype; the global RNG is untouched."""
    config = tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.update(**_special_token_ids(tokenizer))
    return model


def qwen25_05b_config(tokenizer) -> Qwen2Config:
    """Qwen2.5-0.5B's architecture (494M parameters), with the special-token ids of `tokenizer`."""
    return Qwen2Config(vocab_size=151_936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4_864, max_position_embeddings=32_768,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, use_sliding_window=False,
                       tie_word_embeddings=True, **_special_token_ids(tokenizer))


def qwen3_config(size: str, tokenizer) -> Qwen3Config:
    """Qwen3-4B's or Qwen3-8B's architecture (4.02B / 8.19B parameters), the paper's models."""
    width, mlp, tied = {"4b": (2560, 9_728, True), "8b": (4096, 12_288, False)}[size]
    return Qwen3Config(vocab_size=151_936, hidden_size=width, intermediate_size=mlp, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, **_special_token_ids(tokenizer))


RANDOM_SHAPES = {"random-0.5b": qwen25_05b_config, "random-qwen3-4b": functools.partial(qwen3_config, "4b")}


def build_random_model(name: str, tokenizer, dtype: torch.dtype, device="cpu"):
    """A model of RANDOM_SHAPES with random weights, built directly in `dtype` on `device`. FOR TIMING AND
    MEMORY ONLY: its vocabulary has 151,936 rows while the tiny tokenizer's ids are the first 512 of them."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(RANDOM_SHAPES[name](tokenizer), dtype=dtype)
    model.generation_config.update(**_special_token_ids(tokenizer))
    return model


def eos_list(model) -> list[int]:
    """The EOS ids of the model's generation config (none, one or several), as a list."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


MODEL_NAMES = (f"tiny, {', '.join(RANDOM_SHAPES)} (built in code), a folder holding config.json and a tokenizer, or a "
               "Hugging Face model name that this machine can download or has in its cache")


def not_loadable(name: str, what: str, error: Exception) -> SystemExit:
    """The stop for a --model whose config or tokenizer transformers cannot read (a typo, a hub name offline):
    one line naming the flag, the choices and transformers' reason, not its traceback."""
    reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return SystemExit(f"--model: expected {MODEL_NAMES}, got {name!r}: its {what} could not be read ({reason})")


def model_config(name: str):
    """The transformers config of the model `name` names, without reading any weights; a name whose config
    cannot be read stops (`not_loadable`), before any model loads."""
    if name == "tiny":
        return tiny_config(build_tiny_tokenizer())
    if name in RANDOM_SHAPES:
        return RANDOM_SHAPES[name](build_tiny_tokenizer())
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:  # not found, offline, gated; an unknown model type
        raise not_loadable(name, "config", error) from None


def meta_model(config):
    """The causal LM of a transformers `config` on the meta device: its shapes and parameter counts, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def is_built_in(name: str) -> bool:
    """Whether `name` is a model built in code ("tiny", a RANDOM_SHAPES name), not a hub name or a folder."""
    return name == "tiny" or name in RANDOM_SHAPES


def load_tokenizer(name: str):
    """The tokenizer of the model `name` names: the tiny one for a model built in code, else a hub model's or
    local folder's, with the pad and chat-template fallbacks it may need."""
    if is_built_in(name):
        return build_tiny_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise not_loadable(name, "tokenizer", error) from None
    if not tokenizer("0 a", add_special_tokens=False)["input_ids"]:  # a folder or repository without tokenizer files
        raise SystemExit(f"--model: {name}: its tokenizer encodes text to nothing (are its tokenizer files missing?)")
    if tokenizer.pad_token is None:
        # Fallback: pad with EOS. Padding is masked by the attention mask, so only the mask tells them apart.
        warnings.warn(f"{name}: tokenizer has no pad token; using its EOS {tokenizer.eos_token!r} as pad")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        warnings.warn(f"{name}: tokenizer has no chat template; using a plain ChatML one")
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_model_and_tokenizer(name: str, device, dtype: torch.dtype):
    """(model on `device` in `dtype`, tokenizer): "tiny", a RANDOM_SHAPES name (tiny tokenizer), or a hub name."""
    tokenizer = load_tokenizer(name)
    if name == "tiny":
        model = build_tiny_model(tokenizer, dtype=dtype)
    elif name in RANDOM_SHAPES:
        model = build_random_model(name, tokenizer, dtype, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)
    # A clean generation config. A checkpoint's own sampling defaults (Qwen2.5-Instruct ships a
    # repetition penalty, temperature, top-p and top-k) would fill every setting the trainer leaves unset,
    # and rollouts would no longer come from the policy whose log-probs are trained. It keeps every EOS
    # id: the tokenizer's and the checkpoint's (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>); a row that
    # ends on any of them is finished, and rewarded.
    eos_ids = [tokenizer.eos_token_id] + [i for i in eos_list(model) if i != tokenizer.eos_token_id]
    model.own_generation_config = model.generation_config  # final/ is saved with it: it generates as this model would
    model.own_generation_config.eos_token_id = eos_ids
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    # Built and loaded in `dtype` already: a later .to(dtype) would also round buffers that transformers
    # keeps in float32, such as the rotary frequencies.
    return model.to(device), tokenizer


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward. transformers 5.2x renamed gradient_checkpointing_enable;
    5.17 has the old name only."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


# ----------------------------------------------------------------------------------------------------
# The tiny tokenizer's corpus: short arithmetic word problems with worked solutions, generated from five
# hand-written templates (no download). The trainer's own problems are the shipped files of data/; these
# only train the 512-token BPE and the tiny model of docs/make_token_view.py.

NAMES = ["Ava", "Ben", "Carla", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam"]
ITEMS = ["apples", "pencils", "stickers", "cookies", "marbles", "books", "cards", "oranges", "balloons"]

# Each template draws small integers from `rng` and returns (question, solution steps, answer).

def _shopping(rng, name, item):
    """3 steps: buy two kinds of items, pay with a bill, get change."""
    a, p, b, q = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 5), rng.randint(1, 6)
    bill = 50 if a * p + b * q < 50 else 100
    question = (f"{name} buys {a} {item} for ${p} each and {b} notebooks for ${q} each. "
                f"{name} pays with a ${bill} bill. How much change does {name} get, in dollars?")
    steps = [f"The {item} cost {a} * {p} = {a * p} dollars.",
             f"The notebooks cost {b} * {q} = {b * q} dollars.",
             f"Together that is {a * p} + {b * q} = {a * p + b * q} dollars.",
             f"The change is {bill} - {a * p + b * q} = {bill - a * p - b * q} dollars."]
    return question, steps, bill - a * p - b * q


def _sharing(rng, name, item):
    """2 steps: add more items, then share them equally."""
    k, each = rng.randint(2, 6), rng.randint(2, 9)
    b = rng.randint(1, k * each - 1)
    a = k * each - b
    question = (f"{name} has {a} {item} and gets {b} more. {name} shares all of them equally among "
                f"{k} friends. How many {item} does each friend get?")
    steps = [f"{name} has {a} + {b} = {a + b} {item}.",
             f"Each friend gets {a + b} / {k} = {each} {item}."]
    return question, steps, each


def _boxes(rng, name, item):
    """3 steps: buy boxes of items, give some away, use some."""
    boxes, per_box = rng.randint(2, 6), rng.randint(3, 12)
    total = boxes * per_box
    given = rng.randint(1, total // 2)
    used = rng.randint(1, total - given - 1)
    question = (f"{name} buys {boxes} boxes with {per_box} {item} in each box. {name} gives {given} "
                f"{item} to a neighbor and uses {used}. How many {item} are left?")
    steps = [f"{name} buys {boxes} * {per_box} = {total} {item}.",
             f"After giving some away, {total} - {given} = {total - given} are left.",
             f"After using some, {total - given} - {used} = {total - given - used} are left."]
    return question, steps, total - given - used


def _wages(rng, name, item):
    """4 steps: earn an hourly wage on two days, spend some, save half of the rest."""
    rate, h1, h2 = rng.randint(5, 15), rng.randint(2, 6), rng.randint(1, 5)
    earned = rate * (h1 + h2)
    spent = rng.randrange(2 - earned % 2, earned - 3, 2)  # same parity as `earned`: the half is whole
    question = (f"{name} earns ${rate} per hour. {name} works {h1} hours on Monday and {h2} hours on "
                f"Tuesday, then spends ${spent} on {item}. {name} saves half of the money that is left. "
                f"How many dollars does {name} save?")
    steps = [f"{name} works {h1} + {h2} = {h1 + h2} hours.",
             f"{name} earns {h1 + h2} * {rate} = {earned} dollars.",
             f"After spending, {earned} - {spent} = {earned - spent} dollars are left.",
             f"{name} saves {earned - spent} / 2 = {(earned - spent) // 2} dollars."]
    return question, steps, (earned - spent) // 2


def _temperature(rng, name, item):
    """3 steps: a temperature falls, rises, then falls again (the answer may be negative)."""
    start, drop, rise, drop2 = rng.randint(1, 10), rng.randint(5, 15), rng.randint(2, 8), rng.randint(3, 12)
    end = start - drop + rise - drop2
    question = (f"While {name} packs {item} for a trip, the temperature is {start} degrees. It falls by "
                f"{drop} degrees, rises by {rise} degrees, then falls by {drop2} degrees. "
                f"What is the temperature now, in degrees?")
    steps = [f"After the first fall: {start} - {drop} = {start - drop} degrees.",
             f"After the rise: {start - drop} + {rise} = {start - drop + rise} degrees.",
             f"After the second fall: {start - drop + rise} - {drop2} = {end} degrees."]
    return question, steps, end


TEMPLATES = [_shopping, _sharing, _boxes, _wages, _temperature]


def make_arithmetic_problems(n: int, seed: int) -> list[Problem]:
    """`n` distinct (by question text) 2-4 step arithmetic word problems, the same for the same seed."""
    rng = random.Random(seed)
    problems, seen = [], set()
    for _ in range(100 * n):
        if len(problems) == n:
            break
        template = rng.choice(TEMPLATES)
        question, steps, answer = template(rng, rng.choice(NAMES), rng.choice(ITEMS))
        if question not in seen:
            seen.add(question)
            problems.append(Problem(question, "\n".join(steps + [f"The answer is {answer}."]), str(answer)))
    if len(problems) < n:
        raise ValueError(f"n: could only make {len(problems)} distinct problems, asked for {n}")
    return problems
