"""When does ``shs`` help? Every regime of the storage sweeps side by side, with controls.

    python benchmarks/hald_regimes.py                 # tables, JSON and plots from runs.jsonl
    python benchmarks/hald_regimes.py --stores DIR    # also measure drift of each regime's store

Reads every ``benchmarks/results/storage-*/runs.jsonl`` (written by ``storage_vs_accuracy.py``)
and writes ``benchmarks/results/hald-regimes/``: ``regimes.md`` (``shs`` per regime, every schedule per
regime, each schedule counted across the grid with the preset criterion, drift; the README and
docs/hald.md quote them),
``regimes.json``, ``shs_vs_drift.png``, ``collapse_curves.png`` (from ``storage-ipc10-curves-t*``) and,
with ``--stores``, ``drift/*.json``.

A regime is (data set, how the labels were made, crops per image S). In each regime:

* every schedule's test top-1 is first averaged over the label codecs it ran with, within a seed
  (codecs are a storage axis, not a replicate), so a regime has one value per schedule and seed;
* the **controls** are ``soft-only`` and ``hard-only`` (hard-only reads no soft labels, so one
  hard-only run per data set and seed serves every S and label build);
* every other schedule is paired by seed against the **better control** (the one with the higher
  mean), with a 95% t interval over the seeds: the verdict says whether that schedule beats the
  best thing a user could have trained instead.

Drift (``--stores``): the store of each regime (``stores/s{S}-full.zarr`` under the sweep's work
directory) is measured with :func:`hald_store.drift.measure_drift`; the plot puts ``shs`` minus the
better control against the regime's mean per-image drift.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from common import save_figure

RESULTS = Path("benchmarks/results")
OUT = RESULTS / "hald-regimes"
CONTROLS = ("soft-only", "hard-only")
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
IMAGES = {"ipc10": 100, "ipc50": 500, "dc-ipc50": 500, "ipc100": 1000}  # training images per data set
BATCH = 16  # the hald-reference preset's batch size: optimizer steps per epoch = images / 16


def load_runs(root: Path = RESULTS) -> list[dict]:
    """Every logged run of every storage sweep (last line per key wins)."""
    runs: dict[tuple, dict] = {}
    for path in sorted(root.glob("storage-*/runs.jsonl")):
        if "-curves-" in path.parent.name:  # single-seed reruns for learning curves, not replicates
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("test_images"):  # evaluated on a test subset: not comparable
                    continue
                r.setdefault("labels", "eval")
                runs[r["dataset"], r["labels"], r["key"]] = r
    return list(runs.values())


def by_seed(runs: list[dict]) -> dict[tuple, dict[int, dict[str, dict]]]:
    """(dataset, labels, S, schedule) -> seed -> codec -> run."""
    out: dict[tuple, dict[int, dict[str, dict]]] = {}
    for r in runs:
        key = (r["dataset"], r["labels"], r["crops_per_image"], r["schedule"])
        out.setdefault(key, {}).setdefault(r["seed"], {})[r["codec"]] = r
    return out


def pooled(seeds: dict[int, dict[str, dict]], codecs: set[str] | None = None) -> dict[int, dict]:
    """Seed -> final and best top-1 (points) averaged over ``codecs`` (all when None); seeds
    missing one of them are left out, so two schedules pool the same codecs."""
    out = {}
    for seed, runs in seeds.items():
        rs = [runs[c] for c in sorted(runs if codecs is None else codecs) if c in runs]
        if not rs or (codecs is not None and len(rs) < len(codecs)):
            continue
        best = [r.get("best_test_top1") for r in rs]
        out[seed] = {"final": 100 * float(np.mean([r["test_top1"] for r in rs])),
                     "best": None if None in best else 100 * float(np.mean(best))}
    return out


def _control(values: dict, dataset: str, labels: str, s: int, name: str, codecs: set[str]) -> dict[int, dict] | None:
    """A control's per-seed values in a regime, over the same codecs; hard-only reads no soft
    labels, so its runs at any S or label build of the data set serve (codec irrelevant)."""
    if name == "hard-only":
        for (d, lab, _s, sch), v in sorted(values.items(), key=lambda kv: (kv[0][1] != labels, kv[0][2])):
            if d == dataset and sch == name:
                return pooled(v)
        return None
    v = values.get((dataset, labels, s, name))
    return pooled(v, codecs) or None if v else None


def interval(diffs: list[float]) -> dict:
    """Mean, std and 95% t interval of paired differences."""
    n = len(diffs)
    if not n:
        return {"mean": math.nan, "std": math.nan, "n": 0, "low": math.nan, "high": math.nan}
    mean = float(np.mean(diffs))
    std = float(np.std(diffs, ddof=1)) if n > 1 else math.nan
    half = T95.get(n - 1, 2.0) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "low": mean - half, "high": mean + half}


def regimes(runs: list[dict]) -> list[dict]:
    """One row per (regime, schedule other than the controls), with both controls beside it."""
    values = by_seed(runs)
    rows = []
    for (dataset, labels, s, schedule), seeds in sorted(values.items()):
        if schedule in CONTROLS:
            continue
        codecs = set.intersection(*(set(v) for v in seeds.values()))
        mine = pooled(seeds, codecs)
        controls = {c: _control(values, dataset, labels, s, c, codecs) for c in CONTROLS}
        means = {c: float(np.mean([v["final"] for v in cs.values()])) for c, cs in controls.items() if cs}
        row = {"dataset": dataset, "labels": labels, "crops_per_image": s, "schedule": schedule,
               "steps_per_epoch": -(-IMAGES.get(dataset, 0) // BATCH), "codecs": sorted(codecs), "seeds": len(mine),
               "top1": interval([v["final"] for v in mine.values()]),
               "best_top1": interval([v["best"] for v in mine.values() if v["best"] is not None])}
        for c, cs in controls.items():
            row[c] = interval([v["final"] for v in cs.values()]) if cs else None
        if means:
            better = max(means, key=means.get)
            row["better_control"] = better
            row["paired"] = [mine[k]["final"] - v["final"] for k, v in sorted(controls[better].items()) if k in mine]
            row["vs_better_control"] = interval(row["paired"])
        rows.append(row)
    return rows


def outcome(d: dict) -> str:
    """Where a paired difference's 95% interval lies: above zero, below it, or across it."""
    return "beats it" if d["low"] > 0 else "below it" if d["high"] < 0 else "within noise"


def verdict(d: dict) -> str:
    """Plain words for a paired difference against the better control."""
    if d["n"] < 2 or math.isnan(d["low"]):
        return f"{d['mean']:+.2f} (n={d['n']}: too few seeds)"
    return f"{d['mean']:+.2f} ({d['low']:+.2f} .. {d['high']:+.2f}): {outcome(d)}"


def _cell(d: dict | None) -> str:
    if not d or not d["n"]:
        return "not run"
    return f"{d['mean']:.2f} ± {d['std']:.2f}" if d["n"] > 1 else f"{d['mean']:.2f} (1 seed)"


def table(rows: list[dict], drift: dict[str, dict] | None = None, schedule: str | None = None) -> str:
    """The regime table in Markdown (drift columns when measured): final top-1 (the headline) and
    the best evaluated epoch's; one schedule's rows only, final top-1 only, when ``schedule`` is given."""
    drift = drift or {}
    name = "| schedule | top-1 | best epoch's |" if schedule is None else f"| {schedule} top-1 |"
    head = (f"| data | labels | S | steps/epoch {name} soft-only | hard-only | "
            f"{'' if schedule is None else schedule + ' '}vs better control (95% interval) | drift tr(Σ), T=1 | off-class crops |")
    lines = [head, "| --- | --- | ---: | ---: | " + ("--- | ---: | " if schedule is None else "") + "---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        if schedule is not None and r["schedule"] != schedule:
            continue
        dr = drift_of(drift, r)
        tr = dr.get("tr_cov_mean")
        off = dr.get("off_class_mean")
        vs = r.get("vs_better_control")
        lines.append(
            f"| {r['dataset']} | {r['labels']} | {r['crops_per_image']} | {r['steps_per_epoch']} | "
            f"{'' if schedule is not None else r['schedule'] + ' | '}{_cell(r['top1'])} | "
            f"{'' if schedule is not None else (_cell(r['best_top1']) if r['best_top1']['n'] else 'not recorded') + ' | '}{_cell(r['soft-only'])} | {_cell(r['hard-only'])} | "
            f"{(r['better_control'] + ': ' + verdict(vs)) if vs else 'no control'} | "
            f"{'' if tr is None else f'{tr:.4f}'} | {'' if off is None else f'{100 * off:.1f}%'} |")
    return "\n".join(lines)


def variants(rows: list[dict]) -> str:
    """Each schedule over the grid (every regime where plain ``shs`` ran, both controls beside it):
    the issue's preset criterion is "never below the better control beyond noise in any cell"."""
    grid = {regime_name(r) for r in rows if r["schedule"] == "shs" and r.get("vs_better_control")}
    lines = ["| schedule | regimes run | beats the better control | within noise "
             "| below it | paired seeds below it | mean difference, all seeds | preset criterion |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for schedule in sorted({r["schedule"] for r in rows}, key=lambda s: (s != "shs", s)):
        mine = [r for r in rows if r["schedule"] == schedule and r.get("vs_better_control", {}).get("n", 0) > 1]
        words = [outcome(r["vs_better_control"]) for r in mine]
        paired = [d for r in mine for d in r["paired"]]
        missing = len(grid - {regime_name(r) for r in mine})
        below = words.count("below it")
        criterion = (f"not met: below it in {below} regime(s)" if below else
                     f"open: {missing} regime(s) not run" if missing else "met")
        lines.append(f"| {schedule} | {len(mine)} of {len(grid)} | {words.count('beats it')} | {words.count('within noise')} | {below} "
                     f"| {sum(d < 0 for d in paired)} of {len(paired)} | {np.mean(paired):+.2f} | {criterion} |")
    return "\n".join(lines)


def regime_name(r: dict) -> str:
    return f"{r['dataset']}-{r['labels']}-s{r['crops_per_image']}"


def measure_drifts(stores: Path) -> dict[str, dict]:
    """Drift of every sweep's full store under ``stores`` (``storage-*-e300/stores/s*-full.zarr``)
    at T = 1 (the teacher's own softmax, as the reference's LVSD) and at the store's T, cached in
    ``OUT/drift`` by regime name with eval labels: a reference-label store holds mixed crops,
    whose drift is undefined, so its regime takes its eval sibling's (same images, crops, teacher)."""
    from hald_store.drift import measure_drift

    (OUT / "drift").mkdir(parents=True, exist_ok=True)
    for store in sorted(stores.glob("storage-*-e300/stores/s*-full.zarr")):
        dataset = store.parent.parent.name.removeprefix("storage-").removesuffix("-e300")
        s = int(store.name.removeprefix("s").removesuffix("-full.zarr"))
        cache = OUT / "drift" / f"{dataset}-eval-s{s}.json"
        if "-labels" in dataset or "-curves" in dataset or cache.exists():
            continue
        t1, ts = measure_drift(store, temperature=1.0, progress=False), measure_drift(store, progress=False)
        cache.write_text(json.dumps({"T=1": t1.summary()["overall"], "store T": ts.summary()["overall"],
                                     "store_temperature": ts.temperature, "notes": t1.notes}, indent=2))
    out = {}
    for cache in sorted((OUT / "drift").glob("*.json")):
        d = json.loads(cache.read_text())["T=1"]
        out[cache.stem] = {"images": d["images"], "tr_cov_mean": d.get("tr_cov", {}).get("mean"),
                           "off_class_mean": d["off_class"]["mean"], "off_majority_mean": d["off_majority"]["mean"]}
    return out


def drift_of(drift: dict[str, dict], r: dict) -> dict:
    """A regime's drift (its eval-label store's)."""
    return drift.get(regime_name({**r, "labels": "eval"}), {})


def drift_table(drift: dict[str, dict]) -> str:
    """Drift of every measured store, whatever ran on it."""
    lines = ["| store (data, S) | images | drift tr(Σ), T=1 | off-class crops | off-majority crops |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, d in sorted(drift.items(), key=lambda kv: (kv[0].rsplit("-s", 1)[0], int(kv[0].rsplit("-s", 1)[1]))):
        tr = d["tr_cov_mean"]
        lines.append(f"| {name.replace('-eval-s', ', S=')} | {d['images']} | {'undefined (S=1)' if tr is None else f'{tr:.4f}'} | "
                     f"{100 * d['off_class_mean']:.1f}% | {100 * d['off_majority_mean']:.1f}% |")
    return "\n".join(lines)


def plot(rows: list[dict], drift: dict[str, dict], path: Path) -> None:
    """shs (and variants) minus the better control against the regime's measured drift (T = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, stat, label in ((axes[0], "tr_cov_mean", "mean per-image drift tr(Σ) of stored crops (T = 1)"),
                            (axes[1], "off_class_mean", "share of stored crops whose top-1 is not the class")):
        for i, schedule in enumerate(sorted({r["schedule"] for r in rows})):
            pts = [(drift_of(drift, r).get(stat), r) for r in rows if r["schedule"] == schedule and r.get("vs_better_control")]
            pts = [(x, r) for x, r in pts if x is not None]
            if not pts:
                continue
            d = [r["vs_better_control"] for _, r in pts]
            ax.errorbar([x for x, _ in pts], [v["mean"] for v in d],
                        yerr=[[v["mean"] - v["low"] if v["n"] > 1 else 0 for v in d],
                              [v["high"] - v["mean"] if v["n"] > 1 else 0 for v in d]],
                        fmt="o" if schedule == "shs" else "x", color=f"C{i}", capsize=3, label=schedule, alpha=0.8)
            for x, r in pts:
                ax.annotate(f"{r['dataset']} {r['labels'][:3]} S{r['crops_per_image']}", (x, r["vs_better_control"]["mean"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 minus the better control (points, 95% CI)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Does drift predict when shs beats the better of soft-only and hard-only?", fontsize=10)
    save_figure(fig, path)


def curves(root: Path, path: Path) -> None:
    """Test top-1 and training loss per epoch of the IPC 10, S = 16 collapse diagnostics: the
    runs of ``storage-ipc10-curves-tN-e300`` with the largest N (every schedule evaluated every few
    epochs on one fixed N-image test subset; their ``metrics.jsonl`` are committed), mean over the
    seeds that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found: dict[str, list[list[dict]]] = {}
    sweeps = {int(d.name.removeprefix("storage-ipc10-curves-t").removesuffix("-e300")): d
              for d in root.glob("storage-ipc10-curves-t*-e300")}
    if not sweeps:
        return
    subset = max(sweeps)  # one test subset per plot: the largest swept
    for metrics in sorted(sweeps[subset].glob("runs/s16-fp16-probs-*/metrics.jsonl")):
        schedule = metrics.parent.name.removeprefix("s16-fp16-probs-").rsplit("-seed", 1)[0]
        found.setdefault(schedule, []).append([json.loads(x) for x in metrics.read_text().splitlines() if x.strip()])
    if not found:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for i, (schedule, runs) in enumerate(sorted(found.items())):
        epochs = sorted({r["epoch"] for run in runs for r in run if "val_top1" in r})
        acc = [np.mean([r["val_top1"] for run in runs for r in run if r["epoch"] == e and "val_top1" in r]) for e in epochs]
        top.plot(epochs, 100 * np.asarray(acc), "-o", ms=2, color=f"C{i}", label=f"{schedule} ({len(runs)} seed(s))")
        steps = sorted({r["epoch"] for run in runs for r in run})  # a run stopped part-way has fewer
        loss = [np.mean([r["loss"] for run in runs for r in run if r["epoch"] == e]) for e in steps]
        bottom.semilogy(steps, loss, color=f"C{i}", lw=0.8)
    for ax in (top, bottom):
        ax.axvspan(75.5, 225.5, color="grey", alpha=0.12)
        ax.grid(alpha=0.3)
    top.set_ylabel(f"test top-1 (%), fixed {subset}-image subset")
    bottom.set_ylabel("training loss (KL or CE)")
    bottom.set_xlabel("epoch (hard phase shaded)")
    top.legend(fontsize=7, ncol=2, loc="lower right")
    top.set_title("IPC 10, S = 16, fp16 probs: where shs breaks (mean over seeds)", fontsize=10)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="where the storage-*/runs.jsonl are")
    ap.add_argument("--stores", default=None, help="root holding the sweeps' work dirs with their stores (drift)")
    args = ap.parse_args()
    rows = regimes(load_runs(Path(args.results)))
    OUT.mkdir(parents=True, exist_ok=True)
    drift = measure_drifts(Path(args.stores or "/nonexistent"))  # cached measurements without --stores
    text = (table(rows, drift, "shs") + "\n\nEvery schedule:\n\n" + table(rows, drift) + "\n\nEach schedule across the grid (the regimes where `shs` ran):\n\n" + variants(rows)
            + "\n\nDrift of each store (per image over its S stored crops, mean over images):\n\n" + drift_table(drift))
    (OUT / "regimes.md").write_text(text + "\n")
    (OUT / "regimes.json").write_text(json.dumps({"rows": rows, "drift": drift}, indent=2))
    if drift:
        plot(rows, drift, OUT / "shs_vs_drift.png")
    curves(Path(args.results), OUT / "collapse_curves.png")
    print(text)


if __name__ == "__main__":
    main()
