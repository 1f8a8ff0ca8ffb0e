"""The method registry and the shared training step."""
import pytest
import torch

from d2r_lib import methods, models


def _setup(name, seed=0):
    torch.manual_seed(seed)
    m = methods.get_method(name)
    target = models.build_model("small_cnn")
    guide = models.build_model("small_cnn") if m.uses_guide else None
    opt = methods.make_optimizer(target, guide)
    return m, target, guide, opt


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_train_step_updates_what_the_method_trains(name, synthetic_xy):
    m, target, guide, opt = _setup(name)
    x, y = synthetic_xy[0][:16], synthetic_xy[1][:16]
    modes = []
    target.register_forward_pre_hook(lambda mod, inp: modes.append(("f", mod.training)))
    if guide is not None:
        guide.register_forward_pre_hook(lambda mod, inp: modes.append(("g", mod.training)))
    before_f = [p.detach().clone() for p in target.parameters()]
    before_g = [p.detach().clone() for p in guide.parameters()] if guide is not None else []
    target.eval()
    budget = {} if m.attack_kind == "none" else {"steps": 2}
    terms = methods.train_step(name, target, guide, opt, x, y, **budget)
    assert "loss" in terms and all(isinstance(v, float) for v in terms.values())
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert any(not torch.equal(a, b) for a, b in zip(before_f, target.parameters()))
    if guide is not None:
        assert any(not torch.equal(a, b) for a, b in zip(before_g, guide.parameters()))
        assert guide.training
    assert target.training
    # attack forwards (if any) run in eval mode, then exactly the declared passes in train mode, in
    # order
    n_eval = sum(not training for _, training in modes)
    assert all(not training for _, training in modes[:n_eval])
    letter = {"target": "f", "guide": "g"}
    assert [who for who, _ in modes[n_eval:]] == [letter[p.model] for p in m.passes]


def test_d2r_step_uses_cag_and_d2r_terms(synthetic_xy):
    _, target, guide, opt = _setup("d2r")
    terms = methods.train_step("d2r", target, guide, opt, synthetic_xy[0][:8], synthetic_xy[1][:8],
                               steps=1)
    assert set(terms) == {"ce", "mse", "kl_fg", "kl_gf", "clean", "adv", "loss"}
    expected = terms["ce"] + terms["mse"] + 20 * terms["clean"] + 30 * terms["adv"]
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)


def test_ablations_differ_only_in_their_setting():
    d2r = methods.get_method("d2r")
    assert methods.get_method("d2r_no_clean").defaults == {**d2r.defaults, "w_clean": 0.0}
    assert methods.get_method("d2r_no_adv").defaults == {**d2r.defaults, "w_adv": 0.0}
    gen = methods.get_method("d2r_trades_gen")
    assert gen.attack_kind == "trades" and gen.loss is d2r.loss and d2r.attack_kind == "cag"
    assert d2r.defaults == {"eps": 0.031, "step_size": 0.007, "steps": 10, "w_clean": 20.0,
                            "w_adv": 30.0,
                            "kl_reduction": "mean"}


def test_optimizer_has_target_and_guide_groups():
    target, guide = models.build_model("small_cnn"), models.build_model("small_cnn")
    opt = methods.make_optimizer(target, guide)
    assert len(opt.param_groups) == 2
    assert opt.defaults["lr"] == 0.1 and opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 2e-4
    assert not opt.defaults["nesterov"]


def test_bad_method_arguments():
    target = models.build_model("small_cnn")
    opt = methods.make_optimizer(target)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="method must be one of 'standard', 'pgd_at'"):
        methods.train_step("fast_at", target, None, opt, x, y)
    with pytest.raises(ValueError, match="method 'd2r' trains a guide model: pass guide="):
        methods.train_step("d2r", target, None, opt, x, y)
    with pytest.raises(ValueError,
                       match="method 'pgd_at' has no parameter beta; allowed: eps, step_size, "
                             "steps"):
        methods.train_step("pgd_at", target, None, opt, x, y, beta=1.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        methods.train_step("pgd_at", target, None, opt, x, y, eps=-1.0)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        methods.train_step("standard", target, None, opt, x, y[:1])
    with pytest.raises(ValueError, match="lr must be > 0"):
        methods.make_optimizer(target, lr=0)
