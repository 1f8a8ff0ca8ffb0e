"""The 2-D world of d2r_lib.toy: data, training of every method, exact robust accuracy, plots."""
import matplotlib.figure
import matplotlib.pyplot as plt
import pytest
import torch

from d2r_lib import attacks, methods, toy

TEST = toy.make_data(400, seed=123)


@pytest.fixture(scope="module")
def standard_run():
    return toy.train("standard", seed=0, epochs=15)


@pytest.mark.parametrize("kind", toy.KINDS)
def test_data_shapes_range_balance(kind):
    x, y = toy.make_data(301, kind=kind, seed=3)
    assert x.shape == (301, 2, 1, 1) and x.dtype == torch.float32
    assert y.shape == (301,) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1
    assert sorted(y.unique().tolist()) == [0, 1]
    assert (y == 0).sum().item() == 150 and (y == 1).sum().item() == 151
    assert toy.points(x).shape == (301, 2)


def test_data_deterministic_and_seed_dependent():
    a, b, c = toy.make_data(50, seed=1), toy.make_data(50, seed=1), toy.make_data(50, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_rings_geometry():
    x, y = toy.make_data(400, kind="rings", seed=0, noise=0.0)
    radius = (toy.points(x) - 0.5).norm(dim=1)
    torch.testing.assert_close(radius[y == 0], torch.full_like(radius[y == 0], 0.2))
    torch.testing.assert_close(radius[y == 1], torch.full_like(radius[y == 1], 0.4))


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 1}, "n must be >= 2"), ({"kind": "spiral"}, "kind must be one of"),
    ({"noise": -1.0}, "noise must be >= 0"), ({"seed": -1}, "seed must be >= 0"),
])
def test_data_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        toy.make_data(**kwargs)


def test_mlp_has_batchnorm_and_takes_both_shapes():
    model = toy.mlp(8, 3).eval()
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 3
    x, _ = toy.make_data(10, seed=0)
    torch.testing.assert_close(model(x), model(x.view(10, 2)))
    with pytest.raises(ValueError, match="width must be >= 1"):
        toy.mlp(0)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_trains_on_the_toy(method):
    run = toy.train(method, seed=0, epochs=12)
    x, y = TEST
    clean = (run.target(x).argmax(1) == y).float().mean().item()
    assert clean > 0.75, f"{method}: clean accuracy {clean:.3f} is too close to chance (0.5)"
    assert len(run.history) == 12 and "loss" in run.history[-1]
    assert (run.guide is not None) == methods.get_method(method).uses_guide
    assert not run.target.training


def test_train_is_deterministic_and_validates():
    a, b = toy.train("trades", seed=4, epochs=2), toy.train("trades", seed=4, epochs=2)
    torch.testing.assert_close(a.target.state_dict(), b.target.state_dict())
    assert a.params == {"eps": toy.EPS, "step_size": toy.EPS / 4, "steps": toy.STEPS, }
    with pytest.raises(ValueError, match="has no parameter beta"):
        toy.train("pgd_at", epochs=1, beta=1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        toy.train("nope", epochs=1)
    with pytest.raises(ValueError, match="shape \\(n, 2, 1, 1\\)"):
        toy.train("standard", epochs=1,
                  data=(torch.rand(8, 3, 1, 1), torch.zeros(8, dtype=torch.long)))


def test_train_constant_schedule_and_own_step():
    run = toy.train("standard", seed=1, epochs=3, schedule="constant", lr=0.05)
    assert [h["lr"] for h in run.history] == [0.05, 0.05, 0.05]
    cosine = toy.train("standard", seed=1, epochs=3, lr=0.05)
    assert cosine.history[0]["lr"] == 0.05 and cosine.history[-1]["lr"] < 0.05
    calls = []

    def step(target, optimizer, x, y):
        assert target.training and x.shape == (500, 2, 1, 1)
        calls.append(len(y))
        return {"loss": 1.0}

    run = toy.train("standard", seed=1, epochs=2, step=step)
    assert calls == [500] * 8 and [h["loss"] for h in run.history] == [1.0, 1.0]
    torch.manual_seed(1)
    torch.testing.assert_close(run.target.state_dict(), toy.mlp().state_dict())  # step did nothing
    with pytest.raises(ValueError, match="schedule must be one of 'cosine', 'constant'"):
        toy.train("standard", epochs=1, schedule="step")
    with pytest.raises(TypeError, match="step must be a callable"):
        toy.train("standard", epochs=1, step=3)


def test_fgsm_method_without_and_with_random_start():
    x, y = TEST
    model = toy.mlp(8).eval()
    plain = methods.make_adversarial(toy.fgsm_method(False), model, None, x, y, eps=0.1,
                                     step_size=0.1, steps=1)
    torch.testing.assert_close(plain, attacks.fgsm(model, x, y, eps=0.1))
    torch.manual_seed(0)
    started = methods.make_adversarial(toy.fgsm_method(True), model, None, x, y, eps=0.1,
                                       step_size=0.125, steps=1)
    assert not torch.equal(started, plain)
    assert (started - x).abs().max() <= 0.1 + 1e-6
    run = toy.train(toy.fgsm_method(True), seed=0, epochs=1, eps=0.1, step_size=0.125, steps=1)
    assert run.method.name == "fgsm_rs_at" and run.params["step_size"] == 0.125
    with pytest.raises(TypeError, match="random_start must be True or False"):
        toy.fgsm_method("yes")


def test_train_raises_on_divergence():
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        toy.train("d2r", seed=0, epochs=3, lr=5.0)


def test_exact_below_pgd_below_clean(standard_run):
    x, y = TEST
    model = standard_run.target
    clean = (model(x).argmax(1) == y).float().mean().item()
    pgd = toy.pgd_accuracy(model, x, y, toy.EPS)
    exact = toy.exact_robust_accuracy(model, x, y, toy.EPS, grid=41)
    assert exact <= pgd <= clean
    assert exact < clean  # the standard model is not robust at EPS on these points
    assert toy.exact_robust_accuracy(model, x, y, 0.0, grid=5) == pytest.approx(clean)


def test_pgd_never_finds_a_point_the_dense_check_misses(standard_run):
    x, y = TEST
    model = standard_run.target
    robust = toy.robust_mask(model, x, y, toy.EPS, grid=41)
    torch.manual_seed(0)
    x_adv = attacks.pgd(model, x, y, eps=toy.EPS, step_size=toy.EPS / 4, steps=20)
    fooled = model(x_adv).argmax(1) != y
    assert not (robust & fooled).any()        # whatever PGD breaks, the lattice breaks too


def _brute_force(model, xy, label, eps, grid):
    """One point at a time, two nested loops over a grid × grid lattice of its ball."""
    ticks = torch.linspace(-eps, eps, grid).tolist()
    for dx in ticks:
        batch = torch.tensor([[min(max(xy[0] + dx, 0.0), 1.0), min(max(xy[1] + dy, 0.0), 1.0)]
                              for dy in ticks])
        if (model(batch.view(-1, 2, 1, 1)).argmax(1) != label).any():
            return False
    return True


def test_dense_check_agrees_with_a_finer_brute_force(standard_run):
    model = standard_run.target
    x, y = TEST
    mask = toy.robust_mask(model, x, y, toy.EPS, grid=41)
    # the points nearest the boundary are the hard cases: take robust and non-robust ones
    with torch.no_grad():
        margin = model(x).softmax(1).gather(1, y[:, None]).squeeze(1)
    chosen = torch.argsort((margin - 0.9).abs())[:12]
    with torch.no_grad():
        brute = torch.tensor([_brute_force(model, toy.points(x[i:i + 1])[0].tolist(), y[i].item(),
                                           toy.EPS, 121)
                              for i in chosen])
    assert brute.any() and not brute.all()
    assert torch.equal(mask[chosen], brute)


def test_finer_lattice_only_removes_robust_points(standard_run):
    x, y = TEST
    coarse = toy.robust_mask(standard_run.target, x, y, toy.EPS, grid=11)
    # the fine lattice contains every coarse point
    fine = toy.robust_mask(standard_run.target, x, y, toy.EPS, grid=21)
    assert not (fine & ~coarse).any()


def test_robust_mask_validates(standard_run):
    x, y = TEST
    with pytest.raises(ValueError, match="shape \\(n, 2, 1, 1\\)"):
        toy.robust_mask(standard_run.target, torch.rand(4, 3, 1, 1), y[:4], 0.1)
    with pytest.raises(ValueError, match="grid must be >= 2"):
        toy.robust_mask(standard_run.target, x, y, 0.1, grid=1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        toy.exact_robust_accuracy(standard_run.target, x, y, -0.1)


def test_evaluate_terms_matches_compute_terms():
    run = toy.train("d2r", seed=1, epochs=2)
    x, y = TEST
    terms = toy.evaluate_terms(run, x, y, seed=5)
    torch.manual_seed(5)
    with attacks.eval_mode(run.target, run.guide):
        x_adv = attacks.cag(run.target, run.guide, x, **run.params)
        with torch.no_grad():
            expected = methods.compute_terms("d2r", run.target, run.guide, x, x_adv, y,
                                             **run.params)
    assert terms == {k: v.item() for k, v in expected.items()}
    assert set(terms) >= {"ce", "mse", "clean", "adv", "loss"}


def test_plots_return_figures(standard_run):
    plt.switch_backend("Agg")
    x, y = TEST
    guided = toy.train("lbgat", seed=0, epochs=1)
    figs = [
        toy.plot_regions({"a": standard_run.target, "b": guided.guide}, x, y, resolution=20,
                         title="t"),
        toy.plot_arrows(standard_run.target, x[:5], y[:5], {"PGD": x[:5].clone(), "other": x[5:10]},
                        eps=toy.EPS, resolution=20, background={"other": guided.guide}),
        toy.plot_target_vs_guide({"lbgat": guided, "standard": standard_run}, x, y, resolution=20),
    ]
    for fig in figs:
        assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
        plt.close(fig)
    probs = toy.grid_predictions(standard_run.target, 16)
    assert probs.shape == (16, 16) and probs.min() >= 0 and probs.max() <= 1
