"""Evaluation: official-protocol accuracies, reproducibility, mode/RNG hygiene, sanity warnings,
tables."""
import json
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from d2r_lib import evaluate as ev
from d2r_lib.evaluate import RobustnessWarning

N = 32  # images per attack test: PGD-20 on a 2-core CPU costs ~0.05 s per image


@pytest.fixture(scope="module")
def xy(synthetic_xy):
    return synthetic_xy[0][:N], synthetic_xy[1][:N]


@pytest.fixture(scope="module")
def results(trained_cnn, xy):
    with warnings.catch_warnings():  # a healthy eval-mode model raises no sanity warning
        warnings.simplefilter("error", RobustnessWarning)
        return ev.evaluate(trained_cnn, *xy)


class Softmaxed(nn.Module):
    """A broken model: returns probabilities instead of logits."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return F.softmax(self.net(x), dim=1)


class Masked(nn.Module):
    """Gradient masking: the same predictions as `net`, but a zero gradient with respect to x."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.no_grad():
            z = self.net(x)
        return z + 0 * x.sum(dim=(1, 2, 3))[:, None]


# --------------------------------------------------------------------------------------- accuracies
def test_clean_accuracy_matches_direct_argmax(trained_cnn, synthetic_xy):
    x, y = synthetic_xy
    with torch.no_grad():
        direct = (trained_cnn(x).argmax(1) == y).float().mean().item()
    assert ev.accuracy(trained_cnn, x, y, batch_size=100) == pytest.approx(direct)
    assert ev.robust_accuracy(trained_cnn, x[:64], y[:64], "clean") == pytest.approx(
        ev.accuracy(trained_cnn, x[:64], y[:64]))


def test_evaluate_orders_attacks_and_returns_fractions(results):
    assert list(results) == ["clean", "fgsm", "pgd20", "cw20"]
    assert all(0.0 <= v <= 1.0 for v in results.values())
    assert results["clean"] > 0.9
    tol = 1 / N + 1e-9
    for attack in ("fgsm", "pgd20", "cw20"):
        assert results[attack] <= results["clean"] + tol
    assert results["pgd20"] < results["clean"]  # ε = 8/255 hurts a plainly trained model


def test_pgd20_is_not_weaker_than_fgsm(trained_cnn, synthetic_xy):
    """Not an invariant image by image (PGD starts at a random point), so it is checked on 128
    images, where PGD-20 leaves about 9 fewer correct than FGSM: rounding that moves a handful of
    predictions cannot flip it."""
    x, y = synthetic_xy[0][:128], synthetic_xy[1][:128]
    res = ev.evaluate(trained_cnn, x, y, ("fgsm", "pgd20"), sanity=False)
    assert res["pgd20"] <= res["fgsm"]


def test_eps_sweep_decreases_to_zero(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:16], synthetic_xy[1][:16]
    sweep = ev.eps_sweep(trained_cnn, x, y, [0.0, 2 / 255, 8 / 255, 0.5])
    assert [e for e, _ in sweep] == pytest.approx([0.0, 2 / 255, 8 / 255, 0.5])
    accs = [a for _, a in sweep]
    assert accs[0] == pytest.approx(ev.accuracy(trained_cnn, x, y))
    assert all(b <= a + 1 / 16 + 1e-9 for a, b in zip(accs, accs[1:]))
    assert accs[-1] <= 0.05


def test_same_seed_same_numbers_and_matches_robust_accuracy(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:16], synthetic_xy[1][:16]
    a = ev.evaluate(trained_cnn, x, y, ("pgd20",), seed=3, sanity=False)
    b = ev.evaluate(trained_cnn, x, y, ("pgd20",), seed=3, sanity=False, batch_size=256)
    assert a == b
    assert ev.robust_accuracy(trained_cnn, x, y, "pgd20", seed=3) == a["pgd20"]


def test_global_rng_state_is_untouched(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:8], synthetic_xy[1][:8]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    ev.evaluate(trained_cnn, x, y, ("clean", "fgsm", "pgd20"), sanity=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_modes_are_restored(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:8], synthetic_xy[1][:8]
    ev.evaluate(trained_cnn, x, y, ("clean", "fgsm"), sanity=False)
    assert not any(m.training for m in trained_cnn.modules())
    clean_eval = ev.accuracy(trained_cnn, x, y)
    try:
        trained_cnn.train()
        trained_cnn.features[1].eval()  # a mixed state must come back exactly
        before = [m.training for m in trained_cnn.modules()]
        running = trained_cnn.features[4].running_mean.clone()
        with pytest.warns(RobustnessWarning, match="train mode"):
            res = ev.evaluate(trained_cnn, x, y, ("clean", "fgsm"), sanity=True, sanity_images=8)
        assert [m.training for m in trained_cnn.modules()] == before
        assert torch.equal(trained_cnn.features[4].running_mean, running)  # BN ran in eval mode
        assert res["clean"] == clean_eval
    finally:
        trained_cnn.eval()


# --------------------------------------------------------------------------------------- AutoAttack
def test_autoattack_quick_apgd_ce(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:8], synthetic_xy[1][:8]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    aa = ev.robust_accuracy(trained_cnn, x, y, "autoattack", autoattack_version="apgd-ce")
    assert torch.equal(torch.get_rng_state(), state)
    pgd = ev.robust_accuracy(trained_cnn, x, y, "pgd20")
    assert aa <= pgd + 1 / 8 + 1e-9
    assert aa <= ev.accuracy(trained_cnn, x, y)
    assert aa == ev.robust_accuracy(trained_cnn, x, y, "autoattack", autoattack_version=["apgd-ce"])


@pytest.mark.slow
def test_autoattack_fast_version_not_weaker_than_pgd20(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:16], synthetic_xy[1][:16]
    res = ev.evaluate(trained_cnn, x, y, ("clean", "pgd20", "autoattack"),
                      autoattack_version="fast", sanity=False)
    assert res["autoattack"] <= res["pgd20"] + 1 / 16 + 1e-9


@pytest.mark.slow
def test_autoattack_standard(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:16], synthetic_xy[1][:16]
    aa = ev.robust_accuracy(trained_cnn, x, y, "autoattack")
    assert aa <= ev.robust_accuracy(trained_cnn, x, y, "pgd20") + 1 / 16 + 1e-9


def test_autoattack_missing_package_says_how_to_install(trained_cnn, synthetic_xy, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    x, y = synthetic_xy[0][:4], synthetic_xy[1][:4]
    with pytest.raises(ImportError, match="pip install pyautoattack"):
        ev.robust_accuracy(trained_cnn, x, y, "autoattack")


# ------------------------------------------------------------------------------------------- sanity
def test_probability_outputs_are_flagged(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:8], synthetic_xy[1][:8]
    with pytest.warns(RobustnessWarning, match="returns probabilities"):
        ev.evaluate(Softmaxed(trained_cnn).eval(), x, y, ("clean",), sanity_images=8)


class Constant(nn.Module):
    """Gradient masking taken to the limit: the same logits for every input (class `c` wins), so the
    gradient with respect to x is exactly zero and no point of any ε-ball can change
    a prediction."""

    def __init__(self, c, num_classes=10):
        super().__init__()
        self.register_buffer("logits", 4.0 * F.one_hot(torch.tensor(c), num_classes).float())

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * x.sum(dim=(1, 2, 3))[:, None]


def test_masked_gradients_fail_the_large_eps_check(synthetic_xy):
    # Holds by construction on any machine: the model ignores its input, so PGD's random start and
    # its steps change no prediction, at ε = 8/255 and at the check's large ε alike.
    x = synthetic_xy[0][:16].clone().requires_grad_(True)
    model = Constant(3).eval()
    model(x)[:, 3].sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    y = torch.full((16,), 3)
    with pytest.warns(RobustnessWarning, match="gradient masking suspected: PGD-20 accuracy at "
                                               "eps=0.5 \\(L-inf\\) is 100.00% on 16 images"):
        res = ev.evaluate(model, x.detach(), y, ("clean", "pgd20"))
    assert res == {"clean": 1.0, "pgd20": 1.0}


def test_healthy_model_passes_large_eps_check(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:16], synthetic_xy[1][:16]
    res = {"clean": 1.0, "pgd20": 0.5}
    assert ev.sanity_checks(trained_cnn, x, y, res, max_images=16) == []


def test_ordering_violation_is_flagged(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:16], synthetic_xy[1][:16]
    fake = {"clean": 0.9, "fgsm": 0.6, "pgd20": 0.5, "cw20": 0.5, "autoattack": 0.7}
    with pytest.warns(RobustnessWarning,
                      match="ordering violated: AutoAttack accuracy 70.00% > PGD-20"):
        problems = ev.sanity_checks(trained_cnn, x, y, fake, large_eps=None)
    assert len(problems) == 1
    with pytest.warns(RobustnessWarning, match="ordering violated: PGD-20 .* > FGSM"):
        ev.sanity_checks(trained_cnn, x, y, {"fgsm": 0.2, "pgd20": 0.5}, large_eps=None)
    # within one example (1/16) is tolerated
    assert ev.sanity_checks(trained_cnn, x, y, {"clean": 0.5, "pgd20": 0.5 + 1 / 16},
                            large_eps=None) == []


def test_transfer_stronger_than_whitebox_is_flagged(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:16], synthetic_xy[1][:16]
    with pytest.warns(RobustnessWarning, match="transfer attack beats white-box"):
        res = ev.transfer_check(trained_cnn, Masked(trained_cnn).eval(), x, y)
    assert res.transfer < res.whitebox and res.problems
    healthy = ev.transfer_check(trained_cnn, trained_cnn, x, y, whitebox=0.0)  # cannot beat 0 %
    assert healthy.problems == []


def test_non_differentiable_forward_gets_a_clear_error(trained_cnn, synthetic_xy):
    class NoGrad(nn.Module):
        def forward(self, x):
            with torch.no_grad():
                return trained_cnn(x)

    x, y = synthetic_xy[0][:4], synthetic_xy[1][:4]
    with pytest.raises(ValueError, match="no gradient with respect to x"):
        ev.robust_accuracy(NoGrad().eval(), x, y, "pgd20")


# -------------------------------------------------------------------------------------------- table
def test_results_table_rendering_and_json_round_trip(tmp_path):
    table = ev.ResultsTable({"PGD-AT": {"clean": 0.8412, "pgd20": 0.5003},
                             "D2R": {"clean": 0.8601, "pgd20": 0.5655, "autoattack": 0.5}},
                             meta={"eps": 8 / 255})
    md = table.to_markdown(caption="Table 1")
    assert "**Table 1**" in md and "| PGD-AT | 84.12 | 50.03 | – |" in md
    assert "| D2R | 86.01 | 56.55 | 50.00 |" in md
    assert "AutoAttack" in md and "PGD-20" in md
    assert table._repr_markdown_() == table.to_markdown()
    assert "0.8412" in table.to_markdown(percent=False)
    text = str(table)
    assert "D2R" in text and "56.55" in text and "PGD-AT" in text and "|" not in text
    assert len({len(line) for line in text.splitlines()}) == 1  # fixed width
    path = table.save_json(tmp_path / "sub" / "results.json")
    assert json.loads(path.read_text())["rows"]["D2R"]["pgd20"] == 0.5655
    # no temporary file is left behind
    assert not [p for p in path.parent.iterdir() if p.name != "results.json"]
    loaded = ev.ResultsTable.load_json(path)
    assert loaded == table and loaded.meta["eps"] == pytest.approx(8 / 255)
    assert ev.ResultsTable.from_dict(table.to_dict()) == table
    assert ev.ResultsTable.from_dict({"A": {"clean": 0.5}})["A"] == {"clean": 0.5}


def test_evaluate_many_builds_a_table(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:8], synthetic_xy[1][:8]
    table = ev.evaluate_many({"cnn": trained_cnn, "cnn again": trained_cnn}, x, y,
                             ("clean", "fgsm"), sanity=False)
    assert table.names == ["cnn", "cnn again"] and table.columns == ["clean", "fgsm"]
    assert table["cnn"] == table["cnn again"]
    assert table.meta["n"] == 8


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_parameter(trained_cnn, synthetic_xy):
    x, y = synthetic_xy[0][:4], synthetic_xy[1][:4]
    with pytest.raises(ValueError,
                       match="attack must be one of 'clean', 'fgsm', 'pgd20', 'cw20', "
                             "'autoattack'"):
        ev.evaluate(trained_cnn, x, y, ("pgd50",))
    with pytest.raises(ValueError, match="attack must be one of"):
        ev.robust_accuracy(trained_cnn, x, y, "pgd")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ev.evaluate(trained_cnn, x, y, eps=-0.1)
    with pytest.raises(ValueError, match=r"x must have pixels in \[0, 1\]"):
        ev.accuracy(trained_cnn, x * 255, y)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        ev.evaluate(trained_cnn, x, y[:3])
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 9\]"):
        ev.accuracy(trained_cnn, x, y + 10)
    with pytest.raises(ValueError, match="models must hold at least one"):
        ev.evaluate_many({}, x, y)
    with pytest.raises(ValueError, match="autoattack_version must be one of"):
        ev.robust_accuracy(trained_cnn, x, y, "autoattack", autoattack_version="fastest")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ev.accuracy(trained_cnn, x, y, batch_size=0)
    with pytest.raises(ValueError, match="eps_values must hold at least one"):
        ev.eps_sweep(trained_cnn, x, y, [])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ev.accuracy(lambda t: t, x, y)


def test_non_finite_clean_logits_are_refused(trained_cnn, xy):
    import copy
    broken = copy.deepcopy(trained_cnn)
    broken.linear.bias.data[3] = float("nan")
    message = "model returns NaN or infinite logits on clean images"
    for call in (lambda: ev.evaluate(broken, *xy, ("clean", "pgd20"), sanity=False),
                 lambda: ev.accuracy(broken, *xy),
                 lambda: ev.robust_accuracy(broken, *xy, "fgsm")):
        with pytest.raises(ValueError, match=message):
            call()
    # only some images non-finite: the clean pass over every image catches them

    class NanOnSome(nn.Module):
        def forward(self, x):
            z = trained_cnn(x)
            return torch.where(x[:, :1, 0, 0] > 0.5, torch.full_like(z, float("inf")), z)
    some = NanOnSome()
    first_ok = xy[0][xy[0][:, 0, 0, 0] <= 0.5][:1]
    x = torch.cat([first_ok, xy[0]])
    y = torch.cat([xy[1][:1], xy[1]])
    with pytest.raises(ValueError, match=message):
        ev.evaluate(some, x, y, ("clean",), sanity=False)


def test_evaluate_validates_once_at_the_entry(trained_cnn, xy):
    """One check at the entry: one forward pass of one image, then the clean batches (no forward
    passes spent re-validating in robust_accuracy or accuracy)."""
    calls = []
    handle = trained_cnn.register_forward_pre_hook(lambda mod, inputs: calls.append(len(inputs[0])))
    try:
        ev.evaluate(trained_cnn, *xy, ("clean",), sanity=False, batch_size=8)
    finally:
        handle.remove()
    assert calls == [1] + [8] * (N // 8)


@pytest.mark.parametrize("attack", ["clean", "fgsm", "pgd20"])
def test_correct_is_per_image_and_its_mean_is_the_accuracy(trained_cnn, synthetic_xy, attack):
    x, y = synthetic_xy
    x, y = x[:96], y[:96]
    mask = ev.correct(trained_cnn, x, y, attack, eps=8 / 255, batch_size=40, seed=3)
    assert mask.dtype == torch.bool and mask.shape == (96,)
    expected = ev.robust_accuracy(trained_cnn, x, y, attack, batch_size=40, seed=3)
    assert int(mask.sum()) / 96 == expected
    with pytest.raises(ValueError, match="attack"):
        ev.correct(trained_cnn, x, y, "autoattack")
