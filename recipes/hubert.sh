#!/usr/bin/env bash
# HuBERT recipe, corpus-independent: features -> k-means units -> pretraining -> units of a hidden layer -> the next
# iteration, for --iterations iterations, then exp/report.md. With --objective wav2vec2 or bestrq, the same stages
# train that objective instead, in one run (exp/<objective>): no k-means, no labels, no iterations (they make their
# own targets); stage 2 then dumps only the spectral features the per-layer report compares with.
# Called by egs/<corpus>/hubert/run.sh after the corpus-specific data preparation (stage 0 there).
# Every stage reads files and writes files; a finished stage leaves <out>/.done and is skipped when re-run.
#
#   recipes/hubert.sh --data data --train-set train --dev-set dev --stage 1 --stop-stage 10
#
# Launching. Every parallel stage (features, hidden-layer sample, labels, pretraining) goes through `launch`:
#   one process (default), or torchrun on --ngpu processes per node x --nnodes nodes (c10d rendezvous at
#   --master-addr:--master-port), or a --launcher command prefix (e.g. srun ... torchrun ... --no-python) that is
#   given `speechssl VERB ...`. With --nnodes N, start this same command on every node with its --node-rank; the
#   directories must be on a filesystem every node sees. Node 0 (the head) runs the serial stages (validation,
#   k-means fits, reports); the other nodes wait for their .done markers and join every parallel launch.
#   SIGTERM/SIGINT are forwarded to the running launch (a preempted pretraining run saves a checkpoint); the
#   stage is left unfinished and a re-run resumes it (`speechssl pretrain --resume auto`).
set -euo pipefail

stage=1
stop_stage=100
objective=hubert         # hubert | wav2vec2 | bestrq (models/pretrain.py); the latter two: one run, exp/<objective>
data=data                # directory holding the Kaldi data dirs
train_set=train
dev_set=dev
dump=dump                # features and labels
exp=exp                  # k-means models, checkpoints, reports
nj=2                     # shards of feature dumping / sampling / labelling (at least the number of processes)
iterations=2             # pretraining iterations (at most 4): 1 on --feats1 units, then each on units of a
                         # hidden layer of the iteration before
feats1=mfcc              # iteration-1 target sets, FEAT[:CMVN] each (FEAT mfcc: 39-d, the paper's, or fbank: 80-d;
                         # CMVN per utterance: mean or meanvar, per speaker: spk-mean or spk-meanvar, none
                         # without); several = one k-means and one
                         # prediction head each (the paper's cluster ensembles), e.g. "fbank:meanvar mfcc"
k1=100                   # iteration 1: k-means on each of those features
k2=100                   # iteration N >= 2: k-means on a hidden layer of iteration N-1's model
k3=""                    # (--k3, --k4: iterations 3 and 4; default: k2)
k4=""
sample_frac=0.1          # k-means sample of iteration 1's targets: fraction of the frames
hidden_sample_frac=auto  # iterations >= 2: fraction of the train utterances whose hidden layer is dumped for k-means
                         # (only they are written; the labels are streamed). auto: sample_frac, but no more than
                         # 1.2 x max_frames at 50 Hz (k-means reads at most max_frames): 960 h -> 0.014, ~3.7 GB for
                         # Base instead of 26.5 GB at 0.1
max_frames=2000000
iter1_conf=""            # default conf/pretrain_iter1.yaml (--objective hubert), conf/pretrain_<objective>.yaml
iter2_conf=conf/pretrain_iter2.yaml
iter3_conf=conf/pretrain_iter3.yaml
iter4_conf=conf/pretrain_iter4.yaml
iter1_opts=""            # extra key=value overrides of iteration N (e.g. "optim.max_minutes=20")
iter2_opts=""
iter3_opts=""
iter4_opts=""
iter2_init=false         # true: iteration N starts from iteration N-1's encoder (ckpt.init_from), false: from
iter3_init=false         # scratch (paper); the prediction head always starts fresh
iter4_init=false
layer=auto               # hidden layer for the units of iteration N >= 2 (--layer2 .. --layer4 for one iteration);
layer2=""                # auto = `speechssl units best-layer`: best PNMI of iteration N-1's per-layer report, or
layer3=""                # without alignments the middle transformer layer (HuBERT Base: 6 of 12)
layer4=""
alignments=              # phone CTM of the train set for label-quality reports (optional; empty or none: no
                         # quality and per-layer reports)
layers_opts="--max-utts 500"  # `units layers` options: which utterances to score (two model passes over them)
report=true              # write $exp/report.md at the end (speechssl report)
superb=""                # SUPERB experiment dirs to include in the report
# launching (see the header)
ngpu=0                   # processes per node (one per GPU; 0: one process, CPU or the one GPU)
nnodes=1
node_rank=0
master_addr=127.0.0.1
master_port=29500
rdzv_timeout=3600        # seconds a node waits for the others at a launch (the head may still be on a serial stage)
launcher=""              # a command prefix that runs `speechssl VERB ...` on every process instead
help_message="Usage: $0 [options]
  --objective hubert|wav2vec2|bestrq   the pretraining objective (wav2vec2, bestrq: one run -> exp/<objective>,
                               no k-means or label stages, --iter1-conf / --iter1-opts are its config)
  --stage N / --stop-stage N   run stages N..M: 1 validate, 2 MFCC/fbank, 3 k-means, 4 labels, 5 unit quality (iteration-1
                               targets), then for iteration i: 3i+3 pretrain, 3i+4 per-layer units, and for i >= 2
                               3i+2 its units from a hidden layer of iteration i-1 (iteration 2: stages 8, 9, 10)
  --data DIR --train-set NAME --dev-set NAME --dump DIR --exp DIR --nj N
  --iterations N               pretraining iterations (1..4; default 2)
  --feats1 'FEAT[:CMVN] ...'   iteration-1 target sets (FEAT mfcc|fbank, CMVN per utterance mean|meanvar or per
                               speaker spk-mean|spk-meanvar; default: mfcc, as the
                               paper); several: one k-means each and a target set each (cluster ensemble)
  --k1 K .. --k4 K --iter1-conf YAML .. --iter4-conf YAML --iter1-opts 'k=v ...' .. --iter4-opts
  --sample-frac F --max-frames N   k-means sample of iteration 1 (fraction of the frames, at most N frames)
  --hidden-sample-frac F|auto  later iterations: fraction of the train utterances dumped for k-means (auto: F, at
                               most 1.2 x max-frames frames at 50 Hz)
  --alignments CTM|''|none     phone CTM of the train set; without it stages 5 and 3i+4 are skipped
  --layer L|auto               hidden layer for the units of iterations >= 2 (--layer2 .. --layer4: one iteration);
                               auto: best PNMI of the previous per-layer report (needs alignments), otherwise
                               ceil(layers/2) of the previous model (speechssl units best-layer)
  --iter2-init true|false      iteration 2 (..4) from the previous encoder instead of from scratch (head always fresh)
  --layers-opts '--max-utts N'  options of the per-layer reports
  --report true|false --superb 'DIR ...'   $exp/report.md at the end, with these SUPERB experiments
  --ngpu N --nnodes N --node-rank R --master-addr HOST --master-port P --rdzv-timeout S
                               torchrun (c10d rendezvous) for every parallel stage; run on every node
  --launcher 'CMD'             or this prefix for every parallel stage (e.g. 'srun ... torchrun ... --no-python')"

. "$(dirname "$0")/../tools/parse_options.sh"

log() { echo "$(date '+%F %T') [hubert.sh] $*"; }
stage_pending() {  # stage_pending OUT_DIR : succeeds (the stage must run) while OUT_DIR/.done is missing
  [ ! -f "$1/.done" ]
}
in_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
var() { local name="$1$2$3"; echo "${!name}"; }  # var iter 2 _conf -> $iter2_conf

# ---------------------------------------------------------------------------------------------------- launching
nproc=$(( ngpu > 0 ? ngpu : 1 ))
world=$(( nproc * nnodes ))
[ "$nnodes" -ge 1 ] && [ "$node_rank" -ge 0 ] && [ "$node_rank" -lt "$nnodes" ] || {
  echo "$0: --node-rank $node_rank must be in [0, --nnodes $nnodes)" >&2; exit 1; }
is_head=true
[ "$node_rank" -eq 0 ] || is_head=false
launches=0
stopping=false
forward_to=""
on_signal() { stopping=true; [ -n "$forward_to" ] && kill -TERM "$forward_to" 2>/dev/null; return 0; }
trap on_signal TERM INT

run_child() {  # run_child CMD... : CMD as a child that SIGTERM/SIGINT reach (bash would wait for it and then die)
  if $stopping; then log "stopped by a signal (run again to resume)"; exit 143; fi
  "$@" &
  forward_to=$!
  local rc=0
  wait "$forward_to" || rc=$?
  while kill -0 "$forward_to" 2>/dev/null; do  # a signal ended the wait: wait for the child to save and exit
    rc=0; wait "$forward_to" || rc=$?
  done
  forward_to=""
  if $stopping; then log "stopped by a signal (the stage is unfinished; run again to resume)"; exit 143; fi
  return "$rc"
}

launch() {  # launch VERB ARGS... : `speechssl VERB ARGS` on every process of the job (see the header)
  launches=$((launches + 1))
  if [ -n "$launcher" ]; then
    # shellcheck disable=SC2086
    run_child $launcher speechssl "$@"
  elif [ "$world" -gt 1 ]; then
    # one rendezvous per launch: its id is the launch's place in the recipe, the same on every node
    run_child torchrun --nnodes "$nnodes" --nproc-per-node "$nproc" \
      --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port" --rdzv-id "speechssl-$(basename "$exp")-$launches" \
      --rdzv-conf "join_timeout=$rdzv_timeout,read_timeout=$rdzv_timeout" --max-restarts 0 \
      --no-python speechssl "$@"
  else
    run_child speechssl "$@"
  fi
}

serial() {  # serial CMD... : on the head node only (k-means fits, reports); the others skip it
  if $is_head; then run_child "$@"; fi
}

done_mark() {  # done_mark DIR : the head marks a finished stage
  if $is_head; then touch "$1/.done"; fi
}

after_head() {  # after_head DIR : on the other nodes, wait until the head has finished DIR (DIR/.done)
  $is_head && return 0
  if [ ! -f "$1/.done" ]; then
    log "node $node_rank: waiting for the head node to finish $1"
    while [ ! -f "$1/.done" ]; do sleep 5; done
  fi
}

# ---------------------------------------------------------------------------------------------------- stages
run_name() {  # run_name N : the exp subdirectory of iteration N (hubert_iterN; wav2vec2 / bestrq: the objective)
  if [ "$objective" = hubert ]; then echo "hubert_iter$1"; else echo "$objective"; fi
}

pretrain_iteration() {  # pretrain_iteration STAGE N K 'LABEL_ROOT ...' : iteration N -> exp/$(run_name N)
  local stage_no=$1 it=$2 k=$3 labels=$4  # one target set (k classes) per label root (none: wav2vec2, bestrq)
  local out l tr=() dv=() nc=() init_opt=() label_opts=()
  out=$exp/$(run_name "$it")
  for l in $labels; do tr+=("$l/$train_set"); dv+=("$l/$dev_set"); nc+=("$k"); done
  stage_pending "$out" || return 0
  if [ "$objective" = hubert ]; then
    log "stage $stage_no: HuBERT iteration $it -> $out"
    label_opts=(data.train_labels="[$(IFS=,; echo "${tr[*]}")]" data.dev_labels="[$(IFS=,; echo "${dv[*]}")]"
                model.num_classes="[$(IFS=,; echo "${nc[*]}")]")
  else
    log "stage $stage_no: $objective pretraining (its own targets) -> $out"
    label_opts=("data.train_labels=[]" "data.dev_labels=[]" "model.objective=$objective")
  fi
  if [ "$it" -gt 1 ] && $(var iter "$it" _init); then
    init_opt=("ckpt.init_from=$exp/$(run_name $((it - 1)))/best")
  fi
  # shellcheck disable=SC2046
  launch pretrain --config "$(var iter "$it" _conf)" --resume auto exp_dir="$out" \
    data.train="$train" data.dev="$dev" "${label_opts[@]}" "${init_opt[@]}" $(var iter "$it" _opts)
  done_mark "$out"
}

label_sets() {  # label_sets STAGE WHAT OUT_ROOT ARGS... : `kmeans label ARGS` of the train and dev sets -> OUT_ROOT/<set>
  local stage_no=$1 what=$2 root=$3 s out a args  # in ARGS, {set} stands for the set
  shift 3
  for s in $train_set $dev_set; do
    out=$root/$s
    if stage_pending "$out"; then
      log "stage $stage_no: $what for $s -> $out"
      args=()
      for a in "$@"; do args+=("${a//\{set\}/$s}"); done
      launch kmeans label "${args[@]}" --nshard "$nj" --out "$out"
      done_mark "$out"
    fi
  done
}

layer_report() {  # layer_report STAGE N K : PNMI by layer of iteration N's best checkpoint (skipped without alignments)
  local stage_no=$1 it=$2 k=$3
  local out
  out=$exp/$(run_name "$it")/layers
  if [ -z "$alignments" ]; then
    log "stage $stage_no: no alignments, no per-layer report of iteration $it"
    return 0
  fi
  stage_pending "$out" || return 0
  $is_head || return 0
  log "stage $stage_no: what each layer of iteration $it learned (PNMI by layer, k=$k, beside an untrained model and ${sets1[0]} units)"
  # shellcheck disable=SC2086
  serial speechssl units layers --ckpt "$exp/$(run_name "$it")/best" --data "$train" --alignments "$alignments" \
    --k "$k" --spectral "$dump/${sets1[0]}/$train_set" $layers_opts --out "$out"
  done_mark "$out"
}

hidden_units() {  # hidden_units STAGE N K : units of a hidden layer of iteration N-1 -> $dump/labels_iterN
  local stage_no=$1 it=$2 k=$3 prev=$(( $2 - 1 ))
  local ckpt=$exp/hubert_iter$prev/best lay best_opts
  lay=$(var layer "$it" "")
  [ -n "$lay" ] || lay=$layer
  if [ "$lay" = auto ]; then  # best PNMI of the previous per-layer report; without alignments the middle layer
    best_opts=(--ckpt "$ckpt")
    if [ -n "$alignments" ]; then
      after_head "$exp/hubert_iter$prev/layers"
      best_opts+=(--layers-json "$exp/hubert_iter$prev/layers/layers.json")
    fi
    lay=$(speechssl units best-layer "${best_opts[@]}")
  fi
  # Only the k-means sample is dumped: --sample-frac of the train utterances (disk O(sample), not O(corpus)); the
  # labels of every utterance come from one streaming pass (model forward, nearest centroid), never written.
  local sample=$dump/hidden_iter${prev}_L${lay}_sample km=$exp/kmeans_iter${prev}_L${lay}_k$k
  if stage_pending "$sample"; then
    log "stage $stage_no: layer $lay of iteration $prev for a $hidden_sample_frac sample of $train_set -> $sample/layer_$lay"
    launch extract --upstream "$ckpt" --data "$train" --layers "$lay" --sample-frac "$hidden_sample_frac" \
      --nshard "$nj" --out "$sample"
    done_mark "$sample"
  fi
  if stage_pending "$km"; then
    if $is_head; then
      log "stage $stage_no: k-means k=$k on layer $lay of iteration $prev (the sample's frames)"
      serial speechssl kmeans fit --feats "$sample/layer_$lay" --k "$k" --sample-frac 1 --max-frames "$max_frames" \
        --out "$km"
      done_mark "$km"
    fi
    after_head "$km"
  fi
  label_sets "$stage_no" "iteration-$it labels (layer $lay of iteration $prev, streamed)" "$dump/labels_iter$it" \
    --upstream "$ckpt" --layer "$lay" --data "$data/{set}" --km "$km"
}

# ---------------------------------------------------------------------------------------------------- the chain
[ "$alignments" = none ] && alignments=
case "$objective" in
  hubert) iter1_conf=${iter1_conf:-conf/pretrain_iter1.yaml} ;;
  wav2vec2|bestrq)
    iter1_conf=${iter1_conf:-conf/pretrain_$objective.yaml}
    [ "$iterations" -eq 2 ] && iterations=1  # the default; another number is refused below
    [ "$iterations" -eq 1 ] || { echo "$0: --objective $objective has no iterations (it makes its own targets), got --iterations $iterations" >&2; exit 1; } ;;
  *) echo "$0: --objective must be hubert, wav2vec2 or bestrq, got '$objective'" >&2; exit 1 ;;
esac
train=$data/$train_set
dev=$data/$dev_set
if [ "$hidden_sample_frac" = auto ]; then  # from the train set's utt2dur (without one: sample_frac)
  hidden_sample_frac=$sample_frac
  if [ -f "$train/utt2dur" ]; then
    hidden_sample_frac=$(awk -v mf="$max_frames" -v sf="$sample_frac" '{ s += $2 } END {
      f = (s > 0) ? 1.2 * mf / (s * 50) : sf; if (f > sf) f = sf; printf "%.3g", f }' "$train/utt2dur")
  fi
fi
[ "$iterations" -ge 1 ] && [ "$iterations" -le 4 ] || { echo "$0: --iterations must be 1..4, got $iterations" >&2; exit 1; }
sets1=()    # names of the iteration-1 feature stores, k-means dirs and label roots: mfcc, fbank_cmvn-meanvar, ...
for f in $feats1; do
  case "$f" in mfcc|fbank|mfcc:none|fbank:none) sets1+=("${f%:none}") ;;
    mfcc:mean|mfcc:meanvar|fbank:mean|fbank:meanvar|mfcc:spk-mean|mfcc:spk-meanvar|fbank:spk-mean|fbank:spk-meanvar)
      sets1+=("${f%%:*}_cmvn-${f#*:}") ;;
    *) echo "$0: --feats1: '$f' is not FEAT[:CMVN] with FEAT mfcc|fbank and CMVN none|mean|meanvar|spk-mean|spk-meanvar" >&2
       exit 1 ;;
  esac
done
[ "${#sets1[@]}" -ge 1 ] || { echo "$0: --feats1 is empty" >&2; exit 1; }
labels1=""  # iteration-1 label roots, one per target set
for f1 in "${sets1[@]}"; do labels1="$labels1 $dump/labels_iter1_$f1"; done
if [ "$world" -gt 1 ] || [ -n "$launcher" ]; then
  log "launching parallel stages on ${launcher:-torchrun: $nnodes node(s) x $nproc process(es), rendezvous $master_addr:$master_port}; this is node $node_rank"
fi

if in_stage 1 && $is_head; then
  log "stage 1: validate data dirs and read every audio header (a bad file is named here, not hours later)"
  for d in "$train" "$dev"; do serial speechssl data validate --audio --nj "$nj" "$d"; done
fi

for f1 in "${sets1[@]}"; do  # stages 2-5 for each iteration-1 target set
  feat=${f1%%_cmvn-*}; cmvn=none; cmvn_opt=()
  [ "$f1" != "$feat" ] && cmvn=${f1#*_cmvn-} && cmvn_opt=(--cmvn "$cmvn")
  km=$exp/kmeans_${f1}_k$k1
  dump_sets="$train_set $dev_set"
  if [ "$objective" != hubert ]; then  # no k-means targets: only the spectral features of the per-layer report
    dump_sets=""
    [ -n "$alignments" ] && [ "$f1" = "${sets1[0]}" ] && dump_sets=$train_set
  fi
  if in_stage 2; then
    for s in $dump_sets; do
      out=$dump/$f1/$s
      if stage_pending "$out"; then
        log "stage 2: $feat (CMVN: $cmvn, 100 Hz) for $s -> $out"
        launch features dump --data "$data/$s" --kind "$feat" "${cmvn_opt[@]}" --nshard "$nj" --out "$out"
        done_mark "$out"
      fi
    done
  fi
  [ "$objective" = hubert ] || continue  # wav2vec2, bestrq: no k-means, labels or label quality

  if in_stage 3 && stage_pending "$km"; then
    if $is_head; then
      log "stage 3: k-means k=$k1 on $f1 of $train_set -> $km"
      serial speechssl kmeans fit --feats "$dump/$f1/$train_set" --k "$k1" --sample-frac "$sample_frac" \
        --max-frames "$max_frames" --out "$km"
      done_mark "$km"
    fi
  fi

  if in_stage 4; then
    after_head "$km"
    label_sets 4 "iteration-1 labels ($f1 units)" "$dump/labels_iter1_$f1" --feats "$dump/$f1/{set}" --km "$km"
  fi

  if in_stage 5 && $is_head; then
    if [ -z "$alignments" ]; then
      log "stage 5: no alignments, no quality report of the $f1 units"
    else
      log "stage 5: quality of the $f1 units against $alignments"
      serial speechssl units quality --labels "$dump/labels_iter1_$f1/$train_set" --alignments "$alignments" \
        --out "$km/quality.json" --plot "$km/quality.png"
    fi
  fi
done

for it in $(seq 1 "$iterations"); do  # iteration i: stages 3i+2 (units, i >= 2), 3i+3 (pretrain), 3i+4 (layers)
  k=$(var k "$it" "")
  k=${k:-$k2}
  if [ "$it" -gt 1 ] && in_stage $((3 * it + 2)); then
    hidden_units $((3 * it + 2)) "$it" "$k"
  fi
  if in_stage $((3 * it + 3)); then
    if [ "$it" -eq 1 ]; then labels=$labels1; else labels=$dump/labels_iter$it; fi
    pretrain_iteration $((3 * it + 3)) "$it" "$k" "$labels"
  fi
  if in_stage $((3 * it + 4)); then  # k of the units the next iteration would take from this model
    if [ "$it" -eq 1 ]; then layer_report 7 1 "$k2"; else layer_report $((3 * it + 4)) "$it" "$k"; fi
  fi
done

if $report && $is_head && [ "$stop_stage" -ge $((3 * iterations + 4)) ]; then
  superb_opts=()
  for s in $superb; do superb_opts+=(--superb "$s"); done
  log "report: $exp/report.md"
  serial speechssl report "$exp" "${superb_opts[@]}"
fi
log "done (stages $stage..$stop_stage)"
