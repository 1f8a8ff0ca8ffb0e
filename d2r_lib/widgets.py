"""ipywidgets explorers for the chapters: `eps_explorer` (chapter 1), `perturbation_explorer` and
`terms_explorer` (chapters 5–7).

Each explorer returns a static matplotlib figure (what a printed page shows) and, when ipywidgets is
installed, displays controls above a stack of pre-drawn frames. The controls are linked to the
stack in the browser (`jslink`), so they respond in the rendered HTML book too, with no kernel
behind the page.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from . import attacks
from .plot import TERM_LABELS, to_hwc

__all__ = ["eps_explorer", "perturbation_explorer", "terms_explorer", "frame_stack"]

EPS_STEPS = tuple(range(0, 17, 2))  # ε × 255 offered by the chapter 1 slider


def _display(obj) -> None:
    try:
        from IPython.display import display
    except ImportError:  # plain Python: nothing to show
        return
    display(obj)


def _widgets():
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def frame_stack(frames: Sequence[bytes], control, *, trait: str = "index"):
    """A `Stack` of PNG frames whose visible child follows `control.<trait>` in the browser. Chapter
    1.

    `jslink` keeps the link in the page's JavaScript, so it works in static HTML as well as in a
    kernel.
    """
    w = _widgets()
    stack = w.Stack([w.Image(value=f, format="png") for f in frames])
    w.jslink((control, trait), (stack, "selected_index"))
    return stack


def _attack_one(model, x, y, eps, attack):
    torch.manual_seed(0)
    if eps == 0:
        return x.clone()
    if attack == "fgsm":
        return attacks.fgsm(model, x, y, eps=eps)
    return attacks.pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10)


def _eps_figure(model, x, y, classes, eps_list, attack):
    fig, axes = plt.subplots(2, len(eps_list), figsize=(1.9 * len(eps_list), 4.3), squeeze=False)
    for j, eps in enumerate(eps_list):
        x_adv = _attack_one(model, x, y, eps, attack)
        with torch.no_grad(), attacks.eval_mode(model):
            p = torch.softmax(model(x_adv), 1)[0]
        pred = int(p.argmax())
        delta = (x_adv - x)[0]
        axes[0, j].imshow(to_hwc(x_adv[0]), interpolation="nearest")
        colour = "black" if pred == int(y[0]) else "crimson"
        axes[0, j].set_title(f"ε = {eps * 255:.0f}/255\n{classes[pred]} {100 * p[pred]:.0f}%",
                             fontsize=8, color=colour)
        axes[1, j].imshow(to_hwc(0.5 + delta * (0.5 / max(eps, 1e-12))), interpolation="nearest")
        axes[1, j].set_xlabel("δ (amplified)", fontsize=7)
        for ax in axes[:, j]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{attack.upper()} on one image (true class: {classes[int(y[0])]})", fontsize=10)
    fig.tight_layout()
    return fig


def _eps_frame(model, x, y, classes, eps, attack):
    """One frame of the slider: x′ and its perturbation side by side for one ε."""
    x_adv = _attack_one(model, x, y, eps, attack)
    with torch.no_grad(), attacks.eval_mode(model):
        p = torch.softmax(model(x_adv), 1)[0]
    pred = int(p.argmax())
    fig, (left, right) = plt.subplots(1, 2, figsize=(4.2, 2.4))
    left.imshow(to_hwc(x_adv[0]), interpolation="nearest")
    right.imshow(to_hwc(0.5 + (x_adv - x)[0] * (0.5 / max(eps, 1e-12))), interpolation="nearest")
    left.set_xlabel(f"x′: {classes[pred]} {100 * p[pred]:.0f}%", fontsize=8,
                    color="black" if pred == int(y[0]) else "crimson")
    right.set_xlabel("δ (amplified)", fontsize=8)
    for ax in (left, right):
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{attack.upper()}, ε = {eps * 255:.0f}/255 (true class: {classes[int(y[0])]})",
                 fontsize=9)
    fig.tight_layout()
    return fig


def eps_explorer(model, x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], *,
                 attack: str = "pgd",
                 eps_list: Sequence[float] = (0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255),
                 index: int = 0, n_images: int = 3):
    """An ε slider: the image, its perturbation and the model's prediction as ε grows. Chapter 1.

    Returns the static figure (one column per ε in `eps_list`, for image `index`). The interactive
    version offers ε ∈ {0, 2, …, 16}/255 for `n_images` images starting at `index`.
    """
    if attack not in ("pgd", "fgsm"):
        raise ValueError(f"attack must be 'pgd' or 'fgsm'; got {attack!r}")
    if not 0 <= index < len(x):
        raise ValueError(f"index must be in [0, {len(x) - 1}]; got {index}")
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive int; got {n_images!r}")
    one = slice(index, index + 1)
    fig = _eps_figure(model, x[one], y[one], classes, list(eps_list), attack)
    w = _widgets()
    if w is None:
        return fig
    images = list(range(index, min(index + n_images, len(x))))
    eps_slider = w.SelectionSlider(options=[f"{e}/255" for e in EPS_STEPS], value="8/255",
                                   description="ε")
    img_slider = w.IntSlider(value=0, min=0, max=len(images) - 1, description="image")
    per_image = []
    for i in images:
        frames = [_png(_eps_frame(model, x[i:i + 1], y[i:i + 1], classes, e / 255, attack))
                  for e in EPS_STEPS]
        per_image.append(frame_stack(frames, eps_slider))
    outer = w.Stack(per_image)
    w.jslink((img_slider, "value"), (outer, "selected_index"))
    _display(w.VBox([w.HBox([eps_slider, img_slider]), outer]))
    return fig


def _perturbation_figure(perturbations, indices):
    names = list(perturbations)
    fig, axes = plt.subplots(len(indices), len(names) + 1,
                             figsize=(1.8 * (len(names) + 1), 1.9 * len(indices)), squeeze=False)
    for r, i in enumerate(indices):
        x0 = next(iter(perturbations.values()))[0][i]
        axes[r, 0].imshow(to_hwc(x0), interpolation="nearest")
        if r == 0:
            axes[r, 0].set_title("x", fontsize=8)
        for c, name in enumerate(names, start=1):
            x, x_adv = perturbations[name]
            delta = (x_adv[i] - x[i])
            scale = 0.5 / max(delta.abs().max().item(), 1e-12)
            axes[r, c].imshow(to_hwc(0.5 + scale * delta), interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(f"δ {name}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig


def perturbation_explorer(perturbations: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                          n_static: int = 3, n_frames: int = 12):
    """Compare methods' perturbations: {name: (x, x_adv)} with the same x. Chapters 6 and 7.

    Static figure: the first `n_static` images, δ of every method side by side (amplified); the
    slider
    steps through the first `n_frames` images.
    """
    if not perturbations:
        raise ValueError("perturbations must name at least one method: {name: (x, x_adv)}")
    n = len(next(iter(perturbations.values()))[0])
    fig = _perturbation_figure(perturbations, list(range(min(n_static, n))))
    w = _widgets()
    if w is None:
        return fig
    count = min(n_frames, n)
    img = w.IntSlider(value=0, min=0, max=count - 1, description="image")
    frames = [_png(_perturbation_figure(perturbations, [i])) for i in range(count)]
    _display(w.VBox([img, frame_stack(frames, img, trait="value")]))
    return fig


def _terms_figure(histories, term):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, hist in histories.items():
        values = [r.get(f"train_{term}") for r in hist]
        if any(v is not None for v in values):
            ax.plot([r["epoch"] for r in hist], values, marker="o", label=name)
    ax.set_xlabel("epoch"), ax.set_ylabel(TERM_LABELS.get(term, term))
    ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def terms_explorer(histories: Mapping[str, Sequence[Mapping]], *, default: str = "loss"):
    """Pick a loss term and see it per epoch for every run that logged it. Chapters 5 and 7."""
    terms = sorted({k[6:] for hist in histories.values() for r in hist for k in r
                    if k.startswith("train_")})
    if default not in terms:
        raise ValueError(f"default must be one of {terms}; got {default!r}")
    fig = _terms_figure(histories, default)
    w = _widgets()
    if w is None:
        return fig
    pick = w.Dropdown(options=terms, value=default, description="term")
    frames = [_png(_terms_figure(histories, term)) for term in terms]
    _display(w.VBox([pick, frame_stack(frames, pick)]))
    return fig
