"""The one sharding rule of every sharded verb (``features dump``, ``kmeans label``) and the trainer's rank/world
(floor 0: imports nothing of ours, so every room may use it).

A sharded job cuts the C-sorted utterance list into ``nshard`` contiguous ranges (:func:`shard_range`); shard ``R``
is written by one rank, independently of the others, and the output is complete (merged, where the output has a
merge step) as soon as every shard is finished, whichever process finishes last. Which shards *this* process does
is decided by :func:`resolve_shards`, in this order:

1. ``nshard``: explicit (``--nshard``), else ``$WORLD_SIZE`` under ``torchrun``, else 1.
2. ``rank`` explicit (``--rank R``): shard ``R`` only (separate jobs, one per shard).
3. Under ``torchrun`` (``$WORLD_SIZE`` set): worker ``$RANK`` does shards ``$RANK, $RANK + $WORLD_SIZE, ...`` of
   ``nshard``, i.e. exactly shard ``$RANK`` when ``nshard == $WORLD_SIZE``; the workers never share a shard.
4. Otherwise every shard, in turn, in this process.

In every case a shard already finished with the same header is skipped, and whoever finishes the last shard
merges (merging is idempotent and atomic), so ``--nshard 2`` alone, ``--rank 0`` then ``--rank 1``, and
``torchrun --nproc-per-node 2`` all give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

from speechssl.errors import UserError

__all__ = ["TorchrunEnv", "torchrun_env", "resolve_shards", "shard_range", "shard_items", "ids_sha1", "wait_for_all_ranks"]

T = TypeVar("T")


@dataclass(frozen=True)
class TorchrunEnv:
    """The process's place in a ``torchrun`` launch: ``$RANK``, ``$WORLD_SIZE``, ``$LOCAL_RANK``."""

    rank: int
    world: int
    local_rank: int


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"${name}={value!r} is not an integer (torchrun sets it; unset it outside torchrun)") from None


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The ``torchrun`` environment of this process, or None when ``$WORLD_SIZE`` is unset or empty.

    ``$RANK`` and ``$LOCAL_RANK`` default to 0; a rank outside ``[0, $WORLD_SIZE)`` is an error naming the variable.
    """
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", None)
    if world is None:
        return None
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    assert rank is not None and local_rank is not None
    if world < 1:
        raise UserError(f"$WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise UserError(f"$RANK must be in [0, $WORLD_SIZE={world}), got {rank}")
    return TorchrunEnv(rank=rank, world=world, local_rank=local_rank)


def resolve_shards(nshard: int | None, rank: int | None,
                   environ: Mapping[str, str] | None = None) -> tuple[int, list[int]]:
    """``(nshard, ranks this process does)`` by the module's rule (explicit, else torchrun, else every shard)."""
    env = torchrun_env(environ)
    if nshard is None:
        nshard = env.world if env is not None else 1
    if nshard < 1:
        raise UserError(f"--nshard must be >= 1, got {nshard}")
    if rank is not None:
        if not 0 <= rank < nshard:
            raise UserError(f"--rank must be in [0, --nshard={nshard}), got {rank}")
        return nshard, [rank]
    if env is not None:
        return nshard, list(range(env.rank, nshard, env.world))
    return nshard, list(range(nshard))


def shard_range(num_items: int, nshard: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of shard ``rank``: contiguous ranges in order, sizes differing by at most one."""
    if nshard < 1 or not 0 <= rank < nshard:
        raise ValueError(f"need 0 <= rank < nshard, got rank={rank} nshard={nshard}")
    return num_items * rank // nshard, num_items * (rank + 1) // nshard


def shard_items(items: Sequence[T], nshard: int, rank: int) -> list[T]:
    """Shard ``rank``'s block of ``items`` (already in their canonical, sorted order)."""
    start, end = shard_range(len(items), nshard, rank)
    return list(items[start:end])


def ids_sha1(ids: Sequence[str]) -> str:
    """SHA-1 of an utterance list in its order (one id and a newline each): recorded in shard headers, so a shard
    made from another utterance list is redone or refused instead of being combined with the others."""
    h = hashlib.sha1()
    for u in ids:
        h.update(u.encode("utf-8") + b"\n")
    return h.hexdigest()


def wait_for_all_ranks(timeout_hours: float = 24.0) -> None:
    """Under ``torchrun`` with several processes, return only when every process has got here (a gloo barrier over
    torchrun's ``MASTER_ADDR``/``MASTER_PORT``); otherwise at once.

    A sharded verb's workers finish their shards at different times, and ``torchrun`` only waits a few minutes
    (its exit barrier) for the other nodes' workers. Ending every sharded verb here makes a launch return on all
    nodes together, when every shard is written and the last finisher has merged, so that the recipe's next stage
    (on any node) reads complete outputs. A worker that fails makes ``torchrun`` stop the others."""
    env = torchrun_env()
    if env is None or env.world <= 1 or not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return  # not a torchrun launch (torchrun always sets both): a worker's environment set by hand, as in tests
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        return
    dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
