"""Single-positive baselines against values computed by hand on small tensors."""
import math

import pytest
import torch

from timm_srn.data import pack_target
from timm_srn.losses import (
    AssumeNegativeLoss, EntropyMaximizationLoss, ExpectedPositiveLoss, LargeLossLoss, RoleLoss,
    WeakAssumeNegativeLoss, create_single_positive_loss)

LOGITS = torch.tensor([[2., -1., 0.]])
LABELS = torch.tensor([[1., 0., 0.]])


def sp(z):  # softplus
    return math.log1p(math.exp(z))


def test_an_and_an_ls():
    expected = (sp(-2) + sp(-1) + sp(0)) / 3
    assert AssumeNegativeLoss()(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)
    # eps = 0.1: positive target 0.95, negative 0.05; BCE = softplus(z) - t * z
    t = [0.95, 0.05, 0.05]
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


def test_ll_r_ct_cp():
    an = [sp(-2), sp(-1), sp(0)]
    for mode in ('reject', 'correct_temporary', 'correct_permanent'):
        loss = LargeLossLoss(mode, delta_rel=50., num_samples=2, num_classes=3)
        target = torch.stack([pack_target(LABELS[0], 1)])
        loss.set_epoch(0)
        assert loss(LOGITS, target).item() == pytest.approx(sum(an) / 3, rel=1e-6)
        loss.set_epoch(1)  # rate 0.5 of the 2 unobserved: the largest loss (class 2, z=0) is modified
        value = loss(LOGITS, target).item()
        if mode == 'reject':
            assert value == pytest.approx((an[0] + an[1]) / 3, rel=1e-6)
        else:
            assert value == pytest.approx((an[0] + an[1] + sp(-0.)) / 3, rel=1e-6)
    assert loss.flipped[1].tolist() == [False, False, True]
    loss.set_epoch(0)  # permanent: the flip persists at rate 0
    assert loss(LOGITS, target).item() == pytest.approx((an[0] + an[1] + sp(0)) / 3, rel=1e-6)


def test_em_and_apl():
    p = [1 / (1 + math.exp(-z)) for z in (2., -1., 0.)]
    h = [-(pi * math.log(pi) + (1 - pi) * math.log(1 - pi)) for pi in p]
    expected = (sp(-2) - 0.1 * (h[1] + h[2])) / 3
    assert EntropyMaximizationLoss(alpha=0.1)(LOGITS, LABELS).item() == pytest.approx(expected, abs=1e-6)
    apl = EntropyMaximizationLoss(alpha=0.1, apl_beta=2., apl_threshold=0.3, warmup_epochs=1)
    apl.set_epoch(1)  # class 1 (p = 0.27) becomes a pseudo negative
    assert apl(LOGITS, LABELS).item() == pytest.approx(expected + 2 * sp(-1) / 3, abs=1e-6)


def test_role_gradients_reach_estimates_and_model():
    loss = RoleLoss(num_samples=4, num_classes=3, expected_positives=1.)
    logits = LOGITS.clone().requires_grad_()
    value = loss(logits, torch.stack([pack_target(LABELS[0], 2)]))
    value.backward()
    assert logits.grad is not None and loss.label_logits.grad[2].abs().sum() > 0
    assert loss.label_logits.grad[[0, 1, 3]].abs().sum() == 0
    # all estimates at 0.5 (logit 0) except the observed positive fixed to 1
    est = torch.tensor([[1., 0.5, 0.5]])
    bce_model = torch.nn.functional.binary_cross_entropy_with_logits(LOGITS, est)
    probs = LOGITS.sigmoid()
    epr = lambda q: ((q.sum() - 1.) ** 2 / 9)
    bce_est = torch.nn.functional.binary_cross_entropy(est.clamp(1e-6, 1 - 1e-6), probs)
    assert value.item() == pytest.approx((bce_model + epr(probs) + bce_est + epr(est)).item(), rel=1e-5)


def test_factory_and_errors():
    for name in ('an', 'an-ls', 'wan', 'epr', 'role', 'll-r', 'll-ct', 'll-cp', 'em', 'em-apl', 'consistency', 'en', 'spatial'):
        assert create_single_positive_loss(name, 4, 3) is not None
    with pytest.raises(ValueError, match="Unknown single-positive loss 'nope'"):
        create_single_positive_loss('nope', 4, 3)
    with pytest.raises(ValueError, match='packed targets'):
        RoleLoss(4, 3)(LOGITS, LABELS)
    with pytest.raises(ValueError, match='Mixup/CutMix'):
        AssumeNegativeLoss()(LOGITS, torch.tensor([[0.7, 0.3, 0.]]))
