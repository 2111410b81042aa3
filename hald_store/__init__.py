"""hald-store: compact soft-label stores, exact crop replay and the HALD training schedule.

The public API::

    from hald_store import build_store, BuildConfig, LabelStore, StoreSettings, LabelCodec, CropPolicy, plan_crops

Names are imported on first use (PEP 562), so ``import hald_store`` and the CLIs' ``--help``
and ``--version`` do not import torch.
"""

from __future__ import annotations

from ._version import __version__
from .lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("BuildConfig", "BuildSummary", "build_store"), "build"),
    **dict.fromkeys(("VALUE_CODECS", "LabelCodec", "TopKLabels"), "codec"),
    "reencode_store": "convert",
    **dict.fromkeys(("CropPolicy", "plan_crops"), "crop_plan"),
    "HaldStoreError": "errors",
    **dict.fromkeys(("Manifest", "scan_image_folder"), "images"),
    **dict.fromkeys(("ImportSummary", "import_reference"), "importer"),
    **dict.fromkeys(("CropLoader", "EvalLoader", "HardLabelLoader", "SoftLabelLoader"), "loader"),
    **dict.fromkeys(("LoaderOptions", "RenderOptions"), "options"),
    "epoch_crop_seeds": "order",
    **dict.fromkeys(("load_checkpoint", "load_teacher", "resolve_model"), "models"),
    **dict.fromkeys(("make_renderer", "renderer_for"), "render"),
    **dict.fromkeys(("RenderSpec", "StoreSettings"), "schema"),
    "LabelStore": "store",
    **dict.fromkeys(("VerifyReport", "teacher_logits", "verify_store"), "verify"),
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
