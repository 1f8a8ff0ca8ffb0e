"""ipywidgets explorers for the chapters (chapter 1: `eps_explorer`; chapters 5–7: `perturbation_explorer`,
`terms_explorer`).

Each explorer first draws a static matplotlib figure (what the rendered book shows), then, when ipywidgets
is installed, displays the interactive controls under it (live when a kernel is attached).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from . import attacks
from .plot import TERM_LABELS, _hwc


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
        axes[0, j].imshow(_hwc(x_adv[0]), interpolation="nearest")
        colour = "black" if pred == int(y[0]) else "crimson"
        axes[0, j].set_title(f"ε = {eps * 255:.0f}/255\n{classes[pred]} {100 * p[pred]:.0f}%", fontsize=8, color=colour)
        axes[1, j].imshow(_hwc(0.5 + delta * (0.5 / max(eps, 1e-12))), interpolation="nearest")
        axes[1, j].set_xlabel("δ (amplified)", fontsize=7)
        for ax in axes[:, j]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{attack.upper()} on one image (true class: {classes[int(y[0])]})", fontsize=10)
    fig.tight_layout()
    return fig


def eps_explorer(model, x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], *, attack: str = "pgd",
                 eps_list: Sequence[float] = (0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255), index: int = 0):
    """An ε slider: the image, its perturbation and the model's prediction as ε grows. Chapter 1.

    Returns the static figure (one column per ε in `eps_list`, for image `index`).
    """
    if attack not in ("pgd", "fgsm"):
        raise ValueError(f"attack must be 'pgd' or 'fgsm'; got {attack!r}")
    if not 0 <= index < len(x):
        raise ValueError(f"index must be in [0, {len(x) - 1}]; got {index}")
    fig = _eps_figure(model, x[index:index + 1], y[index:index + 1], classes, list(eps_list), attack)
    w = _widgets()
    if w is None:
        return fig
    eps_slider = w.IntSlider(value=8, min=0, max=16, step=1, description="ε ×255")
    img_slider = w.IntSlider(value=index, min=0, max=len(x) - 1, description="image")
    out = w.Output()

    def redraw(_=None):
        i, eps = img_slider.value, eps_slider.value / 255
        with out:
            out.clear_output(wait=True)
            f = _eps_figure(model, x[i:i + 1], y[i:i + 1], classes, [0, eps], attack)
            _display(f)
            plt.close(f)

    eps_slider.observe(redraw, names="value")
    img_slider.observe(redraw, names="value")
    _display(w.VBox([w.HBox([eps_slider, img_slider]), out]))
    return fig


def _perturbation_figure(perturbations, indices):
    names = list(perturbations)
    fig, axes = plt.subplots(len(indices), len(names) + 1, figsize=(1.8 * (len(names) + 1), 1.9 * len(indices)),
                             squeeze=False)
    for r, i in enumerate(indices):
        x0 = next(iter(perturbations.values()))[0][i]
        axes[r, 0].imshow(_hwc(x0), interpolation="nearest")
        if r == 0:
            axes[r, 0].set_title("x", fontsize=8)
        for c, name in enumerate(names, start=1):
            x, x_adv = perturbations[name]
            delta = (x_adv[i] - x[i])
            scale = 0.5 / max(delta.abs().max().item(), 1e-12)
            axes[r, c].imshow(_hwc(0.5 + scale * delta), interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(f"δ {name}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig


def perturbation_explorer(perturbations: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, n_static: int = 3):
    """Compare methods' perturbations: {name: (x, x_adv)} with the same x. Chapters 6 and 7.

    Static figure: the first `n_static` images, δ of every method side by side (amplified).
    """
    if not perturbations:
        raise ValueError("perturbations must name at least one method: {name: (x, x_adv)}")
    n = len(next(iter(perturbations.values()))[0])
    fig = _perturbation_figure(perturbations, list(range(min(n_static, n))))
    w = _widgets()
    if w is None:
        return fig
    img = w.IntSlider(value=0, min=0, max=n - 1, description="image")
    out = w.Output()

    def redraw(_=None):
        with out:
            out.clear_output(wait=True)
            f = _perturbation_figure(perturbations, [img.value])
            _display(f)
            plt.close(f)

    img.observe(redraw, names="value")
    _display(w.VBox([img, out]))
    return fig


def _terms_figure(histories, term):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, hist in histories.items():
        values = [r.get(f"train_{term}") for r in hist]
        if any(v is not None for v in values):
            ax.plot([r["epoch"] for r in hist], values, marker="o", label=name)
    ax.set_xlabel("epoch"), ax.set_ylabel(TERM_LABELS.get(term, term))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def terms_explorer(histories: Mapping[str, Sequence[Mapping]], *, default: str = "loss"):
    """Pick a loss term and see it per epoch for every run that logged it. Chapters 5 and 7."""
    terms = sorted({k[6:] for hist in histories.values() for r in hist for k in r if k.startswith("train_")})
    if default not in terms:
        raise ValueError(f"default must be one of {terms}; got {default!r}")
    fig = _terms_figure(histories, default)
    w = _widgets()
    if w is None:
        return fig
    pick = w.Dropdown(options=terms, value=default, description="term")
    out = w.Output()

    def redraw(_=None):
        with out:
            out.clear_output(wait=True)
            f = _terms_figure(histories, pick.value)
            _display(f)
            plt.close(f)

    pick.observe(redraw, names="value")
    _display(w.VBox([pick, out]))
    return fig
