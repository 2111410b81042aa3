"""What a finished run shows: its learning curve (a PNG) and the human summary ``hald-train`` prints."""

from __future__ import annotations

import io
from pathlib import Path

# The files of a finished run directory (beside checkpoint.pt)
METRICS = "metrics.jsonl"
FINAL = "final.json"
MODEL = "model.pt"
CURVE = "learning_curve.png"


def hard_spans(curve: list[dict]) -> list[tuple[float, float]]:
    """(first, last) epoch bounds of each run of hard epochs in metrics rows, for shading."""
    spans: list[tuple[float, float]] = []
    for m in curve:
        if m["kind"] == "hard":
            if spans and spans[-1][1] == m["epoch"] - 0.5:
                spans[-1] = (spans[-1][0], m["epoch"] + 0.5)
            else:
                spans.append((m["epoch"] - 0.5, m["epoch"] + 0.5))
    return spans


def learning_curve_png(rows: list[dict], schedule: str) -> bytes:
    """A PNG of training loss and (where evaluated) validation top-1 per epoch of metrics ``rows``,
    hard phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for lo, hi in hard_spans(rows):
        ax.axvspan(lo, hi, color="C1", alpha=0.12, lw=0)
    ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], color="C0", marker=".", label="training loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (shaded: hard-label phase)")
    ax.set_ylabel("training loss", color="C0")
    ax.grid(alpha=0.3)
    val = [r for r in rows if "val_top1" in r]
    if val:
        bx = ax.twinx()
        bx.plot([r["epoch"] for r in val], [100 * r["val_top1"] for r in val], color="C2", marker="o",
                label="val top-1")
        bx.set_ylabel("val top-1 (%)", color="C2")
    ax.set_title(f"hald-train {schedule}", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    return png.getvalue()


def format_summary(final: dict, out_dir: str | Path, seconds: float, quiet: bool = False,
                   finished_before: bool = False, started_fresh: bool = False) -> str:
    """The end-of-run text of ``hald-train`` from its ``final.json`` contents; ``quiet``: two lines."""
    out = Path(out_dir)
    epochs = final["epoch"]
    if "val_top1" in final:
        acc = (f"val top-1 {100 * final['val_top1']:.2f}% at the end (epoch {epochs}), best "
               f"{100 * final['best_val_top1']:.2f}% (epoch {final['best_epoch']})")
    else:
        acc = "no validation (pass --val FOLDER to evaluate)"
    head = (f"the run in {out} had already finished: nothing trained, its files are complete" if finished_before
            else f"trained {final['schedule']} ({epochs} epochs) in {seconds:.1f} s")
    lines = [f"note: no checkpoint in {out} yet, so --resume started the run"] if started_fresh else []
    if quiet:
        return "\n".join(lines + [head, f"{acc}; model {out / MODEL}"])
    lines += [head,
              f"schedule    {final['schedule']} (soft: the store's soft labels; hard: hard labels with CutMix)",
              f"accuracy    {acc}",
              f"last epoch  {final['kind']}, loss {final['loss']:.4f}, train top-1 {100 * final['train_top1']:.2f}%",
              f"model       {out / MODEL}",
              f"metrics     {out / METRICS} (one JSON line per epoch), summary {out / FINAL}",
              f"curve       {out / CURVE}"]
    return "\n".join(lines)
