"""The 2-D world: two-class data in [0, 1]², small MLPs and exact robust accuracy. Chapters 1–6 use
it.

In two dimensions a model's whole decision function can be drawn, and robust accuracy under an L∞
ball can be checked almost exactly by evaluating the model on a dense grid of each point's ball (its
boundary and corners included), so PGD's estimate can be compared with the truth.

A point is stored as a 1×1 image with two channels, shape (n, 2, 1, 1), with values in [0, 1]: every
attack of `d2r_lib.attacks` and every method of `d2r_lib.methods` applies unchanged, the [0, 1]
clamp included. `points(x)` gives the (n, 2) view for plotting.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import attacks, evaluate, methods, validate
from .train import cosine_lr

__all__ = [
    "EPS",
    "KINDS",
    "MLP",
    "STEPS",
    "ToyRun",
    "METRICS",
    "attack_params",
    "compare",
    "evaluate_terms",
    "exact_robust_accuracy",
    "fgsm_method",
    "grid_predictions",
    "make_data",
    "mlp",
    "pgd_accuracy",
    "plot_arrows",
    "plot_regions",
    "plot_target_vs_guide",
    "points",
    "robust_mask",
    "test_set",
    "train",
]

KINDS = ("moons", "rings")
EPS = 0.08
"""The toy's L∞ radius (in units of the [0, 1] square), about half the gap between the two moons."""
STEPS = 10
"""Attack steps used in training on the toy (step size EPS / 4)."""


# --------------------------------------------------------------------------------------------- data
def make_data(n: int = 2000, *, kind: str = "moons", seed: int = 0, noise: float = 0.04):
    """n points of two interleaved moons or two rings in [0, 1]², classes balanced. Chapter 1.

    Returns x of shape (n, 2, 1, 1) (float32, every value in [0, 1]) and y of shape (n,) (int64, 0
    or 1); the first n // 2 points are class 0, shuffled with the rest. noise: Gaussian standard
    deviation in units of the square. The same (n, kind, seed, noise) always gives the same points.
    """
    validate.number("n", n, min=2, integer=True)
    validate.choice("kind", kind, KINDS)
    validate.number("seed", seed, min=0, integer=True)
    validate.number("noise", noise, min=0)
    gen = torch.Generator().manual_seed(seed)
    counts = (n // 2, n - n // 2)
    parts, labels = [], []
    for label, count in enumerate(counts):
        if kind == "moons":
            theta = math.pi * torch.rand(count, generator=gen)
            if label == 0:
                xy = torch.stack([theta.cos(), theta.sin()], dim=1)
            else:
                xy = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
            xy = 0.5 + (xy - torch.tensor([0.5, 0.25])) / 3.5  # a fixed affine map into the square
        else:
            theta = 2 * math.pi * torch.rand(count, generator=gen)
            radius = 0.2 if label == 0 else 0.4
            xy = 0.5 + radius * torch.stack([theta.cos(), theta.sin()], dim=1)
        parts.append(xy + noise * torch.randn(count, 2, generator=gen))
        labels.append(torch.full((count,), label, dtype=torch.long))
    order = torch.randperm(n, generator=gen)
    x = torch.cat(parts)[order].clamp(0.0, 1.0).float()
    return x.view(n, 2, 1, 1), torch.cat(labels)[order]


def test_set(seed: int = 0, n: int = 500, *, kind: str = "moons", noise: float = 0.04):
    """Held-out points for runs of `train(seed=seed)`: `make_data(n, seed=10_000 + seed)`, never
    their training points (those use seed `seed`)."""
    validate.number("seed", seed, min=0, integer=True)
    return make_data(n, kind=kind, seed=10_000 + seed, noise=noise)


def points(x: torch.Tensor) -> torch.Tensor:
    """The (n, 2) coordinates of toy inputs of shape (n, 2, 1, 1) (or (n, 2)), detached, on the
    CPU."""
    return x.detach().reshape(x.shape[0], 2).cpu()


# ------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """Linear → BatchNorm → ReLU blocks and a linear head; takes (n, 2, 1, 1) or (n, 2) inputs."""

    def __init__(self, width: int = 32, depth: int = 2, num_classes: int = 2):
        super().__init__()
        layers, d = [nn.Flatten()], 2
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
            d = width
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(d, num_classes)

    def forward(self, x):
        return self.linear(self.features(x))


def mlp(width: int = 32, depth: int = 2, num_classes: int = 2) -> MLP:
    """A small MLP with BatchNorm (`depth` hidden layers of `width` units), usable as target or
    guide."""
    validate.number("width", width, min=1, integer=True)
    validate.number("depth", depth, min=1, integer=True)
    validate.number("num_classes", num_classes, min=2, integer=True)
    return MLP(width, depth, num_classes)


# ----------------------------------------------------------------------------------------- training
@dataclass
class ToyRun:
    """A trained toy run: models, the per-epoch mean of every loss term, and what made it."""
    method: methods.Method
    target: nn.Module
    guide: nn.Module | None
    history: list[dict]
    params: dict = field(default_factory=dict)
    seed: int = 0


def attack_params(method: str | methods.Method, eps: float = EPS, steps: int = STEPS,
                  step_size: float | None = None) -> dict:
    """The attack budget a method trains with on the toy ({} for a method without attack)."""
    m = method if isinstance(method, methods.Method) else methods.get_method(method)
    if "eps" not in m.defaults:
        return {}
    return {"eps": eps, "step_size": eps / 4 if step_size is None else step_size, "steps": steps}


def fgsm_method(random_start: bool) -> methods.Method:
    """FGSM adversarial training as a `methods.Method` (CE on one-step x′). Chapter 2.

    random_start=False: one step from x itself (train it with step_size = eps), the setting in which
    Wong et al. (2020) saw catastrophic overfitting; True: their repair, a uniform start in the ball
    (train it with step_size = 1.25 eps). Train with steps=1; `methods.train_step` runs it like any
    registry method.
    """
    validate.flag("random_start", random_start)
    start = "uniform" if random_start else "clean"
    name = "fgsm_rs_at" if random_start else "fgsm_at"
    text = ("FGSM training: CE on one signed-gradient step from "
            f"{'a uniform start' if random_start else 'x'}")
    base = methods.get_method("pgd_at")
    # a registry whose attack is a kind + start
    if "pgd_start" in {f.name for f in dataclasses.fields(base)}:
        return dataclasses.replace(base, name=name, description=text, pgd_start=start)

    def attack(target, guide, x, y, *, eps, step_size, steps):
        return attacks.pgd(target, x, y, eps=eps, step_size=step_size, steps=steps, start=start)

    return dataclasses.replace(base, name=name, description=text, attack=attack)


def train(method: str | methods.Method, *, seed: int = 0, epochs: int = 20, data=None,
          width: int = 32, depth: int = 2, batch_size: int = 500, lr: float = 0.02,
          eps: float = EPS, steps: int = STEPS, step_size: float | None = None,
          guide_width: int | None = None, schedule: str = "cosine", step=None,
          **params) -> ToyRun:
    """Train any registry method on the toy with `methods.train_step`, cosine learning rate.
    Chapter 1 onwards.

    data: (x, y) to train on (default `make_data(2000, seed=seed)`). The attack budget (eps,
    step_size = eps / 4, steps) replaces the method's CIFAR defaults; other method parameters (beta,
    w_clean, ...) pass through `params`. SGD with the official momentum 0.9 and weight decay 2e-4,
    but lr 0.02: at the official 0.1 the D2R loss diverges on the toy. A non-finite loss raises.
    guide_width: the guide's hidden width (default: `width`, a guide as large as the target).
    schedule: "cosine" or "constant" learning rate. step: a callable (target, optimizer, x, y) run
    instead of `methods.train_step` (the exercise checks train a learner's step this way); it may
    return a dict of loss terms. Models come back in eval mode.
    """
    m = method if isinstance(method, methods.Method) else methods.get_method(method)
    validate.number("seed", seed, min=0, integer=True)
    validate.number("epochs", epochs, min=1, integer=True)
    validate.number("batch_size", batch_size, min=2, integer=True)
    if guide_width is not None:
        validate.number("guide_width", guide_width, min=1, integer=True)
    validate.choice("schedule", schedule, ("cosine", "constant"))
    if step is not None and not callable(step):
        raise TypeError(f"step must be a callable (target, optimizer, x, y); got {step!r}")
    budget = attack_params(m, eps, steps, step_size)
    all_params = {**budget, **params}
    m.resolve(**all_params)  # unknown or invalid parameters fail before any work
    x, y = make_data(2000, seed=seed) if data is None else data
    _check_model_data(x, y)
    torch.manual_seed(seed)
    target = mlp(width, depth)
    guide = mlp(guide_width or width, depth) if m.uses_guide else None
    optimizer = methods.make_optimizer(target, guide, lr=lr)
    order_gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        rate = cosine_lr(epoch, epochs, lr) if schedule == "cosine" else lr
        for group in optimizer.param_groups:
            group["lr"] = rate
        sums, seen = {}, 0
        order = torch.randperm(len(y), generator=order_gen)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:                       # BatchNorm needs two points
                continue
            if step is None:
                terms = methods.train_step(m, target, guide, optimizer, x[idx], y[idx],
                                           **all_params)
            else:
                terms = step(target, optimizer, x[idx], y[idx]) or {}
            if not all(math.isfinite(v) for v in terms.values()):
                raise FloatingPointError(f"toy.train({m.name!r}): non-finite loss at epoch {epoch} "
                                         f"({terms}); lower lr (now {lr})")
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            seen += len(idx)
        history.append({"epoch": epoch, "lr": rate, **{k: v / seen for k, v in sums.items()}})
    target.eval()
    if guide is not None:
        guide.eval()
    return ToyRun(m, target, guide, history, all_params, seed)


# --------------------------------------------------------------------------------------- evaluation
def _check_model_data(x, y):
    validate.images(x)
    if x.shape[1:] != (2, 1, 1):
        raise ValueError(f"x must hold toy points of shape (n, 2, 1, 1); got {tuple(x.shape)}")
    validate.labels(y, 2 if y.numel() == 0 else max(2, int(y.max()) + 1), x.shape[0])


def _ball_offsets(eps: float, grid: int) -> torch.Tensor:
    ticks = torch.linspace(-eps, eps, grid)
    dx, dy = torch.meshgrid(ticks, ticks, indexing="ij")
    # grid² offsets, corners and edges included
    return torch.stack([dx.flatten(), dy.flatten()], dim=1)


@torch.no_grad()
def robust_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                grid: int = 41, chunk: int = 200_000) -> torch.Tensor:
    """Per point: is the model right on every point of a grid × grid lattice over its L∞ ball?
    Chapter 1.

    The lattice spans [x − ε, x + ε]² with both ends included (so the ball's corners and edges are
    checked), clamped to [0, 1]² as the attacks clamp. Model in eval mode, modes restored. A finer
    lattice can only turn True into False; PGD's estimate can be below the lattice's only through
    gaps between its points.
    """
    _check_model_data(x, y)
    validate.eps(eps)
    validate.number("grid", grid, min=2, integer=True)
    offsets = _ball_offsets(eps, grid).to(x.device, x.dtype)
    xy = x.reshape(-1, 2)
    robust = torch.ones(len(y), dtype=torch.bool, device=x.device)
    per_chunk = max(1, chunk // len(offsets))
    with attacks.eval_mode(model):
        for i in range(0, len(y), per_chunk):
            ball = (xy[i:i + per_chunk, None, :] + offsets[None]).clamp(0.0, 1.0)
            n = ball.shape[0]
            pred = model(ball.reshape(-1, 2, 1, 1)).argmax(1).view(n, -1)
            robust[i:i + n] = (pred == y[i:i + n, None]).all(dim=1)
    return robust


def exact_robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                          grid: int = 41) -> float:
    """The fraction of points whose whole L∞ ball (a dense lattice, see `robust_mask`) is classified
    right."""
    mask = robust_mask(model, x, y, eps, grid=grid)
    return mask.sum().item() / len(mask)            # a count over n, like evaluate's accuracies


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                 seed: int = 0) -> float:
    """PGD-20's estimate of robust accuracy (step ε/4, uniform start, early stop):
    `evaluate.robust_accuracy`."""
    _check_model_data(x, y)
    return evaluate.robust_accuracy(model, x, y, "pgd20", eps=eps, seed=seed, batch_size=len(y))


def evaluate_terms(run: ToyRun, x: torch.Tensor, y: torch.Tensor, *,
                   seed: int = 0) -> dict[str, float]:
    """The run's own loss terms on (x, y): its attack, then `methods.compute_terms`, both in eval
    mode."""
    _check_model_data(x, y)
    models_ = [run.target] + ([run.guide] if run.guide is not None else [])
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with attacks.eval_mode(*models_):
            x_adv = methods.make_adversarial(run.method, run.target, run.guide, x, y,
                                             **run.params)
            with torch.no_grad():
                terms = methods.compute_terms(run.method, run.target, run.guide, x, x_adv, y,
                                              **run.params)
    finally:
        torch.random.set_rng_state(state)
    return {k: v.item() for k, v in terms.items()}


METRICS = ("clean", "pgd20", "exact")
"""What `compare` measures on each run: clean, PGD-20 and exact robust accuracy at EPS."""


def compare(method_names, seeds, *, n_test: int = 500, grid: int = 21, **train_kw) -> list[dict]:
    """Train every method once per seed and measure `METRICS` on that seed's test set. Chapter 7.

    Returns one dict per run, {"method", "seed", "metrics"}, the shape `reference.summary` and
    `reference.paired` take: runs with the same seed share the training data, the initialisation
    seed, the batch order and the test points, so differences can be paired by seed.
    """
    names = [methods.get_method(name).name for name in method_names]
    seeds = [validate.number("seeds entry", s, min=0, integer=True) for s in seeds]
    if not names or not seeds:
        raise ValueError("compare needs at least one method and one seed")
    runs = []
    for seed in seeds:
        x, y = test_set(seed=seed, n=n_test)
        for name in names:
            run = train(name, seed=seed, **train_kw)
            runs.append({"method": name, "seed": seed, "metrics": {
                "clean": evaluate.accuracy(run.target, x, y),
                "pgd20": pgd_accuracy(run.target, x, y, EPS, seed=seed),
                "exact": exact_robust_accuracy(run.target, x, y, EPS, grid=grid)}})
    return runs


# ----------------------------------------------------------------------------------------- plotting
@torch.no_grad()
def grid_predictions(model: nn.Module, resolution: int = 200) -> torch.Tensor:
    """p(class 1) of `model` (eval mode) on a resolution × resolution grid of [0, 1]²; rows are
    y."""
    validate.number("resolution", resolution, min=2, integer=True)
    ticks = torch.linspace(0, 1, resolution)
    gy, gx = torch.meshgrid(ticks, ticks, indexing="ij")
    grid = torch.stack([gx.flatten(), gy.flatten()], dim=1).view(-1, 2, 1, 1)
    device = next(model.parameters()).device
    with attacks.eval_mode(model):
        p = F.softmax(model(grid.to(device)), dim=1)[:, 1]
    return p.view(resolution, resolution).cpu()


def _draw(ax, model, x, y, *, title=None, resolution=200, boundary_of=None, show_points=True):
    probs = grid_predictions(model, resolution)
    ax.imshow(probs.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="RdBu_r", vmin=0, vmax=1,
              alpha=0.55)
    ax.contour(probs.numpy(), levels=[0.5], origin="lower", extent=(0, 1, 0, 1), colors="black",
               linewidths=1.5)
    if boundary_of is not None:
        other = grid_predictions(boundary_of, resolution)
        ax.contour(other.numpy(), levels=[0.5], origin="lower", extent=(0, 1, 0, 1),
                   colors="darkgreen", linewidths=1.5, linestyles="--")
    if show_points and x is not None:
        pts = points(x)
        ax.scatter(pts[:, 0], pts[:, 1], c=y.cpu(), cmap="bwr", s=6, edgecolors="none", vmin=0,
                   vmax=1)
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _colour_bar(fig, axes) -> None:
    """The scale of the region colour: p(class 1), from 0 (blue) to 1 (red)."""
    import matplotlib as mpl
    scale = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap="RdBu_r")
    fig.colorbar(scale, ax=axes, shrink=0.8, label="p(class 1)")


def _figure(n, size=3.2):
    import matplotlib.pyplot as plt
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_regions(models: dict[str, nn.Module] | nn.Module, x=None, y=None, *,
                 resolution: int = 200, title: str | None = None):
    """Decision regions (colour: p(class 1), black line: the boundary) of one or several models.
    Chapter 1.

    models: a model or {panel title: model}; x, y: points drawn on top (optional). Returns the
    figure.
    """
    if isinstance(models, nn.Module):
        models = {"": models}
    fig, axes = _figure(len(models))
    for ax, (name, model) in zip(axes, models.items()):
        _draw(ax, model, x, y, title=name, resolution=resolution)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _colour_bar(fig, axes)
    return fig


def plot_arrows(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                x_adv: dict[str, torch.Tensor], *, eps: float | None = None,
                resolution: int = 200, title: str | None = None,
                background: dict[str, nn.Module] | None = None):
    """One panel per attack: the model's regions and an arrow from each x to its x′.
    Chapters 1 and 6.

    x_adv: {attack name: x′}. eps draws each point's L∞ ball as a square. An arrow is red when the
    model's prediction at x′ is wrong. background: {attack name: model} draws another model's
    regions in that panel.
    """
    fig, axes = _figure(len(x_adv), size=3.6)
    pts = points(x)
    for ax, (name, xa) in zip(axes, x_adv.items()):
        shown = (background or {}).get(name, model)
        _draw(ax, shown, None, None, title=name, resolution=resolution)
        with torch.no_grad(), attacks.eval_mode(model):
            wrong = (model(xa).argmax(1) != y).cpu()
        ends = points(xa)
        ax.scatter(pts[:, 0], pts[:, 1], c=y.cpu(), cmap="bwr", s=10, vmin=0, vmax=1,
                   edgecolors="k", linewidths=0.3)
        for (x0, y0), (x1, y1), bad in zip(pts.tolist(), ends.tolist(), wrong.tolist()):
            if eps is not None:
                ax.add_patch(_square(x0, y0, eps))
            if (x1 - x0) ** 2 + (y1 - y0) ** 2 > 1e-10:
                ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                            arrowprops={"arrowstyle": "->", "lw": 0.8,
                                        "color": "crimson" if bad else "black"})
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _colour_bar(fig, axes)
    return fig


def _square(x0, y0, eps):
    from matplotlib.patches import Rectangle
    return Rectangle((x0 - eps, y0 - eps), 2 * eps, 2 * eps, fill=False, lw=0.4, color="grey")


def plot_target_vs_guide(runs: dict[str, ToyRun], x=None, y=None, *, resolution: int = 200,
                         title: str | None = None):
    """Per run: the target's regions, its boundary (black) and the guide's boundary (green, dashed).

    Chapters 4 and 5: how each loss shapes the target against the guide. Runs without a guide show
    the target alone.
    """
    fig, axes = _figure(len(runs))
    for ax, (name, run) in zip(axes, runs.items()):
        _draw(ax, run.target, x, y, title=name, resolution=resolution, boundary_of=run.guide)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _colour_bar(fig, axes)
    return fig
