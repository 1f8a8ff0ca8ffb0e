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
    with pytest.raises(ValueError, match="eps must be > 0; got -1.0"):
        methods.train_step("pgd_at", target, None, opt, x, y, eps=-1.0)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        methods.train_step("standard", target, None, opt, x, y[:1])
    with pytest.raises(ValueError, match="lr must be > 0"):
        methods.make_optimizer(target, lr=0)


def test_official_defaults_and_passes():
    mart = methods.get_method("mart")
    assert mart.defaults == {"eps": 0.031, "step_size": 0.007, "steps": 10, "beta": 6.0}
    assert mart.attack_kind == "pgd" and not mart.uses_guide
    expected = {"standard": "f(x)", "pgd_at": "f(x′)", "trades": "f(x), f(x′), f(x)",
                "mart": "f(x), f(x′)", "lbgat": "f(x′), f(x), g(x)", "d2r": "f(x′), f(x), g(x)"}
    for name, passes in expected.items():
        assert ", ".join(map(str, methods.get_method(name).passes)) == passes
    for name in ("trades", "lbgat"):
        assert methods.get_method(name).defaults["official_passes"] is True
    # the book's earlier MART budget is reachable by passing it
    assert methods.get_method("mart").resolve(eps=8 / 255, step_size=2 / 255)["eps"] == 8 / 255


def test_mart_attack_is_the_official_loop(synthetic_xy):
    """MART's x′: batch-mean CE ascent from x + 0.001·N(0, I), min/max projection, clamp."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = models.build_model("small_cnn").eval()
    x, y = synthetic_xy[0][:8], synthetic_xy[1][:8]
    torch.manual_seed(3)
    ours = methods.make_adversarial("mart", model, None, x, y, steps=3)
    torch.manual_seed(3)
    x_adv = x + 0.001 * torch.randn(x.shape)
    for _ in range(3):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + 0.007 * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - 0.031), x + 0.031), 0.0, 1.0)
    assert torch.equal(ours, x_adv)


def test_describe_says_what_one_step_does():
    text = methods.get_method("trades").describe()
    assert text.startswith("trades: TRADES")
    assert "3 train-mode forward passes f(x), f(x′), f(x)" in text
    assert "eps 0.031, step_size 0.007, steps 10" in text and "official_passes=False" in text
    assert "CE(f(x), y) + β·KL(p_f(x) ‖ p_f(x′))" in text and "one SGD step on the target" in text
    d2r = methods.get_method("d2r").describe()
    assert "both models in eval mode" in d2r and "one SGD step on target and guide" in d2r
    assert "w_clean=20.0, w_adv=30.0" in d2r


def _ce_loss(logits, y):
    """CE(f(x), y)"""
    return {"loss": torch.nn.functional.cross_entropy(logits[0], y)}


def _method(**changes):
    fields = dict(name="my_method", description="test", attack_kind="none", attack=None,
                  loss=_ce_loss, passes=(methods.Pass("target", "x"),))
    return methods.Method(**{**fields, **changes})


def test_register_refuses_bad_methods():
    import torch.nn.functional as F
    before = dict(methods.METHODS)
    cases = [
        (_method(name="d2r"), ValueError, "a method named 'd2r' is already registered"),
        (_method(name="My-Method"), ValueError, "method name must be lowercase letters"),
        (_method(attack_kind="fgsm", attack=_ce_loss), ValueError,
         "attack_kind must be one of 'none', 'pgd', 'trades', 'cag'; got 'fgsm'"),
        (_method(attack_kind="pgd"), ValueError, "attack must be None exactly when attack_kind"),
        (_method(attack_kind="pgd", attack=lambda *a, **k: None), ValueError,
         "defaults must give the attack's eps, step_size, steps"),
        (_method(passes=()), ValueError, "passes must be a non-empty tuple of methods.Pass"),
        (_method(passes=(methods.Pass("target", "x_adv"),)), ValueError,
         "a pass on x_adv needs an attack"),
        (_method(loss=lambda logits, y: F.cross_entropy(logits[0], y, reduction="none")),
         ValueError, r"loss term 'loss' must be a scalar \(0-dim\) float tensor; got \(4,\)"),
        (_method(loss=lambda logits, y: 1.0), TypeError,
         "loss must return a scalar tensor or a dict of terms with key 'loss'; got float"),
        (_method(loss=lambda logits, y: {"loss": torch.tensor(1.0)}), ValueError,
         "does not depend on the logits"),
        (_method(loss=lambda logits, y: logits[1].sum()), ValueError,
         r"its loss failed on a probe with 1 random \(4, 3\) logits.*IndexError"),
        (_method(fast_passes=lambda p: ()), ValueError, "give fast_passes exactly when"),
    ]
    for method, error, message in cases:
        with pytest.raises(error, match=message):
            methods.register(method)
    with pytest.raises(ValueError, match="Pass model must be one of 'target', 'guide'; got 'teach"):
        methods.Pass("teacher", "x")
    with pytest.raises(ValueError, match="Pass input must be one of 'x', 'x_adv'"):
        methods.Pass("target", "x_prime")
    with pytest.raises(ValueError, match="'d2r' is a built-in method and cannot be unregistered"):
        methods.unregister("d2r")
    with pytest.raises(ValueError, match="no method 'mine' was added with register; added: none"):
        methods.unregister("mine")
    assert methods.METHODS == before


def test_method_parameters_are_checked_by_type():
    with pytest.raises(TypeError, match="official_passes must be True or False; got 'yes'"):
        methods.get_method("trades").resolve(official_passes="yes")
    with pytest.raises(ValueError, match="kl_reduction must be one of 'mean', 'batchmean'"):
        methods.get_method("d2r").resolve(kl_reduction="sum")


# ------------------------------------------------------------------------- no host synchronisation
_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_the_step_fit_calls_reads_nothing_back_from_the_device(name, synthetic_xy, monkeypatch):
    """`methods.step` (what `fit` runs per batch) makes no call that waits for the device: every
    tensor method that reads values to the host is counted during one step (before this change
    `train_step` made 6 to 15 such calls: its checks and the attack's, then `.item()` per term)."""
    m, target, guide, opt = _setup(name)
    x, y = synthetic_xy[0][:16], synthetic_xy[1][:16]
    budget = {} if m.attack_kind == "none" else {"steps": 2}
    method, params = methods.check_step(name, guide, x, y, **budget)
    calls = []
    for attr in _SYNCS:
        real = getattr(torch.Tensor, attr)
        monkeypatch.setattr(torch.Tensor, attr,
                            lambda self, *a, _real=real, _attr=attr, **k:
                            calls.append(_attr) or _real(self, *a, **k))
    terms = methods.step(method, target, guide, opt, x, y, params)
    monkeypatch.undo()
    assert calls == []
    assert all(v.dim() == 0 and not v.requires_grad for v in terms.values())
    # the counter sees what it should: the public step reads every term back as a float
    expected = methods.train_step(name, *_setup(name)[1:], x, y, **budget)
    assert set(expected) == set(terms)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["pgd_at", "trades", "mart", "d2r"])
def test_the_step_runs_under_cuda_sync_debug_mode_error(name):
    torch.manual_seed(0)
    m = methods.get_method(name)
    target = models.build_model("small_cnn").cuda()
    guide = models.build_model("small_cnn").cuda() if m.uses_guide else None
    opt = methods.make_optimizer(target, guide)
    x, y = torch.rand(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    method, params = methods.check_step(name, guide, x, y, steps=2)
    methods.step(method, target, guide, opt, x, y, params)  # warm-up (lazy initialisation)
    torch.cuda.set_sync_debug_mode("error")
    try:
        methods.step(method, target, guide, opt, x, y, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
