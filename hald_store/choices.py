"""Fixed names and defaults the library accepts (codecs, mixes, teacher modes, normalization),
importable without torch so that the CLIs build their options and ``--help`` quickly. The
modules that use them (``codec``, ``mixing``, ``schema``, ``render``) re-export them."""

VALUE_CODECS = ("fp32", "fp16", "uint8", "uint4")
MIXES = ("none", "cutmix", "mixup")
TEACHER_MODES = ("eval", "train")  # train: BatchNorm on each labelling batch's statistics
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
