"""tools/bench_egrsd.py measures right: what runs in a process of its own counts that process's memory; each
number lands under its own label, against the right baseline, and the correctness checks it makes compare
what they claim to."""
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bench_egrsd  # noqa: E402


def _own_memory(label, device):
    """(pid, resident memory, peak resident memory) of the process it runs in: a part of the bench."""
    return os.getpid(), bench_egrsd.rss_bytes(), bench_egrsd.peak_rss_bytes()


def test_a_part_in_a_spawned_process_counts_its_own_peak_memory_not_its_parents():
    held = torch.ones(3 * 2**29, dtype=torch.uint8)  # 1.5 GiB held here, every page touched
    pid, rss, peak = bench_egrsd.isolated(_own_memory, "part", "cpu")
    assert pid != os.getpid(), "a CPU part runs in a process of its own"
    assert bench_egrsd.rss_bytes() > held.numel() > peak, "the child's peak: its imports, not the parent's 1.5 GiB"
    assert 50 * 2**20 < rss <= peak, "resident memory and its peak, both in bytes (its imports: over 50 MiB)"


def test_the_peak_is_the_high_water_mark_memory_freed_since_still_counts():
    block = torch.ones(2**28, dtype=torch.uint8)  # 256 MiB, every page touched, then given back
    del block
    assert bench_egrsd.peak_rss_bytes() - bench_egrsd.rss_bytes() > 200 * 2**20


def test_measured_times_the_block_and_counts_memory_above_what_was_held_before_it():
    with bench_egrsd.measured("cpu") as result:
        time.sleep(0.02)
    assert result["seconds"] >= 0.02
    assert result["peak_gib"] < (bench_egrsd.peak_rss_bytes() - 50 * 2**20) / 2**30, "not the process's whole peak"


def test_measured_counts_the_blocks_own_peak_not_one_the_process_reached_before_it():
    torch.ones(2**28, dtype=torch.uint8)  # 256 MiB touched and given back: the process's high-water mark above it now
    with bench_egrsd.measured("cpu") as result:  # the block's own peak: 64 MiB, above glibc's largest mmap threshold
        torch.ones(2**26, dtype=torch.uint8)  # (32 MiB), so new pages (a smaller block could reuse freed heap pages)
    assert 48 / 1024 < result["peak_gib"] < 160 / 1024


def test_best_of_keeps_the_shortest_of_repeats_calls_and_the_last_result():
    calls = []
    seconds, last = bench_egrsd.best_of(3, lambda: calls.append(time.sleep(0.03 if not calls else 0)) or len(calls), "cpu")
    assert last == len(calls) == 3 and seconds < 0.02


def test_an_error_in_a_part_comes_back_as_a_runtime_error_naming_its_type():
    with pytest.raises(RuntimeError, match="ValueError: invalid literal"):
        bench_egrsd._reraised(int, "x")


def test_scoring_results_are_labelled_by_variant_and_errors_compare_plain_with_chunked(monkeypatch):
    def fake(function, variant, *args):
        sample = torch.zeros(2) if variant == "plain" else torch.tensor([0.0, 0.5])
        return {"seconds": {"plain": 2.0, "chunked": 1.0}[variant], "peak_gib": {"plain": 4.0, "chunked": 0.5}[variant],
                "logp": sample, "grad_hidden": 2 * sample, "grad_weight": 3 * sample, "entropy": 4 * sample}

    monkeypatch.setattr(bench_egrsd, "isolated", fake)
    out = bench_egrsd.bench_scoring("cpu", dict(layers=2, score_batch=4, score_length=8, chunk_size=4))
    assert out["plain_step"] == out["plain_entropy"] == {"seconds": 2.0, "peak_gib": 4.0}
    assert out["chunked_step"] == out["chunked_entropy"] == {"seconds": 1.0, "peak_gib": 0.5}
    assert (out["max_err_logp"], out["max_err_grad_hidden"], out["max_err_grad_weight"], out["max_err_entropy"]) == (0.5, 1, 1.5, 2)
    assert out["tokens"] == 32


def test_on_cuda_each_scoring_variant_is_warmed_up_then_timed_best_of_three_in_alternating_order(monkeypatch):
    calls = []

    def fake(variant, device, *args):  # the process's first call pays its one-time costs (5 s), the next ones do not
        calls.append(variant)
        seconds = 5.0 if len(calls) == 1 else {"plain": 1.0, "chunked": 2.0}[variant] + len(calls) / 100
        return {"seconds": seconds, "peak_gib": len(calls), "logp": torch.zeros(2), "grad_hidden": torch.zeros(2),
                "grad_weight": torch.zeros(2), "entropy": torch.zeros(2)}

    monkeypatch.setattr(bench_egrsd, "scoring_step", fake)
    monkeypatch.setattr(bench_egrsd, "entropy_pass", fake)
    s = bench_egrsd.sizes("cuda") | dict(layers=1, score_batch=2, score_length=8, chunk_size=4)
    out = bench_egrsd.bench_scoring("cuda", s)
    order = ["plain", "chunked", "plain", "chunked", "chunked", "plain", "plain", "chunked"]  # warm-ups, then ABBA
    assert calls == order + order
    assert out["plain_step"] == {"seconds": 1.03, "peak_gib": 7, "seconds_each": [1.03, 1.06, 1.07], "warmup_s": 5.0}
    assert out["chunked_step"] == {"seconds": 2.04, "peak_gib": 8, "seconds_each": [2.04, 2.05, 2.08], "warmup_s": 2.02}
    assert out["plain_entropy"]["seconds"] == 1.11 and out["chunked_entropy"]["seconds"] == 2.12


@pytest.fixture
def tiny_qwen05b(monkeypatch):
    """bench_egrsd.qwen05b at the tiny model's size, seeded as the real one is."""
    from trainer import offline_models

    monkeypatch.setattr(offline_models, "qwen25_05b_config", offline_models.tiny_config)


def test_the_plain_and_chunked_scoring_steps_and_entropies_agree_on_the_same_weights(tiny_qwen05b):
    torch.manual_seed(5)
    args = ("cpu", 1, 2, 12, 4)
    plain, ours = (bench_egrsd.scoring_step(v, *args) for v in ("plain", "chunked"))
    for key in ("logp", "grad_hidden", "grad_weight"):
        torch.testing.assert_close(plain[key], ours[key], rtol=1e-4, atol=1e-5)
    plain_h, ours_h = (bench_egrsd.entropy_pass(v, *args) for v in ("plain", "chunked"))
    torch.testing.assert_close(plain_h["entropy"], ours_h["entropy"], rtol=1e-4, atol=1e-5)


def test_qwen05b_has_the_layers_asked_and_is_the_same_in_every_process(tiny_qwen05b):
    torch.manual_seed(1)
    first = bench_egrsd.qwen05b(1, "cpu", torch.float32)
    torch.rand(3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), bench_egrsd.qwen05b(1, "cpu", torch.float32).parameters()))
    assert first.config.num_hidden_layers == len(first.model.layers) == 1
    assert len(first.config.layer_types) == 1


def test_rollout_rates_are_new_tokens_per_second_against_hf_and_greedy_engines_agree(monkeypatch, compile_step_recorded):
    seconds = iter([0.5, 0.25, 1.0, 2.0, 1.0, 1.0])  # the best times of eager, eager-compiled, hf-dynamic, hf-static, LoRA's two
    monkeypatch.setattr(bench_egrsd, "best_of", lambda repeats, run, device: (next(seconds), run()))
    s = dict(rollout_layers=0, new_tokens=3, batches=(2,), repeats=1, prompt=4, lora_rank=2, project_engine="eager",
             engines=("eager", "eager-compiled", "hf-dynamic", "hf-static"))
    out = bench_egrsd.bench_rollouts("cpu", s)
    assert out["project_engine"] == "eager" and not any(k.endswith("_error") for k in out), out
    rates = [out[f"{e}_batch2_tokens_per_s"] for e in ("eager", "eager-compiled", "hf-dynamic", "hf-static", "lora_peft", "lora_sampler")]
    assert rates == [12.0, 24.0, 6.0, 3.0, 6.0, 6.0], "2 rows of 3 new tokens a (best) call"
    assert out["eager_batch2_ms_per_token"] == pytest.approx(500 / 3), "the best call's time over its 3 decode steps"
    assert (out["speedup_batch2"], out["speedup_batch2_vs_static"]) == (2.0, 4.0), "eager's rate over HF's"
    assert out["compiled_speedup_batch2"] == 2.0, "eager-compiled's rate over eager's"
    assert out["greedy_rows_equal_to_eager"] == {"eager": 1.0, "eager-compiled": 1.0, "hf-dynamic": 1.0, "hf-static": 1.0}
    assert compile_step_recorded[:6] == [False, False, False, True, True, True], "eager's three calls, then eager-compiled's"
    assert "compiled / not: 2.00×" in bench_egrsd.report({"device": "cpu", "torch": torch.__version__, "rollouts": out})


def _fake_runs(monkeypatch, rows_of):
    """train_min.main writes the metrics rows rows_of(argv) gives instead of training."""
    import train_min

    def main(argv):
        folder = argv[argv.index("--output-dir") + 1]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows_of(argv))
    monkeypatch.setattr(train_min, "main", main)


def test_finetune_reports_the_second_steps_time_and_the_memory_the_run_added(monkeypatch):
    _fake_runs(monkeypatch, lambda argv: [{"step_s": 9.0, "length_mean": 1}, {"step_s": 2.0, "length_mean": 3}])
    out = bench_egrsd.finetune_step("tiny", "cpu", "tiny", ["--lora-r", "8"])
    assert (out["step_s"], out["length_mean"], out["flags"]) == (2.0, 3, ["--lora-r", "8"])
    assert out["peak_gib"] < (bench_egrsd.peak_rss_bytes() - 50 * 2**20) / 2**30, "not the memory held before"


def test_finetune_counts_the_runs_own_peak_not_one_the_process_reached_before_it(monkeypatch):
    def run(argv):
        torch.ones(2**25, dtype=torch.uint8)  # the run's own peak: 32 MiB
        return [{"step_s": 2.0, "length_mean": 3}] * 2
    _fake_runs(monkeypatch, run)
    torch.ones(2**28, dtype=torch.uint8)  # 256 MiB touched and given back before the part
    assert 24 / 1024 < bench_egrsd.finetune_step("tiny", "cpu", "tiny", [])["peak_gib"] < 128 / 1024


def test_the_memory_estimate_counts_20_bytes_a_parameter_full_and_18_an_adapter_parameter_with_lora(monkeypatch):
    from trainer import lora

    monkeypatch.setattr(lora, "adapter_parameters", lambda model, cfg: 1000 * cfg.lora_r)  # (peft on an 8B model: seconds)
    out = bench_egrsd.memory_estimates()
    assert [round(out[m]["parameters"] / 1e9, 2) for m in ("Qwen2.5-0.5B", "Qwen3-4B", "Qwen3-8B")] == [0.49, 4.02, 8.19]
    for row in out.values():
        assert row["full_gib"] == 20 * row["parameters"] / 2**30
        assert row["lora_gib"] == (2 * row["parameters"] + 18 * 64_000) / 2**30


def test_the_flop_floor_counts_four_passes_or_five_with_recomputation_at_the_cards_peak(monkeypatch):
    from trainer.offline_models import meta_model, model_config

    params = sum(p.numel() for p in meta_model(model_config("tiny")).parameters())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    for recomputed, passes in ((False, 4), (True, 5)):
        out = bench_egrsd.flop_floor("tiny", 100, 3.0, "cuda", recomputed)
        assert out["score_update_flops"] == 2 * params * 100 * passes
        assert out["score_update_floor_s"] == out["score_update_flops"] / 989e12
        assert out["score_update_over_floor"] == 3.0 / out["score_update_floor_s"]
    assert math.isnan(bench_egrsd.flop_floor("tiny", 100, 3.0, "cpu", False)["score_update_floor_s"])


@pytest.mark.parametrize("card, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", math.nan)])
def test_the_flop_floor_takes_the_peak_of_the_cards_whole_name_not_of_a_part_of_it(card, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: card)
    out = bench_egrsd.flop_floor("tiny", 100, 3.0, "cuda", False)
    assert out["score_update_flops"] / out["score_update_floor_s"] == pytest.approx(peak, nan_ok=True)


def test_the_step_part_reports_the_second_step_per_completion_token_and_a_run_with_checkpointing_on(monkeypatch):
    def rows(argv):
        on = "--gradient-checkpointing" in argv
        return [dict(generate_s=9.0, score_s=9.0, update_s=9.0, step_s=27.0, length_mean=1.0, length_max=1,
                     peak_gpu_mem_gb=0.0, gradient_checkpointing=on)] + [
                dict(generate_s=2.0, score_s=1.0, update_s=1.0 + on, step_s=4.0 + on, length_mean=10.0, length_max=12,
                     peak_gpu_mem_gb=0.0, gradient_checkpointing=on)]
    _fake_runs(monkeypatch, rows)
    out = bench_egrsd.bench_step("cpu", bench_egrsd.sizes("cpu"))
    assert out["completion_tokens"] == 10.0 * 8 and out["step_s"] == 4.0 and out["gradient_checkpointing"] is False
    assert (out["generate_tokens_per_s"], out["score_plus_update_share"]) == (40.0, 0.5)
    assert out["checkpointing_on"]["update_s"] == 2.0


def test_the_padding_part_takes_the_same_gradient_both_ways_and_the_baseline_runs_over_the_full_width(monkeypatch):
    from trainer import config

    monkeypatch.setattr(config, "check_lengths", lambda *args: None)  # (2,000 prompts tokenized: a second)
    import train_min

    like_length, update, calls = train_min.micro_batches, train_min.update, []
    monkeypatch.setattr(train_min, "update", lambda *args: calls.append(train_min.micro_batches is like_length) or update(*args))
    s = {"padding": dict(model="tiny", batch=4, micro=2, cap=16, dtype="float32", repeats=1)}
    out = bench_egrsd.bench_padding("cpu", s)
    assert calls == [False, True, False, True], "the baseline's micro-batching in the baseline's calls only (untimed, then timed)"
    base, ours = out["baseline"], out["like_length"]
    assert base["grad_norm"] == pytest.approx(ours["grad_norm"], rel=1e-5)
    assert out["valid_tokens"] <= ours["forward_tokens"] < base["forward_tokens"]
    assert out["speedup"] == base["seconds"] / ours["seconds"]


def test_the_lookahead_loop_baseline_equals_lookahead_min_and_the_speedup_is_loop_over_vectorised():
    out = bench_egrsd.bench_lookahead(batch=3, length=40, window=3)
    assert out["max_err"] == 0
    assert out["speedup"] == out["loop_s"] / out["vectorised_s"]


def test_every_part_lands_in_the_json_and_a_failing_part_is_recorded_while_the_next_still_runs(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bench.json"
    monkeypatch.setattr(bench_egrsd, "bench_padding", lambda device, s: sys.exit(f"cannot load {s['padding']['model']}"))
    monkeypatch.setattr(bench_egrsd, "bench_lookahead", lambda: {"loop_s": 1.0, "vectorised_s": 0.5, "speedup": 2.0, "max_err": 0.0,
                                                                 "shape": [1, 2], "window": 3})
    monkeypatch.setattr(sys, "argv", ["bench_egrsd.py", "--only", "padding,lookahead", "--json", str(path),
                                     "--padding-model", "my-model"])
    with pytest.raises(SystemExit, match=r"failed: padding \(SystemExit: cannot load my-model\)"):
        bench_egrsd.main()
    results = json.loads(path.read_text())
    assert results["lookahead"]["speedup"] == 2.0 and results["padding_error"] == "SystemExit: cannot load my-model"
    assert {"device", "torch", "transformers"} <= set(results)
    assert "lookahead_min [1, 2] W=3" in capsys.readouterr().out


def test_the_report_gives_the_flop_floor_where_the_peak_is_known_and_says_so_where_not():
    step = {"model": "tiny", "batch": 8, "completion_tokens": 512.0, "peak_gpu_mem_gb": 0.0, "step_s": 4.0,
            "score_plus_update_share": 0.5, "gradient_checkpointing": False,
            **{f"{phase}_{key}": 1.0 for phase in ("generate", "score", "update") for key in ("s", "tokens_per_s")}}
    run = {"device": "cpu", "torch": torch.__version__}
    assert "no FLOP floor (the device's bf16 peak is not known)" in bench_egrsd.report(run | {"step": step})
    read_back = {"score_update_floor_s": None, "score_update_over_floor": None}  # a CPU run's JSON: null, not NaN
    assert "no FLOP floor (the device's bf16 peak is not known)" in bench_egrsd.report(run | {"step": step | read_back})
    known = bench_egrsd.report(run | {"step": step | {"score_update_floor_s": 0.25, "score_update_over_floor": 8.0}})
    assert "8.0× its FLOP floor of 0.25 s" in known and "nan" not in known


LOOKAHEAD = {"loop_s": 1.0, "vectorised_s": 0.5, "speedup": 2.0, "max_err": 0.0, "shape": [1, 2], "window": 3}


def test_a_json_file_in_a_folder_not_made_yet_gets_its_folder_and_every_part(tmp_path, monkeypatch):
    path = tmp_path / "new" / "deeper" / "bench.json"
    monkeypatch.setattr(bench_egrsd, "bench_lookahead", lambda: LOOKAHEAD)
    monkeypatch.setattr(sys, "argv", ["bench_egrsd.py", "--only", "lookahead", "--json", str(path)])
    bench_egrsd.main()
    assert json.loads(path.read_text())["lookahead"] == LOOKAHEAD


@pytest.mark.parametrize("flag, part", [("--json", "lookahead"), ("--profile", "step")])
def test_a_json_or_profile_file_that_cannot_be_written_is_refused_before_any_part_runs(flag, part, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    ran = []
    monkeypatch.setattr(bench_egrsd, f"bench_{part}", lambda *args: ran.append(part))
    monkeypatch.setattr(sys, "argv", ["bench_egrsd.py", "--only", part, flag, str(tmp_path / "a-file" / "out")])
    with pytest.raises(SystemExit):
        bench_egrsd.main()
    assert f"{flag}: expected a file in a folder that exists or can be made" in capsys.readouterr().err
    assert ran == [], "refused before the part ran, not after"


def test_a_json_write_that_fails_during_the_run_loses_no_number(tmp_path, monkeypatch, capsys):
    path, replace = tmp_path / "b.json", os.replace

    def full_disk_once_the_file_exists(source, target):  # the first write succeeds, every later one fails
        if os.path.exists(target):
            raise OSError(28, "No space left on device")
        replace(source, target)
    monkeypatch.setattr(bench_egrsd.os, "replace", full_disk_once_the_file_exists)
    monkeypatch.setattr(bench_egrsd, "bench_lookahead", lambda: LOOKAHEAD)
    monkeypatch.setattr(bench_egrsd, "bench_padding", lambda device, s: 1 / 0)
    monkeypatch.setattr(sys, "argv", ["bench_egrsd.py", "--only", "lookahead,padding", "--json", str(path)])
    with pytest.raises(SystemExit, match=r"failed: padding \(ZeroDivisionError.*\n--json: .* could not be written"):
        bench_egrsd.main()
    monkeypatch.undo()
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("\n{") : out.index("\n}") + 2])
    assert printed["lookahead"] == LOOKAHEAD and printed["padding_error"].startswith("ZeroDivisionError"), "the JSON went to stdout"


def test_a_profile_that_fails_keeps_the_steps_numbers(monkeypatch, tmp_path):
    _fake_runs(monkeypatch, lambda argv: [dict(generate_s=2.0, score_s=1.0, update_s=1.0, step_s=4.0, length_mean=10.0, length_max=12,
                                               peak_gpu_mem_gb=0.0, gradient_checkpointing=False)] * 2)

    def unwritable(flags, run_dir, device, path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(bench_egrsd, "_profile_one_more_step", unwritable)
    out = bench_egrsd.bench_step("cpu", bench_egrsd.sizes("cpu"), profile=str(tmp_path / "profile.txt"))
    assert out["step_s"] == 4.0 and out["checkpointing_on"]["step_s"] == 4.0, "the step and the run with checkpointing on"
    assert out["profile_error"].startswith("PermissionError")


def test_device_cuda_without_cuda_is_refused_naming_the_flag(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    monkeypatch.setattr(bench_egrsd, "bench_lookahead", lambda: ran.append(1))
    monkeypatch.setattr(sys, "argv", ["bench_egrsd.py", "--device", "cuda", "--only", "lookahead"])
    with pytest.raises(SystemExit):
        bench_egrsd.main()
    assert "--device cuda: expected a CUDA device" in capsys.readouterr().err and ran == []


def strict_json(text: str):
    """json.loads as RFC 8259 (and JavaScript, Go, serde_json) read it: NaN and Infinity are no JSON."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_what_was_not_measured_or_is_not_known_is_written_as_null_not_nan(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    monkeypatch.setattr(bench_egrsd, "bench_lookahead", lambda: LOOKAHEAD | {"speedup": math.nan, "shape": [1, math.inf]})
    monkeypatch.setattr(sys, "argv", ["bench_egrsd.py", "--only", "lookahead", "--json", str(path)])
    bench_egrsd.main()
    lookahead = strict_json(path.read_text())["lookahead"]
    assert lookahead["speedup"] is None and lookahead["shape"] == [1, None] and lookahead["loop_s"] == 1.0
