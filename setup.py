import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("hald_store/_version.py", encoding="utf-8").read()).group(1)

setup(
    name="hald-store",
    version=VERSION,
    description="Compact soft-label stores, exact crop replay and the HALD schedule for "
    "dataset distillation and fast knowledge distillation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hald_store", "hald_store.*", "hald_train", "hald_train.*"]),
    package_data={"hald_train": ["assets/demo_teacher.pt", "assets/demo_teacher.json"]},
    install_requires=[
        # torchvision>=0.29 pulls a matching torch; never pin torch itself (see README).
        "torchvision>=0.29",
        "nvidia-dali-cuda130>=2.0",
        "zarr>=3.1",  # crc32c codec, Array.with_config
        "numcodecs>=0.13",
        "numpy>=1.24",
        "click>=8.1",
        "tqdm>=4.60",
        "pillow>=9.0",
        "numba>=0.61",  # the pillow renderer's compiled kernel (hald_store.resample)
        "matplotlib>=3.6",
        "fsspec>=2023.1",
        "filelock>=3.12",
    ],
    extras_require={
        "s3": ["s3fs"],
        "test": ["pytest>=7.0", "s3fs", "moto[server]>=5"],
    },
    entry_points={"console_scripts": ["hald-store=hald_store.cli:main", "hald-train=hald_train.cli:main",
                                      "hald-demo=hald_train.cli:demo"]},
)
