"""The HALD trainer: one learning-rate schedule over soft and hard phases, evaluation,
per-epoch checkpoints with exact resume, metrics as JSON lines."""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hald_store import EvalLoader, HardLabelLoader, LabelStore, SoftLabelLoader, distributed, resolve_model
from hald_store.errors import HaldStoreError, OptionError, SettingsMismatchError, check_at_least, check_positive_finite
from hald_store.safety import run_dir_lock
from hald_store.store import settings_diff

from .losses import cutmix, smooth_one_hot, soft_kl_loss, soft_target_cross_entropy
from .optim import lr_factor, make_optimizer
from .schedule import Schedule, parse_schedule

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL = "final.json"
# Settings that may change between a run and its resume without changing the result's meaning.
_RESUME_FREE = ("device", "workers", "progress", "stop_after")

# When fresh optimizer moments start: phase changes into which kind (None: any change).
RESETS = {"never": (), "every": ("soft", "hard"), "to-hard": ("hard",), "to-soft": ("soft",)}
# Settings of named recipes; each value cites the HALD code (Jiacheng8/HALD) it reproduces.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "hald-reference": {  # validate/scripts/imagenet1k/train.sh, hyper.yaml imagenet1k ResNet18 IPC 10
        "schedule": "shs",  # S6: soft(soft // 2), hard, soft(rest) -- train_fkd.py:155-157
        "epochs": 300,  # train.sh: 150 soft + 150 hard (our preset's hard epochs default to half)
        "batch_size": 16,  # train.sh bs=16, the relabel batch size (a replay store needs it)
        "hard_batch_size": 16,  # train_fkd.py:131
        "optimizer": "adamw",  # train.sh passes no --sgd -- train_fkd.py:431-434
        "lr": 1e-3,  # hyper.yaml [0.001, 2]
        "lr_eta": 2.0,  # hyper.yaml [0.001, 2]; curve at train_fkd.py:436-438, stepped at :503
        "weight_decay": 0.01,  # --adamw-weight-decay -- train_fkd.py:108
        "decay_params": "weights",  # get_parameters -- utils_validate.py:280-294
        "warmup_epochs": 0,  # none in the reference
        "temperature": 20.0,  # log_softmax(output / 20), KLDivLoss(batchmean), no T**2 -- train_fkd.py:618, 675-676
        "cutmix_alpha": 1.0,  # Mixup(mixup_alpha=0, cutmix_alpha=1) -- train_fkd.py:449-454
        "label_smoothing": 0.8,  # --label-smoothing -- train_fkd.py:133
        "reset_optimizer": "never",  # one AdamW state through every phase -- train_fkd.py:432, 547, 616
        "adam_beta2": 0.999,  # torch.optim.AdamW's default -- train_fkd.py:432
    },
}


@dataclass
class TrainConfig:
    """Everything a run depends on (``hald-train`` flags map one to one)."""

    store: str
    images: str
    out_dir: str
    val: str | None = None
    student: str = "cifar_resnet20"
    schedule: str = "shs"
    epochs: int | None = None  # needed by named schedules (shs, ...); an explicit schedule sums its own
    hard_epochs: int | None = None
    batch_size: int = 64
    hard_batch_size: int | None = None  # hard phases' batch size; None: batch_size (the reference uses 16)
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_eta: float = 2.0  # the LR ends at lr * 0.5 * (1 + cos(pi / lr_eta)): 1 -> 0, 2 -> half (reference)
    weight_decay: float = 0.01
    decay_params: str = "weights"  # "weights": conv/linear weights only, as the reference; "all"
    momentum: float = 0.9
    warmup_epochs: int = 0
    temperature: float | None = None  # None: the store's build temperature
    cutmix_alpha: float = 1.0
    label_smoothing: float = 0.8
    reset_optimizer: str = "never"  # fresh optimizer moments at phase changes: never (reference), every,
    # to-hard (soft -> hard only) or to-soft (hard -> soft only); True/False mean every/never
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    eval_every: int = 0  # 0: evaluate at the end only
    eval_crop_fraction: float = 1.0
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    workers: int | None = None  # data-path threads (DALI) or processes (torchvision); None: this process's cores
    amp: bool = True  # bf16 autocast and channels-last where the device is CUDA (never on CPU)
    progress: bool = True
    stop_after: int | None = None  # stop this call after that many epochs (resume later)

    def __post_init__(self) -> None:
        if isinstance(self.reset_optimizer, bool):
            self.reset_optimizer = "every" if self.reset_optimizer else "never"

    def check(self) -> None:
        positive = {"batch_size": self.batch_size, "hard_batch_size": self.hard_batch, "lr": self.lr,
                    "lr_eta": self.lr_eta}
        for name, v in positive.items():
            if not v > 0:
                raise OptionError(f"{name} must be > 0, got {v}", name)
        check_positive_finite("temperature", self.temperature)
        if self.optimizer not in ("adamw", "sgd"):
            raise OptionError(f"optimizer must be adamw or sgd, got {self.optimizer!r}", "optimizer")
        if self.reset_optimizer not in RESETS:
            raise OptionError(f"reset_optimizer must be one of {', '.join(RESETS)}, got {self.reset_optimizer!r}",
                              "reset_optimizer")
        if not 0 <= self.adam_beta2 < 1:
            raise OptionError(f"adam_beta2 must be in [0, 1), got {self.adam_beta2}", "adam_beta2")
        if not 0 <= self.label_smoothing < 1:
            raise OptionError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}", "label_smoothing")
        for name in ("workers", "warmup_epochs", "eval_every", "weight_decay", "cutmix_alpha"):
            check_at_least(name, getattr(self, name), 0)
        check_at_least("stop_after", self.stop_after, 1)

    @classmethod
    def from_preset(cls, name: str, **fields: Any) -> "TrainConfig":
        """A config with the settings of :data:`TRAIN_PRESETS` ``[name]``; ``fields`` override them."""
        if name not in TRAIN_PRESETS:
            raise HaldStoreError(f"unknown preset {name!r}; presets: {', '.join(TRAIN_PRESETS)}")
        return cls(**{**TRAIN_PRESETS[name], **fields})

    @property
    def hard_batch(self) -> int:
        """The hard phases' batch size."""
        return self.batch_size if self.hard_batch_size is None else self.hard_batch_size

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in _RESUME_FREE}


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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Set up a run from a :class:`TrainConfig`; :meth:`run` trains (or resumes) it."""

    def __init__(self, config: TrainConfig) -> None:
        config.check()
        self.config = c = config
        self.out = Path(c.out_dir)
        self.store = LabelStore.open(c.store)
        self.schedule: Schedule = parse_schedule(c.schedule, c.epochs, c.hard_epochs)
        kinds = set(self.schedule.kinds())
        self.ranks = distributed.context()
        common = dict(batch_size=c.batch_size, seed=c.seed, backend=c.backend, device=c.device,
                      rank=self.ranks.rank, world_size=self.ranks.world_size, workers=c.workers)
        if self.ranks.active and torch.cuda.is_available() and c.device in ("auto", "cuda"):
            common.update(device="cuda", device_id=self.ranks.local_rank)
        self.loaders: dict[str, SoftLabelLoader | HardLabelLoader] = {}
        if "soft" in kinds:
            self.loaders["soft"] = SoftLabelLoader(self.store, c.images, temperature=c.temperature, **common)
        if "hard" in kinds:
            per_rank, low = -(-self.store.num_images // self.ranks.world_size), 2 if c.cutmix_alpha > 0 else 1
            if not low <= c.hard_batch <= per_rank:
                name = "batch_size" if c.hard_batch_size is None else "hard_batch_size"
                raise OptionError(f"{name} of hard phases must be between {low} (CutMix pairs images) and the "
                                  f"{per_rank} images each of {self.ranks.world_size} rank(s) gets, got {c.hard_batch}",
                                  name)
            self.loaders["hard"] = HardLabelLoader(self.store, c.images, **{**common, "batch_size": c.hard_batch})
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

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {
            "epoch": self.epoch, "config": self.config.settings(), "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "store_identity": self.store.identity,
        }

    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            raise HaldStoreError(f"cannot resume: no {CHECKPOINT} in {str(self.out)!r}")
        try:  # weights_only: tensors, dicts, lists, numbers and strings; a pickled object cannot run code
            state = torch.load(path, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError as e:
            what = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise HaldStoreError(f"cannot resume from {str(path)!r}: it holds objects other than tensors, numbers and "
                                 f"strings{f' ({what[1]})' if what else ''}; hald-train did not write it, and it was "
                                 "not loaded") from None
        diff = settings_diff(state["config"], self.config.settings())
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
        metrics = self.out / METRICS
        if metrics.exists() and self.ranks.is_main:  # drop lines of epochs that will be redone
            keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["epoch"] <= self.epoch]
            metrics.write_text("".join(ln + "\n" for ln in keep))

    # ------------------------------------------------------------------ epochs
    def _train_epoch(self, epoch: int) -> dict:
        c, kind = self.config, self.schedule.kind_at(epoch)
        loader = self.loaders[kind]
        rng = np.random.default_rng([c.seed, epoch])  # CutMix draws: a pure function of (seed, epoch)
        changed = epoch > 0 and self.schedule.phase_at(epoch) != self.schedule.phase_at(epoch - 1)
        if changed and kind in RESETS[c.reset_optimizer]:
            self.optimizer.state.clear()  # Adam's moments of the last phase would scale this one's steps
        temperature = loader.temperature if kind == "soft" else None
        lr = self.optimizer.param_groups[0]["lr"]
        self.model.train()
        loss_sum = correct = n = 0
        t0 = time.perf_counter()
        bar = tqdm(loader.iter_epoch(epoch), total=len(loader), desc=f"epoch {epoch + 1}/{self.schedule.epochs} {kind}",
                   unit="batch", disable=not self.progress, leave=False, dynamic_ncols=True)
        for batch in bar:
            if kind == "soft":
                logits = forward(self.model, batch.images, self.amp)
                loss = soft_kl_loss(logits, batch.soft, temperature)
            else:
                target = smooth_one_hot(batch.hard, self.store.num_classes, c.label_smoothing)
                images, target = cutmix(batch.images, target, c.cutmix_alpha, rng)  # an odd batch loses its last
                if not len(images):
                    continue
                logits = forward(self.model, images, self.amp)
                loss = soft_target_cross_entropy(logits, target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += float(loss.detach()) * len(logits)
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
        rows = [json.loads(ln) for ln in (self.out / METRICS).read_text().splitlines() if ln]
        rows = [r for r in rows if "val_top1" in r]
        if not rows:
            return {}
        best = max(rows, key=lambda r: r["val_top1"])
        return {"best_val_top1": best["val_top1"], "best_epoch": best["epoch"]}

    def _run(self, resume: bool) -> dict:
        c, main = self.config, self.ranks.is_main
        if resume:
            self._resume()
        elif (self.out / CHECKPOINT).exists():
            raise HaldStoreError(f"{str(self.out)!r} already holds a run; pass resume=True or choose another out_dir",
                                 "resume", "out_dir")
        self.ranks.barrier()  # nobody writes before every rank has read the run directory
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        last: dict = {}
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
                _atomic_save(self._state(), self.out / CHECKPOINT)
                with open(self.out / METRICS, "a") as f:
                    f.write(json.dumps(last) + "\n")
            self.ranks.barrier()
            bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "train_top1", "val_top1") if k in last} | {"kind": last["kind"]})
            bar.update()
        bar.close()
        if main and last and self.epoch == self.schedule.epochs:
            torch.save(self.net.state_dict(), self.out / "model.pt")
            (self.out / FINAL).write_text(json.dumps({"schedule": str(self.schedule), **last, **self._best()}, indent=2))
        return last


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Train a student as ``config`` says (see :class:`Trainer`)."""
    return Trainer(config).run(resume=resume)

