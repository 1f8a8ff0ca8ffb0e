"""Matplotlib figures shared by the chapters. Chapter 1 introduces `image_grid`; chapter 2
`training_curves`.

Each function returns the figure and never calls `plt.show()`: a notebook shows the returned figure.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["TERM_LABELS", "to_hwc", "image_grid", "training_curves", "compare_histories",
           "accuracy_vs_eps", "results_bars", "integer_epochs", "sweep_over_seeds"]

TERM_LABELS = {
    "loss": "total loss", "ce": "cross-entropy", "mse": "MSE(f(x′), g(x))",
    "clean": "|KL(f‖g) − KL(g‖f)| (clean)", "adv": "KL(p_f(x′) ‖ p_g(x)) (adv)",
    "kl_fg": "KL(p_f(x) ‖ p_g(x))", "kl_gf": "KL(p_g(x) ‖ p_f(x))",
    "kl": "KL term", "bce": "boosted CE",
}


def to_hwc(img: torch.Tensor) -> np.ndarray:
    """A CHW image tensor as an HWC array in [0, 1] for imshow. Chapter 1."""
    return img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def image_grid(x: torch.Tensor, x_adv: torch.Tensor, *, labels=None, preds_clean=None,
               preds_adv=None, classes: Sequence[str] | None = None, n: int = 6,
               amplify: float | None = None, title: str | None = None):
    """Rows: x, the perturbation δ = x′ − x (amplified to the full colour range), x′. Chapter 1."""
    n = min(n, len(x))
    delta = (x_adv[:n] - x[:n]).detach().cpu()
    scale = amplify if amplify is not None else 0.5 / max(delta.abs().max().item(), 1e-12)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), squeeze=False)
    name = (lambda c: classes[int(c)]) if classes is not None else (lambda c: str(int(c)))
    for i in range(n):
        rows = [(x[i], "x"), (0.5 + scale * delta[i], f"δ ×{scale:.0f}"), (x_adv[i], "x′")]
        for r, (img, label) in enumerate(rows):
            ax = axes[r, i]
            ax.imshow(to_hwc(img), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label)
        if labels is not None:
            axes[0, i].set_title(f"true: {name(labels[i])}", fontsize=8)
        if preds_clean is not None:
            axes[0, i].set_xlabel(f"pred: {name(preds_clean[i])}", fontsize=8)
        if preds_adv is not None:
            wrong = labels is not None and int(preds_adv[i]) != int(labels[i])
            axes[2, i].set_xlabel(f"pred: {name(preds_adv[i])}", fontsize=8,
                                  color="crimson" if wrong else "black")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def integer_epochs(ax) -> None:
    """Epoch axis with whole-number ticks only. Chapter 2."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def sweep_over_seeds(rows: Sequence[Mapping], x: str, metrics: Mapping[str, str], *,
                     title: str | None = None, xlabel: str | None = None):
    """One panel per metric: its mean over seeds against `x` (line) and the band from the lowest to
    the highest seed. rows: dicts holding `x`, "seed" and each metric (fractions, drawn in %, axis
    from 0). metrics: {key: panel title}. Chapter 5."""
    xs = sorted({r[x] for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics.items()):
        per_x = [[100 * r[key] for r in rows if r[x] == v] for v in xs]
        mean = [float(np.mean(v)) for v in per_x]
        line, = ax.plot(xs, mean, marker="o", label="mean over seeds")
        ax.fill_between(xs, [min(v) for v in per_x], [max(v) for v in per_x], alpha=0.25,
                        color=line.get_color(), label="lowest to highest seed")
        ax.set_ylim(0, 100)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(xlabel or x), ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_curves(history: Sequence[Mapping], *, terms: Sequence[str] | None = None,
                    title: str | None = None, labels: Mapping[str, str] | None = None):
    """Left: every training loss term per epoch (log scale); right: held-out clean and PGD accuracy.
    Chapter 2.

    labels: legend text per term, e.g. {"ce": "CE(g(x), y)"} for the guided methods (default:
    TERM_LABELS).
    """
    names = {**TERM_LABELS, **(labels or {})}
    epochs = [r["epoch"] for r in history]
    keys = terms or [k[6:] for k in history[0] if k.startswith("train_")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for k in keys:
        values = [r.get(f"train_{k}") for r in history]
        if all(v is not None and v > 0 for v in values):
            ax1.plot(epochs, values, marker="o", label=names.get(k, k))
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("training loss term (epoch mean)")
    integer_epochs(ax1)
    ax1.legend(fontsize=7)
    if "clean_acc" in history[0]:
        ax2.plot(epochs, [100 * r["clean_acc"] for r in history], marker="o", label="clean")
        ax2.plot(epochs, [100 * r["pgd_acc"] for r in history], marker="s", label="PGD-20")
        ax2.set_xlabel("epoch"), ax2.set_ylabel("held-out accuracy (%)")
        ax2.set_ylim(0, 100)
        integer_epochs(ax2)
        ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def compare_histories(histories: Mapping[str, Sequence[Mapping]], *, keys=("clean_acc", "pgd_acc"),
                      title: str | None = None):
    """Held-out accuracy per epoch for several methods, one panel per key. Chapter 7."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, hist in histories.items():
            ax.plot([r["epoch"] for r in hist], [100 * r[key] for r in hist], marker="o",
                    label=name)
        ax.set_xlabel("epoch"), ax.set_ylabel(f"{key.replace('_acc', '')} accuracy (%)")
        ax.set_ylim(0, 100)
        integer_epochs(ax)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_vs_eps(curves: Mapping[str, Sequence[tuple[float, float]]], *,
                    title: str | None = None, in_255: bool = True):
    """Accuracy against ε for each named curve of (ε, accuracy) pairs. Chapters 1 and 8."""
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    for name, points in curves.items():
        eps = [e * 255 if in_255 else e for e, _ in points]
        ax.plot(eps, [100 * a for _, a in points], marker="o", label=name)
    ax.set_xlabel("ε (×1/255)" if in_255 else "ε")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def results_bars(table: Mapping[str, Mapping[str, float]], *, title: str | None = None):
    """Grouped bars: one group per method, one bar per attack (accuracies as fractions). Chapters 7
    and 8."""
    names = list(table)
    attacks = list(next(iter(table.values())))
    width = 0.8 / len(attacks)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 2), 3.8))
    for j, attack in enumerate(attacks):
        ax.bar(np.arange(len(names)) + j * width,
               [100 * table[n].get(attack, np.nan) for n in names], width, label=attack)
    ax.set_xticks(np.arange(len(names)) + width * (len(attacks) - 1) / 2, names, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
