"""timm's own training pieces around timm_srn: create_loader (prefetcher), SinglePositiveTask (timm's
MultiLabelClassificationTask), CheckpointSaver and resume_task_checkpoint. A stopped + resumed run equals an
uninterrupted one, criterion buffers included."""
import argparse
import random

import numpy as np
import pytest
import torch
import timm
from timm.data import create_loader
from timm.optim import create_optimizer_v2
from timm.task import resume_task_checkpoint
from timm.utils import CheckpointSaver

from timm_srn import SinglePositiveTask, SpatialConsistencyLoss
from timm_srn.checkpoint import load_model
from timm_srn.data import PackedTargetDataset, create_dataset, protocol_split

SIZE = 64


@pytest.fixture(scope='module')
def packed_train(synthetic_dir):
    base = create_dataset('synthetic', synthetic_dir, 'train').subset(range(80))
    train, _, observed, _ = protocol_split(base)
    return PackedTargetDataset(train, None, observed)


def _run(dataset, output, epochs, stop_after=None, resume=None):
    """timm's train.py loop in miniature, with its own pieces."""
    torch.manual_seed(0)
    model = timm.create_model('srn_test_resnet', num_classes=dataset.num_classes, img_size=SIZE)
    criterion = SpatialConsistencyLoss(len(dataset), dataset.num_classes, warmup_epochs=0).attach(model)
    task = SinglePositiveTask(model, criterion, verbose=False)
    optimizer = create_optimizer_v2(model, opt='sgd', lr=0.05)
    loader = create_loader(dataset, input_size=(3, SIZE, SIZE), batch_size=16, is_training=True,
                           use_prefetcher=True, device=torch.device('cpu'), num_workers=0, scale=(0.3, 1.0),
                           hflip=0.5, color_jitter=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    output.mkdir(exist_ok=True)
    args = argparse.Namespace(model='srn_test_resnet', num_classes=dataset.num_classes, img_size=SIZE)
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(output), recovery_dir=str(output),
                            task=task, max_history=1)
    start = resume_task_checkpoint(task, resume, optimizer, log_info=False) if resume else 0
    for epoch in range(start, epochs if stop_after is None else stop_after):
        torch.manual_seed(epoch)
        random.seed(epoch)
        criterion.set_epoch(epoch)
        task.train()
        for images, target in loader:
            loss = task(images, target)['loss']
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        saver.save_checkpoint(epoch, metric=-loss.item())
    return model, criterion


def test_timm_loop_stopped_and_resumed_equals_uninterrupted(packed_train, tmp_path):
    assert isinstance(packed_train.transform, type(None))
    full_model, full_criterion = _run(packed_train, tmp_path / 'full', epochs=2)
    # create_loader assigned timm's transform; the dataset wrapped it and kept recording crop geometry
    assert type(packed_train.transform).__name__ == 'GeometryRecordingTransform'
    _run(packed_train, tmp_path / 'split', epochs=2, stop_after=1)
    state = torch.load(tmp_path / 'split' / 'last.pth.tar', weights_only=False)
    assert state['task_state']['criterion']['heatmaps.seen'].any()
    model, criterion = _run(packed_train, tmp_path / 'split', epochs=2, resume=str(tmp_path / 'split' / 'last.pth.tar'))
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    for key, value in full_criterion.state_dict().items():
        assert torch.equal(value, criterion.state_dict()[key]), key
    assert float(criterion.epoch) == 1 and criterion.predictions.seen.all()

    # timm's checkpoint (argparse.Namespace args, task_state) loads as a trained model, without allowing other globals
    loaded = load_model(tmp_path / 'split' / 'last.pth.tar')
    assert loaded.num_classes == packed_train.num_classes and loaded.pretrained_cfg['tag'] == 'checkpoint_last'
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_resuming_without_criterion_state_is_refused(packed_train, tmp_path):
    model = timm.create_model('srn_test_resnet', num_classes=packed_train.num_classes, img_size=SIZE)
    path = tmp_path / 'plain.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'epoch': 0, 'version': 2}, path)
    criterion = SpatialConsistencyLoss(len(packed_train), packed_train.num_classes).attach(model)
    with pytest.raises(RuntimeError, match='holds no SpatialConsistencyLoss state'):
        resume_task_checkpoint(SinglePositiveTask(model, criterion, verbose=False), str(path), log_info=False)
    other = SpatialConsistencyLoss(len(packed_train) + 1, packed_train.num_classes)
    task = SinglePositiveTask(model, other, verbose=False)
    with pytest.raises(RuntimeError, match='another training set size'):
        task.load_task_state({'criterion': criterion.state_dict()})


def test_mixup_is_refused_before_training(packed_train):
    model = timm.create_model('test_resnet', num_classes=packed_train.num_classes)
    with pytest.raises(ValueError, match='Mixup / CutMix mix samples'):
        SinglePositiveTask(model, SpatialConsistencyLoss(8, packed_train.num_classes), mixup_active=True)


def test_create_dataset_takes_timm_arguments(synthetic_dir):
    val = create_dataset('synthetic', synthetic_dir, split='validation', search_split=True, class_map='',
                         is_training=False, download=False, batch_size=32, seed=42, repeats=0, input_img_mode='RGB',
                         trust_remote_code=False, num_samples=None, target_key=None)
    assert len(val) == 500
    train = create_dataset('synthetic', synthetic_dir, split='train', single_positive=True)
    assert isinstance(train, PackedTargetDataset) and len(train) == 1600
    assert np.all(train.observed_labels.sum(1) <= 1) and np.all(train.observed_labels <= train.targets)
    assert len(create_dataset('synthetic', synthetic_dir, split='validation', single_positive=True)) == 400
    assert len(create_dataset('synthetic', synthetic_dir, split='test', single_positive=True)) == 500
    with pytest.raises(ValueError, match="class_map=.* is not supported"):
        create_dataset('synthetic', synthetic_dir, class_map={'a': 0})
    with pytest.raises(ValueError, match="split must be one of"):
        create_dataset('synthetic', synthetic_dir, split='holdout')


def test_weight_sources_load_their_weights_and_unpublished_tags_fail_at_once(tmp_path):
    import time
    start = time.time()
    with pytest.raises(RuntimeError, match="'srn_resnet50.coco_224' are not published yet"):
        timm.create_model('srn_resnet50.coco_224', pretrained=True)
    assert time.time() - start < 5
    model = timm.create_model('srn_test_resnet', num_classes=3)
    from timm.models._hub import save_for_hf
    save_for_hf(model, str(tmp_path))
    loaded = load_model(f'local-dir:{tmp_path}')
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
