"""Process and device set-up of a pretraining run: one process, or one of ``torchrun``'s DDP processes; signals.

Every collective goes through here and is a no-op in a single process, so the trainer reads the same either way.
Decisions that must agree across ranks (stop, skip a step) are taken on all-reduced values.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from speechssl.errors import UserError
from speechssl.sharding import torchrun_env
from speechssl.train import state as st

log = logging.getLogger(__name__)

__all__ = ["Dist", "init_distributed", "barrier", "all_reduce", "broadcast_from_main", "gather_rng", "bf16_supported",
           "StopSignals"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this process group is ours to destroy in close()

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """The process group from the ``torchrun`` environment (``WORLD_SIZE`` > 1, read by
    :func:`speechssl.sharding.torchrun_env`, the rule every sharded stage uses), and this process's device."""
    env = torchrun_env()
    world = env.world if env is not None else 1
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available")
    if world <= 1:
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    assert env is not None
    local_rank = env.local_rank
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        here = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, initialized_here=here), device


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce(t: torch.Tensor, d: Dist, op=None) -> torch.Tensor:
    """Sum (or ``op``) of ``t`` over ranks, in place; ``t`` itself in a single process."""
    if d.enabled:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def broadcast_from_main(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; used for small lists such as metric names)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rng(d: Dist) -> list[dict]:
    """RNG states of every rank, gathered to every rank (rank order)."""
    mine = st.get_rng_state()
    if not d.enabled:
        return [mine]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, mine)
    return out


def bf16_supported(device: torch.device) -> bool:
    """CUDA with bf16, or a CPU with AMX / AVX512-BF16 (where bf16 matmuls are fast, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        if "AMX" in torch.backends.cpu.get_cpu_capability().upper():
            return True
    except Exception:  # pragma: no cover - older torch
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:  # pragma: no cover - not Linux
        pass
    return False


class StopSignals:
    """``with StopSignals() as sig:`` SIGTERM / SIGUSR1 set ``sig.received`` (the trainer saves and stops after the
    update, on an all-reduced flag); the previous handlers come back on exit. Off outside the main thread."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if s is not None:
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        log.warning("signal %d: saving a checkpoint and stopping after this update", signum)

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
