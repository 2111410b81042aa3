"""The ``hald-train`` command: a thin click layer over :class:`hald_train.TrainConfig`."""

from __future__ import annotations

import json
import time
from typing import Callable

import click

from hald_store.cli import _friendly_errors
from hald_store.options import BACKENDS

from .config import default
from .phases import PHASE_KINDS, option_fields
from .presets import DECAY_PARAMS, OPTIMIZERS, RESETS, TRAIN_PRESETS
from .schedule import PRESETS


def _phase_options(command: Callable) -> Callable:
    """One flag per phase option (``--cutmix-alpha``, ``-T/--temperature``, ...), from the kinds' definitions."""
    for f in reversed(option_fields()):
        meta = f.metadata
        command = click.option(f"--{f.name.replace('_', '-')}", *meta["aliases"], f.name, type=meta["type"],
                               default=f.default, help=meta["help"])(command)
    return command


def _preset_defaults(ctx: click.Context, param: click.Parameter, name: str | None) -> str | None:
    """``--preset``: the preset's settings become the other flags' defaults."""
    if name:
        ctx.default_map = {**(ctx.default_map or {}), **TRAIN_PRESETS[name]}
    return name


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("store", type=click.Path())
@click.argument("images", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory (checkpoint.pt, metrics.jsonl, final.json, model.pt, learning_curve.png).")
@click.option("--val", type=click.Path(file_okay=False), default=default("val"), help="Held-out image folder to evaluate on.")
@click.option("--preset", type=click.Choice(list(TRAIN_PRESETS)), is_eager=True, expose_value=False,
              callback=_preset_defaults, help="Start from a recipe's settings (hald-reference: the HALD reference "
              "run, see the README); flags given override them.")
@click.option("--student", default=default("student"), help="cifar_resnet20/56/..., a torchvision name, or pkg.mod:factory.")
@click.option("--schedule", default=default("schedule"),
              help=f"A named schedule ({', '.join(PRESETS)}) or phases KIND:EPOCHS,... (kinds: "
              f"{', '.join(PHASE_KINDS)}), e.g. soft:75,hard:150,soft:75.")
@click.option("--epochs", type=int, default=default("epochs"),
              help="Total epochs (named schedules need it; an explicit one sums its own).")
@click.option("--hard-epochs", type=int, default=default("hard_epochs"),
              help="Hard epochs of a named schedule [default: half of --epochs].")
@click.option("--batch-size", type=int, default=default("batch_size"))
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=default("optimizer"))
@click.option("--lr", type=float, default=default("lr"))
@click.option("--lr-eta", type=float, default=default("lr_eta"),
              help="LR = lr * 0.5 * (1 + cos(pi * epoch / epochs / eta)) per epoch: 1 decays to 0, 2 to half.")
@click.option("--weight-decay", type=float, default=default("weight_decay"))
@click.option("--decay-params", type=click.Choice(DECAY_PARAMS), default=default("decay_params"),
              help="weights: decay only conv/linear weights (name has 'weight', ndim > 1), as the reference.")
@click.option("--momentum", type=float, default=default("momentum"), help="SGD momentum (Nesterov).")
@click.option("--warmup-epochs", type=int, default=default("warmup_epochs"))
@_phase_options
@click.option("--reset-optimizer", type=click.Choice(list(RESETS)), default=default("reset_optimizer"), is_flag=False, flag_value="every",
              help="Fresh optimizer moments at phase changes: every one (the bare flag) or only into phases of one "
              "kind (to-KIND); the reference keeps one optimizer state.")
@click.option("--adam-beta2", type=float, default=default("adam_beta2"), help="AdamW's second-moment decay.")
@click.option("--eval-every", type=int, default=default("eval_every"), help="Evaluate every N epochs (0: at the end only).")
@click.option("--eval-crop-fraction", type=float, default=default("eval_crop_fraction"), help="Centre crop side / shorter side at evaluation.")
@click.option("--seed", type=int, default=default("seed"))
@click.option("--backend", type=click.Choice(("auto", *BACKENDS)), default=default("backend"))
@click.option("--device", default=default("device"), help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=int, default=default("workers"),
              help="Data-path threads (DALI, pillow) or worker processes (torchvision) [default: this process's cores].")
@click.option("--amp/--no-amp", default=default("amp"), help="bf16 autocast and channels-last on CUDA (always off on CPU).")
@click.option("--stop-after", type=int, default=default("stop_after"), help="Stop after N epochs of this call (continue with --resume).")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped (or start it if it has no checkpoint yet; "
              "a finished run gets any missing final files).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, a two-line summary.")
@_friendly_errors
def main(resume: bool, quiet: bool, **options) -> None:
    """Train a student on STORE's soft labels over IMAGES with a Soft/Hard phase schedule."""
    from .report import FINAL, METRICS, format_summary
    from .trainer import TrainConfig, Trainer

    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig(progress=not quiet, **options))
    trainer.run(resume=resume)
    if not trainer.ranks.is_main:
        return
    if trainer.epoch < trainer.schedule.epochs:
        click.echo(f"stopped after epoch {trainer.epoch} of {trainer.schedule.epochs} (--stop-after); continue with "
                   f"--resume and the same flags (metrics so far: {trainer.out / METRICS})")
        return
    final = json.loads((trainer.out / FINAL).read_text())
    click.echo(format_summary(final, trainer.out, time.perf_counter() - t0, quiet=quiet,
                              finished_before=trainer.finished_before, started_fresh=trainer.started_fresh))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", default="demo-output", type=click.Path(file_okay=False),
              help="Where scenes, teacher, store, student runs, summary and plot go.")
@click.option("--full", is_flag=True, help="40-epoch students (the quick default: 12), and teacher with "
              "--train-teacher.")
@click.option("--train-teacher", is_flag=True, help="Train the teacher here (12 epochs; 40 with --full) instead of "
              "using the shipped demo teacher.")
@click.option("--fresh", is_flag=True, help="Remove the demo's earlier outputs in --out and start over "
              "(without it, finished steps with the same settings are reused).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_friendly_errors
def demo(out: str, full: bool, train_teacher: bool, fresh: bool, quiet: bool) -> None:
    """End to end on generated scenes: teacher, store, students with shs and soft-only."""
    from dataclasses import replace

    from .demo import FULL, QUICK, format_table, run_demo

    settings = replace(FULL if full else QUICK, train_teacher=train_teacher)
    results = run_demo(out, settings, progress=not quiet, fresh=fresh, log=click.echo)
    click.echo("\n" + format_table(results))


if __name__ == "__main__":
    main()
