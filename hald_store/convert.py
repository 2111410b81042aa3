"""Re-encode a store's labels with another codec (fewer classes kept, fewer bits), keeping
its images, crops and every other attribute. Cheap: no teacher, no pixels."""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from .codec import LabelCodec
from .errors import HaldStoreError, OptionError
from .locations import same_location
from .replay import BATCH_ARRAYS, batch_path
from .store import LabelStore
from .writer import StoreWriter

_ROWS = 65536  # crops re-encoded at a time


def reencode_store(
    src: LabelStore | str | os.PathLike,
    dst: str | os.PathLike,
    *,
    top_k: int,
    values: str,
    overwrite: bool = False,
    progress: bool = True,
) -> LabelStore:
    """Write ``dst``: ``src`` with its labels decoded and re-encoded as ``(top_k, values)``.

    From a full-precision source (``top_k`` = number of classes, ``fp32``) the result equals a
    fresh build with the new codec up to float rounding of the logit gaps. A source that keeps
    fewer classes can only lose more: ``top_k`` may not exceed the source's. The new store is
    written beside ``dst`` and moved into place when complete, so an existing ``dst`` survives
    a failure; ``dst`` may not be (or lie inside) the source.
    """
    src = src if isinstance(src, LabelStore) else LabelStore.open(src)
    dst = os.fspath(dst)
    if same_location(src.path, dst):
        raise HaldStoreError(f"DST {dst!r} is the source store {src.path!r} (or inside it): write the new store to "
                             "another path")
    if top_k > src.codec.top_k:
        raise OptionError(f"top_k={top_k} exceeds the {src.codec.top_k} classes per crop the source store keeps: "
                          "the others are gone", "top_k")
    codec = LabelCodec.checked(values, top_k, src.num_classes, src.temperature)
    so = src.storage_options
    batches = {k: src.array(batch_path(k))[:] for k in BATCH_ARRAYS} if src.batch_mode else None
    with StoreWriter(dst, overwrite=overwrite, storage_options=so, resumable=False) as writer:
        out = writer.open(src.manifest(), lambda a, b: (src.array("crops/box")[a:b], src.array("crops/flip")[a:b]),
                          src.settings.reencoded(codec), src.chunk_images, batches=batches)
        for block in tqdm(writer.todo(), desc="re-encode", unit="block", disable=not progress):
            sel = (slice(None), block) if out.batch_mode else slice(*out.block_range(block))
            fields = {k: src.array(f"labels/{k}")[sel] for k in src.codec.fields()}
            lead = next(iter(fields.values())).shape[: 1 if out.batch_mode else 2]
            flat = {k: v.reshape(-1, *v.shape[len(lead):]) for k, v in fields.items()}
            rows_in_block = int(np.prod(lead))
            new = {k: np.empty((rows_in_block, *shape), dtype) for k, (dtype, shape) in codec.fields().items()}
            for a in range(0, rows_in_block, _ROWS):  # bounded memory: never a block of dense logits
                rows = {k: v[a : a + _ROWS] for k, v in flat.items()}
                for k, v in codec.encode(src.codec.decode(rows).dense_logits()).items():
                    new[k][a : a + _ROWS] = v
            out.write_block(block, {k: v.reshape(*lead, *v.shape[1:]) for k, v in new.items()})
    return LabelStore.open(dst, storage_options=so)
