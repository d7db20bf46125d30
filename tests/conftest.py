"""Shared by the trainer's tests: the repository root on sys.path (train_min, trainer/, egrsd and the
spec's helpers import from there), the project's fixed hypothesis profile (derandomized, no example
database: a run is reproducible and CI never flakes), as in test_egrsd.py, which must stand alone, and
the fixtures of the compiled decode step's tests."""
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Warnings that libraries raise about their own calls (TRL, peft and the HF Trainer call transformers' renamed
# gradient-checkpointing API; the TRL tests pass rollout_func, which TRL marks experimental): not ours to fix.
LIBRARY_WARNINGS = [
    "ignore:`gradient_checkpointing` is deprecated:FutureWarning",
    "ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning",
    "ignore:`gradient_checkpointing_disable` is deprecated:FutureWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",  # peft's call (trainer/lora.py hides it in runs)
    "ignore:You are using 'rollout_func', which is an experimental feature:UserWarning",
]


def pytest_configure(config):
    for line in LIBRARY_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


settings.register_profile("egrsd", derandomize=True, database=None, deadline=None, max_examples=50,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("egrsd")


@pytest.fixture
def compiled_by_dynamo_alone(monkeypatch):
    """decoding.py's compile_step (train_min.py --compile-decode) with dynamo's trace and no code generation
    (inductor's C++ build would take ~30 s here; the CUDA tests use inductor), from an empty cache of compiled
    steps. Yields the list of graphs compiled (one per compilation); dynamo's caches are emptied after the test."""
    from trainer import decoding

    compiled = []

    def backend(graph_module, example_inputs):
        compiled.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(decoding, "COMPILE_BACKEND", backend)
    monkeypatch.setattr(decoding, "_compiled", {})
    yield compiled
    torch._dynamo.reset()


@pytest.fixture
def compile_step_recorded(monkeypatch):
    """decoding.generate with the compile_step of each call recorded (the yielded list) and then decoding
    uncompiled: whether --compile-decode reaches the decoder, without a compilation (test_decoding compiles)."""
    from trainer import decoding

    calls, generate = [], decoding.generate
    monkeypatch.setattr(decoding, "generate", lambda *a, **k: calls.append(k["compile_step"]) or generate(*a, **k | dict(compile_step=False)))
    return calls
