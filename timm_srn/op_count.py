"""What a criterion adds to a training step, counted op by op: the aten operators one call dispatches (each a kernel
launch on a GPU, where a small criterion is launch-bound) and the operators that make the host wait for the device.

Counted with a `TorchDispatchMode` around the call and around the backward, so the counts are the same on every
device (a CPU run gives the GPU's launch count; views are counted too).
"""
from typing import Callable, List, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['OpCounts', 'count_ops', 'criterion_op_counts', 'SYNC_OPS']

# operators whose result the host must read (a device synchronisation on a GPU), or whose output shape depends on data
SYNC_OPS = frozenset({
    'aten::_local_scalar_dense', 'aten::item', 'aten::is_nonzero', 'aten::equal', 'aten::nonzero',
    'aten::nonzero_static', 'aten::masked_select', 'aten::_unique2', 'aten::unique_consecutive', 'aten::unique_dim'})


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket._qualified_op_name)
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket._qualified_op_name in ('aten::_to_copy', 'aten::copy_'):
            source = args[0] if func.overloadpacket._qualified_op_name == 'aten::_to_copy' else args[1]
            target = out if isinstance(out, torch.Tensor) else args[0]
            if isinstance(source, torch.Tensor) and source.device != target.device:
                self.ops.append('device_copy')  # host <-> device: a synchronisation when the copy goes to the host
        return out


def count_ops(fn: Callable[[], object]) -> List[str]:
    """The aten operators `fn()` dispatches, in order ('device_copy' marks a copy between devices)."""
    with _Recorder() as recorder:
        fn()
    return recorder.ops


class OpCounts(NamedTuple):
    forward: int  # aten ops of one criterion call
    backward_extra: int  # aten ops of the backward beyond those of BCE on the same logits
    syncs: int  # operators that wait for the device (scalar reads, data-dependent shapes, copies to the host)


def criterion_op_counts(criterion: Callable, model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor,
                        warmup: int = 2) -> OpCounts:
    """`OpCounts` of `criterion(model(images), target)` after `warmup` calls (the steady state: buffers filled,
    warm-up epochs over when the criterion's epoch says so). The backward is counted through the model, against
    BCE with logits on the same model's output."""
    for _ in range(warmup):
        criterion(model(images), target).backward()
    output = model(images)
    losses = []
    loss_ops = count_ops(lambda: losses.append(criterion(output, target)))
    backward_ops = count_ops(losses[0].backward)
    reference = model(images)
    labels = target[:, :reference.shape[1]].float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(reference.float(), labels)
    bce_backward = count_ops(bce.backward)
    syncs = sum(op in SYNC_OPS or op == 'device_copy' for op in loss_ops + backward_ops)
    return OpCounts(len(loss_ops), len(backward_ops) - len(bce_backward), syncs)
