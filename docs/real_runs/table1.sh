#!/usr/bin/env bash
# Real weights (2 of 2): the paper's Table 1 at 0.5B, every method and seed, on one GPU, one command:
#
#   bash docs/real_runs/table1.sh MODEL_DIR OUT_DIR   # then: python train_min.py --compare OUT_DIR/grpo-s* OUT_DIR/*-s*
#
# MODEL_DIR: a Hugging Face folder of Qwen2.5-0.5B-architecture weights (we use Qwen2.5-Coder-0.5B-Instruct).
# Seven settings, each with SEEDS (default 0 1 2), all from the same weights, data and evaluation (greedy and
# avg@4 on the 400 held-out problems; one step-0 evaluation, made once and reused by every run):
#   grpo, opsd, rlsd (γ = 0), egrsd (γ = 0.3), cl-egrsd (γ = 0.3, W = 3)        the paper's Qwen3-4B column
#   egrsd-g1 (γ = 1.0), cl-egrsd-g1w5 (γ = 1.0, W = 5)                          its Qwen3-8B setting
# SETTING holds what moves the model: the setting in which train_min.py learns (README, "Real weights on one
# GPU"); until a GPU run confirms one, the default is setting1.sh's LoRA arm. Runs go PER_CALL at a time side
# by side (tools/run_arms.py), each batch within BUDGET seconds (default: no limit worth the name); ONLY (a list
# of NAME-sSEED) runs a part of the table, so that a lent GPU with minutes to spare can finish whole runs, call
# by call, into the same OUT_DIR. A run counts as done once it has evaluated at its last step (STEPS): one that
# BUDGET stopped early is run again, so choose STEPS and EVAL_SAMPLES that fit BUDGET. Prints how long it
# took, and on which card.
# --gradient-checkpointing on, not auto: the runs share one card, so one run's update could take the memory
# that another's rollouts need, and auto recovers only an update that runs out.
set -euo pipefail
model=$1 out=$2
cd "$(dirname "$0")/../.."
seeds=${SEEDS:-0 1 2}
setting=${SETTING:---lora-r 64 --lora-alpha 128 --lora-dropout 0 --lr 5e-5 --group-size 1}
common="--model $(printf %q "$model") --data data/gsm_symbolic_train.jsonl --eval-data data/gsm_symbolic_eval.jsonl
  --device cuda --dtype auto --steps ${STEPS:-40} --batch-size 32 --micro-batch-size 8
  --max-new-tokens 512 --temperature 1.1 --top-p 0.95 --top-k 20 --score-temperature 0
  --lr-schedule constant --warmup-steps 0 --weight-decay 0.0 --grad-clip 0.1
  --eps 0.2 --floor 0.1 --min-denominator 1.0 --denominator raw --gate-group 0
  --beta-length 0.5 --advantage-warmup 10 --verifier builtin
  --eval-size 400 --eval-every 0 --eval-batch-size 64 --eval-max-new-tokens 0 --eval-greedy --eval-samples ${EVAL_SAMPLES:-4}
  --eval-temperature 1.0 --eval-top-p 0.95 --eval-top-k 0 --eval-seed 0 --save-every 0
  --rollout auto --chunk-size 1024 --gradient-checkpointing on --max-bad-steps 3 --regime-low 0.2 --regime-high 0.5
  --lora-target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --dump-tokens 0 $setting ${FLAGS:-}"
declare -A methods=(
  [grpo]="--method grpo --gamma 0.3 --window 3"
  [opsd]="--method opsd --gamma 0.3 --window 3"
  [rlsd]="--method rlsd --gamma 0.0 --window 3"
  [egrsd]="--method egrsd --gamma 0.3 --window 3"
  [cl-egrsd]="--method cl-egrsd --gamma 0.3 --window 3"
  [egrsd-g1]="--method egrsd --gamma 1.0 --window 5"
  [cl-egrsd-g1w5]="--method cl-egrsd --gamma 1.0 --window 5"
)
order="grpo opsd rlsd egrsd cl-egrsd egrsd-g1 cl-egrsd-g1w5"
runs=()
for seed in $seeds; do
  for name in $order; do
    run="$name-s$seed"
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $run "* ]]; then continue; fi
    if [ -f "$out/$run/metrics.jsonl" ] && grep -qE "\"kind\": \"eval\", \"step\": ${STEPS:-40}[,}]" "$out/$run/metrics.jsonl"; then
      echo "[table1] $run is done already"; continue
    fi
    # a run cut off before its final evaluation, or stopped early by BUDGET: --no-save-model runs cannot resume
    rm -rf "${out:?}/$run"
    runs+=("$run")
  done
done
sha256sum data/gsm_symbolic_train.jsonl data/gsm_symbolic_eval.jsonl
git rev-parse HEAD 2>/dev/null || true
card=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')")
start=$(date +%s)
per_call=${PER_CALL:-3}
for ((i = 0; i < ${#runs[@]}; i += per_call)); do
  arms=()
  for run in "${runs[@]:i:per_call}"; do
    name=${run%-s*} seed=${run##*-s}
    arms+=(--arm "$run=${methods[$name]} --seed $seed")
  done
  python tools/run_arms.py --out "$out" --initial "$out/initial" --budget "${BUDGET:-86400}" --common "$common" "${arms[@]}" \
    --pack "${OUT:-$out/packed}" || failed=1  # the other batches still run
done
echo "[table1] ${#runs[@]} runs in $(( $(date +%s) - start )) s on $card${failed:+ (some failed: see their log.txt)}"
exit "${failed:-0}"
