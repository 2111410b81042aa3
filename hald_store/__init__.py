"""hald-store: compact soft-label stores, exact crop replay and the HALD training schedule.

The public API::

    from hald_store import build_store, BuildConfig, LabelStore, StoreSettings, LabelCodec, CropPolicy, plan_crops
"""

__version__ = "0.1.0"

from .build import BuildConfig, BuildSummary, build_store  # noqa: E402
from .codec import VALUE_CODECS, LabelCodec, TopKLabels  # noqa: E402
from .convert import reencode_store  # noqa: E402
from .crop_plan import CropPolicy, plan_crops  # noqa: E402
from .errors import HaldStoreError  # noqa: E402
from .images import Manifest, scan_image_folder  # noqa: E402
from .importer import ImportSummary, import_reference  # noqa: E402
from .loader import CropLoader, EvalLoader, HardLabelLoader, SoftLabelLoader  # noqa: E402
from .order import epoch_crop_seeds  # noqa: E402
from .models import load_checkpoint, load_teacher, resolve_model  # noqa: E402
from .render import make_renderer  # noqa: E402
from .schema import RenderSpec, StoreSettings  # noqa: E402
from .store import LabelStore  # noqa: E402
from .verify import VerifyReport, teacher_logits, verify_store  # noqa: E402

__all__ = [
    "__version__", "BuildConfig", "BuildSummary", "build_store", "StoreSettings", "RenderSpec", "VALUE_CODECS", "LabelCodec", "TopKLabels", "CropPolicy",
    "plan_crops", "HaldStoreError", "Manifest", "scan_image_folder", "ImportSummary", "import_reference", "load_checkpoint", "load_teacher", "resolve_model",
    "make_renderer", "CropLoader", "SoftLabelLoader", "HardLabelLoader", "EvalLoader", "epoch_crop_seeds", "LabelStore", "VerifyReport", "reencode_store", "teacher_logits", "verify_store",
]
