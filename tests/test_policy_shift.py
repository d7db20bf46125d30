"""tools/policy_shift.py: it takes train_min.py's first step, reads the token order it scores in, and its
measures of the step equal their naive float64 forms."""

import json
import math
from collections import Counter

import pytest
import torch

import egrsd
import train_min
from test_trainer import TINY, read_metrics
from tools import policy_shift
from trainer.modeling import micro_batches

FLAGS = [*TINY, "--dtype", "bfloat16", "--lr-schedule", "constant", "--warmup-steps", "0", "--lr", "1e-4", "--seed", "3"]
STEP_KEYS = ("loss", "grad_norm", "update_rel", "sampler_changed")


@pytest.mark.parametrize("arm", [[], ["--lora-r", "4", "--lr", "1e-3"]], ids=["full", "lora"])
def test_an_arm_takes_train_mins_first_step_and_what_it_moved_is_measured(arm, tmp_path, capsys):
    train_min.main([*FLAGS, *arm, "--steps", "1", "--eval-size", "0", "--no-save-model", "--output-dir", str(tmp_path / "run")])
    step = read_metrics(tmp_path / "run")[-1]
    row = policy_shift.main(["--common", " ".join(FLAGS), "--arm", "a=" + " ".join(arm), "--json", str(tmp_path / "shift.json")])["a"]
    assert {k: row[k] for k in STEP_KEYS} == pytest.approx({k: step[k] for k in STEP_KEYS}, rel=1e-6)
    assert step["accuracy"] == 0 and row["correct"] == 0  # every rollout wrong: every Â < 0, none > 0
    assert ("student" in row) == (not arm)  # full fine-tuning in bf16: the float32 student is another model than the sampler
    for model in [m for m in ("sampler", "student") if m in row]:
        shift = row[model]
        assert shift["kl"] > 0 and shift["dlogp_neg"] < 0 and math.isnan(shift["dlogp_pos"]), (model, shift)
    assert "sampler" in capsys.readouterr().out
    written = json.loads((tmp_path / "shift.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert written["arms"]["a"]["sampler"]["dlogp_pos"] is None, "no token with Â > 0: null, not NaN"


def test_each_token_is_measured_with_its_own_rows_advantage_and_the_float32_student_goes_uphill(monkeypatch):
    flags = [*FLAGS, "--method", "grpo", "--seed", "0", "--batch-size", "8", "--max-new-tokens", "32", "--micro-batch-size", "3"]
    monkeypatch.setattr(train_min, "verify", lambda texts, *_: torch.arange(len(texts)) % 2 == 0)  # every other one right
    seen, sample, shift, rollouts = {}, policy_shift.sample, policy_shift.shift, train_min.rollouts

    def rollouts_of_rising_lengths(*args):  # (the tiny model's EOS comes by chance: lengths 11, 14, ..., 32 instead)
        batch = rollouts(*args)
        batch.mask &= torch.arange(batch.mask.shape[1]) < torch.arange(11, 33, 3)[:, None]
        return batch

    def measured(*args):  # what the first model's measures are taken on
        seen.setdefault("measured", args)
        return shift(*args)

    monkeypatch.setattr(train_min, "rollouts", rollouts_of_rising_lengths)
    monkeypatch.setattr(policy_shift, "sample", lambda *a: seen.setdefault("sampled", sample(*a)))
    monkeypatch.setattr(policy_shift, "shift", measured)
    row = policy_shift.main(["--common", " ".join(flags), "--arm", "a="])["a"]
    _, batch, _ = seen["sampled"]
    lengths = batch.mask.sum(dim=1)
    assert lengths.tolist() != sorted(lengths.tolist(), reverse=True)  # the micro-batches take the rows in another order
    # GRPO's first step: A = r − 0.5 (the running advantage's warm-up baseline), r the length-shaped reward
    advantage = egrsd.length_shaped_reward(torch.arange(8) % 2 == 0, lengths, 32, beta=0.5) - 0.5
    expected = Counter((t, round(float(a), 6)) for row_tokens, m, a in zip(batch.completion, batch.mask, advantage)
                       for t in row_tokens[m].tolist())
    _, _, tokens, measured_advantage, _ = seen["measured"]
    assert Counter(zip(tokens.tolist(), (round(a, 6) for a in measured_advantage.tolist()))) == expected
    assert len({a for _, a in expected}) == 5 and row["correct"] == 4  # −0.5, and 4 rewards shaped by 4 lengths
    assert row["student"]["gain"] > 0  # a small float32 step goes up the objective, to first order


def test_the_hidden_states_read_line_up_with_the_tokens_and_temperature_as_train_min_scores_them(tmp_path):
    cfg = policy_shift.config([*TINY, "--score-temperature", "0.7", "--micro-batch-size", "3"], str(tmp_path / "run"))  # float32
    problems, batch, _ = policy_shift.sample(cfg, group_size=1)
    run = train_min.setup(cfg)
    with run.metrics:
        micro = micro_batches(batch.mask, cfg.micro_batch_size)
        hidden, head = policy_shift.read(run.sampler, batch, micro, temperature=0.7)
        tokens = torch.cat([batch.completion[mb][batch.mask[mb]] for mb in micro])
        mine = torch.log_softmax(hidden.double() @ head.double().T, dim=-1).gather(1, tokens[:, None])[:, 0]
        scored = train_min.score(run.sampler, run.teacher, batch, cfg).student_logp  # (B, T), rows in batch order
        theirs = torch.cat([scored[mb][batch.mask[mb]] for mb in micro]).double()
    assert len(micro) > 1 and mine.shape == theirs.shape
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)  # the same tokens (a token misread is off by whole nats)


def test_the_shift_of_a_step_equals_its_naive_float64_form():
    g = torch.Generator().manual_seed(0)
    n, d, v = 7, 5, 11
    h0, h1 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    w0, w1 = torch.randn(v, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    tokens, advantage = torch.randint(v, (n,), generator=g), torch.tensor([1.0, -2.0, 0.0, 0.5, -0.5, 3.0, -1.0], dtype=torch.float64)
    got = policy_shift.shift((h0, w0), (h1, w1), tokens, advantage, chunk_size=3)
    p0, p1 = torch.log_softmax(h0 @ w0.T, dim=-1), torch.log_softmax(h1 @ w1.T, dim=-1)
    change = [float(p1[i, t] - p0[i, t]) for i, t in enumerate(tokens.tolist())]
    expected = {"kl": sum(float((p0[i].exp() * (p0[i] - p1[i])).sum()) for i in range(n)) / n,
                "abs_dlogp": sum(abs(c) for c in change) / n,
                "dlogp_pos": sum(c for c, a in zip(change, advantage.tolist()) if a > 0) / 3,  # 1, 0.5, 3
                "dlogp_neg": sum(c for c, a in zip(change, advantage.tolist()) if a < 0) / 3,  # -2, -0.5, -1
                "gain": sum(c * a for c, a in zip(change, advantage.tolist())) / n}
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("arms, message", [
    (["a=", "b=--group-size 3 --batch-size 6"], "--group-size: the largest of the arms, 3, must divide the first arm's --batch-size 4"),
    (["a=--group-size 4", "b=--group-size 3 --batch-size 6"], "--arm b: its --group-size 3 must divide the largest of the arms, 4")])
def test_a_group_size_that_would_not_hold_whole_groups_of_one_problem_is_refused(arms, message, capsys):
    with pytest.raises(SystemExit):
        policy_shift.main(["--common", " ".join(FLAGS), *(f"--arm={a}" for a in arms)])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--common", '--model tiny "', "--arm", "a="], "--common: expected train_min.py flags as a shell would split them"),
    (["--common", "--model tiny", "--arm", 'a=--lr "1e-5'], "--arm a: expected train_min.py flags as a shell would split them"),
    (["--common", "--model tiny --device cpu", "--arm", "a=", "--arm", "b=--lr -1"], "--arm b (with --common): --lr: expected > 0"),
    (["--common", "--model tiny --device cpu", "--arm", "a=--lr x"], "--arm a (with --common): argument --lr: invalid float value"),
    (["--common", "--model tiny", "--arm", "a=", "--json", "/dev/null/shift.json"], "--json: expected a file in a folder that exists")])
def test_a_bad_flag_is_refused_naming_the_arm_or_common_or_json_it_came_in(args, message, capsys):
    with pytest.raises(SystemExit):
        policy_shift.main(args)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_each_arm_is_read_at_the_temperature_its_update_scores_with_and_says_which(monkeypatch, tmp_path):
    cfgs = {arm: policy_shift.config([*TINY, "--score-temperature", t], str(tmp_path / arm)) for arm, t in (("a", "1"), ("b", "0.5"))}
    problems, batch, _ = policy_shift.sample(cfgs["a"], group_size=1)
    read, temperatures = policy_shift.read, []
    monkeypatch.setattr(policy_shift, "read", lambda *args: temperatures.append(args[-1]) or read(*args))
    rows = {arm: policy_shift.probe(cfg, problems, batch) for arm, cfg in cfgs.items()}
    assert temperatures == [1.0, 1.0, 0.5, 0.5], "before and after the step (float32: the sampler is the student)"
    assert [rows[arm]["temperature"] for arm in "ab"] == [1.0, 0.5]
    summary = dict(problems=4, group_size=1, rollouts=4, correct=0, tokens=9, finished=0, sample_s=1.0, rollout_temperature=1.0)
    lines = policy_shift.table(summary, rows).splitlines()
    assert lines[1].split()[2] == "T" and [line.split()[2] for line in lines[2:]] == ["1", "0.5"], lines
