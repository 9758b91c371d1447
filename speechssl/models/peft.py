"""Parameter-efficient tuning of the encoder: bottleneck adapters and LoRA, on a frozen base.

Both keep every parameter name of the base (transformers' ``HubertModel`` names) and only *add* tensors, so the
base's weights load into a tuned model with ``strict=False`` reporting exactly the added keys missing, and a
partial checkpoint holds the added tensors plus the head.

**Adapters** (:func:`add_adapters`; Houlsby et al. 2019, Pfeiffer et al. 2021, for speech Thomas et al. 2022): in
each chosen transformer layer, the feed-forward block's output ``f`` becomes ``f + up(GELU(down(LN(f))))``
(``Linear(D, dim)`` down, ``Linear(dim, D)`` up, its weight and bias zero, so the tuned model starts as the base
bit for bit). The adapter sits on the FFN output *before* the layer's residual add, which is the one place that
means the same in both layouts: post-LN (Base) ``x = LN'(x + A(FFN(x)))``, the layer's own final LayerNorm still
normalises what the adapter adds; pre-LN (Large) ``x = x + A(FFN(LN'(x)))``, the adapter writes into the residual
stream like every sublayer does. An adapter after the whole layer would instead add an unnormalised term *after*
a post-LN layer's LayerNorm. WavLM layers share the FFN block, so nothing differs for them. The adapter's own
LayerNorm makes its input scale independent of the layer (pre-LN FFN outputs grow with depth). Parameters:
``encoder.layers.N.feed_forward.adapter.{layer_norm, down_proj, up_proj}.*``; the feed-forward block becomes an
:class:`AdaptedFeedForward` (a :class:`~speechssl.models.transformer.FeedForward` subclass holding the same
submodules and parameters plus ``adapter``), a plain module without hooks, as ``torch.compile`` and DDP like.
Adapters cannot be folded into the base weights (GELU between the projections): a model tuned with adapters is
saved and loaded through our checkpoint format only (rebuild the base, :func:`add_adapters` with the same ``dim``
and ``layers``, load), never exported to transformers.

**LoRA** (:func:`add_lora`; Hu et al. 2021): a chosen ``nn.Linear`` ``W x + b`` becomes a :class:`LoRALinear`
computing ``W x + b + (alpha / rank) B A x``, ``A`` [rank, in] Kaiming-uniform, ``B`` [out, rank] zero.
We use our own small LoRA rather than the ``peft`` library. ``peft`` 0.21 would install beside the pinned torch
(pip's dry run adds peft, accelerate and psutil and keeps torch 2.13.0+cpu), but it wraps each target module and
renames its weight (``q_proj.base_layer.weight``), so our transformers-named state dicts, partial checkpoints and
export would all need a translation layer, for about forty lines of arithmetic. Ours keeps ``...q_proj.weight``
and ``...q_proj.bias`` where they were and adds ``...q_proj.lora_A`` / ``lora_B``; :func:`merge_lora` folds
``(alpha / rank) B A`` into ``W`` and puts a plain ``nn.Linear`` back, so a merged model is a plain
:class:`~speechssl.models.hubert.HubertModel` with exactly the base's keys (exportable to transformers).

**Freezing** (:func:`freeze_for_tuning`): "full" trains everything; "adapters" / "lora" train only the added
modules and the head (parameters under ``head_prefixes``), and return the names and counts for the log line.
:func:`trainable_state_dict` / :func:`load_trainable_state_dict` move exactly those tensors, keys checked strictly.

Floor 4: imports torch and this room only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transformer import Encoder, FeedForward

__all__ = [
    "Adapter",
    "AdaptedFeedForward",
    "LoRALinear",
    "TUNE_MODES",
    "add_adapters",
    "add_lora",
    "merge_lora",
    "freeze_for_tuning",
    "trainable_state_dict",
    "load_trainable_state_dict",
]

TUNE_MODES = ("full", "adapters", "lora")


# ------------------------------------------------------------------------------------------------------- adapters
class Adapter(nn.Module):
    """Bottleneck adapter with its own residual: ``h + up_proj(GELU(down_proj(layer_norm(h))))``.

    ``up_proj`` starts at zero (weight and bias), so the adapter starts as the identity (exactly: ``h + 0``);
    ``down_proj`` gets the encoder's own Linear init (N(0, 0.02), zero bias)."""

    def __init__(self, hidden_size: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.down_proj = nn.Linear(hidden_size, dim)
        self.activation = nn.GELU()
        self.up_proj = nn.Linear(dim, hidden_size)
        with torch.no_grad():
            self.down_proj.weight.normal_(mean=0.0, std=0.02)
            self.down_proj.bias.zero_()
            self.up_proj.weight.zero_()
            self.up_proj.bias.zero_()

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up_proj(self.activation(self.down_proj(self.layer_norm(h))))


class AdaptedFeedForward(FeedForward):
    """A :class:`~speechssl.models.transformer.FeedForward` with an :class:`Adapter` on its output.

    Built from an existing block: it holds that block's very submodules (same parameter objects, same names), so
    ``feed_forward.intermediate_dense.weight`` etc. stay where they were and only ``feed_forward.adapter.*`` is new.
    """

    def __init__(self, feed_forward: FeedForward, adapter: Adapter):
        nn.Module.__init__(self)  # not FeedForward.__init__: the layers are feed_forward's own, not new ones
        for key, value in vars(feed_forward).items():  # plain attributes (none today), then modules and tensors
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self._modules.update(feed_forward._modules)
        self._parameters.update(feed_forward._parameters)
        self._buffers.update(feed_forward._buffers)
        self.train(feed_forward.training)
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(super().forward(x))


def _find_encoder(model: nn.Module) -> Encoder:
    """The one transformer :class:`Encoder` in ``model`` (a HubertModel, a model holding one, or the encoder)."""
    found = [m for m in model.modules() if isinstance(m, Encoder)]
    if len(found) != 1:
        raise TypeError(f"expected a module holding exactly one transformer Encoder (a HubertModel, CTCModel, ...), "
                        f"{type(model).__name__} holds {len(found)}")
    return found[0]


def _chosen_layers(encoder: Encoder, layers: int | None) -> list[nn.Module]:
    """All layers, or the top ``layers`` of them."""
    total = len(encoder.layers)
    if layers is None:
        return list(encoder.layers)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= total:
        raise ValueError(f"layers must be an integer in [1, {total}] (the top layers to tune) or None for all, "
                         f"got {layers!r}")
    return list(encoder.layers)[total - layers:]


def _new_names(model: nn.Module, added: Iterable[nn.Parameter]) -> list[str]:
    """Names in ``model`` of the ``added`` parameters, in ``model``'s order."""
    ids = {id(p) for p in added}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def add_adapters(encoder: nn.Module, *, dim: int = 64, layers: int | None = None) -> list[str]:
    """Insert a bottleneck :class:`Adapter` of width ``dim`` on the FFN output of every transformer layer of
    ``encoder`` (a :class:`~speechssl.models.hubert.HubertModel`, or any model holding exactly one encoder), or of
    the top ``layers`` layers only. In place; the model's outputs are unchanged until the adapters train.

    Returns the names (relative to ``encoder``) of the added parameters, e.g.
    ``encoder.layers.11.feed_forward.adapter.down_proj.weight``. Adding adapters twice to a layer is an error.
    """
    enc = _find_encoder(encoder)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"adapter dim must be a positive integer, got {dim!r}")
    chosen = _chosen_layers(enc, layers)
    index = {id(layer): i for i, layer in enumerate(enc.layers)}
    for layer in chosen:  # check every layer before changing any
        ff = layer.feed_forward
        if isinstance(ff, AdaptedFeedForward):
            raise ValueError(f"encoder layer {index[id(layer)]} already has an adapter")
        if not isinstance(ff, FeedForward):
            raise TypeError(f"encoder layer {index[id(layer)]}: feed_forward is a {type(ff).__name__}, "
                            "not a FeedForward")
    added: list[nn.Parameter] = []
    for layer in chosen:
        ff = layer.feed_forward
        ref = ff.output_dense.weight
        hidden = ff.output_dense.out_features
        eps = layer.final_layer_norm.eps
        adapter = Adapter(hidden, dim, eps=eps).to(device=ref.device, dtype=ref.dtype)
        layer.feed_forward = AdaptedFeedForward(ff, adapter)
        added.extend(adapter.parameters())
    return _new_names(encoder, added)


# ----------------------------------------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update: ``W x + b + scaling * B (A dropout(x))``, ``scaling = alpha / rank``.

    Built from an existing ``nn.Linear``, sharing its ``weight`` and ``bias`` parameters (same names), with new
    ``lora_A`` [rank, in] (Kaiming-uniform, as ``nn.Linear``'s own init) and ``lora_B`` [out, rank] (zero)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.train(base.training)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        ref = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=ref.device, dtype=ref.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=ref.device, dtype=ref.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def delta_weight(self) -> Tensor:
        """``scaling * B A`` [out, in], computed in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def add_lora(encoder: nn.Module, *, rank: int = 8, alpha: float = 16, targets: Sequence[str] = ("q_proj", "v_proj"),
             layers: int | None = None, dropout: float = 0.0) -> list[str]:
    """Replace the ``targets`` Linears of every transformer layer (or of the top ``layers``) by :class:`LoRALinear`.

    A target names a Linear inside a layer by its last name component(s): ``"q_proj"``, ``"k_proj"``,
    ``"v_proj"``, ``"out_proj"`` (attention) or ``"intermediate_dense"`` / ``"output_dense"`` (FFN); each must
    match exactly one Linear per layer. ``dropout``: dropout on the LoRA branch's input (Hu et al. use 0-0.1).
    In place; outputs are unchanged until ``lora_B`` trains. Returns the names (relative to ``encoder``) of the
    added parameters, e.g. ``encoder.layers.0.attention.q_proj.lora_A``.
    """
    enc = _find_encoder(encoder)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty list of Linear names (e.g. ['q_proj', 'v_proj']), got {targets!r}")
    chosen = _chosen_layers(enc, layers)
    index = {id(layer): i for i, layer in enumerate(enc.layers)}
    # find every target in every chosen layer before changing anything
    plan = []
    for layer in chosen:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for target in dict.fromkeys(targets):
            hits = [name for name in linears if name == target or name.endswith("." + target)]
            if len(hits) != 1:
                raise ValueError(f"LoRA target {target!r} matches {hits or 'no Linear'} in encoder layer "
                                 f"{index[id(layer)]}; its Linears: {sorted(linears)}")
            if isinstance(linears[hits[0]], LoRALinear):
                raise ValueError(f"encoder layer {index[id(layer)]}: {hits[0]} already has LoRA")
            plan.append((layer, hits[0]))
    added: list[nn.Parameter] = []
    for layer, name in plan:
        parent_name, _, attr = name.rpartition(".")
        parent = layer.get_submodule(parent_name)
        lora = LoRALinear(getattr(parent, attr), rank, alpha, dropout)
        setattr(parent, attr, lora)
        added += [lora.lora_A, lora.lora_B]
    return _new_names(encoder, added)


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every :class:`LoRALinear` of ``model`` into its base weight (``W += scaling * B A``) and put a plain
    ``nn.Linear`` (the same ``weight`` / ``bias`` parameters) in its place. In place; afterwards ``model`` has
    exactly the base's parameter names, so a merged HubertModel saves and exports as a plain one.
    Returns the names of the merged Linears."""
    merged = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        module.weight.add_(module.delta_weight().to(module.weight.dtype))
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = module.weight
        plain.register_parameter("bias", module.bias)
        plain.train(module.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, plain)
        merged.append(name)
    return merged


# ------------------------------------------------------------------------------------------------------- freezing
def freeze_for_tuning(model: nn.Module, mode: str,
                      head_prefixes: Sequence[str] = ("lm_head",)) -> tuple[list[str], int, int]:
    """Set ``requires_grad`` for a tuning ``mode`` and return ``(trainable_names, n_trainable, n_total)``.

    * ``"full"``: every parameter trains.
    * ``"adapters"``: only the parameters of :class:`Adapter` modules (:func:`add_adapters` first) and the head.
    * ``"lora"``: only ``lora_A`` / ``lora_B`` of :class:`LoRALinear` modules (:func:`add_lora` first) and the head.

    The head is every parameter named ``P`` or ``P.*`` for a ``P`` in ``head_prefixes``; a prefix that matches no
    parameter is an error (pass ``head_prefixes=()`` for a model without a head). Counts are numbers of scalars
    (shared parameters once). The caller builds its optimizer over the trainable parameters; a frozen one gets no
    ``.grad`` and no update (weight decay included).
    """
    if mode not in TUNE_MODES:
        raise ValueError(f"tuning mode must be one of {list(TUNE_MODES)}, got {mode!r}")
    named = list(model.named_parameters())
    if isinstance(head_prefixes, str):
        head_prefixes = (head_prefixes,)
    for prefix in head_prefixes:
        if not any(name == prefix or name.startswith(prefix + ".") for name, _ in named):
            raise ValueError(f"head prefix {prefix!r} matches no parameter of {type(model).__name__} "
                             f"(top-level modules: {[n for n, _ in model.named_children()]})")
    if mode == "full":
        keep = {id(p) for _, p in named}
    else:
        if mode == "adapters":
            added = [p for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()]
            how = "add_adapters"
        else:
            added = [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
            how = "add_lora"
        if not added:
            raise ValueError(f"tuning mode {mode!r}: {type(model).__name__} has no {mode} (call {how} first)")
        keep = {id(p) for p in added}
        keep |= {id(p) for name, p in named
                 if any(name == prefix or name.startswith(prefix + ".") for prefix in head_prefixes)}
    names = []
    n_trainable = n_total = 0
    for name, p in named:
        train = id(p) in keep
        p.requires_grad_(train)
        n_total += p.numel()
        if train:
            names.append(name)
            n_trainable += p.numel()
    return names, n_trainable, n_total


def _trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_state_dict(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """``{name: tensor}`` of the parameters ``names`` (default: those with ``requires_grad``, i.e. what
    :func:`freeze_for_tuning` left trainable), detached but not copied (as ``state_dict``). A name that is not a
    parameter of ``model`` is a ValueError naming it."""
    params = dict(model.named_parameters())
    wanted = _trainable_names(model) if names is None else list(dict.fromkeys(names))
    unknown = [name for name in wanted if name not in params]
    if unknown:
        raise ValueError(f"not parameters of {type(model).__name__}: {unknown[:10]}"
                         + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    return {name: params[name].detach() for name in wanted}


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, state: dict[str, Tensor], names: Iterable[str] | None = None) -> None:
    """Copy ``state`` into the parameters ``names`` of ``model`` (default: those with ``requires_grad``: call it
    after the same :func:`add_adapters` / :func:`add_lora` and :func:`freeze_for_tuning` as when it was saved).

    Strict: a name expected but missing from ``state``, a key of ``state`` that is not expected (a frozen or
    unknown parameter), or a shape that differs is a ValueError naming the keys. Nothing is copied then."""
    params = dict(model.named_parameters())
    expected = _trainable_names(model) if names is None else list(dict.fromkeys(names))
    unknown = [name for name in expected if name not in params]
    if unknown:
        raise ValueError(f"not parameters of {type(model).__name__}: {unknown[:10]}")
    missing = [name for name in expected if name not in state]
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:10]}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if unexpected:
        frozen = [k for k in unexpected if k in params]
        problems.append(f"unexpected keys {unexpected[:10]}" + (f" (+{len(unexpected) - 10} more)"
                                                                 if len(unexpected) > 10 else "")
                        + (f" ({len(frozen)} of them frozen parameters of the model)" if frozen else ""))
    shapes = [f"{name}: {tuple(state[name].shape)} vs the model's {tuple(params[name].shape)}"
              for name in expected if name in state and state[name].shape != params[name].shape]
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:10]))
    if problems:
        raise ValueError(f"trainable state dict does not fit {type(model).__name__}: " + "; ".join(problems))
    for name in expected:
        params[name].copy_(state[name])
