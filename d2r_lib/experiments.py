"""Profiles, one resolved configuration per chapter, the shared training runs and the results
tables. Every chapter uses it; chapter 9 shows it.

A chapter's `parameters` cell holds literals; `resolve(...)` fills whatever is None from the
profile, validates every value with a clear error, and prints the device once. `trained(cfg,
method)` loads a run from the checkpoint cache or trains it, so chapters with the same profile share
their models. `d2r profiles` prints `PROFILES` as a table; `d2r run` (see `runner`) executes
chapters at any profile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import validate

__all__ = [
    "PROFILES",
    "Profile",
    "Config",
    "DEVICES",
    "PROFILE_ENV",
    "RESULTS_ENV",
    "CHAPTER_RUNS",
    "PROFILE_FIELDS",
    "pick_device",
    "resolve",
    "flush_denormals",
    "profiles_table",
    "test_set",
    "train_config",
    "trained",
    "cached",
    "chapter_runs",
    "run_config",
    "save_results",
    "load_results",
    "collect_results",
    "cache_label",
]

DEVICES = ("auto", "cpu", "cuda", "mps")
PROFILE_ENV = "D2R_PROFILE"
RESULTS_ENV = "D2R_RESULTS_DIR"


@dataclass(frozen=True)
class Profile:
    """A named set of defaults for every chapter. Sizes of None mean the whole split.

    train_size: training images; test_size: test images for clean accuracy; attacked: the first test
    images that a chapter's evaluation attacks; held_out: test images of the per-epoch check during
    training. eps / step_size / steps of None keep each method's own training attack (the official
    0.031 / 0.007 / 10 of TRADES, LBGAT and D2R). Evaluation always follows the official protocol (ε
    = 8/255, PGD-20 and CW-20, step 2/255). `autoattack` names an `evaluate.AUTOATTACK_VERSIONS`
    entry or "off". fast: train with the attack on BatchNorm-folded copies and in channels_last
    memory format (`fast.py`; the same functions up to float rounding, not bit for bit the official
    arithmetic: the paper profiles keep it off).
    """

    purpose: str
    dataset: str
    subset: str
    train_size: int | None
    test_size: int | None
    attacked: int | None
    held_out: int
    epochs: int
    batch_size: int
    target_model: str
    guide_model: str
    autoattack: str
    eps: float | None = None
    step_size: float | None = None
    steps: int | None = None
    lr: float = 0.1
    fast: bool = False


PROFILE_FIELDS = tuple(f.name for f in dataclasses.fields(Profile) if f.name != "purpose")
"""The settings a chapter may override through `resolve(**overrides)` (and `d2r run -p
name=value`)."""

_PAPER = dict(
    subset="full",
    train_size=None,
    test_size=None,
    attacked=None,
    held_out=1000,
    epochs=100,
    batch_size=128,
    target_model="wrn34_10",
    guide_model="resnet18",
    autoattack="standard",
)

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "tests and nbval: seconds per notebook on 2 CPU cores",
        dataset="cifar10",
        subset="mini",
        train_size=256,
        test_size=64,
        attacked=32,
        held_out=32,
        epochs=1,
        batch_size=64,
        target_model="small_cnn",
        guide_model="small_cnn",
        autoattack="apgd-ce",
        steps=2,
        fast=True,  # the cpu profile's code paths, in seconds
    ),
    "cpu": Profile(
        "the rendered book, a laptop: minutes per chapter on lossless CIFAR-10 mini",
        dataset="cifar10",
        subset="mini",
        train_size=4000,
        test_size=1000,
        attacked=250,  # attacks are most of an evaluation's cost; the book's build stays < 15 min
        held_out=100,
        epochs=5,
        batch_size=128,
        target_model="small_cnn",
        guide_model="small_cnn",
        autoattack="fast",
        steps=5,
        fast=True,  # 1.5× the images per second of fit here (chapter 9)
    ),
    "gpu-short": Profile(
        "checks the GPU path with the paper's models: about ten minutes on one GPU",
        dataset="cifar10",
        subset="full",
        train_size=5000,
        test_size=1000,
        attacked=500,
        held_out=200,
        epochs=2,
        batch_size=128,
        target_model="wrn34_10",
        guide_model="resnet18",
        autoattack="fast",
    ),
    "full": Profile(
        "the paper: WRN-34-10 target, ResNet-18 guide, CIFAR-10, 100 epochs (GPU hours)",
        dataset="cifar10",
        **_PAPER,
    ),
    "full-preact": Profile(
        "the paper's PreActResNet-18 target, ResNet-18 guide, CIFAR-10, 100 epochs",
        dataset="cifar10",
        **{**_PAPER, "target_model": "preact_resnet18"},
    ),
    "full-cifar100": Profile(
        "the paper on CIFAR-100: WRN-34-10 target, ResNet-18 guide, 100 epochs",
        dataset="cifar100",
        **_PAPER,
    ),
    "full-tiny": Profile(
        "the paper on Tiny ImageNet (64×64, 200 classes): PreActResNet-18 target, "
        "ResNet-18 guide (layer 2 at stride 2), 100 epochs",
        dataset="tinyimagenet",
        **{**_PAPER, "target_model": "preact_resnet18", "guide_model": "resnet18_standard"},
    ),
    # the settings of reference.CONFIGS["reference"] (the runs shipped in book/reference): 20,000
    # of the full (JPEG) CIFAR-10 training images, 5 epochs, K = 5. reference.py evaluates on the
    # lossless test images, which one subset per profile cannot say: keep the two in step.
    "reference": Profile(
        "the shipped reference runs: several seeds with AutoAttack, hours of CPU once",
        dataset="cifar10",
        subset="full",
        train_size=20_000,
        test_size=1000,
        attacked=1000,
        held_out=500,
        epochs=5,
        batch_size=128,
        target_model="small_cnn",
        guide_model="small_cnn",
        autoattack="standard",
        steps=5,
    ),
}
"""Every profile by name; `profiles_table()` shows them side by side."""


@dataclass(frozen=True)
class Config:
    """A chapter's resolved parameters: every value set and checked; `extra` holds the chapter's
    declared extras."""

    profile: str
    seed: int
    device: str
    dataset: str
    subset: str
    train_size: int | None
    test_size: int | None
    attacked: int | None
    held_out: int
    epochs: int
    batch_size: int
    target_model: str
    guide_model: str
    autoattack: str
    eps: float | None
    step_size: float | None
    steps: int | None
    lr: float
    fast: bool = False
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line naming profile, seed, data and budget: print it beside every table."""

        def size(n):
            return "all" if n is None else n

        budget = f"steps={self.steps if self.steps is not None else 'method default'}"
        return (
            f"profile={self.profile} seed={self.seed} data={self.dataset}/{self.subset} "
            f"(train {size(self.train_size)}, test {size(self.test_size)}, "
            f"attacked {size(self.attacked)}) "
            f"target={self.target_model} guide={self.guide_model} epochs={self.epochs} "
            f"batch={self.batch_size} {budget}" + (" fast-paths" if self.fast else "")
        )


def pick_device(device: str = "auto") -> str:
    """ "auto" → cuda, else mps, else cpu; an unavailable explicit choice raises."""
    validate.choice("device", device, DEVICES)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' was asked for but no CUDA GPU is available; use device='auto' or 'cpu'"
        )
    return device


def _check_values(values: dict) -> None:
    from . import data, evaluate, methods, models  # local: keep `import d2r_lib.experiments` light

    validate.choice("dataset", values["dataset"], data.DATASETS)
    validate.choice("subset", values["subset"], data.DATASETS[values["dataset"]]["subsets"])
    for key in ("train_size", "test_size", "attacked"):
        if values[key] is not None:
            validate.number(key, values[key], min=1, integer=True)
    for key in methods.BUDGET:  # the attack budget: as each method declares it
        if values[key] is not None:
            methods.PARAMS[key].check(key, values[key])
    for key in ("held_out", "epochs", "batch_size"):
        validate.number(key, values[key], min=1, integer=True)
    validate.choice("target_model", values["target_model"], models.MODELS)
    validate.choice("guide_model", values["guide_model"], models.MODELS)
    validate.number("lr", values["lr"], min=0, min_open=True)
    validate.choice("autoattack", values["autoattack"], [*evaluate.AUTOATTACK_VERSIONS, "off"])
    validate.flag("fast", values["fast"])


def resolve(
    profile: str = "cpu",
    *,
    seed: int = 0,
    device: str = "auto",
    verbose: bool = True,
    extras: dict | None = None,
    from_env: bool = True,
    **overrides,
) -> Config:
    """Fill every None override from the profile, validate all values, pick and print the device.
    Chapter 1.

    overrides: profile settings (`PROFILE_FIELDS`); any other name raises, listing the allowed ones.
    extras: a chapter's own parameters (e.g. `{"beta_values": [1.0, 6.0]}` in chapter 3), kept in
    `cfg.extra`. The environment variable D2R_PROFILE, when set, replaces `profile` and says so in
    one printed line (the test suite runs the whole book at the smoke profile this way;
    from_env=False ignores it, as the runner does, which removes it from its kernels' environment).
    Nothing global changes: see `flush_denormals` for the one CPU setting chapters switch on
    explicitly.
    """
    unknown = sorted(set(overrides) - set(PROFILE_FIELDS))
    if unknown:
        raise ValueError(
            f"resolve() got unknown setting(s) {', '.join(map(repr, unknown))}; allowed: "
            f"{', '.join(PROFILE_FIELDS)} (a chapter's own values go in extras={{name: value}})"
        )
    if extras is not None and not isinstance(extras, dict):
        raise TypeError(
            f"extras must be a dict of a chapter's own parameters; got {type(extras).__name__}"
        )
    env = os.environ.get(PROFILE_ENV) if from_env else None
    if env:
        validate.choice(PROFILE_ENV, env, PROFILES)
        if env != profile and verbose:
            print(f"{PROFILE_ENV}={env} replaces this notebook's profile={profile!r}")
        profile = env
    validate.choice("profile", profile, PROFILES)
    validate.number("seed", seed, min=0, integer=True)
    values = {k: getattr(PROFILES[profile], k) for k in PROFILE_FIELDS}
    values.update({k: v for k, v in overrides.items() if v is not None})
    _check_values(values)
    cfg = Config(
        profile=profile, seed=seed, device=pick_device(device), extra=dict(extras or {}), **values
    )
    if verbose:
        print(f"device: {cfg.device} | {cfg.describe()}")
    return cfg


def flush_denormals(enabled: bool = True) -> bool:
    """Flush tiny ("denormal") floats to zero on the CPU: barely trained models are full of them and
    CPUs process them very slowly. A global torch setting, so chapters call it explicitly. Returns
    whether the CPU supports it. Chapter 1."""
    return torch.set_flush_denormal(bool(enabled))


def profiles_table(names=None) -> str:
    """The profiles side by side as a markdown table (`d2r profiles`, chapter 9)."""
    names = list(PROFILES) if names is None else list(names)
    for name in names:
        validate.choice("profile", name, PROFILES)

    def cell(key, value):
        if value is None:
            return "method's own" if key in ("eps", "step_size", "steps") else "all"
        return str(value)

    rows = [
        "| setting | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key in PROFILE_FIELDS:
        rows.append(
            f"| `{key}` | " + " | ".join(cell(key, getattr(PROFILES[n], key)) for n in names) + " |"
        )
    rows.append("| purpose | " + " | ".join(PROFILES[n].purpose for n in names) + " |")
    return "\n".join(rows)


# -------------------------------------------------------------------------------- data and training
def test_set(cfg: Config):
    """The profile's test images: the first `test_size` of the test split (Tiny ImageNet: the val
    split)."""
    from . import data

    split = "val" if cfg.dataset == "tinyimagenet" else "test"
    ds = data.load(cfg.dataset, split, cfg.subset, download=True)
    return ds.subset(cfg.test_size) if cfg.test_size is not None and cfg.test_size < len(ds) else ds


def train_config(cfg: Config, method: str, **method_params):
    """The TrainConfig of `method` under this profile's budget (same settings ⇒ same cached run)."""
    from . import methods, train

    m = methods.get_method(method)
    budget = {
        k: v
        for k, v in (("eps", cfg.eps), ("step_size", cfg.step_size), ("steps", cfg.steps))
        if v is not None and k in m.defaults
    }
    return train.TrainConfig(
        method=method,
        target_model=cfg.target_model,
        guide_model=cfg.guide_model,
        dataset=cfg.dataset,
        subset=cfg.subset,
        train_size=cfg.train_size,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        method_params={**budget, **method_params},
        seed=cfg.seed,
        held_out=cfg.held_out,
        channels_last=cfg.fast,
        fold_batchnorm=cfg.fast,
    ).validate()


def cache_label(text: str) -> str:
    """`text` with the checkpoint cache's absolute folder replaced by `<cache>`: the rendered book
    must not show the machine's home folder."""
    from . import train

    root = str(train.cache_dir())
    return str(text).replace(root, "<cache>")


def _relative_log(message: str = "", *args, **kwargs) -> None:
    print(cache_label(message), *args, **kwargs)


def trained(cfg: Config, method: str, *, progress: bool = True, **method_params):
    """Load `method`'s run for this profile from the checkpoint cache, or train it (see
    train.load_or_train). Messages name the run by its cache key, never by an absolute path, and
    training warnings point at the caller's line (a chapter cell), not at the library's files.
    progress=False: no bar, and one line for a run trained now (its last epoch) instead of one per
    epoch."""
    from . import train

    epochs = []

    def quiet(message: str = "", *args, **kwargs) -> None:
        # progress=False: one line per run (the last epoch's) instead of one per epoch
        if message.startswith("epoch "):
            epochs.append(message)
        else:
            _relative_log(message, *args, **kwargs)

    tc = train_config(cfg, method, **method_params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train.load_or_train(
            tc, device=cfg.device, progress=progress, log=_relative_log if progress else quiet
        )
    if epochs:
        print(f"trained {train.cache_path(tc).name}: {epochs[-1]}")
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    return result


def cached(cfg: Config, method: str, **method_params):
    """`method`'s finished run for this profile if the cache holds it, else None (nothing is
    trained)."""
    from . import train

    return train.load_cached(train_config(cfg, method, **method_params), device=cfg.device)


# The training runs each chapter needs, declared so that `d2r run --nproc-per-node N` can train them
# first under torchrun: chapter prefix → function of (cfg, the chapter's parameters) → [(method,
# method_params)].
_CH7_LIVE = "standard pgd_at trades mart lbgat d2r"
"""Chapter 7's default `live_methods` (the ablations are compared on the 2-D world and in the
reference runs; a user adds them to `live_methods` to train them live)."""


def _ch3(cfg, params):
    from . import methods

    default = methods.get_method("trades").defaults["beta"]
    betas = sorted({float(b) for b in str(params.get("betas", default)).split(",")})
    return [("standard", {}), ("trades", {}), ("pgd_at", {})] + [
        ("trades", {"beta": b}) for b in betas if b != default]


CHAPTER_RUNS = {
    "01": lambda cfg, params: [("standard", {})],
    "02": lambda cfg, params: [("standard", {}), ("pgd_at", {})],
    "03": _ch3,
    "04": lambda cfg, params: [("lbgat", {}), ("pgd_at", {}), ("trades", {}), ("standard", {})],
    "05": lambda cfg, params: [("d2r", {})],
    "06": lambda cfg, params: [("d2r", {})],
    "07": lambda cfg, params: [(name, {}) for name in str(params.get("live_methods",
                                                                     _CH7_LIVE)).split()],
    "08": lambda cfg, params: [(name, {}) for name in str(params.get("method_names", "")).split()],
    "09": lambda cfg, params: [("d2r", {})],
    "d2r_budget": lambda cfg, params: [("d2r", {"w_clean": params.get("w_clean", 20.0)})],
}


def run_config(profile: str, parameters: dict, device: str = "auto") -> Config:
    """The Config a chapter resolves from its parameters under `d2r run` (--nproc-per-node and
    --estimate), without printing; the runner's profile wins over D2R_PROFILE, as in its kernels."""
    fields = {k: v for k, v in parameters.items() if k in PROFILE_FIELDS}
    return resolve(profile, seed=parameters.get("seed", 0), device=device, verbose=False,
                   from_env=False, **fields)


def chapter_runs(chapter: str, cfg: Config, params: dict | None = None) -> list:
    """The TrainConfigs chapter `chapter` (a file stem such as "07_d2r_end_to_end") trains at
    `cfg`."""
    for prefix, runs in CHAPTER_RUNS.items():
        if chapter.startswith(prefix):
            return [train_config(cfg, method, **mp) for method, mp in runs(cfg, dict(params or {}))]
    return []


# ------------------------------------------------------------------------------------------ results
def save_results(cfg: Config, name: str, table) -> Path | None:
    """Write a chapter's ResultsTable (with its configuration) to $D2R_RESULTS_DIR/<name>.json when
    that is set (the runner sets it); returns the path, or None."""
    from . import checkpoint

    root = os.environ.get(RESULTS_ENV)
    if not root:
        return None
    path = Path(root) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"name": name, "config": cfg.as_dict(), "table": table.to_dict()}, indent=1)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def load_results(folder: str | Path) -> list[dict]:
    """The saved result tables of one run folder: [{"name", "config", "table": ResultsTable},
    ...]."""
    from .evaluate import ResultsTable

    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            blob = json.loads(path.read_text())
            item = {"name": blob.get("name", path.stem), "config": dict(blob["config"]),
                    "table": ResultsTable.from_dict(blob["table"])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            warnings.warn(f"skipped the damaged results file {path} ({type(err).__name__}: "
                          f"{err})", validate.D2RWarning, stacklevel=2)
            continue
        out.append(item)
    return out


def collect_results(folder: str | Path) -> str:
    """All saved result tables of a results folder as one markdown document."""
    parts = []
    for item in load_results(folder):
        cfg = Config(**item["config"])
        parts.append(item["table"].to_markdown(caption=f"{item['name']}: {cfg.describe()}"))
    return "\n\n".join(parts)
