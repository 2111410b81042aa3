"""The HALD trainer: one learning-rate schedule over soft and hard phases, evaluation,
per-epoch checkpoints with exact resume, metrics as JSON lines."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hald_store import EvalLoader, HardLabelLoader, LabelStore, SoftLabelLoader, distributed, resolve_model
from hald_store.errors import HaldStoreError, SettingsMismatchError, StoreError, TrainingDivergedError
from hald_store.devices import cuda_available
from hald_store.safety import run_dir_lock
from hald_store.store import settings_diff

from .optim import lr_factor, make_optimizer
from .config import TrainConfig
from .phases import PHASE_KINDS, PhaseKind, option_fields
from .presets import RESETS
from .report import CURVE, FINAL, METRICS, MODEL, learning_curve_png
from .schedule import Schedule, parse_schedule

CHECKPOINT = "checkpoint.pt"
def forward(model: nn.Module, images: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """``model(images)``; with ``amp``, under bf16 autocast with channels-last input."""
    if amp:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        return model(images)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: EvalLoader, amp: bool = False) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) of ``model`` on ``loader`` (``amp``: see :func:`forward`)."""
    was_training = model.training
    model.eval()
    top1 = top5 = n = 0
    for images, labels, _ in loader:
        logits = forward(model, images, amp)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        top1 += int((top[:, 0] == labels).sum())
        top5 += int((top == labels[:, None]).any(dim=1).sum())
        n += len(labels)
    model.train(was_training)
    return {"top1": top1 / n, "top5": top5 / n}


def _atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: a kill leaves the old file
    or the new one, never a part; a failed write (full disk) leaves no temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        e.filename = e.filename or str(path)
        raise


def _serialized(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes (written to disk by :func:`_atomic`, whose full-disk error is an OSError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (none if it is absent). A partial last line (a run killed
    while writing it, before that epoch's checkpoint) is left out; a bad line elsewhere is damage."""
    lines = path.read_text().split("\n") if path.exists() else []
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line else None
        except ValueError:
            row = "bad"
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
        elif row is not None and i < len(lines):  # only the unterminated last line may be partial
            raise StoreError(f"{str(path)!r} line {i} is not a metrics row ({line[:40]!r}): the file is damaged; "
                             "restore it, or delete the run directory to start over")
    return rows


class Trainer:
    """Set up a run from a :class:`TrainConfig`; :meth:`run` trains (or resumes) it."""

    def __init__(self, config: TrainConfig) -> None:
        config.check()
        self.config = c = config
        self.out = Path(c.out_dir)
        self.store = LabelStore.open(c.store)
        self.schedule: Schedule = parse_schedule(c.schedule, c.epochs, c.hard_epochs)
        self.ranks = distributed.context()
        common = dict(batch_size=c.batch_size, seed=c.seed, backend=c.backend, device=c.device,
                      rank=self.ranks.rank, world_size=self.ranks.world_size, workers=c.workers)
        if self.ranks.active and cuda_available() and c.device in ("auto", "cuda"):
            common.update(device="cuda", device_id=self.ranks.local_rank)
        if c.amp and cuda_available() and c.device != "cpu":  # bf16 on CUDA: the student is channels-last
            common.update(memory_format="channels_last")
        self.phases: dict[str, PhaseKind] = {}  # the schedule's kinds (in registration order), each with its loader
        for kind in (k for k in PHASE_KINDS if k in self.schedule.kinds()):
            self.phases[kind] = PHASE_KINDS[kind](c.phase_options(kind))
            self.phases[kind].build(self.store, c.images, **common)
        self.loaders: dict[str, SoftLabelLoader | HardLabelLoader] = {k: p.loader for k, p in self.phases.items()}
        self.device = next(iter(self.loaders.values())).device
        spec = self.store.render_spec
        self.val = None if c.val is None or not self.ranks.is_main else EvalLoader(
            c.val, input_size=spec.size, mean=spec.mean, std=spec.std, crop_fraction=c.eval_crop_fraction,
            batch_size=256, class_names=self.store.class_names, backend=c.backend, device=self.device.type,
            workers=c.workers)
        torch.manual_seed(c.seed)
        self.net = resolve_model(c.student, self.store.num_classes).to(self.device)
        with torch.no_grad():
            width = self.net.eval()(torch.zeros(2, 3, spec.size, spec.size, device=self.device)).shape[-1]
        if width != self.store.num_classes:
            raise HaldStoreError(
                f"student {c.student!r} outputs {width} classes but the store has {self.store.num_classes}"
            )
        self.amp = c.amp and self.device.type == "cuda"  # the CPU path runs the same code with amp off
        if self.amp:
            self.net.to(memory_format=torch.channels_last)
        self.model = self.net  # what the training step calls: DDP-wrapped under torchrun
        if self.ranks.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.optimizer = make_optimizer(self.net, c.optimizer, c.lr, c.weight_decay, c.decay_params, c.momentum,
                                        c.adam_beta2)
        # one curve over all phases, stepped once per epoch (as the reference)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: lr_factor(e, self.schedule.epochs, c.warmup_epochs, c.lr_eta))
        self.epoch = 0
        self.progress = c.progress and self.ranks.is_main
        self.started_fresh = False  # run(resume=True) found no checkpoint and started the run
        self.finished_before = False  # run(resume=True) found the run finished (and completed its files)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {
            "epoch": self.epoch, "config": self.config.settings(), "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "store_identity": self.store.identity,
        }

    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        try:  # weights_only: tensors, dicts, lists, numbers and strings; a pickled object cannot run code
            state = torch.load(path, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError as e:
            what = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise HaldStoreError(f"cannot resume from {str(path)!r}: it holds objects other than tensors, numbers and "
                                 f"strings{f' ({what[1]})' if what else ''}; hald-train did not write it, and it was "
                                 "not loaded") from None
        # a checkpoint from before a phase kind existed trained with that kind's (unused) defaults
        stored = {**{f.name: f.default for f in option_fields()}, **state["config"]}
        diff = settings_diff(stored, self.config.settings())
        if diff:
            raise SettingsMismatchError(
                f"cannot resume the run in {str(self.out)!r} with different settings:\n  " + "\n  ".join(diff)
            )
        if state.get("store_identity", self.store.identity) != self.store.identity:
            raise SettingsMismatchError(f"cannot resume the run in {str(self.out)!r}: store {self.config.store!r} is not "
                                        "the one it trained on (rebuilt with other settings or images); use that "
                                        "store, or start a new run")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch = int(state["epoch"])

    # ------------------------------------------------------------------ epochs
    def _train_epoch(self, epoch: int) -> dict:
        c, kind = self.config, self.schedule.kind_at(epoch)
        phase = self.phases[kind]
        rng = np.random.default_rng([c.seed, epoch])  # the phase's draws (CutMix): a pure function of (seed, epoch)
        changed = epoch > 0 and self.schedule.phase_at(epoch) != self.schedule.phase_at(epoch - 1)
        if changed and kind in RESETS[c.reset_optimizer]:
            self.optimizer.state.clear()  # Adam's moments of the last phase would scale this one's steps
        lr = self.optimizer.param_groups[0]["lr"]
        self.model.train()
        loss_sum = correct = n = 0
        t0 = time.perf_counter()
        bar = tqdm(phase.loader.iter_epoch(epoch), total=len(phase.loader),
                   desc=f"epoch {epoch + 1}/{self.schedule.epochs} {kind}", unit="batch", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            step = phase.loss(lambda images: forward(self.model, images, self.amp), batch, rng)
            if step is None:
                continue
            logits, loss = step
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"epoch {epoch + 1} ({kind}): the loss became {value} at batch {i + 1} of {len(phase.loader)}; training "
                    f"diverged, so the run stops (checkpoint.pt keeps epoch {epoch}); try a smaller lr", "lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += value * len(logits)
            correct += int((logits.argmax(1) == batch.hard[: len(logits)]).sum())
            n += len(logits)
            bar.set_postfix(loss=f"{loss_sum / n:.4f}")
        self.scheduler.step()
        seconds = time.perf_counter() - t0
        loss_sum, correct, n = (self.ranks.sum(v) for v in (loss_sum, correct, n))  # over all ranks
        return {"epoch": epoch + 1, "phase": self.schedule.phase_at(epoch), "kind": kind, "loss": loss_sum / n,
                "lr": lr, "train_top1": correct / n,
                "images_per_s": n / seconds, "seconds": seconds}

    def run(self, resume: bool = False) -> dict:
        """Train to the end of the schedule (or ``stop_after`` epochs); returns the last metrics.

        Writes ``checkpoint.pt`` after every epoch, ``metrics.jsonl`` (one line per epoch) and,
        at the end, ``final.json`` and ``model.pt`` (the student's state dict) to ``out_dir``,
        holding an exclusive lock on ``out_dir`` (a second run there fails naming this one).
        """
        lock = run_dir_lock(self.out) if self.ranks.is_main else nullcontext()
        with lock:
            return self._run(resume)

    def _best(self) -> dict:
        """The best evaluated epoch's top-1 in ``metrics.jsonl`` (the reference tracks ``best_acc1``)."""
        rows = [r for r in read_metrics(self.out / METRICS) if "val_top1" in r]
        if not rows:
            return {}
        best = max(rows, key=lambda r: r["val_top1"])
        return {"best_val_top1": best["val_top1"], "best_epoch": best["epoch"]}

    def _run(self, resume: bool) -> dict:
        c, main = self.config, self.ranks.is_main
        checkpoint = self.out / CHECKPOINT
        if resume and checkpoint.exists():
            try:
                self._resume()
            except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise StoreError(f"cannot resume from {str(checkpoint)!r}: it is damaged or truncated ({reason}); "
                                 "restore it, or delete the run directory to start over") from None
        elif resume:
            self.started_fresh = True
        elif checkpoint.exists():
            raise HaldStoreError(f"{str(self.out)!r} already holds a run; pass resume=True or choose another out_dir",
                                 "resume", "out_dir")
        self.ranks.barrier()  # nobody writes before every rank has read the run directory
        rows: list[dict] = []
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            rows = self._keep_metrics()
        self.finished_before = self.epoch == self.schedule.epochs
        last: dict = rows[-1] if self.finished_before and rows else {}
        stop = self.schedule.epochs if c.stop_after is None else min(self.schedule.epochs, self.epoch + c.stop_after)
        bar = tqdm(total=self.schedule.epochs, initial=self.epoch, desc=f"train {self.schedule}", unit="epoch",
                   disable=not self.progress, dynamic_ncols=True)
        while self.epoch < stop:
            last = self._train_epoch(self.epoch)
            self.epoch += 1
            final = self.epoch == self.schedule.epochs
            if self.val is not None and (final or (c.eval_every and self.epoch % c.eval_every == 0)):
                last.update({f"val_{k}": v for k, v in evaluate(self.net, self.val, self.amp).items()})
            if main:  # rank 0 writes; the others wait so that no rank runs ahead of a checkpoint
                # the line first: a kill before the checkpoint only makes --resume redo (and rewrite) it
                with open(self.out / METRICS, "a") as f:
                    f.write(json.dumps(last) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                _atomic(checkpoint, _serialized(self._state()))
            self.ranks.barrier()
            bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "train_top1", "val_top1") if k in last} | {"kind": last["kind"]})
            bar.update()
        bar.close()
        if main and last and self.epoch == self.schedule.epochs:
            self._finish(last)
        return last

    def _keep_metrics(self) -> list[dict]:
        """Drop the metrics rows of epochs that will be redone (and a partial last line); the kept rows."""
        path = self.out / METRICS
        rows = read_metrics(path)
        keep = [r for r in rows if r["epoch"] <= self.epoch]
        text = path.read_text() if path.exists() else ""
        if keep != rows or not text.endswith("\n") and text:
            _atomic(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        return keep

    def _finish(self, last: dict) -> None:
        """Write ``model.pt``, the learning curve and, last, ``final.json`` (each atomically)."""
        _atomic(self.out / MODEL, _serialized(self.net.state_dict()))
        _atomic(self.out / CURVE, learning_curve_png(read_metrics(self.out / METRICS), str(self.schedule)))
        final = {"schedule": str(self.schedule), **last, **self._best()}
        _atomic(self.out / FINAL, json.dumps(final, indent=2).encode())

def train(config: TrainConfig, resume: bool = False) -> dict:
    """Train a student as ``config`` says (see :class:`Trainer`)."""
    return Trainer(config).run(resume=resume)

