#!/usr/bin/env bash
# LibriSpeech HuBERT recipe (HuBERT paper): MFCC k=100 -> Base iteration 1 -> layer 6, k=500 -> Base iteration 2
# (-> with --iterations 3: layer 9 of Base iteration 2, k=500 -> Large), then exp/report.md.
#   ./run.sh --corpus /data/LibriSpeech                          # one process (a GPU if there is one)
#   ./run.sh --corpus /data/LibriSpeech --ngpu 8                 # one node, 8 GPUs (torchrun)
#   ./run.sh --corpus /data/LibriSpeech --ngpu 8 --nnodes 4 --node-rank R --master-addr HOST   # on each node
#   sbatch slurm/hubert.sbatch --corpus /data/LibriSpeech        # SLURM: srun + torchrun on every node, requeue
#   ./run.sh --corpus DIR --tiny true                            # tiny configs: the whole chain on a CPU in minutes
# The effective batch is the paper's (Base 32 x 87.5 s = 2800 s of audio per update, Large 7200 s) on any number of
# GPUs: optim.batch_seconds in conf/*.yaml sets the gradient accumulation (printed at the start of training).
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
corpus=""            # the LibriSpeech/ directory holding the parts (train-clean-100/, dev-clean/, ...)
download=false       # stage 0 downloads the parts into --corpus first (needs internet; lhotse's download_librispeech)
train_parts=train-clean-100,train-clean-360,train-other-500   # train-960
dev_parts=dev-clean,dev-other
iterations=2         # 2: Base iterations 1 and 2; 3: also Large on layer 9 of Base iteration 2
tiny=false           # tiny models and k, every stage on a CPU in minutes (the recipe's own test)
nj=""                # shards of the sharded stages (default: 4 x the processes, at least 2)
alignments=none      # a phone CTM of the train set for the quality / per-layer reports (LibriSpeech has none)
iter1_opts=""        # extra key=value overrides of pretraining iteration 1 / 2 / 3
iter2_opts=""
iter3_opts=""
ngpu=0               # processes (GPUs) per node; 0: one process
nnodes=1
node_rank=0
master_addr=127.0.0.1
master_port=29500
launcher=""          # a command prefix for every parallel stage instead of torchrun (see slurm/README.md)
help_message="Usage: $0 --corpus DIR [--download true] [--stage N] [--stop-stage N] [--iterations 2|3] [--tiny true]
          [--train-parts P,P] [--dev-parts P,P] [--nj N] [--alignments CTM] [--iter1-opts 'k=v ...']
          [--ngpu N] [--nnodes N --node-rank R --master-addr HOST --master-port P] [--launcher 'CMD']
  stage 0 prepares data/{train,dev} (Kaldi files + lhotse manifests) from --corpus; stages 1.. are
  ../../../recipes/hubert.sh (see its --help; the report is written at the end)."
. ../../../tools/parse_options.sh

log() { echo "$(date '+%F %T') [run.sh] $*"; }
[ -n "$corpus" ] || { echo "$0: --corpus DIR is required (the LibriSpeech/ directory holding the parts)" >&2; exit 1; }
[ -n "$nj" ] || nj=$(( 4 * (ngpu > 0 ? ngpu : 1) * nnodes )); [ "$nj" -ge 2 ] || nj=2

data=data; dump=dump; exp=exp
confs=(conf/hubert_base_iter1.yaml conf/hubert_base_iter2.yaml conf/hubert_large.yaml)
ks=(100 500 500)
sample_frac=0.1
if $tiny; then
  data=data_tiny; dump=dump_tiny; exp=exp_tiny
  confs=(conf/tiny_iter1.yaml conf/tiny_iter2.yaml conf/tiny_iter2.yaml)
  ks=(20 20 20)
  sample_frac=0.5
fi

if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ] && [ "$node_rank" -eq 0 ] && [ ! -f "$data/prepare.json" ]; then
  if $download; then
    log "stage 0: download LibriSpeech $train_parts,$dev_parts -> $corpus (needs internet)"
    python3 -c "import sys; from lhotse.recipes import download_librispeech as d; \
d(sys.argv[1], dataset_parts=sys.argv[2].split(','))" "$(dirname "$corpus")" "$train_parts,$dev_parts"
  fi
  log "stage 0: LibriSpeech $train_parts -> $data/train, $dev_parts -> $data/dev"
  python3 -m speechssl superb prepare librispeech --corpus "$corpus" --out "$data" --train-part "$train_parts" \
    --dev-part "$dev_parts" --test-part "" --manifests --nj "$nj"
fi
if [ "$node_rank" -ne 0 ]; then  # the other nodes start once the head has prepared the data
  while [ ! -f "$data/prepare.json" ]; do sleep 5; done
fi

exec ../../../recipes/hubert.sh --stage "$(( stage > 1 ? stage : 1 ))" --stop-stage "$stop_stage" \
  --data "$data" --train-set train --dev-set dev --dump "$dump" --exp "$exp" --nj "$nj" \
  --iterations "$iterations" --feats1 mfcc --sample-frac "$sample_frac" \
  --k1 "${ks[0]}" --k2 "${ks[1]}" --k3 "${ks[2]}" --layer auto --layer3 9 \
  --iter1-conf "${confs[0]}" --iter2-conf "${confs[1]}" --iter3-conf "${confs[2]}" \
  --iter1-opts "$iter1_opts" --iter2-opts "$iter2_opts" --iter3-opts "$iter3_opts" \
  --alignments "$alignments" \
  --ngpu "$ngpu" --nnodes "$nnodes" --node-rank "$node_rank" --master-addr "$master_addr" \
  --master-port "$master_port" --launcher "$launcher"
