"""One step of each method with the library's DEFAULT parameters equals a plain transcription of
that method's official training step (attack loop + loss + SGD step), on seeded tiny models with
BatchNorm.

The transcriptions below follow the official files line by line (see ../shared/method/d2r_method.md
§4): yaodongyu/TRADES `trades.py`, dvlab-research/LBGAT `lbgat.py`, YisenWang/MART `mart.py`,
lusti-Yu/D2R `D2R/D2R.py`; `.cuda()` is dropped (the noise is drawn on the CPU generator, as there).
Compared: the loss, every parameter after the SGD step, and every BatchNorm running_mean,
running_var and num_batches_tracked: all bitwise equal (torch.equal), since the library makes the
same operations in the same order.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from d2r_lib import methods


def tiny_bn_model(seed: int, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, classes))


def sgd(*models):
    """The official optimizer: one SGD (lr 0.1, momentum 0.9, weight decay 2e-4) over the models'
    groups."""
    return torch.optim.SGD([{"params": m.parameters()} for m in models], lr=0.1, momentum=0.9,
                           weight_decay=2e-4)


# -------------------------------------------------------------------------- official transcriptions
def official_trades(model, x_natural, y, optimizer, step_size=0.007, epsilon=0.031,
                    perturb_steps=10, beta=6.0):
    criterion_kl = nn.KLDivLoss(reduction="sum")   # size_average=False
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                   F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    loss = loss_natural + beta * loss_robust
    loss.backward()
    optimizer.step()
    return loss


def official_mart(model, x_natural, y, optimizer, step_size=0.007, epsilon=0.031, perturb_steps=10,
                  beta=6.0):
    kl = nn.KLDivLoss(reduction="none")
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    logits = model(x_natural)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    loss = loss_adv + float(beta) * loss_robust
    loss.backward()
    optimizer.step()
    return loss


def official_lbgat(model, model_teacher, x_natural, y, optimizer, step_size=0.007, epsilon=0.031,
                   perturb_steps=10, beta=0.0):
    criterion_kl = nn.KLDivLoss(reduction="sum")
    mse = torch.nn.MSELoss()
    ce = torch.nn.CrossEntropyLoss()
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                   F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    out_adv = model(x_adv)
    out_natural = model(x_natural)
    out = model_teacher(x_natural)
    loss_mse = mse(out_adv, out) + ce(out, y)
    loss_kl = (1.0 / out.size(0)) * criterion_kl(F.log_softmax(out_adv, dim=1),
                                                 F.softmax(out_natural, dim=1))
    loss = loss_mse + beta * loss_kl
    loss.backward()
    optimizer.step()
    return loss


def official_d2r(model, model_teacher, x_natural, y, optimizer, step_size=0.007, epsilon=0.031,
                 perturb_steps=10):
    def criterion_kl(a, b):
        return -a * b + torch.log(b + 1e-5) * b
    mse = torch.nn.MSELoss()
    ce = torch.nn.CrossEntropyLoss()
    model.eval()
    model_teacher.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                   F.softmax(model_teacher(x_natural), dim=1))
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    model_teacher.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    out_adv = model(x_adv)
    out_natural = model(x_natural)
    out = model_teacher(x_natural)
    kl_loss = criterion_kl
    kl_loss1 = torch.mean(kl_loss(F.log_softmax(out, dim=1), F.softmax(out_natural, dim=1)))
    kl_loss2 = torch.mean(kl_loss(F.log_softmax(out_natural, dim=1), F.softmax(out, dim=1)))
    loss_klloss = torch.abs(kl_loss1 - kl_loss2)
    kl_loss5 = torch.mean(kl_loss(F.log_softmax(out, dim=1), F.softmax(out_adv, dim=1)))
    loss = ce(out, y) + mse(out_adv, out) + 20 * loss_klloss + 30 * kl_loss5
    loss.backward()
    optimizer.step()
    return loss


OFFICIAL = {"trades": official_trades, "mart": official_mart, "lbgat": official_lbgat,
            "d2r": official_d2r}


def bn_state(model):
    return {k: v for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def run_both(name, seed=0, **params):
    m = methods.get_method(name)
    target = tiny_bn_model(seed)
    guide = tiny_bn_model(seed + 1) if m.uses_guide else None
    ref_target = copy.deepcopy(target)
    ref_guide = copy.deepcopy(guide)
    torch.manual_seed(100 + seed)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    models = [target] + ([guide] if guide is not None else [])
    ref_models = [ref_target] + ([ref_guide] if ref_guide is not None else [])

    torch.manual_seed(7)
    terms = methods.train_step(m, target, guide, sgd(*models), x, y, **params)
    torch.manual_seed(7)
    official = OFFICIAL[name]
    args = (ref_target, ref_guide) if guide is not None else (ref_target,)
    ref_loss = official(*args, x, y, sgd(*ref_models))
    return terms, ref_loss, models, ref_models


@pytest.mark.parametrize("name", ["trades", "lbgat", "mart", "d2r"])
@pytest.mark.parametrize("seed", [0, 1])
def test_default_step_equals_official_step_bitwise(name, seed):
    terms, ref_loss, ours, ref = run_both(name, seed)
    assert terms["loss"] == ref_loss.item()
    for a, b in zip(ours, ref):
        for (key, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb), f"{name}: parameter {key} differs after the step"
        bn_a, bn_b = bn_state(a), bn_state(b)
        assert len(bn_a) == 9
        for key in bn_a:
            assert torch.equal(bn_a[key],
                               bn_b[key]), f"{name}: BatchNorm {key} differs after the step"


def test_bn_counts_show_the_official_passes():
    """num_batches_tracked counts the train-mode passes: TRADES 3 of f, LBGAT0 2 of f + 1 of g, MART
    2, D2R 2 of f + 1 of g; official_passes=False drops the redundant one of TRADES and LBGAT0 (not
    at β > 0)."""
    for name, params, counts in [("trades", {}, [3]), ("lbgat", {}, [2, 1]), ("mart", {}, [2]),
                                 ("d2r", {}, [2, 1]), ("trades", {"official_passes": False}, [2]),
                                 ("lbgat", {"official_passes": False}, [1, 1]),
                                 ("lbgat", {"official_passes": False, "beta": 6.0}, [2, 1])]:
        m = methods.get_method(name)
        trained = [tiny_bn_model(0)] + ([tiny_bn_model(1)] if m.uses_guide else [])
        x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
        guide = trained[1] if m.uses_guide else None
        methods.train_step(m, trained[0], guide, sgd(*trained), x, y, steps=1, **params)
        tracked = [int(bn_state(mod)["1.num_batches_tracked"]) for mod in trained]
        assert tracked == counts, (name, params)
        assert len(m.step_passes(m.resolve(**params))) == sum(counts)


def test_a_different_pass_order_is_detected():
    """The comparison can fail: TRADES with official_passes=False differs from the official step in
    BatchNorm's statistics even though the loss value agrees."""
    terms, ref_loss, ours, ref = run_both("trades", official_passes=False)
    pairs = zip(bn_state(ours[0]).values(), bn_state(ref[0]).values())
    assert not all(torch.equal(a, b) for a, b in pairs)


def test_fast_passes_give_the_same_loss_value():
    """official_passes=False skips a pass the loss value does not need: same loss, up to
    rounding."""
    for name in ("trades", "lbgat"):
        official, _, _, _ = run_both(name)
        fast, _, _, _ = run_both(name, official_passes=False)
        assert fast["loss"] == pytest.approx(official["loss"], rel=1e-6, abs=1e-7)
