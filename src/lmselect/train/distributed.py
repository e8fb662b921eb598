"""Data-parallel plumbing: process-group setup from torchrun's environment, DDP / FSDP2 wrapping, small collectives
(``all_gather_cat`` / ``all_reduce_`` for code that sums gradients itself, e.g. the BLISS solver).

Single-process runs never touch ``torch.distributed``; every helper here degrades to a no-op when the world size is 1.
Launch data parallel training with torchrun, e.g. ``torchrun --nproc_per_node 8 -m lmselect.cli train ...``:
the backend is NCCL on CUDA and gloo on CPU. Rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from lmselect.artifacts import LmselectError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    """Whether a process group is initialised, i.e. collectives run (False in a plain single process)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world(env_fallback: bool = True) -> tuple[int, int]:
    """(rank, world size): from the process group when one is initialised, else torchrun's env (``env_fallback``;
    code that runs collectives passes False: without a group it is one process), else (0, 1)."""
    if is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not env_fallback:
        return 0, 1
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else CPU; any other value is passed to torch.device."""
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LmselectError(f"device '{pref}' requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*); idempotent.

    Without those variables (plain ``python``/``lmselect``) this is a single-process run and nothing is initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        except (RuntimeError, TimeoutError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise LmselectError(
                f"rank {rank} of {world}: could not join the process group at {where} ({first}); check that every "
                "node started, that they reach the head node, and that --nnodes matches the allocation"
            ) from None
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``x`` over ranks (a copy; ``x`` is untouched)."""
    if not info.enabled:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / info.world_size


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized tensors of all ranks along dim 0, in rank order (no gradient: callers re-insert their
    own slice); ``t`` itself without a process group."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_(tensors: Sequence[torch.Tensor], mean: bool = False) -> None:
    """Sum (``mean``: average) each tensor over ranks, in place; a no-op without a process group."""
    if not is_distributed():
        return
    w = torch.distributed.get_world_size()
    for t in tensors:
        torch.distributed.all_reduce(t)
        if mean:
            t.div_(w)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of an HF causal LM (GPT-NeoX ``gpt_neox.layers``, Llama ``model.layers``)."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise LmselectError(f"cannot find the transformer layers of {type(model).__name__} for FSDP sharding")
    return list(layers)


def wrap_model(model: torch.nn.Module, info: DistInfo, fsdp: bool = False) -> torch.nn.Module:
    """DDP (default) or FSDP2 for multi-process runs; the model itself for a single process.

    FSDP2 (``fully_shard``) shards every decoder block and then the root, so each block's parameters are gathered
    only while it runs. It modifies ``model`` in place (its parameters become DTensors) and returns it.
    """
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in transformer_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (``enabled=False``); sync on the last one."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def is_fsdp(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of an FSDP2 model (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer state of an FSDP2 model (a collective), keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`full_optimizer_state` (a collective; every rank passes the full state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
