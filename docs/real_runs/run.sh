#!/usr/bin/env bash
# The real-weights runs of README.md "Real weights on one GPU", every flag written out.
#
#   bash docs/real_runs/run.sh MODEL_DIR OUT_DIR [METHOD ...]      # default methods: egrsd grpo
#
# MODEL_DIR: a Hugging Face folder of Qwen2.5-0.5B-architecture weights (we used Qwen2.5-Coder-0.5B-Instruct).
# The methods run side by side on the one GPU (each its own process), from the same weights, seed, data and
# evaluation. STEPS (default 40) can be lowered from the environment to fit a time budget; FLAGS adds flags
# (later flags win; the CPU dry run: FLAGS="--device cpu --steps 1 --batch-size 4 ...").
# Data: data/gsm_symbolic_train.jsonl (2,000 problems, 68 templates) and the held-out templates of
# data/gsm_symbolic_eval.jsonl (first 128 problems); sha256 of both are printed below. The runs of
# docs/real_runs predate --lr-schedule, --score-temperature, --gate-group, --lora-r, --verifier, --group-size
# and the evaluation flags: the values written here are the behaviour they had (constant, 1.0, the whole batch,
# full fine-tuning, builtin, one rollout a problem, greedy evaluation only at the rollouts' cap). Unused at
# these values: the LoRA flags and those of sampled evaluation; --train-size (the data is --data).
set -euo pipefail
model=$1 out=$2
shift 2
methods=${*:-egrsd grpo}
steps=${STEPS:-40}
pids=()
cd "$(dirname "$0")/../.."
sha256sum data/gsm_symbolic_train.jsonl data/gsm_symbolic_eval.jsonl
for method in $methods; do
  mkdir -p "$out/$method"
  python train_min.py --model "$model" --method "$method" --output-dir "$out/$method" \
    --data data/gsm_symbolic_train.jsonl --eval-data data/gsm_symbolic_eval.jsonl \
    --device cuda --dtype auto --seed 0 --steps "$steps" --batch-size 32 --micro-batch-size 8 \
    --max-new-tokens 512 --temperature 1.1 --top-p 0.95 --top-k 20 \
    --lr 1e-6 --lr-schedule constant --warmup-steps 0 --weight-decay 0.0 --grad-clip 0.1 \
    --gamma 0.3 --window 3 --eps 0.2 --floor 0.1 --min-denominator 1.0 --denominator raw --gate-group 0 \
    --score-temperature 1.0 --lora-r 0 --verifier builtin --group-size 1 \
    --beta-length 0.5 --advantage-warmup 10 \
    --eval-size 128 --eval-every 20 --eval-batch-size 64 --eval-max-new-tokens 0 --eval-greedy --eval-samples 0 \
    --time-budget 0 --save-model --save-every 0 \
    --rollout auto --chunk-size 1024 --gradient-checkpointing on --max-bad-steps 3 \
    --regime-low 0.2 --regime-high 0.5 --dump-tokens "${DUMP_TOKENS:-0}" \
    ${FLAGS:-} > "$out/$method/log.txt" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
