"""Rows from every rank of torch.distributed: per-sample state that every rank must hold alike (heatmap buffers,
label estimates, permanent label flips) is written from all ranks' rows, and metrics cover the whole set."""
import math
from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ['world_size', 'all_gather_rows']


def world_size() -> int:
    """Processes of the default group; 1 outside torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Every rank's rows of `tensors`, concatenated in rank order; the tensors as given outside torch.distributed.

    The tensors of one call have one row count on a rank (counts may differ between ranks, zero included); each comes
    back with its dtype (bit for bit: int64 indices stay exact), trailing shape and device. Two collectives whatever
    the number of tensors: the row counts (read on the host, to size the buffers) and all tensors' bytes as one
    payload. Results carry no gradient."""
    if world_size() == 1:
        return tensors
    rows = len(tensors[0])
    if any(len(t) != rows for t in tensors):
        raise ValueError(f'all_gather_rows takes tensors of one row count, got {[len(t) for t in tensors]}.')
    device = tensors[0].device
    widths = [math.prod(t.shape[1:]) for t in tensors]
    parts = [t.detach().to(device).reshape(rows, width).contiguous().view(torch.uint8)
             for t, width in zip(tensors, widths)]
    payload = torch.cat(parts, dim=1)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([rows], device=device))
    counts = torch.cat(counts).tolist()
    padded = payload.new_zeros(max(counts), payload.shape[1])
    padded[:rows] = payload
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    payload = torch.cat([rank_rows[:count] for rank_rows, count in zip(gathered, counts)])
    byte_widths = [part.shape[1] for part in parts]
    return tuple(part.contiguous().view(t.dtype).reshape(-1, *t.shape[1:])
                 for t, part in zip(tensors, payload.split(byte_widths, dim=1)))
