"""Command line: `python -m d2r_lib {train, evaluate, quickstart, demo, bench} --help`. Chapter 9 uses it at scale."""
from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path


def _number(text: str) -> float:
    """A float, also written as a fraction such as 8/255."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.031 or 8/255; got {text!r}") from None


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from . import data, methods, models, train
    d = train.TrainConfig()
    p.add_argument("--method", default=d.method, choices=sorted(methods.METHODS),
                   help="training method (default %(default)s): " + "; ".join(
                       f"{m.name}: {m.description}" for m in methods.METHODS.values()))
    p.add_argument("--target", default=d.target_model, choices=sorted(models.MODELS),
                   help="target model f (default %(default)s; the paper: wrn34_10)")
    p.add_argument("--guide", default=d.guide_model, choices=sorted(models.MODELS),
                   help="guide model g for lbgat/d2r methods (default %(default)s; the paper: resnet18)")
    p.add_argument("--dataset", default=d.dataset, choices=sorted(data.DATASETS), help="default %(default)s")
    p.add_argument("--subset", default=d.subset,
                   help="cifar10: mini (lossless 7,897 train / 1,000 test) or full; cifar100: full or test20; "
                        "tinyimagenet: bundle or full (default %(default)s)")
    p.add_argument("--train-size", type=int, default=None, help="use only the first N training images")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s (the paper: 100)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="base learning rate (default %(default)s)")
    p.add_argument("--schedule", default=d.schedule, choices=["paper", "cosine"],
                   help="paper: epoch 1 at 0.2·lr, ×0.1 from 76%%, ×0.01 from 91%% of the run (default)")
    p.add_argument("--eps", type=_number, default=None, help="attack budget ε of the training attack "
                   "(default: the method's, 0.031 for trades/lbgat/d2r, 8/255 for pgd_at)")
    p.add_argument("--steps", type=int, default=None, help="attack steps K (default: the method's, 10)")
    p.add_argument("--step-size", type=_number, default=None, help="attack step α (default: the method's)")
    p.add_argument("--beta", type=float, default=None, help="β of trades / mart / lbgat")
    p.add_argument("--w-clean", type=float, default=None, help="D2R clean-term weight (default 20)")
    p.add_argument("--w-adv", type=float, default=None, help="D2R adversarial-term weight (default 30)")
    p.add_argument("--kl-reduction", default=None, choices=["mean", "batchmean"],
                   help="D2R KL convention: mean over batch×classes (official, default) or batchmean")
    p.add_argument("--seed", type=int, default=d.seed, help="default %(default)s (the official effective seed)")
    p.add_argument("--held-out", "--eval-size", dest="held_out", type=int, default=d.held_out,
                   help="held-out test images for the per-epoch clean/PGD-20 check (default %(default)s)")
    p.add_argument("--no-augment", action="store_true", help="turn off RandomCrop(pad 4) + flip")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default %(default)s")
    p.add_argument("--out", required=True, type=Path, help="output directory (checkpoint last.pt, history.json)")
    p.add_argument("--resume", default="auto", choices=["auto", "always", "never"],
                   help="auto: continue a matching run in --out (default); always: fail if there is none; "
                        "never: start afresh")
    p.add_argument("--data-dir", type=Path, default=None, help="data folder (else $D2R_DATA_DIR, then known folders)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config_from_args(a) -> "object":
    from . import train
    params = {k: v for k, v in {"eps": a.eps, "steps": a.steps, "step_size": a.step_size, "beta": a.beta,
                                "w_clean": a.w_clean, "w_adv": a.w_adv, "kl_reduction": a.kl_reduction}.items()
              if v is not None}
    return train.TrainConfig(method=a.method, target_model=a.target, guide_model=a.guide, dataset=a.dataset,
                             subset=a.subset, train_size=a.train_size, epochs=a.epochs, batch_size=a.batch_size,
                             lr=a.lr, schedule=a.schedule, method_params=params, seed=a.seed,
                             held_out=a.held_out, augment=not a.no_augment, amp=a.amp,
                             channels_last=a.channels_last, compile=a.compile).validate()


def _add_eval_args(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    from . import evaluate
    if checkpoint_required:
        p.add_argument("--checkpoint", required=True, type=Path, help="a last.pt written by `train` (or its folder)")
    p.add_argument("--attacks", default="clean,fgsm,pgd20,cw20,autoattack",
                   help=f"comma-separated, from {', '.join(evaluate.ATTACKS)} (default %(default)s)")
    p.add_argument("--eval-eps", type=_number, default=8 / 255, help="evaluation ε (default 8/255)")
    p.add_argument("--n", type=int, default=None,
                   help="evaluate on the first N test images of the run's dataset (default: all of the split; "
                        "cifar10 mini = the 1,000 lossless test images)")
    p.add_argument("--autoattack-version", default="standard", choices=list(evaluate.AUTOATTACK_VERSIONS),
                   help="standard: APGD-CE, APGD-T, FAB-T, Square (default); others are faster subsets")
    p.add_argument("--eval-batch-size", type=int, default=256, help="default %(default)s")
    p.add_argument("--json", type=Path, default=None, help="also write the results here (JSON)")


def _parse_attacks(text: str) -> list[str]:
    from . import validate, evaluate
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        validate.choice("--attacks", name, evaluate.ATTACKS)
    return names


def _test_tensors(dataset: str, subset: str, n, device, data_dir=None):
    from . import data
    split = "val" if dataset == "tinyimagenet" else "test"
    subset = subset if dataset != "cifar100" else None
    ds = data.load(dataset, split, subset, data_dir=data_dir, download=True)
    if n is not None:
        ds = ds.subset(n)
    return ds, *ds.tensors(device)


def cmd_train(a) -> int:
    from . import experiments, train
    cfg = _config_from_args(a)
    device = experiments.pick_device(a.device)
    result = train.fit(cfg, a.out, device=device, resume=a.resume, progress=not a.no_progress, data_dir=a.data_dir)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    return 0


def cmd_evaluate(a) -> int:
    from . import evaluate, experiments, train
    attacks = _parse_attacks(a.attacks)
    device = experiments.pick_device(a.device)
    target, _, payload = train.load_run(a.checkpoint, device=device)
    ds, x, y = _test_tensors(payload["dataset"], payload["config"]["subset"], a.n, device, a.data_dir)
    started = time.perf_counter()
    results = evaluate.evaluate(target, x, y, attacks, eps=a.eval_eps, batch_size=a.eval_batch_size,
                                autoattack_version=a.autoattack_version)
    table = evaluate.ResultsTable({payload["method"]: results})
    print(f"{payload['method']} ({payload['target_model']}, epoch {payload['epoch']}/{payload['epochs']}) on "
          f"{ds.name}, {len(y)} images ({'lossless' if ds.lossless else 'JPEG'}), ε = {a.eval_eps:.4f}, "
          f"{time.perf_counter() - started:.0f}s")
    print(table)
    if a.json is not None:
        table.save_json(a.json)
        print(f"results: {a.json}")
    return 0


def cmd_quickstart(a) -> int:
    """Train D2R + CAG and a standard model the same way on CIFAR-10 mini, evaluate both, print the table."""
    from . import evaluate, experiments, train
    device = experiments.pick_device(a.device)
    attacks = _parse_attacks(a.attacks)
    trained = {}
    for method in ("standard", "d2r"):
        cfg = train.TrainConfig(method=method, target_model=a.target, guide_model=a.guide, dataset="cifar10",
                                subset="mini", train_size=a.train_size, epochs=a.epochs, batch_size=a.batch_size,
                                lr=a.lr, seed=a.seed, held_out=200,
                                method_params={"steps": a.steps} if method != "standard" else {})
        print(f"== training {method}: {a.epochs} epochs on {a.train_size or 7897} lossless CIFAR-10 training images, "
              f"lr {a.lr:g}, seed {a.seed}")
        trained[method] = train.fit(cfg, a.out / method, device=device, progress=not a.no_progress).target
    ds, x, y = _test_tensors("cifar10", "mini", a.n, device)
    print(f"== evaluating on {ds.name}: {len(y)} lossless CIFAR-10 test images, ε = 8/255, seed 0")
    table = evaluate.evaluate_many(trained, x, y, attacks, autoattack_version=a.autoattack_version)
    print(table)
    table.save_json(a.out / "results.json")
    print(f"results: {a.out / 'results.json'}")
    return 0


def cmd_demo(a) -> int:
    """One D2R + CAG training step on real CIFAR-10 images: every loss term and the perturbation's norms."""
    import torch
    from . import attacks, data, experiments, losses, methods, models
    device = experiments.pick_device(a.device)
    torch.manual_seed(a.seed)
    x, y = data.cifar10("test", "mini", download=True).subset(a.batch_size).tensors(device)
    target = models.build_model(a.target).to(device)
    guide = models.build_model(a.guide).to(device)
    opt = methods.make_optimizer(target, guide)
    started = time.perf_counter()
    x_adv = attacks.cag(target, guide, x)
    target.train(), guide.train()
    terms = losses.d2r_terms(target(x_adv), target(x), guide(x), y)
    opt.zero_grad()
    terms["loss"].backward()
    opt.step()
    elapsed = time.perf_counter() - started
    delta = (x_adv - x).flatten(1)
    print(f"one D2R + CAG step: target {a.target}, guide {a.guide}, {len(y)} CIFAR-10 test images, "
          f"device {device}, {elapsed:.2f}s")
    for k in ("ce", "mse", "kl_fg", "kl_gf", "clean", "adv", "loss"):
        print(f"  {k:6s} {terms[k].item():.6f}")
    print(f"  ‖δ‖∞ max {delta.abs().max().item():.5f} (ε = 0.031)   ‖δ‖₂ mean {delta.norm(dim=1).mean().item():.4f}")
    return 0


def cmd_bench(a) -> int:
    """Images per second of D2R + CAG training steps and of PGD-20 evaluation on this machine."""
    import torch
    from . import costmodel, experiments, models, validate
    device = experiments.pick_device(a.device)
    runs = []
    for pair in a.pairs:  # every entry is checked before anything is measured
        parts = pair.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()):
            raise ValueError(f"--pairs entries must be target:guide or target:guide:batch; got {pair!r}")
        validate.choice("target", parts[0], models.MODELS)
        validate.choice("guide", parts[1], models.MODELS)
        runs.append(parts if len(parts) == 3 else (*parts, a.batch_size))
    for name in a.eval_models:
        validate.choice("--eval-models", name, models.MODELS)
    print(f"device {device}, torch threads {torch.get_num_threads()}, K = {a.steps}, "
          f"fastest of {a.repeats} timed runs after one warm-up")
    for target, guide, batch in runs:
        seconds = costmodel.measure_step(a.method, target, guide, steps=a.steps, batch_size=int(batch),
                                         device=device, repeats=a.repeats)
        print(f"  {a.method} train step  target {target:<16} guide {guide:<16} batch {int(batch):>4}: "
              f"{1 / seconds:8.1f} images/s")
    for name in a.eval_models:
        seconds = costmodel.measure_pgd(name, steps=20, batch_size=a.eval_batch_size, device=device,
                                        repeats=a.repeats)
        print(f"  PGD-20 evaluation  model {name:<16} batch {a.eval_batch_size:>4}: "
              f"{1 / seconds:8.1f} images/s (all 20 steps, no early stop)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m d2r_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train any method; resumable", description="Train a method of the registry. "
                       "Running the same command again resumes from --out/last.pt.")
    _add_train_args(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="robust evaluation of a checkpoint",
                       description="Clean, FGSM, PGD-20, CW-20 and AutoAttack accuracy of a trained target.")
    _add_eval_args(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--data-dir", type=Path, default=None, help="data folder")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("quickstart", help="train D2R + CAG and standard on CIFAR-10 mini, compare robustness",
                       description="A short CPU run: D2R + CAG and a standard model trained the same way on the "
                                   "lossless CIFAR-10 mini split, evaluated on the 1,000 lossless test images.")
    p.add_argument("--target", default="small_cnn")
    p.add_argument("--guide", default="small_cnn")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="CAG steps during training (default 10)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="base learning rate (default %(default)s: half the paper's 0.1, which made small_cnn "
                        "collapse to a constant prediction under D2R for 1 of 4 seeds in our 5-epoch runs)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--no-progress", action="store_true")
    _add_eval_args(p, checkpoint_required=False)
    p.set_defaults(run=cmd_quickstart)

    p = sub.add_parser("bench", help="images/s of training steps and PGD-20 evaluation on this machine",
                       description="A benchmark that prints numbers: images per second of one training step "
                                   "(attack + loss + SGD) for target:guide[:batch] pairs, and of PGD-20.")
    p.add_argument("--method", default="d2r", help="a method of the registry (default %(default)s)")
    p.add_argument("--pairs", nargs="+", default=["small_cnn:small_cnn:128", "small_cnn:small_cnn:32",
                                                  "preact_resnet18:resnet18:32"],
                   help="target:guide[:batch] (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="attack steps K (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="batch when a pair names none")
    p.add_argument("--eval-models", nargs="*", default=["small_cnn", "preact_resnet18"])
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("demo", help="one D2R + CAG step on real CIFAR-10 images",
                       description="One D2R + CAG training step; prints every loss term and the perturbation norms.")
    p.add_argument("--target", default="small_cnn")
    p.add_argument("--guide", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch
    torch.set_flush_denormal(True)  # tiny "denormal" floats are very slow on CPUs; zero is as good
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as err:
        parser.exit(2, f"error: {err}\n")
    except RuntimeError as err:  # checkpoint problems, diverged training
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
