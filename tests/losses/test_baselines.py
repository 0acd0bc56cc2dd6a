"""Single-positive baselines against values computed by hand on small tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_srn.data import pack_target
from timm_srn.losses import (
    EXPECTED_POSITIVES, AssumeNegativeLoss, EntropyMaximizationLoss, ExpectedPositiveLoss, LargeLossLoss, RoleLoss,
    WeakAssumeNegativeLoss, create_single_positive_loss, loss_options)

LOGITS = torch.tensor([[2., -1., 0.]])
LABELS = torch.tensor([[1., 0., 0.]])


def sp(z):  # softplus
    return math.log1p(math.exp(z))


def test_an_and_an_ls():
    expected = (sp(-2) + sp(-1) + sp(0)) / 3
    assert AssumeNegativeLoss()(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)
    # Cole et al.'s loss_an_ls, eps = 0.1: positive target 0.9, the others 0.1; BCE = softplus(z) - t * z
    t = [0.9, 0.1, 0.1]
    z = [2., -1., 0.]
    expected = sum(sp(zi) - ti * zi for zi, ti in zip(z, t)) / 3
    assert AssumeNegativeLoss(smoothing=0.1)(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_wan():
    expected = (sp(-2) + 0.5 * sp(-1) + 0.5 * sp(0)) / 3
    assert WeakAssumeNegativeLoss()(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_epr():
    p = [1 / (1 + math.exp(-z)) for z in (2., -1., 0.)]
    expected = sp(-2) / 3 + (sum(p) - 1.5) ** 2 / 9
    assert ExpectedPositiveLoss(1.5)(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)
    # two images: one batch-level regulariser on the mean of their expected counts, (mean - k)^2 / C^2
    logits2 = torch.tensor([[2., -1., 0.], [-2., -2., 3.]])
    labels2 = torch.tensor([[1., 0., 0.], [0., 0., 1.]])
    p2 = [1 / (1 + math.exp(-z)) for z in (-2., -2., 3.)]
    mean_count = (sum(p) + sum(p2)) / 2
    expected = (sp(-2) + sp(-3)) / 6 + (mean_count - 1.5) ** 2 / 9
    assert ExpectedPositiveLoss(1.5)(logits2, labels2).item() == pytest.approx(expected, rel=1e-6)


def test_ll_r_ct_cp_follow_large_loss_matters():
    an = [sp(-2), sp(-1), sp(0)]  # AN losses: observed positive, then unobserved z=-1 and z=0
    for mode in ('reject', 'correct_temporary', 'correct_permanent'):
        loss = LargeLossLoss(mode, delta_rel=50., num_samples=2, num_classes=3)
        target = torch.stack([pack_target(LABELS[0], 1)])
        loss.set_epoch(0)  # first epoch: nothing modified
        assert loss(LOGITS, target).item() == pytest.approx(sum(an) / 3, rel=1e-6)
        loss.set_epoch(1)  # k = ceil(B C 0.5) = 2 of the 3 entries: both unobserved labels (losses >= the 2nd largest)
        value = loss(LOGITS, target).item()
        if mode == 'reject':
            assert value == pytest.approx(an[0] / 3, rel=1e-6)
        else:
            assert value == pytest.approx((an[0] + sp(1) + sp(0)) / 3, rel=1e-6)  # BCE against 1: softplus(-z)
    # LL-Cp flips only the entries strictly above the k-th largest loss (class 2), for good
    assert loss.flipped[1].tolist() == [False, False, True]
    loss.set_epoch(0)
    assert loss(LOGITS, target).item() == pytest.approx((an[0] + an[1] + sp(0)) / 3, rel=1e-6)
    # LL-R at 20% of B C = 6 entries: k = ceil(1.2) = 2 -> the two largest unobserved losses of the batch
    logits2 = torch.tensor([[2., -1., 0.], [1., 3., -2.]])
    target2 = torch.stack([pack_target([1., 0., 0.], 0), pack_target([0., 1., 0.], 1)])
    rejecting = LargeLossLoss('reject', delta_rel=20.)
    rejecting.set_epoch(1)
    kept = sp(-2) + sp(-1) + sp(-3) + sp(-2)  # rejected: z=0 (0.69) and z=1 (1.31)
    assert rejecting(logits2, target2).item() == pytest.approx(kept / 6, rel=1e-6)


def test_ll_cp_keeps_the_flips_of_every_row_of_a_repeated_sample():
    """A sample twice in one batch (--aug-repeats, sampler padding): each row's flips are kept, not the last row's."""
    loss = LargeLossLoss('correct_permanent', delta_rel=50., num_samples=2, num_classes=3)
    loss.set_epoch(1)  # k = ceil(6 x 0.5) = 3: the three largest unobserved losses; flipped: those above the 3rd
    logits = torch.tensor([[2., 5., -1.], [2., 0., 4.]])  # unobserved losses: 5.0, 0.3 | 0.7, 4.0
    target = torch.stack([pack_target(LABELS[0], 1)] * 2)
    loss(logits, target)
    assert loss.flipped[1].tolist() == [False, True, True] and not loss.flipped[0].any()


def test_ll_rate_accumulates_like_the_reference():
    """LargeLossMatters lowers its clean rate by delta_rel / 100 after each epoch by float subtraction: at epoch 5
    with delta_rel 0.5 the rate is 0.025000000000000022, so ceil(16 * 80 * rate) = 33 entries (32 by the exact
    product 5 * 0.5 / 100)."""
    loss = LargeLossLoss('reject', delta_rel=0.5)
    loss.set_epoch(5)
    assert math.ceil(16 * 80 * loss.rate()) == 33
    logits = torch.linspace(-3, 3, 16 * 80).view(16, 80)
    target = torch.zeros(16, 80)
    target[:, 0] = 1
    rejected = (logits[:, 1:].flatten().sort(descending=True).values[:33])
    kept = F.softplus(logits[:, 1:]).sum() - F.softplus(rejected).sum() + F.softplus(-logits[:, 0]).sum()
    assert loss(logits, target).item() == pytest.approx(kept.item() / (16 * 80), rel=1e-5)
    loss.set_epoch(0)
    assert loss.rate() == 0


def test_em_and_apl_follow_ack_the_unknown():
    p = [1 / (1 + math.exp(-z)) for z in (2., -1., 0.)]
    h = [-(pi * math.log(pi) + (1 - pi) * math.log(1 - pi)) for pi in p]
    expected = (sp(-2) - 0.1 * (h[1] + h[2])) / 3
    assert EntropyMaximizationLoss(alpha=0.1)(LOGITS, LABELS).item() == pytest.approx(expected, abs=1e-6)
    # per-dataset defaults of the reference's train.py
    assert loss_options('em', 'voc')['alpha'] == 0.2 and 'apl_beta' not in loss_options('em')
    assert {k: loss_options('em-apl', 'coco')[k] for k in ('alpha', 'apl_beta', 'warmup_epochs')} == \
        dict(alpha=0.1, apl_beta=0.9, warmup_epochs=5)
    # APL: per class, int(0.9 * 3 unobserved / (6 - 5 epochs)) = 2 lowest-probability unobserved entries per epoch
    apl = EntropyMaximizationLoss(alpha=0.1, apl_beta=2., warmup_epochs=5, num_epochs=6, num_samples=4, num_classes=2)
    assert not apl.pseudo_labels_due(3) and apl.pseudo_labels_due(4)
    observed = torch.tensor([[1., 0.], [0., 0.], [0., 0.], [0., 1.]])
    probs = torch.tensor([[0.9, 0.5], [0.3, 0.05], [0.1, 0.6], [0.2, 0.9]])
    assert apl.pseudo_label(probs, observed) == 4
    assert apl.pseudo_labelled.tolist() == [[False, True], [False, True], [True, False], [True, False]]
    assert apl.pseudo_targets[2, 0].item() == pytest.approx(0.1) and apl.pseudo_targets[0, 1].item() == pytest.approx(0.5)
    assert apl.pseudo_label(probs, observed) == 2  # the rest: (1, 0) and (2, 1); labels are permanent
    assert apl.pseudo_labelled.sum().item() == 6
    # sample 3: class 0 pseudo-labelled (target 0.2): beta * BCE, out of the entropy term; class 1 observed
    z = torch.tensor([[-1., 0.5]])
    bce = -(0.2 * math.log(1 / (1 + math.exp(1.))) + 0.8 * math.log(1 - 1 / (1 + math.exp(1.))))
    value = apl(z, torch.stack([pack_target([0., 1.], 3)]))
    assert value.item() == pytest.approx((2. * bce + sp(-0.5)) / 2, rel=1e-5)
    with pytest.raises(ValueError, match='num_samples and num_classes'):
        EntropyMaximizationLoss(apl_beta=1.)


def test_role_follows_cole_et_al():
    torch.manual_seed(0)
    loss = RoleLoss(num_samples=4, num_classes=3, expected_positives=1.)
    assert loss.lr_multiplier == 10.
    spread = math.log(0.6 / 0.4)  # unobserved estimates start uniform in [logit 0.4, logit 0.6]
    assert loss.label_logits.abs().max() <= spread
    logits = LOGITS.clone().requires_grad_()
    value = loss(logits, torch.stack([pack_target(LABELS[0], 2)]))
    value.backward()
    z_est = loss.label_logits.detach()[2]
    assert z_est[0].item() == pytest.approx(math.log(0.995 / 0.005), rel=1e-6)  # observed positive: 0.995
    assert logits.grad is not None and loss.label_logits.grad[2].abs().sum() > 0
    assert loss.label_logits.grad[[0, 1, 3]].abs().sum() == 0
    # by hand: 0.5 (pos_f + pos_g) + 0.5 (cross_f + cross_g), all / (B C), + 0.5 (EPR_f + EPR_g)
    sig = lambda z: 1 / (1 + math.exp(-z))
    z_f = [2., -1., 0.]
    p_f, p_g = [sig(z) for z in z_f], [sig(float(z)) for z in z_est]
    bce = lambda p, t: -(t * math.log(p) + (1 - t) * math.log(1 - p))
    positives = -math.log(p_f[0]) - math.log(p_g[0])
    cross = sum(bce(p_f[c], p_g[c]) + bce(p_g[c], p_f[c]) for c in range(3))
    regulariser = ((sum(p_f) - 1.) ** 2 + (sum(p_g) - 1.) ** 2) / 9
    assert value.item() == pytest.approx(0.5 * (positives + cross) / 3 + 0.5 * regulariser, rel=1e-5)
    # the estimate of an observed positive is learned too (not pinned to 1), and initialised only once
    before = loss.label_logits.detach()[2].clone()
    with torch.no_grad():
        loss.label_logits[2, 0] = 0.
    loss(LOGITS, torch.stack([pack_target(LABELS[0], 2)]))
    assert loss.label_logits[2, 0].item() == 0. and before[0] != 0.


def test_factory_and_errors():
    for name in ('an', 'an-ls', 'wan', 'epr', 'role', 'll-r', 'll-ct', 'll-cp', 'em', 'em-apl', 'consistency', 'en', 'spatial',
                 'en-spatial'):
        assert create_single_positive_loss(name, 4, 3) is not None
    headline = create_single_positive_loss('en-spatial', 4, 3)
    assert headline.negatives == 'en' and headline.spatial_weight == 1.0
    assert create_single_positive_loss('spatial', 4, 3).negatives == 'an'
    assert loss_options('epr', 'voc') == dict(expected_positives=EXPECTED_POSITIVES['voc'])
    assert 'spatial_weight' not in loss_options('en') and 'negatives' not in loss_options('en-spatial')
    with pytest.raises(TypeError, match="loss 'en' takes no argument spatial_weight"):
        create_single_positive_loss('en', 4, 3, spatial_weight=1.)
    with pytest.raises(ValueError, match="Unknown single-positive loss 'nope'"):
        create_single_positive_loss('nope', 4, 3)
    with pytest.raises(ValueError, match='packed targets'):
        RoleLoss(4, 3)(LOGITS, LABELS)
    soft = torch.tensor([[0.7, 0.3, 0.]])  # stateless: used as given, no check on the device
    torch.testing.assert_close(AssumeNegativeLoss()(LOGITS, soft), F.binary_cross_entropy_with_logits(LOGITS, soft))
    with pytest.raises(ValueError, match='Mixup/CutMix'):  # per-sample state: checked first
        RoleLoss(4, 3)(LOGITS, pack_target(soft[0], 0)[None])
