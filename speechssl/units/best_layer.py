"""Which hidden layer of a checkpoint the next iteration's units come from (``speechssl units best-layer``).

One rule, two sources:

* **measured** — a per-layer report of ``units layers`` (``layers.json``, written where phone alignments exist):
  its ``best_layer``, the layer whose k-means units have the highest PNMI against the phones;
* **paper depth** — without such a report: the middle transformer layer, ``ceil(num_hidden_layers / 2)`` read
  from the checkpoint's ``config.json``. The HuBERT paper (Hsu et al. 2021, §IV-C) takes the second iteration's
  targets from the 6th of 12 transformer layers of the Base model; this scales that choice to the model's depth
  (6 layers -> 3, 24 -> 12). A label-free alternative, the layer with the highest effective rank in the collapse
  watch, is not used: rank measures spread, not phonetic content, and is highest near the input.

Layer indices are hidden-state indices as in ``speechssl extract``: 0 is the encoder input, ``i`` the
output of transformer layer ``i``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from speechssl.errors import MissingInputError, UserError
from speechssl.models.checkpoint import read_config

__all__ = ["LayerChoice", "choose_layer", "paper_layer"]


@dataclass(frozen=True)
class LayerChoice:
    layer: int
    rule: str    # "pnmi" (from layers.json) or "paper-depth" (middle layer of the checkpoint)
    reason: str  # one line for stderr: which rule and from which file


def paper_layer(num_hidden_layers: int) -> int:
    """The HuBERT Base choice (layer 6 of 12) scaled to ``num_hidden_layers``: ``ceil(n / 2)``, at least 1."""
    if num_hidden_layers < 1:
        raise UserError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
    return (num_hidden_layers + 1) // 2


def _read_layers_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingInputError(f"{path}: no per-layer report (run `speechssl units layers --out {path.parent}` "
                                "first, or leave out --layers-json to use the paper-depth rule)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("best_layer"), int):
        raise UserError(f"{path}: no integer 'best_layer' (not a `speechssl units layers` report)")
    return report


def choose_layer(ckpt=None, layers_json=None, exp_dir=None) -> LayerChoice:
    """The layer for the next iteration's k-means units.

    ``exp_dir`` (an iteration's experiment dir) stands for ``ckpt=EXP/best`` and ``layers_json=EXP/layers/layers.json``
    when that file exists. An explicit ``layers_json`` must exist. With a report, its ``best_layer`` (checked
    against the checkpoint's depth and weights when ``ckpt`` is given); without one, :func:`paper_layer` of the
    checkpoint's ``num_hidden_layers``.
    """
    if exp_dir is not None:
        exp_dir = Path(exp_dir)
        if ckpt is None:
            ckpt = exp_dir / "best"
        if layers_json is None and (exp_dir / "layers" / "layers.json").is_file():
            layers_json = exp_dir / "layers" / "layers.json"
    if ckpt is None and layers_json is None:
        raise UserError("give --exp DIR, --ckpt CKPT or --layers-json FILE")
    config = None
    if ckpt is not None:
        try:
            config, _ = read_config(ckpt)
        except json.JSONDecodeError as e:
            raise UserError(f"{Path(ckpt) / 'config.json'}: not JSON ({e})") from None
        except (KeyError, TypeError) as e:  # config.json without a usable "model" section
            raise UserError(f"{Path(ckpt) / 'config.json'}: unreadable model config ({e!r})") from None
    if layers_json is not None:
        path = Path(layers_json)
        report = _read_layers_json(path)
        layer = report["best_layer"]
        if config is not None:
            if not 0 <= layer <= config.num_hidden_layers:
                raise UserError(f"{path}: best_layer {layer} is outside 0..{config.num_hidden_layers} "
                                 f"(the hidden states of {ckpt})")
            recorded = report.get("checkpoint_sha1")
            if recorded:
                from speechssl.upstream import checkpoint_sha1

                if checkpoint_sha1(ckpt) != recorded:
                    raise UserError(f"{path}: scored other weights than {ckpt} (model.safetensors SHA-1 differs); "
                                     "re-run `speechssl units layers` on this checkpoint")
        pnmi = next((r.get("pnmi") for r in report.get("layers", []) if r.get("layer") == layer), None)
        note = f", PNMI {pnmi:.4f}" if isinstance(pnmi, (int, float)) else ""
        return LayerChoice(layer, "pnmi", f"layer {layer}: best PNMI in {path}{note}")
    n = config.num_hidden_layers
    layer = paper_layer(n)
    return LayerChoice(layer, "paper-depth",
                       f"layer {layer}: no per-layer report (no alignments?), paper-depth rule: middle of the "
                       f"{n} transformer layers of {ckpt} (HuBERT Base: 6 of 12)")
