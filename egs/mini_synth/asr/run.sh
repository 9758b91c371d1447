#!/usr/bin/env bash
# mini_synth ASR: CTC fine-tuning of the hubert recipe's checkpoints on little labelled speech, the way the field
# judges pretraining (HuBERT's Libri-light 10 min / 1 h tables), each beside the untrained model of the same config
# fine-tuned with the same recipe and steps (random:CKPT; its frontend is fbank, so that row is also "the spectral
# features, learned from the labels alone").
#   ./run.sh                      # after ../hubert/run.sh: subsets, 10 fine-tunings, decoding, table, report
#   ./run.sh --steps 60 --valid 2 --with-1h false   # make demo's budget: 7 runs in ~3 minutes on 2 CPU cores
#   ./run.sh --stage 3            # only the table and the report
# Stages:
#   0: speaker-balanced 10-minute and 1-hour labelled subsets of train (nested: same seed), phones.ctm with them
#   1: phone-unit fine-tuning (full) of iteration 2, iteration 1 and random:iteration-2 on both subsets, plus adapters
#      (encoder frozen) on iteration 2 and on the untrained model (10 minutes); then greedy decoding of test
#   2: char-unit fine-tuning (CER / WER) of iteration 2 and the untrained model on the 10-minute subset, decoded with
#      a beam search and a word 3-gram of the training transcripts
#   3: the hubert exp's report (speechssl report HUBERT_EXP --superb ../superb/exp --asr exp)
# Runs go in $nj lanes of nproc/nj threads (finished runs are skipped, so a rerun only does what is missing).
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
hubert=../hubert            # the hubert recipe: its data/ and exp/hubert_iter{1,2}/best
superb=../superb/exp        # SUPERB exp for the report (if it exists)
steps=600                   # updates per fine-tuning run (schedule stages are fractions of it: conf/finetune.yaml)
valid=4                     # validations per run (each a candidate for best/; 290 dev utterances, ~4 s on one core)
char_steps=""               # updates of the char-unit runs (default: $steps)
nj=2
seed=0
exp=exp
with_1h=true                # also the 1-hour subset (3 more runs; make demo: false, at 60 updates they do not rank)
objectives=""               # make compare: fine-tune these runs of the hubert recipe instead (exp/<name>/best, phones,
                            # 10 minutes, as phone_iter2_10min), e.g. "wav2vec2 bestrq"; the demo's runs are kept
help_message="Usage: $0 [--stage N] [--stop-stage N] [--hubert DIR] [--superb DIR] [--steps N] [--valid N] [--char-steps N] [--nj N]
          [--exp DIR] [--with-1h true|false] [--objectives 'wav2vec2 bestrq']"
. ../../../tools/parse_options.sh

data=$hubert/data
ckpt1=$hubert/exp/hubert_iter1/best
ckpt2=$hubert/exp/hubert_iter2/best
char_steps=${char_steps:-$steps}
for c in "$ckpt1" "$ckpt2"; do
  [ -f "$c/config.json" ] || { echo "$0: $c missing: run $hubert/run.sh first" >&2; exit 1; }
done
log() { echo "$(date '+%F %T') [asr] $*"; }

if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ] && [ ! -f "$exp/data/.done" ]; then
  log "stage 0: 10-minute and 1-hour speaker-balanced subsets of $data/train"
  rm -rf "$exp/data"; mkdir -p "$exp/data"
  for m in 10 60; do
    name=train_$( [ $m = 10 ] && echo 10min || echo 1h )
    speechssl data subset-minutes --data "$data/train" --minutes $m --seed "$seed" --out "$exp/data/$name"
    awk 'NR == FNR {keep[$1]; next} $1 in keep' "$exp/data/$name/utt2spk" "$data/train/phones.ctm" \
      > "$exp/data/$name/phones.ctm"
  done
  speechssl data validate "$exp/data/train_10min" && speechssl data validate "$exp/data/train_1h"
  touch "$exp/data/.done"
fi

# the schedule of a run of N updates: encoder frozen for 25%, tri-stage 10% / 40% / 50% (conf/finetune.yaml)
schedule() {
  local n=$1
  echo "optim.max_steps=$n optim.warmup_steps=$(( n / 10 )) optim.hold_steps=$(( n * 4 / 10 ))" \
       "optim.decay_steps=$(( n - n / 10 - n * 4 / 10 )) ctc.freeze_updates=$(( n / 4 ))" \
       "valid_every=$(( n / valid )) ckpt.every_steps=$(( n / valid ))"
}

# one run: NAME INIT SPLIT UNITS STEPS [TUNE] -> $exp/NAME (fine-tuned) and $exp/NAME/decode_test (scored)
run_one() {
  local name=$1 init=$2 split=$3 units=$4 n=$5 tune=${6:-full} out=$exp/$1 t0
  if [ -f "$out/config.yaml" ] && ! grep -q "^  max_steps: $n\$" "$out/config.yaml"; then
    log "$out was run with another number of updates ($(grep -m1 '^  max_steps:' "$out/config.yaml" | tr -d ' ')," \
        "now $n): remove it, or give another --exp"
    return 1
  fi
  [ -f "$out/decode_test/scores.json" ] && return 0
  t0=$(date +%s)
  log "fine-tune $name: --init $init --train $split --units $units --tune $tune ($n updates)"
  # shellcheck disable=SC2046
  speechssl finetune --config conf/finetune.yaml --init "$init" --train "$exp/data/$split" --dev "$data/dev" \
    --units "$units" --tune "$tune" --out "$out" --resume auto progress=false $(schedule "$n") > "$out.log" 2>&1 \
    || { log "fine-tune $name failed: see $out.log"; tail -n 3 "$out.log" >&2; return 1; }
  local dec=(--ckpt "$out/best" --data "$data/test" --out "$out/decode_test")
  [ "$units" = char ] && dec+=(--beam 50 --lm "$exp/lm/3gram.arpa" --lm-weight 1.0 --word-score 0.5)
  speechssl decode "${dec[@]}" >> "$out.log" 2>&1 || { log "decode $name failed: see $out.log"; return 1; }
  log "$name: $(cat "$out/decode_test/scores.json" | tr -d '\n ' | grep -o '"\(per\|cer\|wer\)":[0-9.e-]*' | tr '\n' ' ')($(( $(date +%s) - t0 )) s)"
}

lanes() {  # run the "name init split units steps tune" lines of stdin in $nj lanes
  local -a jobs pids; local lane i failed=0 threads
  mapfile -t jobs
  threads=$(( $(nproc) / nj )); [ "$threads" -ge 1 ] || threads=1
  for (( lane = 0; lane < nj; lane++ )); do
    (
      export OMP_NUM_THREADS=$threads
      for (( i = lane; i < ${#jobs[@]}; i += nj )); do
        # shellcheck disable=SC2086
        run_one ${jobs[$i]} || exit 1
      done
    ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return $failed
}

mkdir -p "$exp"
if [ -n "$objectives" ] && [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  start=$(date +%s)
  for o in $objectives; do
    [ -f "$hubert/exp/$o/best/config.json" ] || { echo "$0: $hubert/exp/$o/best missing: run $hubert/run.sh --objective $o first" >&2; exit 1; }
    echo "phone_${o}_10min $hubert/exp/$o/best train_10min phone $steps full"
  done | lanes || { log "stage 1 (objectives) failed"; exit 1; }
  log "stage 1 ($objectives) took $(( $(date +%s) - start )) s"
elif [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  start=$(date +%s)
  skip='^$'; $with_1h || skip=' train_1h '  # grep -v: the lines of no run / of the 1-hour runs
  grep -v -- "$skip" <<EOF | lanes || { log "stage 1 failed"; exit 1; }
phone_iter2_10min $ckpt2 train_10min phone $steps full
phone_random_10min random:$ckpt2 train_10min phone $steps full
phone_iter1_10min $ckpt1 train_10min phone $steps full
adapters_iter2_10min $ckpt2 train_10min phone $steps adapters
phone_iter2_1h $ckpt2 train_1h phone $steps full
phone_random_1h random:$ckpt2 train_1h phone $steps full
phone_iter1_1h $ckpt1 train_1h phone $steps full
adapters_random_10min random:$ckpt2 train_10min phone $steps adapters
EOF
  log "stage 1 took $(( $(date +%s) - start )) s"
fi

if [ -z "$objectives" ] && [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  start=$(date +%s)
  mkdir -p "$exp/lm"
  [ -f "$exp/lm/3gram.arpa" ] || python3 -c "import sys; from speechssl.asr.lm import build_arpa_from_text as b; \
b(sys.argv[1], sys.argv[2], order=3)" "$data/train/text" "$exp/lm/3gram.arpa"
  lanes <<EOF || { log "stage 2 failed"; exit 1; }
char_iter2_10min $ckpt2 train_10min char $char_steps full
char_random_10min random:$ckpt2 train_10min char $char_steps full
EOF
  log "stage 2 took $(( $(date +%s) - start )) s"
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  opts=(--asr "$exp")
  [ -d "$superb" ] && opts+=(--superb "$superb")
  report=$(speechssl report "$hubert/exp" "${opts[@]}")
  log "report: $report (its fine-tuning section: this recipe's runs)"
fi
