#!/usr/bin/env bash
# HuBERT recipe, corpus-independent: features -> k-means units -> pretraining -> units of a hidden layer -> iteration 2.
# Called by egs/<corpus>/hubert/run.sh after the corpus-specific data preparation (stage 0 there).
# Every stage reads files and writes files; a finished stage leaves <out>/.done and is skipped when re-run.
#
#   recipes/hubert.sh --data data --train-set train --dev-set dev --stage 1 --stop-stage 9
set -euo pipefail

stage=1
stop_stage=100
data=data                # directory holding the Kaldi data dirs
train_set=train
dev_set=dev
dump=dump                # features and labels
exp=exp                  # k-means models, checkpoints, reports
nj=2                     # shards for feature dumping / labelling
feats1=mfcc              # iteration-1 target sets, FEAT[:CMVN] each (FEAT mfcc: 39-d, the paper's, or fbank: 80-d;
                         # CMVN per utterance: mean or meanvar, per speaker: spk-mean or spk-meanvar, none
                         # without); several = one k-means and one
                         # prediction head each (the paper's cluster ensembles), e.g. "fbank:meanvar mfcc"
k1=100                   # iteration 1: k-means on each of those features
k2=100                   # iteration 2: k-means on a hidden layer of the iteration-1 model
sample_frac=0.1
max_frames=2000000
iter1_conf=conf/pretrain_iter1.yaml
iter2_conf=conf/pretrain_iter2.yaml
iter1_opts=""            # extra key=value overrides for iteration 1 (e.g. "optim.max_minutes=20")
iter2_opts=""
iter2_init=false         # true: iteration 2 starts from iteration 1's encoder (ckpt.init_from), false: from scratch (paper)
layer=auto               # hidden layer for iteration-2 labels; auto = `speechssl units best-layer`: best PNMI of stage 7,
                         # or without alignments the middle transformer layer (HuBERT Base: 6 of 12)
alignments=              # phone CTM of the train set for label-quality reports (optional; empty or none: stages 5, 7, 10 skipped)
layers_opts="--max-utts 500"  # `units layers` options: which utterances to score (two model passes over them)
help_message="Usage: $0 [options]
  --stage N / --stop-stage N   run stages N..M (1 validate, 2 MFCC/fbank, 3 k-means iter1, 4 labels iter1, 5 unit quality,
                               6 pretrain iter1, 7 per-layer units, 8 labels iter2, 9 pretrain iter2, 10 per-layer units iter2)
  --data DIR --train-set NAME --dev-set NAME --dump DIR --exp DIR --nj N
  --feats1 'FEAT[:CMVN] ...'   iteration-1 target sets (FEAT mfcc|fbank, CMVN per utterance mean|meanvar or per
                               speaker spk-mean|spk-meanvar; default: mfcc, as the
                               paper); several: one k-means each and a target set each (cluster ensemble)
  --k1 K --k2 K --iter1-conf YAML --iter2-conf YAML --iter1-opts 'k=v ...'
  --alignments CTM|''|none     phone CTM of the train set; without it stages 5, 7 and 10 are skipped
  --layer L|auto               hidden layer for iteration-2 labels; auto: best PNMI of stage 7 (needs alignments),
                               otherwise ceil(layers/2) of the iteration-1 model (speechssl units best-layer)
  --iter2-init true|false      iteration 2 from iteration 1's encoder instead of from scratch (head always fresh)
  --layers-opts '--max-utts N'  options of the per-layer report (stages 7, 10)"

. "$(dirname "$0")/../tools/parse_options.sh"

log() { echo "$(date '+%F %T') [hubert.sh] $*"; }
stage_pending() {  # stage_pending OUT_DIR : succeeds (the stage must run) while OUT_DIR/.done is missing
  [ ! -f "$1/.done" ]
}
in_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }

pretrain_iteration() {  # pretrain_iteration STAGE N CONF OPTS K 'LABEL_ROOT ...' [INIT_CKPT] : HuBERT iteration N -> exp/hubert_iterN
  local stage_no=$1 it=$2 conf=$3 opts=$4 k=$5 labels=$6 init=${7:-}  # one target set (k classes) per label root
  local out=$exp/hubert_iter$it l tr=() dv=() nc=()
  for l in $labels; do tr+=("$l/$train_set"); dv+=("$l/$dev_set"); nc+=("$k"); done
  stage_pending "$out" || return 0
  log "stage $stage_no: HuBERT iteration $it -> $out"
  local init_opt=()
  [ -n "$init" ] && init_opt=("ckpt.init_from=$init")
  # shellcheck disable=SC2086
  speechssl pretrain --config "$conf" --resume auto exp_dir="$out" \
    data.train="$train" data.dev="$dev" \
    data.train_labels="[$(IFS=,; echo "${tr[*]}")]" data.dev_labels="[$(IFS=,; echo "${dv[*]}")]" \
    model.num_classes="[$(IFS=,; echo "${nc[*]}")]" "${init_opt[@]}" $opts
  touch "$out/.done"
}

label_sets() {  # label_sets STAGE WHAT FEATS KM OUT_ROOT : k-means labels of the train and dev sets -> OUT_ROOT/<set>
  local stage_no=$1 what=$2 feats=$3 km=$4 root=$5 s out  # FEATS: the feature store, {set} standing for the set
  for s in $train_set $dev_set; do
    out=$root/$s
    if stage_pending "$out"; then
      log "stage $stage_no: $what for $s -> $out"
      speechssl kmeans label --feats "${feats//\{set\}/$s}" --km "$km" --nshard "$nj" --out "$out"
      touch "$out/.done"
    fi
  done
}

layer_report() {  # layer_report STAGE N : PNMI by layer of iteration N's best checkpoint (skipped without alignments)
  local stage_no=$1 it=$2
  local out=$exp/hubert_iter$it/layers
  if [ -z "$alignments" ]; then
    log "stage $stage_no: no alignments, no per-layer report of iteration $it"
    return 0
  fi
  stage_pending "$out" || return 0
  log "stage $stage_no: what each layer of iteration $it learned (PNMI by layer, k=$k2, beside an untrained model and ${sets1[0]} units)"
  # shellcheck disable=SC2086
  speechssl units layers --ckpt "$exp/hubert_iter$it/best" --data "$train" --alignments "$alignments" \
    --k "$k2" --spectral "$dump/${sets1[0]}/$train_set" $layers_opts --out "$out"
  touch "$out/.done"
}

[ "$alignments" = none ] && alignments=
train=$data/$train_set
dev=$data/$dev_set
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

if in_stage 1; then
  log "stage 1: validate data dirs and read every audio header (a bad file is named here, not hours later)"
  for d in "$train" "$dev"; do speechssl data validate --audio --nj "$nj" "$d"; done
fi

for f1 in "${sets1[@]}"; do  # stages 2-5 for each iteration-1 target set
  feat=${f1%%_cmvn-*}; cmvn=none; cmvn_opt=()
  [ "$f1" != "$feat" ] && cmvn=${f1#*_cmvn-} && cmvn_opt=(--cmvn "$cmvn")
  km=$exp/kmeans_${f1}_k$k1
  if in_stage 2; then
    for s in $train_set $dev_set; do
      out=$dump/$f1/$s
      if stage_pending "$out"; then
        log "stage 2: $feat (CMVN: $cmvn, 100 Hz) for $s -> $out"
        speechssl features dump --data "$data/$s" --kind "$feat" "${cmvn_opt[@]}" --nshard "$nj" --out "$out"
        touch "$out/.done"
      fi
    done
  fi

  if in_stage 3 && stage_pending "$km"; then
    log "stage 3: k-means k=$k1 on $f1 of $train_set -> $km"
    speechssl kmeans fit --feats "$dump/$f1/$train_set" --k "$k1" --sample-frac "$sample_frac" \
      --max-frames "$max_frames" --out "$km"
    touch "$km/.done"
  fi

  in_stage 4 && label_sets 4 "iteration-1 labels ($f1 units)" "$dump/$f1/{set}" "$km" "$dump/labels_iter1_$f1"

  if in_stage 5; then
    if [ -z "$alignments" ]; then
      log "stage 5: no alignments, no quality report of the $f1 units"
    else
      log "stage 5: quality of the $f1 units against $alignments"
      speechssl units quality --labels "$dump/labels_iter1_$f1/$train_set" --alignments "$alignments" \
        --out "$km/quality.json" --plot "$km/quality.png"
    fi
  fi
done

in_stage 6 && pretrain_iteration 6 1 "$iter1_conf" "$iter1_opts" "$k1" "$labels1"
in_stage 7 && layer_report 7 1

if in_stage 8; then
  ckpt1=$exp/hubert_iter1/best
  if [ "$layer" = auto ]; then  # best PNMI of stage 7's report; without alignments the middle layer (see --help)
    best_opts=(--ckpt "$ckpt1")
    [ -n "$alignments" ] && best_opts+=(--layers-json "$exp/hubert_iter1/layers/layers.json")
    layer=$(speechssl units best-layer "${best_opts[@]}")
  fi
  hidden=$dump/hidden_iter1_L$layer  # speechssl extract writes $hidden/$s/layer_$layer (one store per layer)
  for s in $train_set $dev_set; do  # each set extracted once: train feeds the k-means fit and its labels
    if stage_pending "$hidden/$s"; then
      log "stage 8: layer $layer of iteration 1 for $s -> $hidden/$s/layer_$layer"
      speechssl extract --upstream "$ckpt1" --data "$data/$s" --layers "$layer" --nshard "$nj" --out "$hidden/$s"
      touch "$hidden/$s/.done"
    fi
  done
  km=$exp/kmeans_iter1_L${layer}_k$k2
  if stage_pending "$km"; then
    log "stage 8: k-means k=$k2 on layer $layer of iteration 1"
    speechssl kmeans fit --feats "$hidden/$train_set/layer_$layer" --k "$k2" --sample-frac "$sample_frac" \
      --max-frames "$max_frames" --out "$km"
    touch "$km/.done"
  fi
  label_sets 8 "iteration-2 labels" "$hidden/{set}/layer_$layer" "$km" "$dump/labels_iter2"
fi

if in_stage 9; then
  init=""
  $iter2_init && init=$exp/hubert_iter1/best
  pretrain_iteration 9 2 "$iter2_conf" "$iter2_opts" "$k2" "$dump/labels_iter2" "$init"
fi
in_stage 10 && layer_report 10 2
log "done (stages $stage..$stop_stage)"
