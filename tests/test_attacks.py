"""Attacks: invariants for every attack in the registry, CAG against a plain copy of the official
loop."""
import pytest
import torch
import torch.nn.functional as F

from d2r_lib import attacks, models

EPS = 8 / 255


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_every_attack_respects_budget_range_and_lowers_accuracy(name, trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:128], synthetic_xy[1][:128]
    torch.manual_seed(0)
    eps = 2.0 if name == "pgd_l2" else EPS
    x_adv = attacks.ATTACKS[name](trained_cnn, x, y, eps)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    delta = (x_adv - x).flatten(1)
    bound = delta.norm(dim=1).max() if name == "pgd_l2" else delta.abs().max()
    assert bound <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    clean, robust = accuracy(trained_cnn, x, y), accuracy(trained_cnn, x_adv, y)
    assert clean > 0.9
    assert robust <= clean
    if name != "trades":  # the KL attack is label-free and need not flip labels
        assert robust < clean - 0.1


def test_pgd_is_stronger_than_fgsm_and_zero_eps_changes_nothing(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:128], synthetic_xy[1][:128]
    torch.manual_seed(0)
    acc_fgsm = accuracy(trained_cnn, attacks.fgsm(trained_cnn, x, y, eps=EPS), y)
    acc_pgd = accuracy(trained_cnn, attacks.pgd(trained_cnn, x, y, eps=EPS, step_size=EPS / 4,
                                                steps=20), y)
    assert acc_pgd <= acc_fgsm
    assert torch.equal(attacks.pgd(trained_cnn, x, y, eps=0.0, steps=3), x)


def test_stop_on_success_freezes_fooled_examples(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:64], synthetic_xy[1][:64]
    torch.manual_seed(0)
    x_es = attacks.pgd(trained_cnn, x, y, eps=EPS, step_size=EPS / 4, steps=20,
                       stop_on_success=True)
    torch.manual_seed(0)
    x_plain = attacks.pgd(trained_cnn, x, y, eps=EPS, step_size=EPS / 4, steps=20)
    assert accuracy(trained_cnn, x_es, y) <= accuracy(trained_cnn, x_plain, y)
    assert (x_es - x).abs().max() <= EPS + 1e-6


def test_cw_margin_sign():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(attacks.cw_margin(logits, y), torch.tensor([-2.0, 2.0]))


def test_project_l2_and_linf():
    x = torch.full((2, 3, 4, 4), 0.5)
    far = x + torch.randn_like(x)
    p = attacks.project(far, x, 0.1, "linf")
    assert (p - x).abs().max() <= 0.1 + 1e-7 and p.min() >= 0 and p.max() <= 1
    p2 = attacks.project(x + 0.01 * torch.randn_like(x), x, 10.0, "l2")
    assert (p2 - x).flatten(1).norm(dim=1).max() < 10.0


# ---------------------------------------------------------------------------------------------- CAG
def official_cag(model, teacher, x_natural, step_size=0.007, epsilon=0.031, perturb_steps=10):
    """A plain copy of the official CAG L∞ loop (method doc §2): the guide is re-run at every
    step."""
    def k(a, b):
        return b * (torch.log(b + 1e-5) - a)
    model.eval()
    teacher.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn_like(x_natural).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            p_teacher = F.softmax(teacher(x_natural), dim=1)
            loss_kl = torch.sum(k(F.log_softmax(model(x_adv), dim=1), p_teacher))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def _pair(seed=0):
    torch.manual_seed(seed)
    return models.build_model("small_cnn"), models.build_model("small_cnn")


def test_cag_equals_official_loop_with_fixed_seed(synthetic_xy):
    target, guide = _pair()
    x = synthetic_xy[0][:32]
    torch.manual_seed(123)
    ours = attacks.cag(target, guide, x)
    torch.manual_seed(123)
    ref = official_cag(target, guide, x)
    assert torch.equal(ours, ref)
    torch.manual_seed(7)
    ours = attacks.cag(target, guide, x, eps=8 / 255, step_size=2 / 255, steps=3)
    torch.manual_seed(7)
    assert torch.equal(ours, official_cag(target, guide, x, step_size=2 / 255, epsilon=8 / 255,
                                          perturb_steps=3))


def test_cag_invariants_modes_and_single_guide_call(synthetic_xy):
    target, guide = _pair(1)
    target.train()
    guide.train()
    guide.linear.eval()  # a mixed state must come back exactly as it was
    seen = {"guide": 0, "guide_training": [], "target_training": []}

    def guide_hook(module, inp, out):
        seen["guide"] += 1
        seen["guide_training"].append(module.training)
    guide.register_forward_hook(guide_hook)
    target.register_forward_hook(lambda m, i, o: seen["target_training"].append(m.training))
    x = synthetic_xy[0][:16]
    x_adv = attacks.cag(target, guide, x, eps=0.031, step_size=0.007, steps=5)
    assert (x_adv - x).abs().max() <= 0.031 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert seen["guide"] == 1
    assert seen["guide_training"] == [False] and seen["target_training"] == [False] * 5
    assert target.training and guide.training and not guide.linear.training


def test_cag_uses_the_guide():
    target, guide = _pair(2)
    _, other_guide = _pair(3)
    x = torch.rand(8, 3, 32, 32)
    torch.manual_seed(0)
    a = attacks.cag(target, guide, x)
    torch.manual_seed(0)
    b = attacks.cag(target, other_guide, x)
    assert not torch.equal(a, b)


def test_cag_l2_is_batched_and_bounded():
    target, guide = _pair(4)
    x = torch.rand(8, 3, 32, 32)
    x_adv = attacks.cag(target, guide, x, eps=0.5, step_size=0.1, steps=5, norm="l2")
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).flatten(1).norm(dim=1).min() > 0.1  # every sample moved, not just one


def test_attack_restores_train_mode():
    model = models.build_model("small_cnn").train()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    attacks.pgd(model, x, y, steps=2)
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,message", [
    ({"eps": -0.1}, "eps must be >= 0"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"step_size": 0.0}, "step_size must be > 0"),
    ({"norm": "l1"}, "norm must be one of 'linf', 'l2'"),
])
def test_bad_attack_arguments(kwargs, message):
    target, guide = _pair()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises((ValueError, TypeError), match=message):
        attacks.cag(target, guide, x, **kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        attacks.pgd(target, x, torch.tensor([0, 1]), **kwargs)


def test_bad_attack_inputs():
    model = models.build_model("small_cnn")
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"x must have pixels in \[0, 1\]"):
        attacks.pgd(model, x * 2 - 0.5, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="mismatched batch sizes: x has 2, y has 3"):
        attacks.pgd(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 9\]"):
        attacks.pgd(model, x, torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="objective must be one of"):
        attacks.pgd(model, x, torch.tensor([0, 1]), objective="hinge")
    with pytest.raises(ValueError, match="needs reference="):
        attacks.pgd(model, x, objective="kl")
    with pytest.raises(ValueError, match="mismatched batch or class sizes"):
        attacks.cag(model, models.build_model("small_cnn", 100), x)
