"""What a criterion adds to a training step, counted op by op: the aten operators one call dispatches (each a kernel
launch on a GPU, where a small criterion is launch-bound) and the operators that make the host wait for the device.

Counted with a `TorchDispatchMode` around the call and around the backward, so the counts are the same on every
device (a CPU run gives the GPU's launch count; views are counted too). A criterion compiled by inductor
(`compile_backend='inductor'`) is counted from the code inductor generates instead (`compiled_launches`).
"""
import re
from typing import Callable, List, NamedTuple, Tuple

import torch
from torch._inductor.utils import run_and_get_code  # the generated code: no public API returns it
from torch.utils._python_dispatch import TorchDispatchMode

from .data import pack_target

__all__ = ['CompiledLaunches', 'OpCounts', 'compiled_launches', 'count_ops', 'counting_batch', 'criterion_op_counts',
           'SYNC_OPS']

# operators whose result the host must read (a device synchronisation on a GPU), or whose output shape depends on data
SYNC_OPS = frozenset({
    'aten::_local_scalar_dense', 'aten::item', 'aten::is_nonzero', 'aten::equal', 'aten::nonzero',
    'aten::nonzero_static', 'aten::masked_select', 'aten::_unique2', 'aten::unique_consecutive', 'aten::unique_dim'})


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[str] = []
        self.views = 0  # ops whose output is a view of an input: metadata only, no kernel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket._qualified_op_name)
        self.views += func.is_view
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
    forward_kernels: int  # the forward's ops that are not views (each launches a kernel on a GPU)


def criterion_op_counts(criterion: Callable, model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor,
                        warmup: int = 2) -> OpCounts:
    """`OpCounts` of `criterion(model(images), target)` after `warmup` calls (the steady state: buffers filled,
    warm-up epochs over when the criterion's epoch says so). The backward is counted through the model, against
    BCE with logits on the same model's output."""
    for _ in range(warmup):
        criterion(model(images), target).backward()
    output = model(images)
    with _Recorder() as call:
        loss = criterion(output, target)
    backward_ops = count_ops(loss.backward)
    reference = model(images)
    labels = target[:, :reference.shape[1]].float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(reference.float(), labels)
    bce_backward = count_ops(bce.backward)
    syncs = sum(op in SYNC_OPS or op == 'device_copy' for op in call.ops + backward_ops)
    return OpCounts(len(call.ops), len(backward_ops) - len(bce_backward), syncs, len(call.ops) - call.views)


def counting_batch(num_classes: int, num_samples: int = 1000, batch: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images and packed targets with crops, flips and a repeated sample, for counting a criterion's ops (the counts
    do not depend on the image size or the model: resnet18 at 64 px serves)."""
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, num_samples, (batch,), generator=generator)
    index[1] = index[0]  # a repeated sample: the closed-form path, still no synchronisation
    target = torch.stack([pack_target(torch.eye(num_classes)[int(i) % num_classes], int(i), (0.1, 0.05, 0.9, 0.85),
                                      bool(i % 2)) for i in index])
    return torch.randn(batch, 3, 64, 64, generator=generator), target


class CompiledLaunches(NamedTuple):
    forward: int  # launches of the compiled call: generated kernels and library calls (matmul, ...)
    backward: int  # launches of its compiled backward


# a launch in inductor's generated `call`: a C++ or Triton kernel, or a library / aten fallback call
_LAUNCH = re.compile(r'^\s*(?:cpp_fused_\w+|\w+\.run|extern_kernels\.\w+|(?:torch\.ops\.)?aten\.\w+(?:\.\w+)?)\(', re.M)


def _launches(code: str) -> int:
    call = code[code.index('def call('):]
    return len(_LAUNCH.findall(call.split('\nrunner = ')[0]))


def compiled_launches(criterion: Callable, model: torch.nn.Module, images: torch.Tensor,
                      target: torch.Tensor) -> CompiledLaunches:
    """`CompiledLaunches` of `criterion(model(images), target)` and its backward, for a criterion built with
    `compile_backend='inductor'`, read from the code inductor generates at its first call (compile caches are
    reset first, so the call compiles). On a CPU the C++ backend fuses more per kernel than Triton does on a GPU."""
    torch.compiler.reset()
    _, codes = run_and_get_code(lambda: criterion(model(images), target).backward())
    backward = [c for c in codes if 'tangents_' in c[c.index('def call('):]]
    forward = [c for c in codes if c not in backward]
    if len(forward) != 1 or len(backward) != 1:
        raise RuntimeError(f'Expected one compiled forward and one backward graph, got {len(forward)} and '
                           f'{len(backward)} (a graph break or a recompilation).')
    return CompiledLaunches(_launches(forward[0]), _launches(backward[0]))
