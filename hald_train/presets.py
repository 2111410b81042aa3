"""Named training recipes and the optimizer choices, importable without torch (``hald-train
--help`` lists them); :mod:`hald_train.trainer` uses them."""

from __future__ import annotations

from typing import Any

from .phases import PHASE_KINDS

OPTIMIZERS = ("adamw", "sgd")  # hald_train.optim.make_optimizer
DECAY_PARAMS = ("weights", "all")  # which parameters weight decay reaches (hald_train.optim.param_groups)
# When fresh optimizer moments start: at phase changes into which kinds.
RESETS = {"never": (), "every": tuple(PHASE_KINDS), **{f"to-{kind}": (kind,) for kind in PHASE_KINDS}}
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
