#!/usr/bin/env bash
# Real weights (1 of 2): find a setting in which train_min.py learns. One call of a lent GPU:
#
#   OUT=DIR bash docs/real_runs/setting1.sh MODEL_DIR [SEED]        # writes DIR/runs.tar.gz and DIR/compare.txt
#
# MODEL_DIR: a Hugging Face folder of Qwen2.5-0.5B-architecture weights (we use Qwen2.5-Coder-0.5B-Instruct).
# Three arms of GRPO side by side (tools/run_arms.py), from the same weights, data, seed and evaluation, and
# one step-0 evaluation shared by all: each arm moves the model in another way.
#   lora      the paper's LoRA (r 64, α 128, dropout 0, all seven projections) at a learning rate at which the
#             adapter moves: its effect is applied unmerged, so bf16 rounding of the base cannot swallow it;
#   full      full fine-tuning at 10× the old 1e-6, so that a larger share of each update reaches the bf16 sampler
#             (17% of its weights a step instead of 4%: sampler_changed in the CPU dry run of the README);
#   lora-g8   the positive control: the LoRA arm with 8 rollouts per problem and GRPO's group advantage
#             (4 problems × 8 rollouts = 32), as TRL's GRPO runs by default.
# A constant learning rate, so that a run stopped by the time budget saw the schedule it was meant to see.
# Every flag is written out (later flags win); BUDGET (seconds, default 450: a call of 570 s also unpacks the
# weights, and run_arms may add two 20 s graces), STEPS (40) and EVAL_SAMPLES (0:
# greedy only, which fits three arms in one call) come from the environment, and FLAGS is added to the common
# flags (the CPU dry run: OUT=/tmp/out FLAGS="--device cpu --batch-size 8 --max-new-tokens 16 --eval-size 8" STEPS=2
# bash docs/real_runs/setting1.sh tiny). SHIFT=1 trains nothing: tools/policy_shift.py measures how far each arm's
# first step moves the sampler, beside the old runs' rate (full 1e-6) and the paper's LoRA rate (5e-6), into
# OUT/policy_shift.json (the README's table: SHIFT=1 FLAGS="--device cpu --dtype bfloat16 --gradient-checkpointing
# off", 23 minutes on 2 CPU cores). A run *learns* when its held-out
# accuracy rises from step 0 with a template-clustered interval that excludes 0 and its reward slope is
# positive with an interval that excludes 0 (python train_min.py --compare on the unpacked runs).
# --gradient-checkpointing on, not auto: the runs share one card, so one run's update could take the memory
# that another's rollouts need, and auto recovers only an update that runs out.
# The runs go to RUNS/setting1-sSEED (RUNS: default /tmp/runs); tools/run_arms.py sets aside what an earlier
# call left there (renamed .NAME.earlier-TIME), and makes the shared step-0 evaluation again if it was made otherwise.
set -euo pipefail
model=$1 seed=${2:-0}
: "${OUT:?setting1.sh: set OUT=DIR, the folder that receives runs.tar.gz and compare.txt (the GPU tool sets it)}"
cd "$(dirname "$0")/../.."
sha256sum data/gsm_symbolic_train.jsonl data/gsm_symbolic_eval.jsonl
git rev-parse HEAD 2>/dev/null || true
common="--model $(printf %q "$model") --data data/gsm_symbolic_train.jsonl --eval-data data/gsm_symbolic_eval.jsonl
  --device cuda --dtype auto --seed $seed --steps ${STEPS:-40} --batch-size 32 --micro-batch-size 8
  --max-new-tokens 512 --temperature 1.1 --top-p 0.95 --top-k 20 --score-temperature 0
  --lr-schedule constant --warmup-steps 0 --weight-decay 0.0 --grad-clip 0.1
  --method grpo --gamma 0.3 --window 3 --eps 0.2 --floor 0.1 --min-denominator 1.0 --denominator raw --gate-group 0
  --beta-length 0.5 --advantage-warmup 10 --verifier builtin
  --eval-size 400 --eval-every 0 --eval-batch-size 64 --eval-max-new-tokens 0 --eval-greedy --eval-samples ${EVAL_SAMPLES:-0}
  --eval-temperature 1.0 --eval-top-p 0.95 --eval-top-k 0 --eval-seed 0 --save-every 0
  --rollout auto --chunk-size 1024 --gradient-checkpointing on --max-bad-steps 3 --regime-low 0.2 --regime-high 0.5
  --dump-tokens 0 ${FLAGS:-}"
lora="--lora-r 64 --lora-alpha 128 --lora-dropout 0 --lora-target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
arms=(--arm lora="$lora --lr 5e-5 --group-size 1"
      --arm full="--lora-r 0 --lr 1e-5 --group-size 1"
      --arm lora-g8="$lora --lr 5e-5 --group-size 8")
if [ -n "${SHIFT:-}" ]; then  # no training: how far each arm's first step moves the sampler (tools/policy_shift.py)
  python tools/policy_shift.py --json "$OUT/policy_shift.json" --common "$common" \
    --arm full-1e-6="--lora-r 0 --lr 1e-6 --group-size 1" --arm lora-5e-6="$lora --lr 5e-6 --group-size 1" "${arms[@]}"
  exit
fi
python tools/run_arms.py --out "${RUNS:-/tmp/runs}/setting1-s$seed" --budget "${BUDGET:-450}" --grace 20 --common "$common" "${arms[@]}"
