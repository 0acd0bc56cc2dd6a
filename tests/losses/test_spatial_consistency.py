"""SpatialConsistencyLoss as a drop-in timm criterion."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import timm
from timm.task import MultiLabelClassificationTask

from timm_srn.data import pack_target, unpack_target
from timm_srn.losses import HeatmapSource, SpatialConsistencyLoss, create_single_positive_loss

C = 5


def _batch(indices, boxes=None, flips=None, positives=None):
    rows = []
    for i, index in enumerate(indices):
        labels = torch.zeros(C)
        labels[(positives or [index % C for index in indices])[i]] = 1
        box = boxes[i] if boxes else (0., 0., 1., 1.)
        rows.append(pack_target(labels, index, box, bool(flips[i]) if flips else False))
    return torch.stack(rows)


def test_pack_target_index_exact_beyond_float32():
    for index in (0, 2 ** 24 + 1, 2 ** 31 - 1, 2 ** 31 + 12345):
        packed = torch.stack([pack_target([0, 1, 0], index, (0.1, 0.2, 0.3, 0.4), True)])
        out = unpack_target(torch.utils.data.default_collate([packed[0]]).to(torch.float32), 3)
        assert int(out.index[0]) == index and bool(out.flips[0])
        torch.testing.assert_close(out.boxes[0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(ValueError, match='expected 3 .* or 10'):
        unpack_target(torch.zeros(2, 7), 3)


def test_plain_model_maps_mean_equals_logits():
    model = timm.create_model('test_resnet', num_classes=C).eval()
    source = HeatmapSource(model)
    logits = model(torch.randn(2, 3, 160, 160))
    torch.testing.assert_close(source.latest().mean(dim=(2, 3)), logits, rtol=1e-5, atol=1e-5)
    source.remove()
    assert 'forward_features' not in vars(model)


@pytest.mark.parametrize('name', ['srn_test_resnet', 'test_resnet', 'test_vit'])
def test_training_step_in_timm_task(name):
    model = timm.create_model(name, num_classes=C)
    criterion = SpatialConsistencyLoss(num_samples=8, num_classes=C, warmup_epochs=0, heatmap_dtype=torch.float32).attach(model)
    task = MultiLabelClassificationTask(model, criterion=criterion, verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    target = _batch([0, 1, 2, 3], boxes=[(0., 0., 1., 1.), (0.1, 0.1, 0.9, 0.8), (0.5, 0., 1., 1.), (0., 0., 0.6, 0.6)],
                    flips=[0, 1, 0, 1])
    images = torch.randn(4, 3, 160, 160)
    for step in range(2):
        result = task(images, target)
        optimizer.zero_grad()
        result['loss'].backward()
        optimizer.step()
    assert set(criterion.last_terms) == {'positive', 'negative', 'consistency', 'spatial'}
    assert criterion.last_terms['spatial'] > 0
    assert criterion.heatmaps.seen[:4].any() and not criterion.heatmaps.seen[4:].any()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not any(b.requires_grad for b in criterion.buffers())


def test_gradients_flow_to_model_only_and_buffer_is_updated_after_loss():
    model = timm.create_model('test_resnet', num_classes=C)
    criterion = SpatialConsistencyLoss(8, C, warmup_epochs=0, momentum=0.5, heatmap_dtype=torch.float32).attach(model)
    target = _batch([0, 1])
    loss = criterion(model(torch.randn(2, 3, 160, 160)), target)
    maps = criterion._source.latest()
    assert maps.shape == (2, C, 5, 5) and maps.requires_grad
    assert criterion.heatmaps.seen[0].all()  # written after the loss, from detached maps
    loss.backward()
    assert model.fc.weight.grad is not None and model.conv1[0].weight.grad is not None
    assert criterion.heatmaps.maps.grad is None and not criterion.heatmaps.maps.requires_grad


@pytest.mark.parametrize('space', ['prob', 'logit'])
def test_spatial_term_matches_hand_computation(space):
    criterion = SpatialConsistencyLoss(4, C, consistency_weight=0., negatives='none', warmup_epochs=0,
                                       heatmap_size=(2, 2), heatmap_dtype=torch.float32, spatial_space=space,
                                       momentum=0.9)
    to_space = torch.sigmoid if space == 'prob' else (lambda t: t)
    first, second = to_space(torch.tensor(1.)), to_space(torch.tensor(3.))

    class Fixed:  # a heatmap source with known maps
        maps = None
        def latest(self):
            return self.maps
        def remove(self):
            pass

    criterion._source = Fixed()
    target = _batch([3], positives=[0])
    criterion._source.maps = torch.full((1, C, 2, 2), 1.)
    criterion(torch.zeros(1, C), target)  # first visit: no stored maps, writes ones
    criterion._source.maps = torch.full((1, C, 2, 2), 3.)
    loss = criterion(torch.zeros(1, C), target)
    positive = F.softplus(torch.tensor(0.)) / C  # one observed positive among C at logit 0
    torch.testing.assert_close(loss, positive + (second - first) ** 2)
    torch.testing.assert_close(criterion.heatmaps.maps[3], torch.full((C, 2, 2), float(0.9 * first + 0.1 * second)))


def test_expected_negatives_ignore_likely_positives():
    criterion = SpatialConsistencyLoss(2, C, negatives='en', en_threshold=0.3, consistency_weight=0., spatial_weight=0.,
                                       warmup_epochs=0, momentum=0., heatmap_dtype=torch.float32)
    target = _batch([0], positives=[0])
    first = torch.tensor([[5., -5., 5., -5., -5.]])  # class 2 looks present
    # a never-seen sample has every unobserved label negative, as 'an'
    torch.testing.assert_close(criterion(first, target), (F.softplus(-first[0, 0]) + F.softplus(first[0, 1:]).sum()) / C)
    loss = criterion(torch.zeros(1, C), target)
    # positive class 0; negatives: 1, 3, 4 (EMA prob < 0.3); class 2 ignored
    expected = (F.softplus(torch.tensor(0.)) * 4) / C
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize('threshold', [0., -0.1, 1.5])
def test_expected_negatives_need_a_threshold_a_never_seen_sample_falls_below(threshold):
    with pytest.raises(ValueError, match=r'en_threshold must be in \(0, 1\]'):
        SpatialConsistencyLoss(2, C, negatives='en', en_threshold=threshold)


def test_warmup_uses_set_epoch_or_samples_seen():
    criterion = SpatialConsistencyLoss(4, C, spatial_weight=0., warmup_epochs=1)
    target = _batch([0, 1])
    criterion(torch.zeros(2, C), target)
    assert 'consistency' not in criterion.last_terms and criterion.current_epoch() == 0.5
    criterion(torch.zeros(2, C), _batch([2, 3]))
    criterion(torch.zeros(2, C), target)
    assert 'consistency' in criterion.last_terms
    criterion.set_epoch(0)
    criterion(torch.zeros(2, C), target)
    assert 'consistency' not in criterion.last_terms


def test_clear_errors():
    criterion = SpatialConsistencyLoss(4, C, spatial_weight=0.)
    with pytest.raises(ValueError, match='needs targets packed'):
        criterion(torch.zeros(2, C), torch.zeros(2, C))
    soft = _batch([0, 1])
    soft[0, 1] = 0.3
    with pytest.raises(ValueError, match='Mixup/CutMix'):
        criterion(torch.zeros(2, C), soft)
        criterion.raise_if_invalid()
    with pytest.raises(RuntimeError, match='attach'):
        SpatialConsistencyLoss(4, C)(torch.zeros(2, C), _batch([0, 1]))
    plain_ok = SpatialConsistencyLoss(4, C, consistency_weight=0., spatial_weight=0.)
    target = torch.zeros(2, C)
    target[:, 0] = 1
    torch.testing.assert_close(plain_ok(torch.zeros(2, C), target), F.softplus(torch.tensor(0.)))


def test_state_dict_resume_is_exact():
    a = SpatialConsistencyLoss(4, C, spatial_weight=0., warmup_epochs=0)
    a(torch.randn(2, C), _batch([0, 1]))
    b = SpatialConsistencyLoss(4, C, spatial_weight=0., warmup_epochs=0)
    b.load_state_dict(a.state_dict())
    logits, target = torch.randn(2, C), _batch([1, 2])
    torch.testing.assert_close(a(logits, target), b(logits, target), rtol=0, atol=0)


@pytest.mark.parametrize('source,size', [('attention', (10, 10)), ('confidence', (10, 10)), ('class_maps', (5, 5))])
def test_srn_heatmap_sources(source, size):
    model = timm.create_model('srn_test_resnet', num_classes=C)
    criterion = SpatialConsistencyLoss(8, C, warmup_epochs=0, heatmap_source=source).attach(model)
    criterion(model(torch.randn(2, 3, 160, 160)), _batch([0, 1]))
    assert criterion._source.latest().shape == (2, C, *size)
    with pytest.raises(ValueError, match="Only SRN models have the 'attention' maps"):
        SpatialConsistencyLoss(8, C, heatmap_source='attention').attach(timm.create_model('test_resnet', num_classes=C))


def test_criterion_after_an_autocast_forward_uses_the_maps_precision():
    """timm's pattern `with autocast: output = model(x)` then `loss_fn(output, target)` outside it: the class maps'
    head runs in the features' precision instead of failing on bf16 features and float32 weights."""
    model = timm.create_model('test_resnet', num_classes=C)
    criterion = SpatialConsistencyLoss(4, C, warmup_epochs=0).attach(model)
    x = torch.randn(4, 3, 64, 64)
    target = _batch(range(4))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        output = model(x)
    loss = criterion(output, target)
    assert torch.isfinite(loss) and criterion.heatmaps.maps.dtype == torch.float16


def test_align_crops_false_stores_crops_as_whole_images():
    """The alignment ablation: a crop's maps land on the whole stored map, as the full-image box would put them."""
    model = timm.create_model('test_resnet', num_classes=C)
    x = torch.randn(2, 3, 64, 64)
    stored = {}
    for align, boxes in ((False, [(0.5, 0.5, 1., 1.)] * 2), (True, [(0., 0., 1., 1.)] * 2)):
        torch.manual_seed(0)
        criterion = SpatialConsistencyLoss(2, C, warmup_epochs=0, align_crops=align).attach(model)
        criterion(model(x), _batch([0, 1], boxes=boxes, flips=[True, False]) if not align else _batch([0, 1], boxes=boxes))
        stored[align] = criterion.heatmaps.maps.clone()
        assert bool(criterion.heatmaps.seen.all())
    torch.testing.assert_close(stored[False], stored[True])


class _Maps:
    def __init__(self):
        self.maps = None

    def latest(self):
        return self.maps

    def remove(self):
        pass


def _fixed_batches(num_classes=5, num_samples=9, steps=12, batch=6):
    """Crops, flips and a repeated sample in every third batch (the sequence the recorded values came from)."""
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        index = torch.randint(0, num_samples, (batch,), generator=generator)
        if step % 3 == 2:
            index[1] = index[0]
            index[4] = index[0]
        rows = []
        for i in index.tolist():
            x0, y0 = torch.rand(2, generator=generator) * 0.5
            w, h = 0.3 + torch.rand(2, generator=generator) * 0.5
            labels = torch.zeros(num_classes)
            labels[i % num_classes] = 1
            box = (float(x0), float(y0), float(min(x0 + w, 1)), float(min(y0 + h, 1)))
            rows.append(pack_target(labels, i, box, bool(torch.rand(1, generator=generator) < 0.5)))
        logits = torch.randn(batch, num_classes, generator=generator) * 2
        yield logits, torch.stack(rows), torch.randn(batch, num_classes, 5, 5, generator=generator) * 2, step / 4


RECORDED = {'consistency': dict(warmup_epochs=1.0), 'en': dict(warmup_epochs=1.0), 'spatial': dict(warmup_epochs=1.0),
            'en-spatial': dict(warmup_epochs=1.0), 'spatial-topk': dict(warmup_epochs=0.5, classes_per_sample=2),
            'spatial-logit-noalign': dict(warmup_epochs=0.5, spatial_space='logit', align_crops=False, momentum=0.9)}


@pytest.mark.parametrize('case', list(RECORDED))
def test_values_equal_the_criterion_before_the_synchronisation_free_rewrite(case):
    """Losses, terms and every buffer after 12 steps equal those recorded from the previous implementation (a host
    copy per step and a loop over repeated samples; float32 storage, so only float rounding may differ)."""
    recorded = torch.load(Path(__file__).parent / 'criteria_before_refactor.pt')[case]
    torch.manual_seed(0)
    criterion = create_single_positive_loss(case.split('-topk')[0].split('-logit')[0], 9, 5,
                                            heatmap_dtype=torch.float32, **RECORDED[case])
    criterion._source = _Maps() if criterion.heatmaps is not None else None
    losses, terms = [], []
    for logits, target, maps, epoch in _fixed_batches():
        criterion.set_epoch(epoch)
        if criterion._source is not None:
            criterion._source.maps = maps
        losses.append(criterion(logits, target).detach())
        terms.append(criterion.last_terms)
    torch.testing.assert_close(torch.stack(losses), recorded['losses'], rtol=1e-6, atol=1e-6)
    for now, before in zip(terms, recorded['terms']):
        assert now.keys() == before.keys() and all(abs(now[k] - before[k]) < 1e-6 for k in now)
    state = criterion.state_dict()
    assert state.keys() == recorded['state'].keys()
    for key, value in recorded['state'].items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('backend', ['eager', 'aot_eager'])
def test_compiled_criterion_equals_the_eager_one(backend):
    """compile_backend runs each call under torch.compile(fullgraph=True): possible only without a host
    synchronisation; the losses and every buffer equal the eager criterion's."""
    torch.compiler.reset()
    eager, compiled = (create_single_positive_loss('en-spatial', 9, 5, warmup_epochs=1.0, heatmap_dtype=torch.float32,
                                                   **kwargs) for kwargs in ({}, dict(compile_backend=backend)))
    for criterion in (eager, compiled):
        criterion._source = _Maps()
    for logits, target, maps, epoch in _fixed_batches(steps=8):
        for criterion in (eager, compiled):
            criterion.set_epoch(epoch)
            criterion._source.maps = maps
        torch.testing.assert_close(compiled(logits, target), eager(logits, target))
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value)
