"""Metrics against sklearn, timm's evaluator and a hand-computed 4x3 example."""
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score
from timm.task import MultiLabelClassificationEvaluator

from timm_srn.metrics import METRIC_PRESETS, MultilabelMetricAccumulator, average_precision, multilabel_metrics


def _random(n=64, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=g) < 0.3).float()
    targets[0] = 1  # every class has a positive
    return torch.rand(n, c, generator=g), targets


def test_against_sklearn_and_timm():
    scores, targets = _random()
    m = multilabel_metrics(scores, targets)
    assert m['mAP'] == pytest.approx(100 * average_precision_score(targets, scores, average='macro'), abs=1e-9)
    pred = (scores > 0.5).numpy()
    assert m['CF1'] == pytest.approx(100 * f1_score(targets, pred, average='macro', zero_division=0), abs=1e-9)
    assert m['OF1'] == pytest.approx(100 * f1_score(targets, pred, average='micro'), abs=1e-9)
    evaluator = MultiLabelClassificationEvaluator(threshold=0.5)
    evaluator.update(torch.logit(scores.double()).float(), targets)
    timm_metrics = evaluator.compute()
    assert m['mAP'] == pytest.approx(timm_metrics['map'], abs=1e-6)
    assert m['OF1'] == pytest.approx(timm_metrics['micro_f1'], abs=1e-4)


def test_hand_computed_4x3():
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.8, 0.7, 0.1], [0.3, 0.6, 0.4], [0.1, 0.4, 0.8]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    m = multilabel_metrics(scores, targets)
    # AP class 0: ranks .9(+) .8(-) .3(+) .1(-): (1 + 2/3) / 2; class 1: .7(+) .6(+): 1; class 2: .8(+) .6(+): 1
    assert m['mAP'] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 + 1) / 3)
    # predictions > .5: c0 {0,1} tp1; c1 {1,2} tp2; c2 {0,3} tp2
    assert m['CP'] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    assert m['CR'] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    assert m['CF1'] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    assert m['OP'] == pytest.approx(100 * 5 / 6) and m['OR'] == pytest.approx(100 * 5 / 6)
    top = multilabel_metrics(scores, targets, top_k=1)
    # top-1 and > .5: rows -> c0, c0, c1, c2: tp = row0 c0, row2 c1, row3 c2
    assert top['top1_OP'] == pytest.approx(100 * 3 / 4) and top['top1_OR'] == pytest.approx(100 * 3 / 6)
    voc = multilabel_metrics(scores, targets, ap='voc')
    # interpolated class 0: precision envelope at recall .5 is 1, at recall 1 is 2/3
    assert voc['mAP'] == pytest.approx(100 * ((0.5 * 1 + 0.5 * 2 / 3) + 1 + 1) / 3)


def test_class_without_positives_is_excluded_and_counted_and_mask():
    scores, targets = _random()
    targets[:, 2] = 0
    m = multilabel_metrics(scores, targets)
    assert m['classes_without_positives'] == 1
    keep = [0, 1, 3, 4, 5]
    assert m['mAP'] == pytest.approx(100 * average_precision_score(targets[:, keep], scores[:, keep]), abs=1e-9)
    mask = torch.ones_like(targets, dtype=torch.bool)
    mask[10:, 0] = False
    masked = multilabel_metrics(scores, targets, mask=mask)
    per_class = [average_precision_score(targets[:10, 0], scores[:10, 0])] + \
        [average_precision_score(targets[:, c], scores[:, c]) for c in (1, 3, 4, 5)]
    assert masked['mAP'] == pytest.approx(100 * sum(per_class) / 5, abs=1e-9)


def test_from_logits():
    scores, targets = _random()
    assert multilabel_metrics(torch.logit(scores), targets, from_logits=True)['CF1'] == pytest.approx(
        multilabel_metrics(scores, targets)['CF1'])


def test_accumulator_equals_one_call_and_drops_padding():
    scores, targets = _random(50)
    acc = MultilabelMetricAccumulator(top_k=3)
    for i in range(0, 50, 8):
        acc.update(scores[i:i + 8], targets[i:i + 8], index=torch.arange(i, min(i + 8, 50)))
    acc.update(scores[:2], targets[:2], index=torch.arange(2))  # sampler padding repeats the first rows
    assert acc.compute() == multilabel_metrics(scores, targets, top_k=3)


def _accumulate_on_rank(rank, init_file, result_file):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    scores, targets = _random(50)
    sampler = torch.utils.data.DistributedSampler(range(50), num_replicas=2, rank=rank, shuffle=True, seed=0)
    index = torch.tensor(list(sampler))  # 25 each; padding when the size is odd
    acc = MultilabelMetricAccumulator(top_k=3)
    for chunk in index.split(8):
        acc.update(scores[chunk], targets[chunk], index=chunk)
    torch.save(acc.compute(distributed=True), result_file + f'.{rank}')
    dist.destroy_process_group()


def test_accumulator_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_accumulate_on_rank, args=(str(tmp_path / 'init'), str(tmp_path / 'metrics')), nprocs=2, join=True)
    scores, targets = _random(50)
    expected = multilabel_metrics(scores, targets, top_k=3)
    for rank in (0, 1):
        assert torch.load(tmp_path / f'metrics.{rank}') == expected


def test_srn_eps_rule_and_preset_by_hand():
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]])
    probs = torch.tensor([[0.9, 0.2], [0.2, 0.1], [0.1, 0.4], [0.3, 0.3]])  # class 1: no prediction above 0.5
    default = multilabel_metrics(probs, labels)
    srn = multilabel_metrics(probs, labels, **METRIC_PRESETS['srn'])
    # class 0: P 1, R 1/2; class 1: P 0 (default) or eps/eps = 1 (SRN's Matlab), R 0 (+ 2 eps)
    assert default['CP'] == pytest.approx(50.) and srn['CP'] == pytest.approx(100.)
    assert default['CR'] == pytest.approx(25.) and srn['CR'] == pytest.approx(25.)
    assert default['CF1'] == pytest.approx(100 * (2 / 3) / 2) and srn['CF1'] == pytest.approx(100 * (2 / 3) / 2)
    assert srn['OP'] == pytest.approx(100.) and srn['OR'] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="precision_rule must be one of"):
        multilabel_metrics(probs, labels, precision_rule='nan')


def test_voc_ap_ranks_ties_in_row_order():
    # tied scores: the row order decides, as Matlab's stable sort: negative first -> precision 1/2 at full recall
    tied = torch.full((40, 1), 0.5)
    targets = torch.zeros(40, 1)
    targets[-1] = 1
    assert average_precision(tied, targets, ap='voc')[0].item() == pytest.approx(1 / 40)
    targets = torch.zeros(40, 1)
    targets[0] = 1
    assert average_precision(tied, targets, ap='voc')[0].item() == pytest.approx(1.)
