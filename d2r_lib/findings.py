"""What the registered follow-ups found (chapter 7, "What we found"): the budget trend, the dose of
D2R's adversarial term, the guide's confidence, and the 2-D studies, as tables of paired intervals
with the verdict each registered rule gives, and the figures that show them.

Every comparison here is one that `followups.FOLLOWUPS` registered before its runs existed; the
functions read the shipped runs (`reference.load`) and the 2-D study files, and never train.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import followups, reference, shipped, validate

__all__ = [
    "load", "by_budget", "budget_gaps", "gap_change", "dose_runs", "dose_slope", "last_epoch",
    "guide_gap", "first_decay_epoch", "late_change", "load_toy", "load_toys", "toy_select",
    "toy_diverged", "toy_mean", "toy_gap_change", "toy_budget_gaps", "toy_slope", "toy_paired",
    "registered", "describe", "plot_pareto", "plot_trend", "plot_dose", "plot_confidence",
]

D2R = "d2r"


# -------------------------------------------------------------------------------------------- CIFAR
def load(root: str | Path) -> dict[str, list[dict]]:
    """The shipped follow-up runs under `root` (book/followups): {"e10": runs, "e20": runs,
    "dose": runs}, each as `reference.load` returns them ([] where none is shipped yet)."""
    root = shipped.find(root)
    return {name: reference.load(root / name) for name in ("e10", "e20", "dose")}


def by_budget(reference_runs: list[dict], shipped: dict[str, list[dict]]) -> dict[int, list[dict]]:
    """The budget study's runs by epochs: {5: the reference runs, 10: e10, 20: e20}."""
    return {5: reference_runs, 10: shipped.get("e10", []), 20: shipped.get("e20", [])}


def _metric(runs, method, metric) -> dict[int, float]:
    return {r["seed"]: r["metrics"][metric] for r in runs if r["method"] == method}


def _interval_row(diffs: list[float], seeds: list[int], predicted_sign: int | None = None,
                  **extra) -> dict:
    row = {**extra, "seeds": seeds, "differences": diffs, **reference.interval(diffs)}
    if predicted_sign is not None:
        row["verdict"] = followups.verdict(row["low"], row["high"], predicted_sign)
    return row


def budget_gaps(budgets: dict[int, list[dict]], other: str,
                metric: str = "autoattack") -> list[dict]:
    """D2R − `other` on `metric` at each budget, paired by seed: one row per budget with the
    per-seed differences and the t-interval (`reference.interval`)."""
    rows = []
    for epochs, runs in sorted(budgets.items()):
        mine, theirs = _metric(runs, D2R, metric), _metric(runs, other, metric)
        seeds = sorted(set(mine) & set(theirs))
        rows.append(_interval_row([mine[s] - theirs[s] for s in seeds], seeds, epochs=epochs,
                                  other=other, metric=metric))
    return rows


def gap_change(budgets: dict[int, list[dict]], other: str = "pgd_at", metric: str = "autoattack",
               start: int = 5, end: int = 20) -> dict:
    """The registered budget comparison: per seed, (D2R − other at `end` epochs) − (D2R − other at
    `start` epochs), its t-interval and the verdict for the predicted sign (+1: the gap grows)."""
    gaps = {}
    for epochs in (start, end):
        runs = budgets.get(epochs, [])
        mine, theirs = _metric(runs, D2R, metric), _metric(runs, other, metric)
        gaps[epochs] = {s: mine[s] - theirs[s] for s in set(mine) & set(theirs)}
    seeds = sorted(set(gaps[start]) & set(gaps[end]))
    return _interval_row([gaps[end][s] - gaps[start][s] for s in seeds], seeds,
                         followups.FOLLOWUPS["budget"]["predicted_sign"], other=other,
                         metric=metric, start=start, end=end)


def dose_runs(reference_runs: list[dict], shipped_dose: list[dict]) -> list[dict]:
    """D2R's runs at every registered w_adv: the shipped `d2r_no_adv` (0) and `d2r` (30) reference
    runs and the dose runs; each run dict gains "w_adv"."""
    out = []
    for run in reference_runs + shipped_dose:
        trained = run.get("trained_method", run["method"])
        if trained in ("d2r", "d2r_no_adv"):
            w = run["manifest"]["method_params"]["w_adv"]
            if w in followups.DOSE_W_ADV:
                out.append({**run, "w_adv": w})
    return sorted(out, key=lambda r: (r["w_adv"], r["seed"]))


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
            / sum((x - mx) ** 2 for x in xs))


def dose_slope(dose: list[dict], metric: str, *, key: str = "w_adv",
               predicted_sign: int | None = -1) -> dict:
    """The registered dose comparison: per seed, the least-squares slope of `metric` against
    log(1 + w) over the doses that seed has (all of them, or the seed is left out), its
    t-interval and verdict."""
    doses = sorted({r[key] for r in dose})
    table = {(r[key], r["seed"]): _value(r, metric) for r in dose}
    seeds = sorted(s for s in {r["seed"] for r in dose} if all((w, s) in table for w in doses))
    xs = [math.log1p(w) for w in doses]
    slopes = [_slope(xs, [table[(w, s)] for w in doses]) for s in seeds] if len(xs) > 1 else []
    return _interval_row(slopes, seeds, predicted_sign, metric=metric, doses=doses)


def _value(run: dict, metric: str) -> float:
    """A metric of a run: from its metrics, else the last epoch of its history (guide_true_prob)."""
    return run["metrics"][metric] if metric in run["metrics"] else last_epoch(run, metric)


def last_epoch(run: dict, key: str) -> float:
    """`key` of the last epoch of a run's history (NaN when that run did not log it)."""
    return run["history"][-1].get(key, float("nan")) if run["history"] else float("nan")


def guide_gap(runs: list[dict], key: str = "guide_true_prob", other: str = "lbgat") -> dict:
    """The registered guide comparison: per seed, `key` at the last epoch, D2R − `other`; its
    t-interval and verdict (predicted −1: D2R's guide is less confident). Runs that did not log
    `key` are left out."""
    mine = {r["seed"]: last_epoch(r, key) for r in runs if r["method"] == D2R}
    theirs = {r["seed"]: last_epoch(r, key) for r in runs if r["method"] == other}
    seeds = sorted(s for s in set(mine) & set(theirs)
                   if not (math.isnan(mine[s]) or math.isnan(theirs[s])))
    return _interval_row([mine[s] - theirs[s] for s in seeds], seeds,
                         followups.FOLLOWUPS["guide"]["predicted_sign"], other=other, key=key)


def first_decay_epoch(epochs: int) -> int:
    """The first epoch of the official schedule's first learning-rate drop (`train.paper_lr`
    scaled to `epochs`): where Rice et al. see robust accuracy peak before robust overfitting."""
    from .train import paper_lr
    validate.number("epochs", epochs, min=2, integer=True)
    return next(e for e in range(2, epochs + 1) if paper_lr(e, epochs) < paper_lr(2, epochs))


def late_change(runs: list[dict], method: str, key: str = "pgd_acc") -> dict:
    """Robust overfitting without selection bias (chapter 8): per seed, `key` at the last epoch
    minus `key` at the first epoch after the first learning-rate drop (an epoch fixed by the
    schedule, never picked by looking at the curve), with its t-interval. A drop shows as an
    interval below 0; the best-of-many-epochs comparison would show one even without any."""
    mine = sorted((r for r in runs if r["method"] == method and r["history"]),
                  key=lambda r: r["seed"])
    diffs, seeds, at = [], [], None
    for run in mine:
        hist = run["history"]
        at = first_decay_epoch(len(hist))
        diffs.append(hist[-1][key] - hist[at - 1][key])
        seeds.append(run["seed"])
    return _interval_row(diffs, seeds, method=method, key=key, from_epoch=at,
                         to_epoch=len(mine[0]["history"]) if mine else None)


# ---------------------------------------------------------------------------------------- 2-D world
def load_toy(path: str | Path) -> list[dict]:
    """The records of a 2-D study file ([] when it is not shipped yet)."""
    path = Path(path)
    return json.loads(path.read_text())["records"] if path.is_file() else []


def load_toys(root: str | Path) -> dict[str, list[dict]]:
    """Every 2-D study shipped under `root` (book/followups): {study: records}."""
    return {study: load_toy(shipped.find(root) / "toy" / f"{study}.json")
            for study in followups.TOY_STUDIES}


def toy_select(records: list[dict], **setting) -> dict[int, dict]:
    """{seed: metrics} of the finished records whose setting has every given key = value (a
    diverged run has no metrics: `toy_diverged` counts those)."""
    return {r["seed"]: r["metrics"] for r in records if r["metrics"] is not None
            and all(r["setting"].get(k) == v for k, v in setting.items())}


def toy_diverged(records: list[dict], **setting) -> list[int]:
    """The seeds whose run of this setting diverged (non-finite loss)."""
    return sorted(r["seed"] for r in records if r["metrics"] is None
                  and all(r["setting"].get(k) == v for k, v in setting.items()))


def toy_mean(records: list[dict], metric: str, **setting) -> dict:
    """Mean and t-interval over seeds of `metric` for one setting."""
    values = toy_select(records, **setting)
    return reference.interval([m[metric] for _, m in sorted(values.items())])


def toy_paired(records: list[dict], a: dict, b: dict, metric: str = "exact",
               predicted_sign: int | None = None) -> dict:
    """Setting a − setting b on `metric`, paired by seed, with its t-interval (and verdict)."""
    xa, xb = toy_select(records, **a), toy_select(records, **b)
    seeds = sorted(set(xa) & set(xb))
    return _interval_row([xa[s][metric] - xb[s][metric] for s in seeds], seeds, predicted_sign,
                         metric=metric)


def toy_gap_change(records: list[dict], other: str = "pgd_at", metric: str = "exact",
                   start: int = 20, end: int = 2000) -> dict:
    """The registered 2-D budget comparison: per seed (D2R − other at `end` epochs) − (D2R − other
    at `start`), its t-interval and verdict (predicted +1)."""
    gap = {}
    for epochs in (start, end):
        mine = toy_select(records, method=D2R, epochs=epochs)
        theirs = toy_select(records, method=other, epochs=epochs)
        gap[epochs] = {s: mine[s][metric] - theirs[s][metric] for s in set(mine) & set(theirs)}
    seeds = sorted(set(gap[start]) & set(gap[end]))
    return _interval_row([gap[end][s] - gap[start][s] for s in seeds], seeds,
                         followups.FOLLOWUPS["toy_budget"]["predicted_sign"], other=other,
                         metric=metric, start=start, end=end)


def toy_slope(records: list[dict], vary: str, metric: str = "exact", *,
              predicted_sign: int | None = -1, **fixed) -> dict:
    """Per seed, the slope of `metric` against log(1 + w) as the setting `vary` (w_adv or w_clean)
    takes each of its values with the others `fixed`; its t-interval and verdict."""
    validate.choice("vary", vary, ("w_adv", "w_clean"))
    rows = [{**r, vary: r["setting"][vary]} for r in records
            if r["metrics"] is not None and r["setting"].get(vary) is not None
            and all(r["setting"].get(k) == v for k, v in fixed.items())]
    other = "w_clean" if vary == "w_adv" else "w_adv"
    rows = [r for r in rows if r["setting"].get(other) == OFFICIAL[other]]
    return dose_slope(rows, metric, key=vary, predicted_sign=predicted_sign)


# ------------------------------------------------------------------------------------------ figures
def _plt():
    import matplotlib.pyplot as plt
    return plt


def plot_pareto(budgets: dict[int, list[dict]], methods: list[str] | None = None, *,
                x: str = "autoattack", y: str = "clean"):
    """Clean against AutoAttack accuracy of every method, one panel per budget: the mean over
    seeds with its 95 % t-interval on both axes, and the Pareto front (no other method is better on
    both). Returns the figure."""
    plt = _plt()
    shown = [(e, runs) for e, runs in sorted(budgets.items()) if runs]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.3 * max(1, len(shown)) + 2.2, 3.6),
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    names = methods or [m for m in reference.METHODS
                        if any(r["method"] == m for _, runs in shown for r in runs)]
    colours = {m: f"C{i}" for i, m in enumerate(names)}
    for ax, (epochs, runs) in zip(axes[0], shown):
        points = []
        for name in names:
            xs = reference.interval([r["metrics"][x] for r in runs if r["method"] == name])
            ys = reference.interval([r["metrics"][y] for r in runs if r["method"] == name])
            if xs["n"] == 0:
                continue
            err = [[0 if math.isnan(v["high"]) else 100 * (v["high"] - v["mean"])]
                   for v in (xs, ys)]
            ax.errorbar(100 * xs["mean"], 100 * ys["mean"], xerr=err[0], yerr=err[1], fmt="o",
                        color=colours[name], capsize=3, label=name)
            points.append((xs["mean"], ys["mean"]))
        front = sorted(p for p in points
                       if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points))
        if front:
            ax.plot([100 * p[0] for p in front], [100 * p[1] for p in front], "k--", lw=0.8,
                    label="Pareto front")
        seeds = sorted({sum(r["method"] == m for r in runs) for m in names} - {0})
        ax.set_title(f"{epochs} epochs ({'/'.join(map(str, seeds))} seeds)")
        ax.set_xlabel(f"{_label(x)} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{_label(y)} accuracy (%)")
    axes[0][0].set_xlim(left=0)
    axes[0][0].set_ylim(bottom=0)
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize=8)
    return fig


def _label(metric: str) -> str:
    return {"autoattack": "AutoAttack", "clean": "clean", "pgd20": "PGD-20", "cw20": "CW-20",
            "exact": "exact robust"}.get(metric, metric)


def _interval_line(ax, xs, rows, label, colour, marker="o"):
    means = [100 * r["mean"] for r in rows]
    low = [100 * (r["mean"] if math.isnan(r["low"]) else r["low"]) for r in rows]
    high = [100 * (r["mean"] if math.isnan(r["high"]) else r["high"]) for r in rows]
    ax.plot(xs, means, marker=marker, color=colour, label=label)
    ax.fill_between(xs, low, high, color=colour, alpha=0.15)


def plot_trend(cifar_rows: dict[str, list[dict]], toy_rows: dict[str, list[dict]]):
    """The registered gaps against the budget: left CIFAR (D2R − each other method, AutoAttack, by
    epochs), right the 2-D world (exact robust accuracy, by epochs, log scale); lines are the mean
    per-seed difference, bands its 95 % t-interval, the dotted line 0. Returns the figure."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, rows_by, title in ((axes[0], cifar_rows, "CIFAR-10 reference setting, 3 seeds"),
                               (axes[1], toy_rows, "2-D world, 20 seeds")):
        for i, (other, rows) in enumerate(rows_by.items()):
            rows = [r for r in rows if r["n"] > 0]
            if rows:
                _interval_line(ax, [r["epochs"] for r in rows], rows, f"D2R − {other}", f"C{i}")
        ax.axhline(0, color="k", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("training epochs")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no runs shipped yet", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel("paired gap (points)")
    axes[1].set_xscale("log")
    fig.tight_layout()
    return fig


def plot_dose(cifar: list[dict], toy_records: list[dict]):
    """D2R's accuracy against the weight of its adversarial term: left CIFAR (clean and AutoAttack,
    mean over seeds with 95 % t-interval bands), right the 2-D world (exact robust accuracy with
    the official 'mean' KL and with 'batchmean'). x is log(1 + w_adv). Returns the figure."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    doses = sorted({r["w_adv"] for r in cifar})
    for i, metric in enumerate(("clean", "autoattack")):
        rows = [reference.interval([r["metrics"][metric] for r in cifar if r["w_adv"] == w])
                for w in doses]
        if doses:
            _interval_line(axes[0], [math.log1p(w) for w in doses], rows, _label(metric), f"C{i}")
    axes[0].set_title("CIFAR-10, reference budget, 3 seeds")
    axes[0].set_ylabel("accuracy (%)")
    for i, reduction in enumerate(("mean", "batchmean")):
        ws = sorted({r["setting"]["w_adv"] for r in toy_records
                     if r["setting"].get("kl_reduction") == reduction
                     and r["setting"].get("w_clean") == 20.0 and r["setting"]["epochs"] == 20})
        rows = [toy_mean(toy_records, "exact", w_adv=w, w_clean=20.0, kl_reduction=reduction,
                         epochs=20) for w in ws]
        if ws:
            _interval_line(axes[1], [math.log1p(w) for w in ws], rows,
                           f"exact robust, KL {reduction}", f"C{i + 2}")
    axes[1].set_title("2-D world, 20 epochs, 20 seeds")
    for ax in axes:
        ticks = [0, 3, 10, 30, 90]
        ax.set_xticks([math.log1p(w) for w in ticks], [str(w) for w in ticks])
        ax.set_xlabel("w_adv (log scale of 1 + w_adv; official 30)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_confidence(runs: list[dict], methods: tuple[str, ...] = ("d2r", "lbgat"), *,
                    keys: tuple[str, ...] = ("guide_true_prob", "target_true_prob"),
                    title: str = ""):
    """The held-out mean true-class probability of the guide (solid) and the target (dashed) per
    epoch, mean over seeds with a band from the lowest to the highest seed, for each method; the
    dotted line is 1/C, a uniform guess. Returns the figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, name in enumerate(methods):
        mine = [r["history"] for r in runs if r["method"] == name]
        for key, style in zip(keys, ("-", "--")):
            curves = [[h.get(key, float("nan")) for h in hist] for hist in mine]
            curves = [c for c in curves if c and not any(math.isnan(v) for v in c)]
            if not curves:
                continue
            epochs = list(range(1, len(curves[0]) + 1))
            mean = [sum(c[e] for c in curves) / len(curves) for e in range(len(epochs))]
            ax.plot(epochs, mean, style, color=f"C{i}",
                    label=f"{name}: {key.split('_')[0]} ({len(curves)} seeds)")
            ax.fill_between(epochs, [min(c[e] for c in curves) for e in range(len(epochs))],
                            [max(c[e] for c in curves) for e in range(len(epochs))],
                            color=f"C{i}", alpha=0.12)
    ax.axhline(0.1, color="k", ls=":", lw=0.8, label="1/C (uniform)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean true-class probability")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------- every registered row
def toy_budget_gaps(records: list[dict], other: str, metric: str = "exact") -> list[dict]:
    """D2R − `other` on the 2-D world at each registered budget, paired by seed (one row per
    budget)."""
    return [{**toy_paired(records, {"method": D2R, "epochs": e}, {"method": other, "epochs": e},
                          metric), "epochs": e} for e in followups.TOY_BUDGETS]


OFFICIAL = {"w_adv": 30.0, "w_clean": 20.0}


def _across_dose(row: dict, top: float = 30.0) -> dict:
    """A slope against log(1 + w) as the fitted change from w = 0 to w = `top`."""
    k = math.log1p(top)
    return {**row, **{key: row[key] * k for key in ("mean", "low", "high")},
            "differences": [d * k for d in row["differences"]]}


def registered(reference_runs: list[dict], shipped: dict[str, list[dict]],
               toys: dict[str, list[dict]]) -> list[dict]:
    """Every registered comparison of `followups.FOLLOWUPS` on what is shipped now: one dict per
    comparison with "study", "what" (in words), "metric", "n", "mean", "low", "high", "verdict"
    (differences in accuracy points are fractions; slopes are shown as the fitted change across
    the registered dose, w = 0 to 30). Rows whose runs are not shipped yet have n = 0 and say
    "undecided"."""
    budgets = by_budget(reference_runs, shipped)
    rows = []

    def add(study, what, row, metric):
        rows.append({"study": study, "what": what, "metric": metric, **row})

    for other in ("pgd_at", "trades", "lbgat"):
        for end in (10, 20):
            add("budget", f"(D2R − {other}) at {end} epochs minus at 5",
                gap_change(budgets, other, "autoattack", 5, end), "autoattack")
    toy_budget, toy_dose, toy_guide = (toys.get(k, []) for k in followups.TOY_STUDIES)
    for other in ("pgd_at", "trades", "lbgat"):
        add("toy_budget", f"(D2R − {other}) at 2000 epochs minus at 20",
            toy_gap_change(toy_budget, other, "exact", 20, 2000), "exact")
    dose = dose_runs(reference_runs, shipped.get("dose", []))
    for metric in ("clean", "autoattack"):
        add("dose", "D2R's change from w_adv 0 to 30 (fitted slope)",
            _across_dose(dose_slope(dose, metric)), metric)
    for epochs in (20, 200):
        for reduction in ("mean", "batchmean"):
            for vary in ("w_adv", "w_clean"):
                row = toy_slope(toy_dose, vary, "exact", epochs=epochs, kl_reduction=reduction,
                                predicted_sign=-1 if vary == "w_adv" else None)
                top = OFFICIAL[vary]
                add("toy_dose", f"{vary} 0 to {top:g} (fitted), KL {reduction}, {epochs} epochs",
                    _across_dose(row, top), "exact")
        official = {"method": D2R, "epochs": epochs, "w_adv": 30.0, "w_clean": 20.0}
        add("toy_dose", f"batchmean − mean at the official weights, {epochs} epochs",
            toy_paired(toy_dose, {**official, "kl_reduction": "batchmean"},
                       {**official, "kl_reduction": "mean"}, "exact", -1), "exact")
        add("toy_dose", f"the guide's confidence, w_adv 0 to 30 (fitted), {epochs} epochs",
            _across_dose(toy_slope(toy_dose, "w_adv", "guide_true_prob", epochs=epochs,
                                   kl_reduction="mean")), "guide_true_prob")
    for epochs, runs in ((10, shipped.get("e10", [])), (20, shipped.get("e20", []))):
        add("guide", f"D2R − LBGAT guide at {epochs} epochs", guide_gap(runs), "guide_true_prob")
    for epochs in followups.TOY_BUDGETS:
        add("guide", f"D2R − LBGAT guide on the 2-D world, {epochs} epochs",
            toy_paired(toy_budget, {"method": D2R, "epochs": epochs},
                       {"method": "lbgat", "epochs": epochs}, "guide_true_prob", -1),
            "guide_true_prob")
    for epochs in (20, 200):
        for wide, narrow in ((128, 32), (32, 8)):
            add("toy_guide", f"D2R, guide width {wide} − {narrow}, {epochs} epochs",
                toy_paired(toy_guide, {"method": D2R, "epochs": epochs, "guide_width": wide},
                           {"method": D2R, "epochs": epochs, "guide_width": narrow}, "exact",
                           followups.FOLLOWUPS["toy_guide"]["predicted_sign"]), "exact")
    for row in rows:
        row.setdefault("verdict", "reported")
    return rows


def describe(row: dict, unit: str = "points") -> str:
    """A registered row in words: "+1.2 points (95 % interval −0.3 to +2.7, 3 seeds): undecided"."""
    if row["n"] == 0:
        return "not shipped yet"
    scale = 1 if row["metric"].endswith("prob") else 100
    unit = "" if scale == 1 else f" {unit}"

    def num(v):
        return "n/a" if math.isnan(v) else f"{scale * v:+.{3 if scale == 1 else 1}f}".replace(
            "-", "−")

    seeds = f"{row['n']} seed{'s' if row['n'] != 1 else ''}"
    return (f"{num(row['mean'])}{unit} (95 % interval {num(row['low'])} to {num(row['high'])}, "
            f"{seeds}): {row['verdict']}")
