"""Fixed names and defaults the library accepts (mixes, teacher modes, normalization),
importable without torch so that the CLIs build their options and ``--help`` quickly. The
modules that use them (``mixing``, ``schema``, ``render``) re-export them. Value codecs are a
registry (``codec.VALUE_CODECS``), which the CLI reads on first use."""

MIXES = ("none", "cutmix", "mixup")
TEACHER_MODES = ("eval", "train")  # train: BatchNorm on each labelling batch's statistics
# How per-crop arrays are chunked (see hald_store.store): "block" -- one chunk per block of images
# holding all their crops; "sharded" -- one shard file per block, one inner chunk per crop seed,
# and every image of a block uses the same crop seed in an epoch, so an epoch reads ~1/S of the labels.
LAYOUTS = ("block", "sharded")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
