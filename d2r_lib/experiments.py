"""Profiles, parameter validation, shared training runs and the papermill runner. Every chapter uses it.

A chapter's `parameters` cell holds literals; `resolve(...)` fills whatever is None from the profile,
validates every value with a clear error, and prints the device once. `trained(cfg, method)` loads a run
from the checkpoint cache or trains it, so chapters with the same profile share their models.

| profile | purpose                     | scale                                                              |
|---------|-----------------------------|--------------------------------------------------------------------|
| smoke   | tests and nbval             | seconds per notebook on 2 CPU cores                                |
| cpu     | the rendered book, a laptop | a few minutes per chapter; lossless CIFAR-10 `mini` (4,000 train / 1,000 test) |
| full    | the paper                   | WRN-34-10 target, ResNet-18 guide, 100 epochs, full CIFAR-10; GPU hours |

Run every chapter from the command line:
`python -m d2r_lib.experiments run --profile smoke --out runs/smoke [--chapters 01 05]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import validate

PROFILES: dict[str, dict] = {
    "smoke": dict(dataset="cifar10", subset="mini", train_size=256, test_size=64, eval_size=32, held_out=32,
                  epochs=1, batch_size=64, target_model="small_cnn", guide_model="small_cnn", eps=None,
                  step_size=None, steps=2, autoattack="apgd-ce", lr=0.1),
    "cpu": dict(dataset="cifar10", subset="mini", train_size=4000, test_size=1000, eval_size=500, held_out=200,
                epochs=5, batch_size=128, target_model="small_cnn", guide_model="small_cnn", eps=None,
                step_size=None, steps=5, autoattack="fast", lr=0.1),
    "full": dict(dataset="cifar10", subset="full", train_size=None, test_size=None, eval_size=None, held_out=1000,
                 epochs=100, batch_size=128, target_model="wrn34_10", guide_model="resnet18", eps=None,
                 step_size=None, steps=None, autoattack="standard", lr=0.1),
}
"""Defaults per profile. Sizes of None mean the whole split: `train_size` training images, `test_size` test
images for clean accuracy, `eval_size` of those for the attacks, `held_out` for the per-epoch check.
`eps` / `step_size` / `steps` of None keep each method's own training attack (the official 0.031 / 0.007 /
10 for TRADES, LBGAT and D2R; 8/255 / 2/255 / 10 for PGD-AT). Evaluation always follows the official
protocol (ε = 8/255, PGD-20 and CW-20 with step 2/255). `autoattack` names an `evaluate.AUTOATTACK_VERSIONS`
entry or "off"."""

DEVICES = ("auto", "cpu", "cuda", "mps")
PROFILE_ENV = "D2R_PROFILE"
CHAPTER_DIR = Path(__file__).resolve().parents[1] / "book"


@dataclass(frozen=True)
class Config:
    """A chapter's resolved parameters: every value set and checked."""
    profile: str
    seed: int
    device: str
    dataset: str
    subset: str
    train_size: int | None
    test_size: int | None
    eval_size: int | None
    held_out: int
    epochs: int
    batch_size: int
    target_model: str
    guide_model: str
    eps: float | None
    step_size: float | None
    steps: int | None
    autoattack: str
    lr: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line naming profile, seed, data and budget: print it beside every table."""
        def size(n):
            return "all" if n is None else n
        budget = f"steps={self.steps if self.steps is not None else 'method default'}"
        return (f"profile={self.profile} seed={self.seed} data={self.dataset}/{self.subset} "
                f"(train {size(self.train_size)}, test {size(self.test_size)}, attacked {size(self.eval_size)}) "
                f"target={self.target_model} guide={self.guide_model} epochs={self.epochs} "
                f"batch={self.batch_size} {budget}")


def pick_device(device: str = "auto") -> str:
    """"auto" → cuda, else mps, else cpu; an unavailable explicit choice raises."""
    validate.choice("device", device, DEVICES)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available; use device='auto' or 'cpu'")
    return device


def resolve(profile: str = "cpu", *, seed: int = 0, device: str = "auto", verbose: bool = True, **overrides) -> Config:
    """Fill every None override from the profile, validate all values, pick and print the device.

    Overrides that are not profile fields (e.g. `beta_values` of chapter 3) are kept in `cfg.extra`.
    The environment variable D2R_PROFILE, when set, replaces `profile` (the test suite builds the whole
    book at the smoke profile this way).
    """
    from . import data, evaluate, models  # local: keep `import d2r_lib.experiments` light

    if os.environ.get(PROFILE_ENV):
        profile = os.environ[PROFILE_ENV]
        validate.choice(PROFILE_ENV, profile, PROFILES)
    validate.choice("profile", profile, PROFILES)
    validate.number("seed", seed, min=0, integer=True)
    values = dict(PROFILES[profile])
    extra = {k: v for k, v in overrides.items() if k not in values}
    values.update({k: v for k, v in overrides.items() if k in values and v is not None})

    validate.choice("dataset", values["dataset"], data.DATASETS)
    validate.choice("subset", values["subset"], data.DATASETS[values["dataset"]]["subsets"])
    for key in ("train_size", "test_size", "eval_size", "steps", "step_size", "eps"):
        if values[key] is None:
            continue
        if key == "eps":
            validate.eps(values[key])
        elif key == "step_size":
            validate.step_size(values[key])
        else:
            validate.number(key, values[key], min=1, integer=True)
    for key in ("held_out", "epochs", "batch_size"):
        validate.number(key, values[key], min=1, integer=True)
    validate.choice("target_model", values["target_model"], models.MODELS)
    validate.choice("guide_model", values["guide_model"], models.MODELS)
    validate.number("lr", values["lr"], min=0, min_open=True)
    validate.choice("autoattack", values["autoattack"], [*evaluate.AUTOATTACK_VERSIONS, "off"])
    cfg = Config(profile=profile, seed=seed, device=pick_device(device), extra=extra, **values)
    # Barely trained models have tiny ("denormal") floats, which CPUs process very slowly: flush them to zero.
    torch.set_flush_denormal(True)
    if verbose:
        print(f"device: {cfg.device} | {cfg.describe()}")
    return cfg


# ------------------------------------------------------------------------------------ data and training
def test_set(cfg: Config):
    """The profile's test images (CIFAR-10 `mini`: the first `test_size` lossless test images)."""
    from . import data
    split = "val" if cfg.dataset == "tinyimagenet" else "test"
    ds = data.load(cfg.dataset, split, cfg.subset if cfg.dataset != "cifar100" else None, download=True)
    return ds.subset(cfg.test_size) if cfg.test_size is not None and cfg.test_size < len(ds) else ds


def train_config(cfg: Config, method: str, **method_params):
    """The TrainConfig of `method` under this profile's budget (same settings ⇒ same cached run)."""
    from . import methods, train
    m = methods.get_method(method)
    budget = {k: v for k, v in (("eps", cfg.eps), ("step_size", cfg.step_size), ("steps", cfg.steps))
              if v is not None and k in m.defaults}
    return train.TrainConfig(method=method, target_model=cfg.target_model, guide_model=cfg.guide_model,
                             dataset=cfg.dataset, subset=cfg.subset, train_size=cfg.train_size, epochs=cfg.epochs,
                             batch_size=cfg.batch_size, lr=cfg.lr, method_params={**budget, **method_params},
                             seed=cfg.seed, eval_size=cfg.held_out).validate()


def trained(cfg: Config, method: str, *, progress: bool = True, **method_params):
    """Load `method`'s run for this profile from the checkpoint cache, or train it (see train.load_or_train)."""
    from . import train
    return train.load_or_train(train_config(cfg, method, **method_params), device=cfg.device, progress=progress)


def cached(cfg: Config, method: str, **method_params):
    """`method`'s finished run for this profile if the cache holds it, else None (nothing is trained)."""
    from . import train
    return train.load_cached(train_config(cfg, method, **method_params), device=cfg.device)


# ------------------------------------------------------------------------------------------- results
RESULTS_ENV = "D2R_RESULTS_DIR"


def save_results(cfg: Config, name: str, table) -> Path | None:
    """Write a chapter's ResultsTable (with its profile) to $D2R_RESULTS_DIR/<name>.json when that is set."""
    root = os.environ.get(RESULTS_ENV)
    if not root:
        return None
    path = Path(root) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": cfg.as_dict(), "table": table.to_dict()}, indent=1))
    return path


def collect_results(folder: str | Path) -> str:
    """All saved result tables of a run folder as one markdown document."""
    from .evaluate import ResultsTable
    parts = []
    for path in sorted(Path(folder).glob("*.json")):
        blob = json.loads(path.read_text())
        cfg = Config(**blob["config"])
        parts.append(ResultsTable.from_dict(blob["table"]).to_markdown(caption=f"{path.stem}: {cfg.describe()}"))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------- runner
def chapters() -> list[Path]:
    """The book's chapter notebooks, in order."""
    return sorted(CHAPTER_DIR.glob("[0-9][0-9]_*.ipynb"))


def run_chapters(profile: str, out: str | Path, *, select: list[str] | None = None, seed: int = 0,
                 device: str = "auto", extra: dict | None = None, kernel: str | None = None) -> list[dict]:
    """Execute chapters with papermill at `profile`; executed notebooks and result tables go to `out`."""
    import papermill

    validate.choice("profile", profile, PROFILES)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out {out} is a file; give a directory")
    todo = [p for p in chapters() if not select or any(p.name.startswith(s) for s in select)]
    if not todo:
        raise ValueError(f"no chapter matches {select}; chapters: {[p.stem for p in chapters()]}")
    out.mkdir(parents=True, exist_ok=True)
    os.environ[RESULTS_ENV] = str(out / "results")
    report = []
    for nb in todo:
        started = time.perf_counter()
        papermill.execute_notebook(str(nb), str(out / nb.name), cwd=str(nb.parent), kernel_name=kernel,
                                   parameters={"profile": profile, "seed": seed, "device": device, **(extra or {})},
                                   progress_bar=False)
        report.append({"chapter": nb.stem, "seconds": round(time.perf_counter() - started, 1)})
        print(f"{nb.stem}: {report[-1]['seconds']} s", flush=True)
    (out / "timings.json").write_text(json.dumps(report, indent=1))
    if (out / "results").is_dir():
        (out / "results.md").write_text(collect_results(out / "results"))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2r_lib.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="execute the chapters with papermill at a profile")
    p.add_argument("--profile", default="cpu", choices=list(PROFILES))
    p.add_argument("--out", type=Path, required=True, help="folder for executed notebooks, timings and results")
    p.add_argument("--chapters", nargs="*", default=None, help="chapter prefixes such as 01 07 (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=list(DEVICES))
    sub.add_parser("profiles", help="print the profiles")
    args = parser.parse_args(argv)
    if args.command == "profiles":
        print(json.dumps(PROFILES, indent=1))
        return 0
    try:
        run_chapters(args.profile, args.out, select=args.chapters, seed=args.seed, device=args.device)
    except (ValueError, NotADirectoryError) as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
