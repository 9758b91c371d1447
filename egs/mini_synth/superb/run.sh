#!/usr/bin/env bash
# mini_synth SUPERB: the ten tasks (PR, ASR, KS, QbE, SID, ASV, SD, ER, IC, SF) on the hubert recipe's corpus for
# four upstreams — fbank (SUPERB's spectral baseline), the untrained model of iteration 1's config (random init),
# and the iteration-1 and iteration-2 checkpoints — then one markdown table (exp/table.md), and the hubert exp's
# report (report.md, with this SUPERB exp in it). PR, ASR, KS, SID, ASV and IC read the corpus itself; QbE, SD, ER
# and SF read data made from it in stage 0 by local/make_{qbe,mixtures,emotions,slots}.py (queries and documents,
# two-speaker mixtures with RTTMs, emotional styles in 5 sessions, slot-tagged commands).
#   ./run.sh                          # after ../hubert/run.sh
#   ./run.sh --upstreams "fbank mfcc" --tasks "pr sid"
#   ./run.sh --stage 2                # only the table and the report
#   ./run.sh --upstreams "fbank fbank:nocmvn random:../hubert/exp/hubert_iter1/best ../hubert/exp/hubert_iter1/best"
#     (fbank:nocmvn: fbank without per-utterance CMVN, the informative spectral baseline for the mean-pooled
#      SID / KS / IC heads, which SUPERB's CMVN'd fbank leaves with nothing but the class prior)
# Heads, steps, batches and the generated sets are sized so the stage takes <= 7 minutes on 2 CPU cores (6.2 measured
# for the nine tasks of `make demo`; conf/*.yaml say how they differ from SUPERB's). Finished runs are reused
# (--resume), so a rerun only does what is missing.
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
hubert=../hubert          # the hubert recipe: its data/ and exp/hubert_iter{1,2}/best
data=""                   # its data dir (default $hubert/data)
ckpt1=""                  # iteration-1 checkpoint (default $hubert/exp/hubert_iter1/best)
ckpt2=""                  # iteration-2 checkpoint (default $hubert/exp/hubert_iter2/best)
tasks="pr asr ks qbe sid asv sd er ic sf"
upstreams=""              # default: fbank random:ITER1 ITER1 ITER2 (the checkpoints that exist)
train_every=3             # train on every 3rd training utterance (40 of the 120 minutes) to fit the budget
nj=2                      # upstreams evaluated side by side (each lane gets nproc/nj threads)
superb_opts=""            # extra options for every `speechssl superb` run (e.g. "--max-steps 10 --no-progress")
exp=exp
hubert_exp=""             # the hubert exp whose report gets this SUPERB table (default: the dir above ckpt1's run)
help_message="Usage: $0 [--stage N] [--stop-stage N] [--hubert DIR] [--data DIR] [--ckpt1 DIR] [--ckpt2 DIR]
          [--tasks 'pr asr ks qbe sid asv sd er ic sf'] [--upstreams 'fbank random:CKPT CKPT ...'] [--train-every N]
          [--nj N] [--superb-opts '...'] [--exp DIR] [--hubert-exp DIR]
  stage 0: training subset + speaker-verification trials, and the data of QbE, SD, ER and SF (for the tasks asked
  for); 1: every task x upstream; 2: the table;
  3: the hubert exp's report regenerated with this SUPERB exp (speechssl report HUBERT_EXP --superb EXP)."
. ../../../tools/parse_options.sh

data=${data:-$hubert/data}
ckpt1=${ckpt1:-$hubert/exp/hubert_iter1/best}
ckpt2=${ckpt2:-$hubert/exp/hubert_iter2/best}
hubert_exp=${hubert_exp:-$(dirname "$(dirname "$ckpt1")")}
[ -f "$data/corpus.json" ] || { echo "$0: $data/corpus.json missing: run $hubert/run.sh first" >&2; exit 1; }
if [ -z "$upstreams" ]; then
  upstreams=fbank
  [ -f "$ckpt1/config.json" ] && upstreams="$upstreams random:$ckpt1 $ckpt1"
  [ -f "$ckpt2/config.json" ] && upstreams="$upstreams $ckpt2"
  [ -f "$ckpt1/config.json" ] || echo "$0: no $ckpt1: only the fbank baseline (run $hubert/run.sh first)" >&2
fi
log() { echo "$(date '+%F %T') [superb] $*"; }

if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ] && [ ! -f "$exp/data/.done" ]; then
  log "stage 0: 1 training utterance in ${train_every} -> $exp/data/train; trials for dev and test_spk"
  rm -rf "$exp/data"
  mkdir -p "$exp/data"
  awk -v n="$train_every" '(NR - 1) % n == 0 {print $1}' "$data/train/utt2spk" > "$exp/data/train.list"
  speechssl data subset "$data/train" "$exp/data/train" --utt-list "$exp/data/train.list"
  awk 'NR == FNR {keep[$1]; next} $1 in keep' "$exp/data/train.list" "$data/train/phones.ctm" \
    > "$exp/data/train/phones.ctm"
  speechssl superb trials --data "$data/dev" --out "$exp/data/trials_dev"
  speechssl superb trials --data "$data/test_spk" --out "$exp/data/trials_test_spk"
  touch "$exp/data/.done"
fi

# stage 0, the tasks with data of their own (each tree appears by one rename; an existing one is kept)
make_task_data() {  # task -> its generator
  case "$1" in
    qbe) echo "local/make_qbe.py --corpus $data --out $exp/data/qbe" ;;
    sd) echo "local/make_mixtures.py --corpus $data --out $exp/data/sd" ;;
    er) echo "local/make_emotions.py --hubert-data $data --out $exp/data/er" ;;
    sf) echo "local/make_slots.py --corpus $data --out $exp/data/sf" ;;
  esac
}
if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
  for task in $tasks; do
    gen=$(make_task_data "$task")
    if [ -n "$gen" ] && [ ! -d "$exp/data/$task" ]; then
      log "stage 0: $task data -> $exp/data/$task"
      python3 $gen
    fi
  done
fi

name_of() {  # directory name of an upstream: fbank, random_hubert_iter1, hubert_iter1, ...
  case "$1" in
    random:*) echo "random_$(basename "$(dirname "${1#random:}")")" ;;
    fbank|mfcc|fbank:*|mfcc:*) echo "${1/:/_}" ;;
    *) basename "$(dirname "$1")" ;;
  esac
}

run_task() {  # one task on one upstream, unless another lane claimed it (mkdir is atomic) or it is finished
  local up=$1 task=$2 out opts
  out=$exp/$(name_of "$up")/$task
  [ -f "$out/results.json" ] && return 0
  mkdir "$exp/.claims/$(name_of "$up")_$task" 2> /dev/null || return 0
  log "stage 1: $task on $up -> $out"
  case "$task" in
    asv) opts=(--train "$exp/data/train" --dev "$data/dev" --test "$data/test_spk"
               --dev-trials "$exp/data/trials_dev" --test-trials "$exp/data/trials_test_spk") ;;
    qbe|sd|er|sf) opts=(--data "$exp/data/$task") ;;
    *) opts=(--train "$exp/data/train" --dev "$data/dev" --test "$data/test") ;;
  esac
  speechssl superb --task "$task" --upstream "$up" "${opts[@]}" --conf "conf/$task.yaml" \
    --cache-dir "$exp/feature_cache" --out "$out" --resume $superb_opts
}

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  # Upstreams are independent (each has its own feature cache), so they run in $nj lanes of
  # $(nproc)/$nj threads each: on 2 cores two 1-thread lanes finish the stage ~1.2x sooner than one 2-thread
  # process (the small heads do not scale to 2 threads). Lane i takes upstreams i, i+nj, ..., every task in order;
  # then, so that no lane idles while another still works, it takes the tasks with data dirs of their own
  # (sf er sd qbe: no other task extracts their features, so two lanes never build one cache) of the other lanes'
  # upstreams, last first. Each (upstream, task) is claimed once, by mkdir.
  start=$(date +%s)
  read -r -a ups <<< "$upstreams"
  threads=$(( $(nproc) / nj )); [ "$threads" -ge 1 ] || threads=1
  rm -rf "$exp/.claims"
  mkdir -p "$exp/.claims"
  own_data=""
  for task in $tasks; do case "$task" in qbe|sd|er|sf) own_data="$task $own_data" ;; esac; done
  pids=()
  for (( lane = 0; lane < nj; lane++ )); do
    (
      export OMP_NUM_THREADS=$threads
      for (( i = lane; i < ${#ups[@]}; i += nj )); do
        up_start=$(date +%s)
        for task in $tasks; do run_task "${ups[$i]}" "$task"; done
        log "stage 1: lane $lane: ${ups[$i]} took $(( $(date +%s) - up_start )) s"
      done
      for (( i = ${#ups[@]} - 1; i >= 0; i-- )); do
        for task in $own_data; do run_task "${ups[$i]}" "$task"; done
      done
    ) &
    pids+=($!)
  done
  failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  rm -rf "$exp/.claims"
  [ "$failed" = 0 ] || { log "stage 1 failed (see the errors above)"; exit 1; }
  log "stage 1 took $(( $(date +%s) - start )) s ($nj lanes x $threads threads)"
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  speechssl superb table "$exp/*/*/results.json" --out "$exp/table.md"
  log "table: $exp/table.md"
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  if [ -d "$hubert_exp" ]; then
    report=$(speechssl report "$hubert_exp" --superb "$exp")
    log "report: $report"
  else
    log "stage 3: no $hubert_exp, no report (run $hubert/run.sh first)"
  fi
fi
