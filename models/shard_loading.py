"""Rank-local loading: each process reads only the rows of the weights it holds.

A sharded strategy builds the model on the meta device, shards it (FSDP2's fully_shard: every
parameter a DTensor split along dim 0, torch.chunk's way: rank r holds rows
[r * ceil(n / P), (r + 1) * ceil(n / P)) clipped to n), allocates the shards (to_empty) and
then calls `load_local_shards`. For each parameter it opens the weights file, takes the
stored tensor's rows this process holds (safetensors get_slice: only those bytes are read)
and copies them into the local shard, converting to the shard's dtype on the way.

Both layouts load alike: the diffusers names map to the Wan names (models/checkpoint.py) and no
WanTransformer3DModel weight is fused or transposed relative to Wan's (separate q/k/v, Linear
weights [out, in] in both), so a stored tensor's rows are the parameter's rows.

Memory: the process holds its shards, plus the rows of ONE stored tensor that it is copying.
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

from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoint import check_finite, check_floating, open_weights, read_config, read_plan


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(the tensor this process holds of param, its first row, one past its last row in dim 0).
    A plain tensor or a replicated DTensor is held whole; a DTensor sharded along dim 0 on a
    one-dimensional mesh (FSDP2) holds torch.chunk's part of the rows."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    rows = param.shape[0]
    if not isinstance(param, DTensor):
        return param, 0, rows
    local, placements = param.to_local(), param.placements
    if all(isinstance(p, Replicate) for p in placements):
        return local, 0, rows
    if len(placements) != 1 or placements[0] != Shard(0):
        raise CheckpointError(f"rank-local loading reads parameters sharded along dim 0 on one mesh dimension "
                              f"(FSDP2), got placements {placements}")
    mesh = param.device_mesh
    per_rank = -(-rows // mesh.size())
    start = min(rows, mesh.get_local_rank() * per_rank)
    if start + local.shape[0] > rows:
        raise CheckpointError(f"a shard of {local.shape[0]} rows at row {start} exceeds the parameter's {rows} rows")
    return local, start, start + local.shape[0]


@torch.no_grad()
def load_local_shards(model: torch.nn.Module, path: str | Path) -> None:
    """Fill model's allocated (not meta) parameters - FSDP2 shards or whole tensors - from the
    checkpoint directory at `path` (Wan or diffusers, one file or an index of shards): each
    process reads only its rows, converting them to its parameters' dtypes. Collective when the
    model holds DTensors (every rank of their mesh calls it)."""
    path = Path(path).expanduser()
    _, fmt = read_config(path)
    params = dict(model.named_parameters())
    meta = [n for n, p in params.items() if p.is_meta]
    if meta:
        raise CheckpointError(f"load_local_shards: allocate the model first (module.to_empty); {meta[0]} is on meta")
    error = None
    try:
        for entry in read_plan(model, path, fmt):   # the same on every rank: raises everywhere alike
            local, start, stop = local_rows(params[entry.name])
            if stop == start:
                continue                             # this rank holds none of it
            with open_weights(entry.file) as f:      # closed after each tensor: see the module docstring
                rows = check_floating(f.get_slice(entry.key)[start:stop], entry.file, entry.key)
                local.copy_(rows)
            check_finite(local, entry.file, entry.key)
    except CheckpointError as e:
        error = str(e)
    _agree(params.values(), error)


def _agree(params, error: str | None) -> None:
    """Raise the first rank's error on every rank of the mesh the parameters are sharded on."""
    from torch.distributed.tensor import DTensor

    mesh = next((p.device_mesh for p in params if isinstance(p, DTensor)), None)
    if mesh is not None:
        errors = [None] * mesh.size()
        torch.distributed.all_gather_object(errors, error, group=mesh.get_group())
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise CheckpointError(error)
