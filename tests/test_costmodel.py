"""d2r_lib.costmodel: the fit recovers known coefficients, predictions scale linearly, bad inputs
are named."""
import math

import pytest
import torch

from d2r_lib import costmodel, fast, models


def synthetic_timings(a, b, c, ks, noise=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [a + b * (k + c) + noise * float(torch.randn(1, generator=gen)) for k in ks]


@pytest.mark.parametrize("a, b, c", [(2e-4, 1e-3, 5.0), (0.0, 3e-2, 1.5), (1e-3, 5e-5, 0.0)])
def test_fit_recovers_exact_coefficients(a, b, c):
    ks = [1, 2, 5, 10]
    model = costmodel.fit(ks, synthetic_timings(a, b, c, ks), c=c, method="d2r")
    assert model.a == pytest.approx(a, abs=1e-12)
    assert model.b == pytest.approx(b, rel=1e-9)
    assert model.c == c
    assert model.rmse == pytest.approx(0.0, abs=1e-12)
    assert model.meta == {"method": "d2r"}
    assert model.steps == (1.0, 2.0, 5.0, 10.0)


def test_fit_with_noise_is_close():
    ks = list(range(1, 21))
    model = costmodel.fit(ks, synthetic_timings(1e-3, 2e-3, 5.0, ks, noise=1e-5), c=5.0)
    assert model.b == pytest.approx(2e-3, rel=0.01)
    assert model.a == pytest.approx(1e-3, abs=5e-5)
    assert 0 < model.rmse < 3e-5


def test_intercept_is_what_timings_determine():
    """Only a + b·c is fixed by the timings: another c moves a, not the predictions."""
    ks = [1, 3, 5]
    ts = synthetic_timings(1e-3, 2e-3, 4.0, ks)
    m1, m2 = costmodel.fit(ks, ts, c=4.0), costmodel.fit(ks, ts, c=0.0)
    assert m1.b == pytest.approx(m2.b)
    assert m2.a == pytest.approx(m1.a + m1.b * m1.c)
    for k in (0, 2, 10, 100):
        assert m1.seconds_per_image(k) == pytest.approx(m2.seconds_per_image(k))


def test_predictions_scale_linearly_with_images_and_epochs():
    model = costmodel.fit([1, 2, 4], synthetic_timings(1e-4, 1e-3, 5.0, [1, 2, 4]), c=5.0)
    per_image = model.seconds_per_image(10)
    assert per_image == pytest.approx(1e-4 + 1e-3 * 15)
    one = costmodel.epoch_time(model, steps=10, images=1000)
    assert one == pytest.approx(1000 * per_image)
    assert costmodel.epoch_time(model, steps=10, images=50_000) == pytest.approx(50 * one)
    assert costmodel.run_time(model, steps=10, images=1000, epochs=1) == pytest.approx(one)
    assert costmodel.run_time(model, steps=10, images=1000, epochs=100) == pytest.approx(100 * one)
    assert costmodel.run_time(model, steps=10, images=50_000,
                              epochs=100) == pytest.approx(5000 * one)


@pytest.mark.parametrize("kwargs, name", [
    (dict(steps=[1, 2], seconds_per_image=[1e-3]), "same length"),
    (dict(steps=[5, 5, 5], seconds_per_image=[1e-3, 1e-3, 1e-3]), "steps"),
    (dict(steps=[1, 2], seconds_per_image=[1e-3, -1e-3]), "seconds_per_image"),
    (dict(steps=[1, 2], seconds_per_image=[1e-3, float("nan")]), "seconds_per_image"),
    (dict(steps=[-1, 2], seconds_per_image=[1e-3, 2e-3]), "steps"),
    (dict(steps=[1, 2], seconds_per_image=[1e-3, 2e-3], c=-1.0), "c"),
])
def test_fit_rejects_bad_inputs(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        costmodel.fit(**kwargs)


def test_predictions_reject_bad_inputs():
    model = costmodel.fit([1, 2], [1e-3, 2e-3])
    with pytest.raises(ValueError, match="images"):
        costmodel.epoch_time(model, steps=10, images=0)
    with pytest.raises(TypeError, match="images"):
        costmodel.epoch_time(model, steps=10, images=1.5)
    with pytest.raises(ValueError, match="epochs"):
        costmodel.run_time(model, steps=10, images=10, epochs=0)
    with pytest.raises(ValueError, match="steps"):
        costmodel.run_time(model, steps=-1, images=10, epochs=1)
    with pytest.raises(TypeError, match="model"):
        costmodel.epoch_time({"a": 1}, steps=1, images=1)


def test_outer_steps_counts_passes():
    assert costmodel.outer_steps("standard") == 1.5
    assert costmodel.outer_steps("pgd_at") == 1.5
    assert costmodel.outer_steps("mart") == 3.0
    # the official TRADES step runs f on x, x′, x and LBGAT on x′, x then g(x): 3 training passes
    for m in ("trades", "lbgat", "d2r", "d2r_no_clean", "d2r_no_adv", "d2r_trades_gen"):
        assert costmodel.outer_steps(m) == 5.0
    assert costmodel.outer_steps("trades", official_passes=False) == 3.5
    assert costmodel.outer_steps("lbgat", official_passes=False) == 3.5
    assert costmodel.outer_steps("lbgat", official_passes=False, beta=6.0) == 5.0
    # D2R: 2 training passes of f, 1 of g, CAG's reference pass of g; unit = 2 forward passes of f
    assert costmodel.outer_steps("d2r", 4.0, 1.0) == pytest.approx((3 * (4 + 4 + 1) + 1) / 8)
    with pytest.raises(ValueError, match="method"):
        costmodel.outer_steps("adagat")
    with pytest.raises(ValueError, match="guide_macs"):
        costmodel.outer_steps("d2r", 1.0, 0.0)


def test_extrapolate_scales_b_and_recomputes_c():
    model = costmodel.fit([1, 5], synthetic_timings(1e-4, 1e-3, 5.0, [1, 5]), c=5.0)
    big = costmodel.extrapolate(model, "d2r", measured_macs=(10, 10), target_macs=100,
                                guide_macs=20)
    assert big.b == pytest.approx(1e-2)
    assert big.a == pytest.approx(model.a)
    assert big.c == pytest.approx(costmodel.outer_steps("d2r", 100, 20))
    assert "extrapolated" in big.note and big.steps == ()
    assert math.isnan(big.rmse)
    with pytest.raises(ValueError, match="measured_macs"):
        costmodel.extrapolate(model, "d2r", measured_macs=(10,), target_macs=100)
    with pytest.raises(ValueError, match="target_macs"):
        costmodel.extrapolate(model, "d2r", measured_macs=(10, 10), target_macs=0)


def test_count_macs_small_cnn_by_hand():
    model = models.build_model("small_cnn")
    w = 16  # conv MACs = output elements × (input channels × 3 × 3); linear = inputs × outputs
    by_hand = (32 * 32 * w * 3 * 9 + 32 * 32 * w * w * 9 + 16 * 16 * 2 * w * w * 9
               + 16 * 16 * 2 * w * 2 * w * 9 + 8 * 8 * 4 * w * 2 * w * 9 + 4 * w * 10)
    model.train()
    assert costmodel.count_macs(model) == by_hand
    assert model.training  # mode restored
    assert costmodel.model_macs("small_cnn") == by_hand


def test_model_macs_of_the_paper_guides():
    # the method doc: the official guide ResNet18_cifar ≈ 1.8 GMAC, a standard CIFAR ResNet-18 ≈
    # 0.56
    assert costmodel.model_macs("resnet18") / 1e9 == pytest.approx(1.76, abs=0.01)
    assert costmodel.model_macs("resnet18_standard") / 1e9 == pytest.approx(0.556, abs=0.005)
    with pytest.raises(ValueError, match="name"):
        costmodel.model_macs("vgg16")


def test_measure_step_runs_and_leaves_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    t = costmodel.measure_step("pgd_at", steps=1, batch_size=4, image_size=16, warmup=0, repeats=1)
    assert t > 0 and math.isfinite(t)
    assert torch.equal(state, torch.get_rng_state())
    t = costmodel.measure_step("d2r", steps=1, batch_size=4, image_size=16, warmup=0, repeats=1)
    assert t > 0
    assert costmodel.measure_step("standard", steps=None, batch_size=4, image_size=16, warmup=0,
                                  repeats=1) > 0
    t = costmodel.measure_step("d2r", steps=1, batch_size=4, image_size=16, warmup=0, repeats=1,
                               channels_last=True, fold_batchnorm=True)
    assert t > 0 and fast.current() == fast.FastOptions()  # the option is restored after timing


@pytest.mark.parametrize("kwargs, name", [
    (dict(method="nope"), "method"),
    (dict(target="vgg"), "target"),
    (dict(method="d2r", guide="vgg"), "guide"),
    (dict(method="standard", steps=5), "steps"),
    (dict(method="pgd_at", steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(repeats=0), "repeats"),
    (dict(warmup=-1), "warmup"),
    (dict(image_size=4), "image_size"),
    (dict(amp="yes"), "amp"),
    (dict(fold_batchnorm=1), "fold_batchnorm"),
])
def test_measure_step_rejects_bad_inputs(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        costmodel.measure_step(**kwargs)


def test_measure_pgd_runs_and_leaves_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    t = costmodel.measure_pgd("small_cnn", steps=2, batch_size=4, warmup=0, repeats=1)
    assert t > 0 and math.isfinite(t)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("kwargs, name", [(dict(model="vgg"), "model"), (dict(steps=0), "steps"),
                                          (dict(batch_size=0), "batch_size"),
                                          (dict(repeats=0), "repeats")])
def test_measure_pgd_rejects_bad_inputs(kwargs, name):
    with pytest.raises(ValueError, match=name):
        costmodel.measure_pgd(**kwargs)
