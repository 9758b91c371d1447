"""`speechssl decode`: hypotheses and WER / CER / PER of a fine-tuned CTC model on a data dir.

    speechssl decode --ckpt exp/ft_iter2_10min/best --data data/test
    speechssl decode --ckpt exp/ft/best --data data/test --beam 50 --lm exp/lm/3gram.arpa --lm-weight 0.5
    speechssl decode --ckpt hf_HubertForCTC_dir --data data/test        # a transformers *ForCTC directory
"""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers, help_):
    p = subparsers.add_parser("decode", help=help_, description=help_ + ". Writes hyp.txt, ref.txt and "
                              "scores.json into --out (default CKPT/../decode_<data dir name>).")
    p.add_argument("--ckpt", required=True, help="fine-tuned checkpoint (EXP/best), or a transformers *ForCTC dir")
    p.add_argument("--data", required=True, help="data dir to decode (scored when it has transcripts)")
    p.add_argument("--out", help="output dir")
    p.add_argument("--beam", type=int, default=0, help="beam width (0: greedy best path)")
    p.add_argument("--lm", help="ARPA word n-gram for the beam search (speechssl decode-lm writes one)")
    p.add_argument("--lm-weight", type=float, default=0.5)
    p.add_argument("--word-score", type=float, default=0.0)
    p.add_argument("--batch-seconds", type=float, default=120.0, help="audio per forward batch")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="encoder precision (auto: as the fine-tuning run validated, fp32 for other checkpoints)")
    p.add_argument("--trust-pickle", action="store_true", help="allow a fairseq pickle base (partial checkpoints)")
    p.set_defaults(func=run)


def run(args) -> int:
    from speechssl.asr.decode import check_decode_options, decode
    from speechssl.fileio import check_writable_dir

    check_decode_options(beam=args.beam, lm=args.lm, lm_weight=args.lm_weight, word_score=args.word_score,
                         batch_seconds=args.batch_seconds)
    out = args.out or str(Path(args.ckpt).parent / f"decode_{Path(args.data).name}")
    check_writable_dir(out, "--out")  # hyp.txt, ref.txt and scores.json appear by one rename
    scores = decode(args.ckpt, args.data, out, beam=args.beam, lm=args.lm, lm_weight=args.lm_weight,
                    word_score=args.word_score, batch_seconds=args.batch_seconds, device=args.device,
                    trust_pickle=args.trust_pickle, bf16={"auto": None, "fp32": False, "bf16": True}[args.precision])
    print(json.dumps({k: v for k, v in scores.items() if k in ("wer", "cer", "per", "utterances")}))
    return 0
