"""The registered follow-ups of chapter 7: why D2R + CAG loses at the book's budget, and when it
would not. Chapter 7 ("What we found") reads them.

Everything here was written down on 2026-12-07, before any of these runs existed: the questions, the
hypotheses with the sign each predicts, the runs, the comparisons, the metric, the interval and the
rule that turns an interval into a verdict (`FOLLOWUPS`). The runs are shipped under
`book/followups/` and re-checked by `tests/test_followups.py`:

    book/followups/e10/<method>-seed<k>/      the reference setting at 10 epochs (as book/reference)
    book/followups/e20/<method>-seed<k>/      ... at 20 epochs
    book/followups/dose/d2r_w_adv<w>-seed<k>/ D2R at the reference budget with w_adv = w
    book/followups/toy/<study>.json           the 2-D world studies, 20 seeds each

`python -m d2r_lib.followups cifar --out book/followups` trains and evaluates the CIFAR runs in the
order of `cifar_plan`, each a run of the runner (`d2r run reference`; one thread per process; start
two processes to use two cores: each claims a run with a lock, complete runs are skipped,
interrupted ones resume from the checkpoint cache).
`python -m d2r_lib.followups toy --out book/followups/toy` runs the 2-D studies (resumable per
seed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, evaluate, reference, toy, train, validate

__all__ = [
    "REGISTERED_ON", "FOLLOWUPS", "BUDGETS", "DOSE_W_ADV", "TOY_SEEDS", "TOY_BUDGETS",
    "TOY_STUDIES", "DIVERGENCE", "CHECKPOINTS_LOST", "Planned", "cifar_plan", "run_cifar",
    "toy_settings", "run_toy", "verdict", "main",
]

REGISTERED_ON = "2026-12-07"
BUDGETS = {"reference": 5, "reference_e10": 10, "reference_e20": 20}
"""Epochs of each budget of the CIFAR budget study (reference.CONFIGS; the 5-epoch runs are the
shipped `book/reference` runs)."""
BUDGET_FOLDERS = {"reference_e10": "e10", "reference_e20": "e20"}
DOSE_W_ADV = (0.0, 3.0, 10.0, 30.0)
"""The CIFAR dose of the adversarial-distribution term; 0 and 30 are the shipped `d2r_no_adv` and
`d2r` reference runs, 3 and 10 are new."""
TOY_SEEDS = tuple(range(20))
TOY_BUDGETS = (20, 60, 200, 600, 2000)
"""Epochs of the 2-D budget study (4 batches each; chapter 7's 2-D comparison trains 20)."""
TOY_W_ADV = (0.0, 3.0, 10.0, 30.0, 90.0)
TOY_W_CLEAN = (0.0, 5.0, 20.0, 80.0)
TOY_GUIDE_WIDTHS = (8, 32, 128)
"""The guide's hidden width on the 2-D world; the target's is 32 (chapter 7's comparison)."""
SEEDS = (0, 1, 2)
LEVEL = 0.95

_RULE = ("supported when the 95 % t-interval of the registered difference lies entirely on the "
         "predicted side of 0, contradicted when it lies entirely on the other side, undecided "
         "otherwise (an interval that contains 0 never counts as support)")

FOLLOWUPS = {
    "budget": {
        "question": "Does D2R's deficit against PGD-AT shrink when every method trains longer?",
        "hypothesis": "the D2R − PGD-AT AutoAttack gap grows (becomes less negative) with the "
                      "training budget",
        "runs": "the reference setting (small_cnn target and guide, the first 20,000 CIFAR-10 "
                "training images, K = 5, the official schedule scaled) at 5 (shipped), 10 and 20 "
                "epochs; methods pgd_at, trades, lbgat, d2r (d2r_trades_gen only if the compute "
                "allows); seeds 0, 1, 2; evaluated exactly like the shipped runs",
        "comparison": "per seed: (D2R − PGD-AT at 20 epochs) − (D2R − PGD-AT at 5 epochs); "
                      "secondary: the same from 5 to 10 epochs, and for trades and lbgat in place "
                      "of pgd_at; every budget's D2R − other gaps as in reference.PREREGISTERED",
        "metric": "autoattack (clean, pgd20 and cw20 reported beside it)",
        "predicted_sign": +1,
        "interval": "95 % two-sided Student t-interval over the 3 seeds (2 df)",
        "rule": _RULE,
    },
    "toy_budget": {
        "question": "On the 2-D world, where training is cheap, does the same hold over a 100-fold "
                    "range of budgets?",
        "hypothesis": "the D2R − PGD-AT gap in exact robust accuracy grows with the number of "
                      "epochs",
        "runs": f"pgd_at, trades, lbgat, d2r, d2r_trades_gen at {TOY_BUDGETS} epochs (cosine lr "
                "from 0.02, 4 batches of 500 per epoch), seeds 0-19",
        "comparison": "per seed: gap at 2000 epochs − gap at 20 epochs",
        "metric": "exact robust accuracy at ε = 0.08 (clean and PGD-20 reported beside it)",
        "predicted_sign": +1,
        "interval": "95 % two-sided Student t-interval over 20 seeds (19 df)",
        "rule": _RULE,
    },
    "dose": {
        "question": "Does the adversarial-distribution term buy robustness, or only cost clean "
                    "accuracy?",
        "hypothesis": "clean accuracy falls as w_adv grows; robust accuracy does not rise with it "
                      "(the ablation d2r_no_adv was +5.5 clean, undecided under AutoAttack)",
        "runs": f"D2R at the reference budget with w_adv in {DOSE_W_ADV} (0 and 30 shipped as "
                "d2r_no_adv and d2r), kl_reduction 'mean' as the official code, seeds 0, 1, 2",
        "comparison": "per seed: the least-squares slope of the metric against log(1 + w_adv) "
                      "over the four doses",
        "metric": "clean (predicted slope < 0) and autoattack (predicted slope ≤ 0: supported "
                  "unless the interval lies above 0)",
        "predicted_sign": -1,
        "interval": "95 % two-sided Student t-interval of the mean per-seed slope (2 df)",
        "rule": _RULE,
    },
    "toy_dose": {
        "question": "On the 2-D world: how do the two D2R terms' weights, and the KL reduction, "
                    "move robustness?",
        "hypothesis": "exact robust accuracy falls as w_adv grows (the 20-seed ablation found "
                      "w_adv = 0 higher by 9 points); w_clean has no monotone effect; batchmean "
                      "(C = 2 times the official mean on this 2-class world) acts as a larger dose",
        "runs": f"d2r at 20 and 200 epochs with w_adv in {TOY_W_ADV} (w_clean 20) and w_clean "
                f"in {TOY_W_CLEAN} (w_adv 30), each with kl_reduction 'mean' and 'batchmean', "
                "seeds 0-19",
        "comparison": "per seed: the slope of exact robust accuracy against log(1 + w) for each "
                      "weight and reduction; batchmean − mean at the official weights",
        "metric": "exact robust accuracy; the guide's true-class probability beside it",
        "predicted_sign": -1,
        "interval": "95 % two-sided Student t-interval over 20 seeds (19 df)",
        "rule": _RULE,
    },
    "guide": {
        "question": "Is D2R's guide an under-confident teacher?",
        "hypothesis": "D2R's guide ends training less confident on clean held-out images than "
                      "LBGAT's guide (the same CE + MSE guide loss without D2R's two KL terms and "
                      "without CAG), and the target follows it",
        "runs": "every guided run of the budget and dose studies logs per epoch the guide's "
                "clean accuracy, mean true-class probability and soft-label entropy on the "
                "held-out images (train.held_out_check), and the target's",
        "comparison": "per seed: guide true-class probability at the last epoch, D2R − LBGAT, at "
                      "10 and at 20 epochs (CIFAR) and at every toy budget",
        "metric": "guide_true_prob",
        "predicted_sign": -1,
        "interval": "95 % two-sided Student t-interval (2 df on CIFAR, 19 on the 2-D world)",
        "rule": _RULE,
    },
    "toy_guide": {
        "question": "Does the guide's capacity matter? (The paper's guide, a ResNet-18, has about "
                    "a quarter of the parameters of its WRN-34-10 target.)",
        "hypothesis": "D2R's exact robust accuracy rises with the guide's width (8 < 32 < 128 "
                      "hidden units, target 32)",
        "runs": f"d2r and lbgat with guide widths {TOY_GUIDE_WIDTHS} at 20 and 200 epochs, "
                "seeds 0-19",
        "comparison": "per seed: width 128 − width 32, and width 32 − width 8",
        "metric": "exact robust accuracy",
        "predicted_sign": +1,
        "interval": "95 % two-sided Student t-interval over 20 seeds (19 df)",
        "rule": _RULE,
    },
}
"""The registered follow-ups (2026-12-07), before any of their runs existed. Verdicts follow `rule`;
every comparison listed is reported, none is picked after the fact."""
DIVERGENCE = ("amended 2026-12-07 18:25, after a toy_dose run diverged and before any toy result "
              "was read: a 2-D run whose loss becomes non-finite is recorded as diverged and "
              "counted beside each table; a comparison uses the seeds whose runs all finished")
for _study in ("toy_budget", "toy_dose", "toy_guide"):
    FOLLOWUPS[_study]["divergence"] = DIVERGENCE

CHECKPOINTS_LOST = frozenset(f"dose/d2r_w_adv{w}-seed{s}" for w in (3, 10) for s in (0, 1, 2))
"""Run folders shipped without their `target.pt`: the six dose runs finished before checkpoints of
follow-up runs were committed, and the files did not survive the session. Their metrics stand as
measured (history, manifest and metrics are shipped); every later run ships its checkpoint and is
re-evaluated by the tests."""



# ------------------------------------------------------------------------------------- CIFAR runs
@dataclass(frozen=True)
class Planned:
    """One CIFAR run of a follow-up: where its folder goes, its configuration and its method."""
    folder: str                 # under the follow-ups root: "e10", "e20" or "dose"
    config: str                 # a reference.CONFIGS name
    name: str                   # the run folder's name before -seed<k>
    method: str
    seed: int
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.folder}/{self.name}-seed{self.seed}"


def cifar_plan(include_optional: bool = True) -> list[Planned]:
    """Every registered CIFAR run in the order they are trained: the dose runs (short), then 10
    epochs (D2R and PGD-AT first: the primary comparison), then 20 epochs, then d2r_trades_gen."""
    plan = [Planned("dose", "reference", f"d2r_w_adv{w:g}", "d2r", s, {"w_adv": w})
            for w in (10.0, 3.0) for s in SEEDS]
    for config in ("reference_e10", "reference_e20"):
        for group in (("d2r", "pgd_at"), ("trades", "lbgat")):
            plan += [Planned(BUDGET_FOLDERS[config], config, m, m, s)
                     for s in SEEDS for m in group]
    if include_optional:
        plan += [Planned(BUDGET_FOLDERS[c], c, "d2r_trades_gen", "d2r_trades_gen", s)
                 for c in ("reference_e10", "reference_e20") for s in SEEDS]
    return plan


def run_cifar(root: str | Path, plan: list[Planned] | None = None, *, device: str = "cpu",
              log=print) -> list[Path]:
    """Train and evaluate every planned run not yet complete under `root`, in order, each a run of
    the runner (`d2r run reference`); a run another process holds is skipped (two processes share
    the plan). Returns the complete folders."""
    from .lab import runner

    done = []
    for item in plan if plan is not None else cifar_plan():
        params = {"method": item.method, "seed": item.seed, **item.params,
                  **({"name": item.name} if item.name != item.method else {})}
        out = Path(root) / item.folder
        (manifest,) = runner.run(item.config, kind="reference", out=out, params=params,
                                 device=device, log=log)
        if manifest.get("status") == "ok":
            done.append(reference.run_dir(out, item.name, item.seed))
    return done


# ---------------------------------------------------------------------------------- 2-D studies
TOY_STUDIES = ("toy_budget", "toy_dose", "toy_guide")


def toy_settings(study: str) -> list[dict]:
    """The settings of a 2-D study, each a dict of `toy.train` arguments plus "method"."""
    validate.choice("study", study, TOY_STUDIES)
    if study == "toy_budget":
        return [{"method": m, "epochs": e} for e in TOY_BUDGETS
                for m in ("pgd_at", "trades", "lbgat", "d2r", "d2r_trades_gen")]
    if study == "toy_dose":
        out = []
        for epochs in (20, 200):
            for reduction in ("mean", "batchmean"):
                out += [{"method": "d2r", "epochs": epochs, "w_adv": w, "w_clean": 20.0,
                         "kl_reduction": reduction} for w in TOY_W_ADV]
                out += [{"method": "d2r", "epochs": epochs, "w_adv": 30.0, "w_clean": w,
                         "kl_reduction": reduction} for w in TOY_W_CLEAN if w != 20.0]
        return out
    return [{"method": m, "epochs": e, "guide_width": w} for e in (20, 200)
            for m in ("d2r", "lbgat") for w in TOY_GUIDE_WIDTHS]


def _toy_metrics(run: toy.ToyRun, seed: int) -> dict:
    x, y = toy.test_set(seed=seed)
    out = {"clean": evaluate.accuracy(run.target, x, y),
           "pgd20": toy.pgd_accuracy(run.target, x, y, toy.EPS, seed=seed),
           "exact": toy.exact_robust_accuracy(run.target, x, y, toy.EPS, grid=21)}
    with torch.no_grad():
        for role, model in (("target", run.target), ("guide", run.guide)):
            if model is not None:
                conf = train.confidence(model(x), y)
                out.update({f"{role}_true_prob": conf["true_prob"],
                            f"{role}_entropy": conf["entropy"]})
    return out


def _key(setting: dict, seed: int) -> str:
    return json.dumps({**setting, "seed": seed}, sort_keys=True)


def run_toy(study: str, path: str | Path, seeds=TOY_SEEDS, *, log=print) -> list[dict]:
    """Train and measure every (setting, seed) of a 2-D study into the JSON file `path`, seed by
    seed; finished ones are kept (the file is rewritten atomically after each), so a rerun resumes.
    Returns the records: {"setting", "seed", "metrics"}; a run whose loss became non-finite is
    recorded with metrics None and its error under "diverged" (`DIVERGENCE`)."""
    settings = toy_settings(study)
    path = Path(path)
    records = json.loads(path.read_text())["records"] if path.is_file() else []
    have = {_key(r["setting"], r["seed"]) for r in records}
    with checkpoint.exclusive(path.with_name(f".{path.name}.lock")):
        for seed in seeds:
            for setting in settings:
                if _key(setting, seed) in have:
                    continue
                kw = {k: v for k, v in setting.items() if k != "method"}
                try:
                    run = toy.train(setting["method"], seed=seed, **kw)
                except FloatingPointError as err:  # a result too: this setting diverges
                    records.append({"setting": setting, "seed": seed, "metrics": None,
                                    "diverged": str(err)})
                else:
                    records.append({"setting": setting, "seed": seed,
                                    "metrics": _toy_metrics(run, seed)})
                have.add(_key(setting, seed))
            text = json.dumps({"study": study, "registered": FOLLOWUPS[study],
                               "records": records}, indent=0) + "\n"
            checkpoint.atomic_write(path, lambda tmp, t=text: Path(tmp).write_text(t))
            log(f"{study}: seed {seed} done ({len(records)} records)")
    return records


# -------------------------------------------------------------------------------------- verdicts
def verdict(low: float, high: float, predicted_sign: int) -> str:
    """The registered rule: 'supported', 'contradicted' or 'undecided' (an interval containing 0,
    or NaN for too few seeds)."""
    if math.isnan(low) or math.isnan(high) or low <= 0 <= high:
        return "undecided"
    side = 1 if low > 0 else -1
    return "supported" if side == predicted_sign else "contradicted"


# ------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2r_lib.followups", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cifar", help="train and evaluate the registered CIFAR runs (resumable)")
    p.add_argument("--out", type=Path, required=True, help="the follow-ups root, book/followups")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-optional", action="store_true", help="leave out d2r_trades_gen")
    p.add_argument("--dry-run", action="store_true", help="list the plan and what is complete")
    p.add_argument("--save-partial", action="store_true",
                   help="copy each unfinished run's last epoch from the cache to <out>/partial "
                        "(commit it: the next sitting resumes from there) and exit")
    t = sub.add_parser("toy", help="run the registered 2-D studies (resumable per seed)")
    t.add_argument("--out", type=Path, required=True, help="folder of the study files")
    t.add_argument("--studies", nargs="+", default=list(TOY_STUDIES),
                   help=f"any of {', '.join(TOY_STUDIES)}")
    args = parser.parse_args(argv)
    try:
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} is a file; give a folder")
        if args.command == "toy":
            for study in args.studies:
                validate.choice("--studies", study, TOY_STUDIES)
        elif args.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {args.device!r} is not allowed; choose cpu or cuda")
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    torch.set_flush_denormal(True)
    if args.command == "toy":
        for study in args.studies:
            run_toy(study, args.out / f"{study}.json")
        return 0
    plan = cifar_plan(include_optional=not args.no_optional)
    if args.dry_run:
        for item in plan:
            state = reference.is_complete(reference.run_dir(args.out / item.folder, item.name,
                                                            item.seed))
            print(f"{'complete' if state else 'to run':>9}  {item.label}  ({item.config})")
        return 0
    if args.save_partial:
        for item in plan:
            folder = reference.run_dir(args.out / item.folder, item.name, item.seed)
            cfg = reference.CONFIGS[item.config].train_config(item.method, item.seed,
                                                              item.params or None)
            saved = reference.save_partial(folder, train.cache_path(cfg))
            if saved is not None:
                print(f"saved {saved} ({len(json.loads((saved / 'history.json').read_text()))} "
                      "epochs)")
        return 0
    run_cifar(args.out, plan, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
