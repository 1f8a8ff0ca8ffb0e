"""A method registered from outside the package trains with `train.fit` like a built-in one: the
CONTRIBUTING.md walk-through, run for one epoch on tiny synthetic data."""
import pytest
import torch
import torch.nn.functional as F

from d2r_lib import attacks, methods, train
from d2r_lib.lab import cli, runner


def fgsm_start_pgd(target, guide, x, y, *, eps, step_size, steps):
    """x′ by PGD on CE from the clean image (no random start)."""
    return attacks.pgd(target, x, y, eps=eps, step_size=step_size, steps=steps, start="clean")


def clean_plus_adv_ce(logits, y, *, weight):
    """CE(f(x), y) + weight·CE(f(x′), y)"""
    nat, adv = logits
    terms = {"ce_clean": F.cross_entropy(nat, y), "ce_adv": F.cross_entropy(adv, y)}
    terms["loss"] = terms["ce_clean"] + weight * terms["ce_adv"]
    return terms


MY_METHOD = methods.Method(
    "clean_plus_adv", "CE on x plus weight × CE on x′ (a test method)", chapter=None,
    attack_kind="pgd", attack=fgsm_start_pgd, loss=clean_plus_adv_ce,
    passes=(methods.Pass("target", "x"), methods.Pass("target", "x_adv")),
    defaults={"eps": 8 / 255, "step_size": 2 / 255, "steps": 2,
              "weight": methods.Param(float, 1.0, "weight of the CE on x′", min=0)})


@pytest.fixture
def registered():
    methods.register(MY_METHOD)
    yield MY_METHOD
    methods.unregister(MY_METHOD.name)


def test_a_registered_method_trains_one_epoch_with_fit(registered, tmp_path):
    cfg = train.TrainConfig(method="clean_plus_adv", dataset="synthetic", subset="default",
                            train_size=64, epochs=1, batch_size=32, held_out=16,
                            method_params={"weight": 0.5})
    torch.manual_seed(0)
    result = train.fit(cfg, tmp_path, progress=False, log=lambda *a: None)
    record = result.history[0]
    for key in ("train_ce_clean", "train_ce_adv", "train_loss", "clean_acc", "pgd_acc"):
        assert key in record
    # train_loss is the batch-weighted mean of ce_clean + 0.5·ce_adv (both are means over batches)
    assert record["train_loss"] == pytest.approx(record["train_ce_clean"]
                                                 + 0.5 * record["train_ce_adv"], rel=1e-5)
    # 2 batches × the 2 declared train-mode passes
    assert int(result.target.state_dict()["features.1.num_batches_tracked"]) == 4
    assert result.guide is None
    target, guide, payload = train.load_run(tmp_path)
    assert payload["method"] == "clean_plus_adv" and guide is None
    assert "f(x), f(x′)" in registered.describe()


def test_a_registered_method_checks_its_parameters(registered):
    with pytest.raises(ValueError, match="method 'clean_plus_adv' has no parameter beta; allowed: "
                                         "eps, step_size, steps, weight"):
        train.TrainConfig(method="clean_plus_adv", method_params={"beta": 1.0}).validate()
    with pytest.raises(TypeError, match="weight must be a number; got 'heavy'"):
        registered.resolve(weight="heavy")
    with pytest.raises(ValueError, match="a method named 'clean_plus_adv' is already registered"):
        methods.register(MY_METHOD)


def test_a_registered_method_gets_its_flag_and_its_checks_for_free(registered, tmp_path, capsys):
    """Declared once (`methods.Param`): `d2r train` gets --weight with the help and range, its
    checks name the flag, the runner's range and the API's checks come from the same
    declaration."""
    assert registered.params["weight"] == methods.Param(float, 1.0, "weight of the CE on x′", min=0)
    assert cli.main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("--weight WEIGHT weight of the CE on x′: a number >= 0 (default: the method's; "
            "methods: clean_plus_adv)") in help_text
    argv = ["train", "--method", "clean_plus_adv", "--out", str(tmp_path / "run")]
    args = cli.build_parser().parse_args([*argv, "--weight", "1/4", "--steps", "3"])
    assert cli.train_config(args).method_params == {"weight": 0.25, "steps": 3}
    assert cli.main([*argv, "--weight", "-1"]) == 2
    assert capsys.readouterr().err == "error: --weight must be >= 0; got -1.0\n"
    assert cli.main(["train", "--method", "pgd_at", "--weight", "2", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: --weight does not apply to method 'pgd_at'; its "
                                       "options: --eps, --step-size, --steps\n")
    assert not (tmp_path / "run").exists()
    assert runner._method_range("weight") == runner.Range(float, 0)
    with pytest.raises(ValueError, match="weight must be >= 0; got -0.5"):
        train.TrainConfig(method="clean_plus_adv", method_params={"weight": -0.5}).validate()


def test_a_parameter_named_like_a_training_setting_is_refused():
    import dataclasses

    clash = dataclasses.replace(MY_METHOD, name="clashing",
                                defaults={**MY_METHOD.defaults, "lr": 0.5})
    with pytest.raises(ValueError, match="method 'clashing': parameter name 'lr' is a training "
                                         "setting"):
        methods.register(clash)
    assert "clashing" not in methods.METHODS
    # every option of `d2r train` and every TrainConfig field is either reserved or a method's
    parser = cli.build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    params = {k for m in methods.METHODS.values() for k in m.params}
    options = {a.dest for a in train_parser._actions}
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert (options | fields) - params <= methods.SETTING_NAMES
    assert not methods.SETTING_NAMES & params
