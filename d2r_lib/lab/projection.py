"""What a planned `d2r run` will cost before it runs: `d2r run --estimate`. Chapter 9.

The chapter cost model (`costmodel`: t(K) = a + b·(K + c) seconds per training image) is fitted to
training steps timed here and now (PGD-AT on `small_cnn`, a few K, a few seconds), then carried to
every training run the planned chapters declare (their cells tagged `runs`) through the models'
multiply-accumulate counts at the data set's image size. Runs that several chapters share (the same
checkpoint-cache key) are counted once, as the cache trains them once. The projection covers
training only (evaluation adds a few per cent at the paper's settings: PGD-20 and CW-20 are 40
attack steps per test image, against K + c per training image and epoch) and assumes that big
models run at the small model's MACs per second on this device, which is only roughly true: time a
few real steps on the machine you will use (chapter 9) before booking it.
"""
from __future__ import annotations

from .. import costmodel, data, experiments, methods

__all__ = ["FULL_TRAIN_IMAGES", "fit_here", "project", "table"]

FULL_TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "tinyimagenet": 100_000,
                     "synthetic": 256}
"""Training images of each data set's `full` split (the paper's epoch)."""


def fit_here(device: str = "cpu", *, ks=(1, 2, 4), batch_size: int = 64,
             repeats: int = 3) -> costmodel.CostModel:
    """The cost model of PGD-AT on `small_cnn` from steps timed on `device` now."""
    seconds = [costmodel.measure_step("pgd_at", "small_cnn", steps=k, batch_size=batch_size,
                                      device=device, repeats=repeats) for k in ks]
    return costmodel.fit(ks, seconds, c=costmodel.outer_steps("pgd_at"), method="pgd_at",
                         target="small_cnn", batch_size=batch_size, device=str(device))


def _images(tc) -> int:
    if tc.train_size is not None:
        return tc.train_size
    if tc.subset == "mini" and tc.dataset == "cifar10":
        return len(data.MINI_TRAIN_INDICES)
    return FULL_TRAIN_IMAGES[tc.dataset]


def project(runs, base: costmodel.CostModel, *, measured: str = "small_cnn") -> list[dict]:
    """One row per distinct training run of the planned `runs` (runner.Run), with the projected
    seconds; the first chapter that needs a run carries it. `base`: a PGD-AT cost model timed on
    the model `measured` at 32×32 (`fit_here`, or chapter 9's fit)."""
    measured = costmodel.model_macs(measured)
    rows, seen = [], set()
    for r in runs:
        cfg = experiments.run_config(r.profile, r.parameters, "cpu")
        for tc in experiments.chapter_runs(r.notebook, cfg, r.parameters):
            key = tc.key()
            if key in seen:
                continue
            seen.add(key)
            spec = data.DATASETS[tc.dataset]
            m = methods.get_method(tc.method)
            macs_f = costmodel.model_macs(tc.target_model, spec["num_classes"],
                                          spec["image_size"])
            macs_g = (costmodel.model_macs(tc.guide_model, spec["num_classes"],
                                           spec["image_size"]) if m.uses_guide else macs_f)
            model = costmodel.extrapolate(base, tc.method, measured_macs=(measured, measured),
                                          target_macs=macs_f, guide_macs=macs_g)
            steps = m.resolve(**tc.method_params).get("steps", 0) if m.attack != "none" else 0
            images = _images(tc)
            changed = {k: v for k, v in tc.method_params.items() if m.defaults.get(k) != v}
            rows.append({"run": r.name, "chapter": r.chapter, "method": tc.method,
                         "changed": changed, "target": tc.target_model,
                         "guide": tc.guide_model if m.uses_guide else None,
                         "dataset": tc.dataset, "images": images, "epochs": tc.epochs,
                         "steps": steps,
                         "seconds": costmodel.run_time(model, steps=steps, images=images,
                                                       epochs=tc.epochs)})
    return rows


def table(rows: list[dict], base: costmodel.CostModel) -> str:
    """The projection as text: one line per run, a total per chapter run and overall."""
    lines = [f"cost model here: {base}",
             f"{'run':<34}{'method':<44}{'target + guide':<22}{'images × epochs':>18}"
             f"{'K':>4}{'hours':>10}"]
    for row in rows:
        pair = row["target"] + (f" + {row['guide']}" if row["guide"] else "")
        method = row["method"] + "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}"
                                         for k, v in row["changed"].items())
        lines.append(f"{row['run']:<34}{method:<44}{pair:<22}"
                     f"{row['images']:>9,} × {row['epochs']:<6}{row['steps']:>4}"
                     f"{row['seconds'] / 3600:>10.2f}")
    total = sum(row["seconds"] for row in rows)
    lines.append(f"total: {len(rows)} training run(s), {total / 3600:,.1f} h on this device "
                 f"({total / 86400:,.1f} days); training only, shared runs counted once")
    return "\n".join(lines)
