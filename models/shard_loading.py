"""Rank-local loading: each process reads only the part of the weights it holds.

A sharded strategy builds the model on the meta device, shards it, allocates the shards and
then calls `load_local_shards`. For each parameter it opens the weights file, takes the stored
rows that cover this process's part (safetensors get_slice: only those bytes are read) and
copies the part into place, converting to its dtype on the way. A part is a range of the
parameter's row-major elements: FSDP2 (fully_shard) splits dim 0 torch.chunk's way, rank r
holding rows [r * ceil(n / P), (r + 1) * ceil(n / P)) clipped to n (`local_rows`); a DeepSpeed
ZeRO-3 partition is a range of the flattened parameter (train/parallel.py passes its own).

Both layouts load alike: the diffusers names map to the Wan names (models/checkpoint.py) and no
WanTransformer3DModel weight is fused or transposed relative to Wan's (separate q/k/v, Linear
weights [out, in] in both), so a stored tensor's rows are the parameter's rows.

Memory: the process holds its parts, plus the rows of ONE stored tensor that it is copying.
Each tensor is read through its own safetensors handle, closed after the copy: safetensors
maps the file, and the pages a read touched stay resident (counted in the process's memory)
until the handle closes; one handle per file would leave the process's part of the whole
file resident by the end.

Errors: the headers (names, shapes, duplicates) are the same on every rank and raise the same
CheckpointError everywhere; a non-finite value is seen only by the rank holding it, so the
ranks agree on the outcome (one all_gather_object) before returning, and every rank raises
the first rank's error: none is left waiting in a later collective.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError
from .checkpoint import PlanEntry, check_finite, check_floating, open_weights, read_config, read_plan


def local_rows(name: str, param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(the tensor this process holds of param, its first element, one past its last) in param's
    row-major (flattened) order. A plain tensor or a replicated DTensor is held whole; a DTensor
    sharded along dim 0 on a one-dimensional mesh (FSDP2) holds torch.chunk's part of the rows."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    numel = param.numel()
    if not isinstance(param, DTensor):
        return param, 0, numel
    local, placements = param.to_local(), param.placements
    if all(isinstance(p, Replicate) for p in placements):
        return local, 0, numel
    if len(placements) != 1 or placements[0] != Shard(0):
        raise CheckpointError(f"rank-local loading reads parameters sharded along dim 0 on one mesh dimension "
                              f"(FSDP2); {name} has placements {placements}")
    rows, mesh = param.shape[0], param.device_mesh
    per_rank = -(-rows // mesh.size())
    start = min(rows, mesh.get_local_rank() * per_rank)
    if start + local.shape[0] > rows:
        raise CheckpointError(f"{name}: a shard of {local.shape[0]} rows at row {start} exceeds its {rows} rows")
    row = numel // rows if rows else 0
    return local, start * row, (start + local.shape[0]) * row


HeldPart = Callable[[str, torch.Tensor], tuple[torch.Tensor, int, int]]


@torch.no_grad()
def load_local_shards(model: torch.nn.Module, path: str | Path, held: HeldPart = local_rows,
                      plan: list[PlanEntry] | None = None) -> None:
    """Fill the part of each of model's parameters this process holds from the checkpoint
    directory at `path` (Wan or diffusers, one file or an index of shards), reading only the
    stored rows that part covers and converting them to the part's dtype.

    held(name, param) -> (the tensor to fill, allocated; first element; end element) in the
    parameter's flattened order: FSDP2's DTensor shards by default (`local_rows`); a ZeRO-3
    partition passes its own. Collective when torch.distributed is initialised: every rank of the
    default process group calls it, and all raise the same error if one fails. plan: the
    checkpoint's read_plan, taken while the parameters still had their shapes (ZeRO-3's do not)."""
    path = Path(path).expanduser()
    params = dict(model.named_parameters())
    error = None
    try:
        if plan is None:
            plan = read_plan(model, path, read_config(path)[1])   # the same on every rank: raises alike
        for entry in plan:
            param = params[entry.name]
            local, first, end = held(entry.name, param)
            if local.is_meta:
                raise CheckpointError(f"load_local_shards: allocate the model first; {entry.name} is on meta")
            if end == first:
                continue                             # this rank holds none of it
            if local.numel() != end - first:
                raise CheckpointError(f"{entry.name}: the part held has {local.numel()} elements, not {end - first}")
            row = math.prod(entry.shape[1:])
            r0, r1 = first // row, -(-end // row)    # the stored rows covering [first, end)
            with open_weights(entry.file) as f:      # closed after each tensor: see the module docstring
                rows = check_floating(f.get_slice(entry.key)[r0:r1], entry.file, entry.key)
                local.copy_(rows.reshape(-1)[first - r0 * row:end - r0 * row].view(local.shape))
            check_finite(local, entry.file, entry.key)
    except CheckpointError as e:
        error = str(e)
    _agree(error)


def _agree(error: str | None) -> None:
    """Raise the first rank's error on every rank of the default process group (if any)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise CheckpointError(error)
