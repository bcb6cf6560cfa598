#!/usr/bin/env bash
# The quality study at the Pythia-70M shape on one GPU (prepared, not run on this CPU machine).
#
# Trains the tiny matched-initialisation study's variants (3 seeds each): vanilla, vanilla with
# twice the layers (2x non-embedding parameters, the papers' "twice the parameters"
# counterpart), vanilla under small_init/wang, pause, loop, PonderLM, AdaPonderLM, PonderLM-2
# with 1 and 2 thoughts, PonderLM-3 at compute penalty 0.01/0.1/1.0, and the
# iso-passes baselines (fixed pruning uniform/geometric, random halting at the trained
# AdaPonderLM's mean_iters) from examples/configs/pythia-70m-*.yml for TOKENS training tokens,
# then scores every checkpoint with `megaponder eval` (exact Jacobi evaluation for the latent
# families, recorded in the JSON; PonderLM-2/3 also in the official 3-pass mode, "eval_official")
# and the depth analysis. One JSON line per run goes to
# $OUT/results.jsonl; tables are then written by hand into benchmarks/results/.
#
#   DATA=data/pile/pile_text_document VALID=data/pile-val/pile_val_text_document \
#   TOKENIZER=data/tokenizer/20B_tokenizer.json TOKENS=300000000 bash benchmarks/quality_gpu.sh
#
# Every run uses one init scheme, model.init_method=$INIT (default official; docs/families.md
# "Initialisation"), so family gaps are not init gaps (benchmarks/results/matched-init.md);
# only vanilla-wang-* overrides it. Unlike the tiny study, each family keeps its paper's recipe
# (optim.weight_decay 0.01 for vanilla/PonderLM/AdaPonderLM, 0.1 for pause/loop/PonderLM-2/3,
# the PonderLM-2 schedule: docs/families.md "Recipes"), so those gaps mix recipe and method.
# The recipes set train.global_batch_size; this script overrides it with MICRO x ACCUM
# (one GPU, dp = 1), so STEPS x SEQ x MICRO x ACCUM = TOKENS holds.
# CPU smoke of every command on the demo data (a few minutes):
#   DATA=data/demo/train_text_document VALID=data/demo/validation_text_document \
#   TOKENIZER=data/demo/tokenizer.model TOKENIZER_TYPE=SentencePieceTokenizer PRECISION=fp32 \
#   SEQ=128 MICRO=2 ACCUM=2 TOKENS=1024 SEEDS=1234 EVAL_SAMPLES=8 DEPTH_WINDOWS=4 EVAL_EVERY=0 \
#   EXTRA="--set model.hidden_size=64 --set model.num_layers=1 --set model.num_heads=2" \
#   OUT=runs/quality-70m-smoke bash benchmarks/quality_gpu.sh
#
# Budget: at seq 2048 x global batch 64 (131,072 tokens/step) 300M tokens = 2,289 steps per run.
# PonderLM-family training costs ~6x vanilla's FLOPs at this shape (flops.py), PonderLM-2/3
# ~4-7x, so on one H100/H200-class GPU expect roughly 1 h for vanilla and 4-8 h per pondering run
# (12 runs per seed plus 3 iso-passes baselines: days of GPU time for 3 seeds; SEEDS=1234 first).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:?set DATA to the training prefix (PREFIX.bin/.idx)}
VALID=${VALID:?set VALID to the validation prefix}
TOKENIZER=${TOKENIZER:?set TOKENIZER to the tokenizer file}
TOKENS=${TOKENS:-300000000}
SEQ=${SEQ:-2048}
MICRO=${MICRO:-16}
ACCUM=${ACCUM:-4}
OUT=${OUT:-runs/quality-70m}
SEEDS=${SEEDS:-"1234 1 2"}
INIT=${INIT:-official}
EVAL_SAMPLES=${EVAL_SAMPLES:-2000}   # validation windows scored by `megaponder eval`
PY=${PY:-python}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HFTokenizer}   # SentencePieceTokenizer for a .model file
PRECISION=${PRECISION:-bf16}
EVAL_EVERY=${EVAL_EVERY:-500}
DEPTH_WINDOWS=${DEPTH_WINDOWS:-256}              # windows of the depth analysis
read -r -a EXTRA_SETS <<< "${EXTRA:-}"           # more --set overrides for every run (smoke: a tiny shape)

STEPS=$(( TOKENS / (SEQ * MICRO * ACCUM) ))
WARMUP=$(( STEPS / 100 + 1 ))
# AdaPonderLM: CE only for the first 30 %, bottom-k fraction rising to k_max by 60 %
S0=$(( STEPS * 3 / 10 )); S1=$(( STEPS * 6 / 10 ))
mkdir -p "$OUT"

train() {   # train NAME FAMILY [--set ...]
  local name=$1 family=$2; shift 2
  local run="$OUT/$name"
  if [ -f "$run/checkpoints/latest" ]; then echo "[quality_gpu] $name: exists"; return; fi
  local config="examples/configs/pythia-70m-$family.yml"
  $PY -m megaponder train --config "$config" --set model.init_method="$INIT" \
    --set train.run_dir="$run" --set train.steps="$STEPS" --set optim.warmup_steps="$WARMUP" \
    --set data.path="[$DATA]" --set data.valid_path="[$VALID]" --set data.tokenizer_model="$TOKENIZER" \
    --set data.tokenizer_type="$TOKENIZER_TYPE" --set train.precision="$PRECISION" \
    --set data.seq_length="$SEQ" --set train.micro_batch_size="$MICRO" \
    --set train.global_batch_size="$(( MICRO * ACCUM ))" --set train.save_every=0 \
    --set train.eval_every="$EVAL_EVERY" --set train.eval_batches=16 "${EXTRA_SETS[@]}" "$@"
}

score() {   # score NAME: full-split eval (+ official 3-pass eval for PonderLM-2/3) + depth analysis, one JSON line
  local name=$1 run="$OUT/$1"
  local eval_json official=""
  eval_json=$($PY -m megaponder eval --checkpoint "$run" --data "$VALID" --max-samples "$EVAL_SAMPLES" \
              --batch-size 8 | tail -n 1)
  case $name in   # the latent families: the exact default above and the authors' 3 Jacobi passes
    ponderlm2*|ponderlm3*)
      official=$($PY -m megaponder eval --checkpoint "$run" --data "$VALID" --max-samples "$EVAL_SAMPLES" \
                 --batch-size 8 --eval-mode official | tail -n 1) ;;
  esac
  $PY tools/analyze_depth.py --checkpoint "$run" --data "$VALID" --windows "$DEPTH_WINDOWS" --seq-length "$SEQ" \
    --compare-full-depth --output "$OUT/depth-$name.json" > /dev/null
  echo "{\"run\": \"$name\", \"eval\": $eval_json${official:+, \"eval_official\": $official}}" >> "$OUT/results.jsonl"
}

# the variants of the tiny matched-initialisation study (benchmarks/bench_matched_init.py,
# benchmarks/results/matched-init.md), every one under model.init_method=$INIT and every seed:
# vanilla, 2x depth, vanilla under Pythia's small_init/wang (the init check), pause, loop,
# PonderLM, AdaPonderLM, PonderLM-2 with 1 and 2 thoughts; PonderLM-3 at three compute-penalty
# weights (the ppl vs inference-FLOPs frontier beside them; recipe K_max = 3).
for seed in $SEEDS; do
  train "vanilla-s$seed" vanilla --set train.seed="$seed"
  train "vanilla2x-s$seed" vanilla --set train.seed="$seed" --set model.num_layers=12
  train "vanilla-wang-s$seed" vanilla --set train.seed="$seed" --set model.init_method=small_init_wang
  train "pause-s$seed" pause --set train.seed="$seed"
  train "loop-s$seed" loop --set train.seed="$seed"
  train "ponderlm-s$seed" ponderlm --set train.seed="$seed"
  train "adaponderlm-s$seed" adaponderlm --set train.seed="$seed" \
    --set ponder.halting_warmup_start="$S0" --set ponder.halting_warmup_end="$S1"
  train "ponderlm2-k1-s$seed" ponderlm2 --set train.seed="$seed" --set ponder.steps=1
  train "ponderlm2-k2-s$seed" ponderlm2 --set train.seed="$seed" --set ponder.steps=2
  for penalty in 0.01 0.1 1.0; do
    train "ponderlm3-p$penalty-s$seed" ponderlm3 --set train.seed="$seed" --set ponder.compute_penalty="$penalty"
  done
done

# iso-FLOPs on the papers' scale: the first AdaPonderLM's validation backbone passes per token
first_seed=${SEEDS%% *}
TARGET=$($PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; \
print([x for x in r if 'val_mean_iters' in x][-1]['val_mean_iters'])" "$OUT/adaponderlm-s$first_seed/metrics.jsonl")
echo "[quality_gpu] iso-passes target (AdaPonderLM mean_iters): $TARGET"
train fixed_pruning-uniform fixed_pruning --set ponder.prune_schedule=uniform --set ponder.target_mean_iters="$TARGET"
train fixed_pruning-geometric fixed_pruning --set ponder.prune_schedule=geometric --set ponder.target_mean_iters="$TARGET"
train random_halting random_halting --set ponder.target_mean_iters="$TARGET"

: > "$OUT/results.jsonl"
for run in "$OUT"/*/; do
  name=$(basename "$run")
  [ -f "$run/checkpoints/latest" ] && score "$name"
done
echo "[quality_gpu] done: $OUT/results.jsonl"
