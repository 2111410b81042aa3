"""Write the format-1 store fixture (run once, with hald-store as of commit 0b2ebc3, the last
format-1 writer): 6 generated 32-px JPEGs (3 classes x 2), labelled by the shared CIFAR-10
ResNet-20 teacher, 3 crops each, top-3 uint4 labels, plus the labels that code decoded.

    PYTHONPATH=$PWD python tests/data/format1/make_format1.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from hald_store import LabelStore, build_store, load_teacher
from hald_store.testing import shared_data_path
from hald_train.scenes import make_shapes_dataset

HERE = Path(__file__).resolve().parent


def main() -> None:
    for name in ("images", "store", "labels.npz"):
        path = HERE / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    scenes = make_shapes_dataset(HERE / "scenes", num_classes=3, train_per_class=2, test_per_class=1, size=32)
    shutil.move(scenes / "train", HERE / "images")
    shutil.rmtree(scenes)
    teacher = load_teacher("cifar_resnet20", shared_data_path("teachers", "cifar10-resnet20.th"), 10)
    build_store(HERE / "images", HERE / "store", teacher, num_classes=10, crops_per_image=3, top_k=3,
                values="uint4", input_size=32, chunk_images=2, backend="torchvision", device="cpu", progress=False)
    store = LabelStore.open(HERE / "store")
    images, seeds = np.divmod(np.arange(store.num_images * store.crops_per_image), store.crops_per_image)
    labels = store.read(images, seeds)
    np.savez(HERE / "labels.npz", indices=labels.indices.numpy(), logits=labels.logits.numpy(),
             rest_logit=labels.rest_logit.numpy())


if __name__ == "__main__":
    main()
