"""What each single-positive criterion adds to a step: aten ops per call, backward ops beyond BCE, host syncs."""
import copy

import pytest
import timm
import torch

from timm_srn.data import pack_target
from timm_srn.losses import create_single_positive_loss
from timm_srn.op_count import compiled_launches, count_ops, counting_batch, criterion_op_counts

C, N, B = 80, 1000, 32
STATEFUL = ('consistency', 'en', 'spatial', 'en-spatial')
# (forward aten ops, of which kernels, backward beyond BCE), held at the counts reached here. The targets are
# on kernels (views launch nothing): <= 10 for the stateless criteria, <= 60 for consistency / en, <= 100 for the
# spatial criteria with <= 40 in the backward (down from 271 / 410 aten ops before the step became free of
# synchronisation, and from 61 / 121 kernels before both buffers shared one EMA update)
LIMITS = {'an': (10, 10, 0), 'wan': (10, 10, 1), 'an-ls': (10, 10, 0), 'consistency': (87, 51, 13),
          'en': (89, 53, 13), 'spatial': (154, 89, 38), 'en-spatial': (156, 91, 38)}


@pytest.mark.parametrize('name', list(LIMITS))
def test_criterion_op_counts_and_no_host_synchronisation(name):
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=C)
    criterion = create_single_positive_loss(name, N, C, **(dict(warmup_epochs=0) if name in STATEFUL else {}))
    if hasattr(criterion, 'attach'):
        criterion.attach(model)
    counts = criterion_op_counts(criterion, model, *counting_batch(C, N, B))
    forward, kernels, backward = LIMITS[name]
    assert counts.syncs == 0
    assert counts.forward <= forward and counts.forward_kernels <= kernels and counts.backward_extra <= backward, counts


def test_syncs_are_counted():
    x = torch.ones(3)
    ops = count_ops(lambda: (x.sum().item(), x.nonzero()))
    assert 'aten::_local_scalar_dense' in ops and 'aten::nonzero' in ops
    with_host_check = create_single_positive_loss('role', 4, 3)
    assert criterion_op_counts(with_host_check, torch.nn.Linear(2, 3), torch.ones(2, 2),
                               torch.stack([pack_target([1., 0., 0.], i) for i in range(2)])).syncs > 0


def test_inductor_compiles_a_spatial_call_and_its_backward_into_a_few_launches():
    """compile_backend='inductor', the option for launch-bound GPU steps: the whole call (check, read, resampling,
    loss, EMA writes) fuses into a few kernels (counted on this CPU's C++ backend), with the eager criterion's
    numbers: the same buffers and model gradients after one step."""
    torch.manual_seed(0)
    models = [timm.create_model('resnet18', num_classes=C)]
    models.append(copy.deepcopy(models[0]))
    eager, compiled = (create_single_positive_loss('spatial', N, C, warmup_epochs=0, heatmap_dtype=torch.float32,
                                                   **kwargs).attach(model)
                       for kwargs, model in zip(({}, dict(compile_backend='inductor')), models))
    images, target = counting_batch(C, N, B)
    eager(models[0](images), target).backward()
    launches = compiled_launches(compiled, models[1], images, target)
    assert launches.forward <= 8 and launches.backward <= 2, launches
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-5)
    for (name, eager_param), compiled_param in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(compiled_param.grad, eager_param.grad, rtol=1e-4, atol=1e-6, msg=name)
