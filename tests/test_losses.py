"""D2R and baseline losses against independent float64 computations of the method doc's formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2r_lib import losses


def np_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_kbar(p, q, c_mean=True):
    """K̄L(P‖Q): mean over B×C of p·(log(p + 1e-5) − log q) (method doc §0), in float64."""
    k = p * (np.log(p + 1e-5) - np.log(q))
    return k.mean() if c_mean else k.sum() / p.shape[0]


def np_d2r(z_adv, z_nat, z_g, y, w_clean=20.0, w_adv=30.0, c_mean=True):
    z_adv, z_nat, z_g = (np.asarray(t, dtype=np.float64) for t in (z_adv, z_nat, z_g))
    p_adv, p_nat, p_g = np_softmax(z_adv), np_softmax(z_nat), np_softmax(z_g)
    ce = -np.mean(np.log(p_g[np.arange(len(y)), y]))
    mse = np.mean((z_adv - z_g) ** 2)
    clean = abs(np_kbar(p_nat, p_g, c_mean) - np_kbar(p_g, p_nat, c_mean))
    adv = np_kbar(p_adv, p_g, c_mean)
    return ce + mse + w_clean * clean + w_adv * adv


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_d2r_matches_independent_formula(num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    z_adv, z_nat, z_g = (3 * torch.randn(16, num_classes, generator=g) for _ in range(3))
    y = torch.randint(0, num_classes, (16,), generator=g)
    got = losses.d2r_loss(z_adv, z_nat, z_g, y).item()
    want = np_d2r(z_adv.numpy(), z_nat.numpy(), z_g.numpy(), y.numpy())
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    got_b = losses.d2r_loss(z_adv, z_nat, z_g, y, kl_reduction="batchmean").item()
    want_b = np_d2r(z_adv.numpy(), z_nat.numpy(), z_g.numpy(), y.numpy(), c_mean=False)
    assert got_b == pytest.approx(want_b, rel=1e-5, abs=1e-6)
    # batchmean = C × the official mean for every KL term
    t_mean = losses.d2r_terms(z_adv, z_nat, z_g, y)
    t_batch = losses.d2r_terms(z_adv, z_nat, z_g, y, kl_reduction="batchmean")
    for key in ("kl_fg", "kl_gf", "adv", "clean"):
        assert t_batch[key].item() == pytest.approx(num_classes * t_mean[key].item(), rel=1e-4)


def test_d2r_terms_sum_to_loss_and_weights_apply():
    torch.manual_seed(0)
    z = [torch.randn(8, 10) for _ in range(3)]
    y = torch.randint(0, 10, (8,))
    t = losses.d2r_terms(*z, y, w_clean=2.0, w_adv=5.0)
    total = t["ce"] + t["mse"] + 2 * t["clean"] + 5 * t["adv"]
    assert t["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert t["clean"].item() == pytest.approx(abs(t["kl_fg"].item() - t["kl_gf"].item()), abs=1e-7)
    no_clean = losses.d2r_loss(*z, y, w_clean=0.0)
    assert no_clean.item() == pytest.approx((t["ce"] + t["mse"] + 30 * t["adv"]).item(), rel=1e-6)


def test_d2r_equal_logits_make_kl_terms_vanish():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 2])
    t = losses.d2r_terms(z, z, z, y)
    assert t["clean"].item() == 0.0
    assert t["mse"].item() == 0.0
    # with p = q the official +1e-5 leaves only Σ_c p·log(1 + 1e-5/p) / C ≈ C·1e-5 / C = 1e-5
    assert t["adv"].item() == pytest.approx(1e-5, rel=1e-3)
    assert t["loss"].item() == pytest.approx(F.cross_entropy(z, y).item() + 30 * t["adv"].item(),
                                             rel=1e-6)


def test_d2r_hand_computed_case():
    # one sample, two classes: p_f(x) = (1/2, 1/2); p_g(x) = (0.8, 0.2); x′ has p = (0.2, 0.8)
    z_nat = torch.tensor([[0.0, 0.0]])
    z_g = torch.tensor([[math.log(4.0), 0.0]])
    z_adv = torch.tensor([[0.0, math.log(4.0)]])
    y = torch.tensor([0])
    def k(p, q):
        return p * (math.log(p + 1e-5) - math.log(q))
    kl_fg = (k(0.5, 0.8) + k(0.5, 0.2)) / 2
    kl_gf = (k(0.8, 0.5) + k(0.2, 0.5)) / 2
    adv = (k(0.2, 0.8) + k(0.8, 0.2)) / 2
    ce = -math.log(0.8)
    mse = ((0 - math.log(4)) ** 2 + (math.log(4) - 0) ** 2) / 2
    t = losses.d2r_terms(z_adv, z_nat, z_g, y)
    assert t["kl_fg"].item() == pytest.approx(kl_fg, rel=1e-5)
    assert t["kl_gf"].item() == pytest.approx(kl_gf, rel=1e-5)
    assert t["adv"].item() == pytest.approx(adv, rel=1e-5)
    assert t["loss"].item() == pytest.approx(ce + mse + 20 * abs(kl_fg - kl_gf) + 30 * adv,
                                             rel=1e-5)


def test_d2r_gradients_reach_all_three_logits():
    torch.manual_seed(0)
    z = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 10, (4,))
    losses.d2r_loss(*z, y).backward()
    for t in z:
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_trades_kl_is_true_kl_clean_to_adv():
    torch.manual_seed(0)
    z_nat, z_adv = torch.randn(5, 10), torch.randn(5, 10)
    p, q = np_softmax(z_nat.double().numpy()), np_softmax(z_adv.double().numpy())
    want = (p * (np.log(p) - np.log(q))).sum() / 5
    assert losses.trades_kl(z_nat, z_adv).item() == pytest.approx(want, rel=1e-5)
    y = torch.randint(0, 10, (5,))
    assert losses.trades_loss(z_nat, z_adv, y, beta=6.0).item() == pytest.approx(
        F.cross_entropy(z_nat, y).item() + 6 * want, rel=1e-5)


def test_mart_matches_formula():
    torch.manual_seed(1)
    z_nat, z_adv = torch.randn(6, 10).double(), torch.randn(6, 10).double()
    y = torch.randint(0, 10, (6,))
    p_adv, p_nat = F.softmax(z_adv, 1), F.softmax(z_nat, 1)
    want = 0.0
    for i in range(6):
        masked = p_adv[i].clone()
        masked[y[i]] = -1
        j = masked.argmax()  # the most likely wrong class
        bce = -torch.log(p_adv[i, y[i]]) - torch.log(1.0001 - p_adv[i, j] + 1e-12)
        kl = (p_nat[i] * (torch.log(p_nat[i]) - torch.log(p_adv[i] + 1e-12))).sum()
        want = want + bce / 6 + 6.0 * kl * (1.0000001 - p_nat[i, y[i]]) / 6
    assert losses.mart_loss(z_nat, z_adv, y).item() == pytest.approx(want.item(), rel=1e-6)


def test_lbgat_loss():
    torch.manual_seed(2)
    z_adv, z_g, z_nat = torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    base = F.cross_entropy(z_g, y) + ((z_adv - z_g) ** 2).mean()
    assert losses.lbgat_loss(z_adv, z_g, y).item() == pytest.approx(base.item(), rel=1e-6)
    six = losses.lbgat_loss(z_adv, z_g, y, beta=6.0, logits_nat=z_nat)
    assert six.item() == pytest.approx(base.item() + 6 * losses.trades_kl(z_nat, z_adv).item(),
                                       rel=1e-6)
    with pytest.raises(ValueError, match="needs logits_nat"):
        losses.lbgat_loss(z_adv, z_g, y, beta=6.0)


def test_pgd_at_and_ce_are_cross_entropy():
    z = torch.randn(3, 10)
    y = torch.tensor([1, 2, 3])
    assert losses.pgd_at_loss(z, y).item() == pytest.approx(F.cross_entropy(z, y).item())
    assert losses.ce_loss(z, y).item() == pytest.approx(F.cross_entropy(z, y).item())


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_parameter():
    z = torch.randn(4, 10)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 9\]"):
        losses.d2r_loss(z, z, z, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="mismatched batch or class sizes"):
        losses.d2r_loss(z, z[:3], z, y)
    with pytest.raises(ValueError, match="mismatched batch or class sizes"):
        losses.d2r_loss(z, z, torch.randn(4, 100), y)
    with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
        losses.d2r_loss(z, z, z, y[:3])
    with pytest.raises(ValueError, match="w_clean must be >= 0"):
        losses.d2r_loss(z, z, z, y, w_clean=-1.0)
    with pytest.raises(ValueError, match="kl_reduction must be one of 'mean', 'batchmean'"):
        losses.d2r_loss(z, z, z, y, kl_reduction="sum")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        losses.trades_loss(z, z, y, beta=-6)
    with pytest.raises(ValueError, match="logits_adv must be a \\(batch, classes\\) tensor"):
        losses.pgd_at_loss(torch.randn(10), y)


def test_term_gradient_norms_show_which_model_each_term_trains():
    torch.manual_seed(0)
    target, guide = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    z_f, z_g = target(x), guide(x)
    terms = {"ce_guide": F.cross_entropy(z_g, y), "mse": F.mse_loss(z_f, z_g)}
    rows = losses.term_gradient_norms(terms, target, guide)
    assert rows["ce_guide"][0] == 0.0 and rows["ce_guide"][1] > 0  # no path to the target
    grads = torch.autograd.grad(terms["mse"], list(target.parameters()), retain_graph=True)
    assert rows["mse"][0] == pytest.approx(float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
    assert rows["mse"][1] > 0
