"""fast: BatchNorm folding is exact up to rounding; options refuse bad values; bf16 is close."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2r_lib import attacks, fast, methods, models


def _random_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh ones: identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model


BUILDERS = {
    "small_cnn": lambda: models.build_model("small_cnn"),
    "resnet18": lambda: models.build_model("resnet18"),
    "preact_resnet18": lambda: models.build_model("preact_resnet18"),
    "wrn10_1": lambda: models.WideResNet(10, 1),
}
LEFT = {"small_cnn": 0, "resnet18": 0, "preact_resnet18": 8, "wrn10_1": 4}
"""BatchNorms that follow a sum (pre-activation blocks, the WRN's last one) stay unfolded."""


@pytest.mark.parametrize("name", list(BUILDERS))
def test_folded_logits_equal_eval_logits(name):
    torch.manual_seed(0)
    model = _random_batchnorm(BUILDERS[name]()).train()
    folded = fast.fold_batchnorm(model)
    assert fast.count_batchnorm(folded) == LEFT[name] < fast.count_batchnorm(model)
    assert model.training and not folded.training  # the original keeps its mode
    x = torch.rand(4, 3, 32, 32)
    with attacks.eval_mode(model), torch.no_grad():
        expected = model(x)
    with torch.no_grad():
        got = folded(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert not any(p.requires_grad for p in folded.parameters())
    own = {t.data_ptr() for t in [*folded.parameters(), *folded.buffers()]}
    assert not own & {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}


def test_folded_gradient_to_the_input_matches():
    torch.manual_seed(0)
    model = _random_batchnorm(models.build_model("small_cnn")).eval()
    folded = fast.fold_batchnorm(model)
    x = torch.rand(8, 3, 32, 32)
    p_ref = F.softmax(torch.randn(8, 10), dim=1)
    grads, values = [], []
    for m in (model, folded):
        xa = x.clone().requires_grad_(True)
        loss = attacks.official_kl_sum(p_ref, m(xa))
        grads.append(torch.autograd.grad(loss, xa)[0])
        values.append(loss.item())
    assert abs(values[0] - values[1]) <= 1e-5 * abs(values[0])
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 1e-5
    assert torch.equal(grads[0].sign(), grads[1].sign())


def test_attack_with_folded_models_matches_on_a_trained_model(trained_cnn, synthetic_xy):
    """The attack's x′ (sign steps) may differ where a gradient component is near 0: a small
    fraction of pixels; the D2R loss on the two x′ stays within 1e-5 relative."""
    target = copy.deepcopy(trained_cnn)
    guide = copy.deepcopy(trained_cnn)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = synthetic_xy[0][:128], synthetic_xy[1][:128]
    torch.manual_seed(1)
    plain = attacks.cag(target, guide, x)
    torch.manual_seed(1)
    folded = attacks.cag(fast.attack_model(target, enabled=True),
                         fast.attack_model(guide, enabled=True), x)
    differ = (plain != folded).float().mean().item()
    assert differ <= 1e-3
    assert (plain - folded).abs().max().item() <= 2 * 0.031 + 1e-6
    target.train(), guide.train()
    with torch.no_grad():
        loss_plain = methods.compute_terms("d2r", target, guide, x, plain, y)["loss"].item()
        loss_folded = methods.compute_terms("d2r", target, guide, x, folded, y)["loss"].item()
    assert abs(loss_plain - loss_folded) <= 1e-5 * abs(loss_plain)
    torch.manual_seed(1)
    pgd_plain = attacks.pgd(trained_cnn, x, y, steps=20)
    torch.manual_seed(1)
    pgd_folded = attacks.pgd(fast.fold_batchnorm(trained_cnn), x, y, steps=20)
    assert (pgd_plain != pgd_folded).float().mean().item() <= 2e-3


def test_attack_model_off_by_default_and_refreshed_when_on():
    torch.manual_seed(0)
    model = _random_batchnorm(models.build_model("small_cnn"))
    assert fast.current().fold_batchnorm is False
    assert fast.attack_model(model) is model
    assert fast.attack_model(None, enabled=True) is None
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    assert fast.attack_model(plain, enabled=True) is plain  # nothing to fold
    with fast.options(fold_batchnorm=True):
        first = fast.attack_model(model)
        assert first is not model and fast.count_batchnorm(first) == 0
        with torch.no_grad():  # a training step changes the weights and statistics
            model.features[0].weight.mul_(1.5)
            model.features[1].running_mean.add_(0.3)
        again = fast.attack_model(model)
    assert again is first  # built once, refreshed
    assert fast.current().fold_batchnorm is False  # restored on exit
    x = torch.rand(4, 3, 32, 32)
    with attacks.eval_mode(model), torch.no_grad():
        expected = model(x)
        assert torch.allclose(again(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x)).mean((2, 3))
        return self.conv(x).mean((2, 3))


def test_untraceable_model_is_refused_or_used_unfolded():
    model = _Untraceable()
    with pytest.raises(TypeError, match="torch.fx"):
        fast.fold_batchnorm(model)
    with pytest.warns(RuntimeWarning, match="unfolded"):
        assert fast.attack_model(model, enabled=True) is model
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fast.fold_batchnorm("small_cnn")


def test_options_refuse_bad_values():
    with pytest.raises(ValueError, match="unknown fast option fold; allowed: fold_batchnorm"):
        fast.configure(fold=True)
    with pytest.raises(TypeError, match="fold_batchnorm must be True or False; got 1"):
        fast.configure(fold_batchnorm=1)
    with pytest.raises(TypeError, match="enabled must be True, False or None"):
        fast.attack_model(models.build_model("small_cnn"), enabled="yes")
    assert fast.current() == fast.FastOptions()
    gpu = fast.FastOptions.for_device("cuda")
    assert gpu.bf16 and gpu.channels_last and gpu.compile and gpu.cudnn_benchmark
    cpu = fast.FastOptions.for_device("cpu")
    assert not (cpu.bf16 or cpu.channels_last or cpu.compile) and cpu.fold_batchnorm


def test_inference_mode_context_follows_the_option():
    with fast.options(inference_mode=True), fast.no_grad():
        assert torch.is_inference_mode_enabled()
    with fast.no_grad():
        assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = _random_batchnorm(models.build_model("small_cnn")).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        prepared = fast.prepare_model(copy.deepcopy(model), channels_last=True)
        got = prepared(x.contiguous(memory_format=torch.channels_last))
    assert prepared.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_bf16_loss_within_1e_2_of_fp32():
    """The D2R loss of one fixed batch (x′ from CAG in fp32) under CPU bf16 autocast."""
    torch.manual_seed(0)
    target, guide = models.build_model("small_cnn"), models.build_model("small_cnn")
    x = torch.rand(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    x_adv = attacks.cag(target, guide, x, steps=3)
    losses = []
    for on in (False, True):
        model_f, model_g = copy.deepcopy(target).train(), copy.deepcopy(guide).train()
        with fast.autocast("cpu", enabled=on), torch.no_grad():
            terms = methods.compute_terms("d2r", model_f, model_g, x, x_adv, y)
        losses.append(terms["loss"].float().item())
    assert losses[0] != losses[1]  # bf16 really ran
    assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0])


def _fit_quietly(cfg):
    from d2r_lib import train
    return train.fit(cfg, None, progress=False, log=lambda *a, **k: None)


def test_fit_with_fold_batchnorm_attacks_folded_copies_and_restores_the_options(monkeypatch):
    from d2r_lib import train
    seen = []
    real = fast.attack_model

    def spy(model, *args, **kwargs):
        seen.append(fast.current().fold_batchnorm)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(fast, "attack_model", spy)
    fields = dict(method="d2r", dataset="synthetic", subset="default", train_size=64, epochs=1,
                  batch_size=32, held_out=16, method_params={"steps": 2})
    folded = _fit_quietly(train.TrainConfig(**fields, fold_batchnorm=True, channels_last=True))
    assert seen and all(seen)  # every attack of the run saw folding on
    assert fast.current() == fast.FastOptions()  # and it is off again after the run
    seen.clear()
    plain = _fit_quietly(train.TrainConfig(**fields))
    assert seen and not any(seen)
    # the same functions up to float rounding: two steps later the losses still agree closely
    a, b = folded.history[0]["train_loss"], plain.history[0]["train_loss"]
    assert abs(a - b) <= 1e-3 * abs(b), (a, b)


def test_train_config_refuses_a_non_boolean_fast_path():
    from d2r_lib import train
    with pytest.raises(TypeError, match="fold_batchnorm must be True or False; got 'yes'"):
        train.TrainConfig(fold_batchnorm="yes").validate()
    with pytest.raises(TypeError, match="channels_last must be True or False; got 1"):
        train.TrainConfig(channels_last=1).validate()


def test_folding_switches_on_when_asked_and_otherwise_leaves_the_options_alone():
    with fast.folding(True):
        assert fast.current().fold_batchnorm
    assert fast.current() == fast.FastOptions()
    with fast.options(fold_batchnorm=True), fast.folding(False):
        assert fast.current().fold_batchnorm  # False does not switch a caller's choice off
    with pytest.raises(TypeError, match="enabled must be True or False; got 'yes'"):
        fast.folding("yes")
