"""The typed store schema: format-1 attributes still read (their codec in format 2's form),
format-2 attributes round-trip exactly, and the render spec is the one way to rebuild a store's renderer."""

import json

import click
import pytest

from hald_store import LabelCodec, RenderSpec, StoreSettings, renderer_for
from hald_store.cli import flag_message
from hald_store.errors import OptionError, StoreError
from hald_store.schema import LabellingPlan, TeacherInfo

_POLICY = {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333333333333333], "flip_prob": 0.5}
_MEAN, _STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_RENDERER = {"backend": "torchvision", "interpolation": "bilinear", "antialias": True, "size": 16, "mean": _MEAN,
             "std": _STD, "torchvision_version": "0.29.1+cu130"}
_COMMON = {"num_images": 12, "crops_per_image": 2, "num_classes": 3, "class_names": ["cat", "dog", "eel"],
           "plan_seed": 0, "crop_policy": _POLICY, "input_size": 16, "mean": _MEAN, "std": _STD, "renderer": _RENDERER}
_FP32 = {"version": 1, "values": "fp32", "top_k": 3, "num_classes": 3, "temperature": 20.0}
_UINT8 = {"version": 1, "values": "uint8", "top_k": 2, "num_classes": 3, "temperature": 20.0}
_TAIL = {"manifest_blake2b": "4d41088bc1543d4d044aff45247697ba", "skipped": []}

# Attributes written by hald-store before the schema existed (zarr.json, "hald_store" key).
BUILT = {"format": "hald-store", "format_version": 1, "library_version": "0.1.0", **_COMMON,
         "teacher": {"name": "r20", "weights_sha256": "da21e1", "mode": "eval"}, "codec": _FP32, **_TAIL,
         "integrity": {"checksum": "crc32c", "every_chunk_written": True}}
BATCH = {"library_version": "0.1.0", **_COMMON, "teacher": {"name": "CifarResNet", "weights_sha256": "da21e1",
                                                            "mode": "train"},
         "codec": _UINT8, **_TAIL, "labelling": {"mode": "batch", "teacher_mode": "train", "num_images": 12, "epochs": 2,
                                                 "batch_size": 4, "seed": 0, "mix": "cutmix", "mix_alpha": 1.0,
                                                 "size": 16}}
IMPORTED = {"library_version": "0.1.0", **_COMMON, "teacher": {"name": "imported", "weights_sha256": None, "mode": "train"},
            "codec": _UINT8, **_TAIL,
            "labelling": {"mode": "batch", "teacher_mode": "train", "num_images": 12, "epochs": 2, "batch_size": 4,
                          "seed": None, "mix": "cutmix", "mix_alpha": None, "size": 16},
            "imported_from": {"format": "fkd-reference", "labels_dir": "/labels", "epoch_files": 2,
                              "source_bytes": 1234, "sampler_indices": True}}
CONVERTED = {"library_version": "0.1.0", **_COMMON, "teacher": {"name": "r20", "weights_sha256": "da21e1", "mode": "eval"},
             "codec": _UINT8, **_TAIL, "reencoded_from": _FP32}
# benchmarks/scale.py: a synthetic teacher and renderer
SYNTHETIC = {"library_version": "0.1.0", **{k: v for k, v in _COMMON.items() if k != "renderer"},
             "renderer": {"backend": "synthetic", "size": 16},
             "teacher": {"name": "synthetic-logits", "weights_sha256": None, "mode": "eval", "synthetic": True},
             "codec": _UINT8, **_TAIL}


def _format_2(codec: dict) -> dict:
    return LabelCodec.from_dict(codec).to_dict()


@pytest.mark.parametrize("attrs", [BUILT, BATCH, IMPORTED, CONVERTED], ids=["built", "batch", "imported", "converted"])
def test_format_1_attributes_read_and_format_2_round_trips_exactly(attrs):
    settings = StoreSettings.from_dict(attrs)
    expected = {k: v for k, v in attrs.items() if k not in ("format", "format_version", "integrity")}
    for key in ("codec", "reencoded_from"):
        if key in expected:
            expected[key] = _format_2(expected[key])
    assert expected["codec"]["name"] == attrs["codec"]["values"]
    assert json.dumps(settings.to_dict()) == json.dumps(expected)  # same keys, values and order
    assert StoreSettings.from_dict(settings.to_dict()) == settings


def test_typed_fields():
    s = StoreSettings.from_dict(BATCH)
    assert s.codec == LabelCodec("uint8", 2, 3, 20.0) and s.crop_policy.scale == (0.08, 1.0)
    assert s.render_spec == RenderSpec("torchvision", 16, tuple(_MEAN), tuple(_STD), "bilinear", True,
                                       {"torchvision_version": "0.29.1+cu130"})
    assert s.teacher == TeacherInfo("CifarResNet", "da21e1", "train")
    assert s.labelling == LabellingPlan("train", 12, 2, 4, 0, "cutmix", 1.0, 16)
    assert StoreSettings.from_dict(BUILT).labelling is None
    conv = StoreSettings.from_dict(BUILT).reencoded(LabelCodec("uint8", 2, 3, 20.0))
    assert conv.reencoded_from == LabelCodec.from_dict(_FP32) and conv.to_dict()["reencoded_from"] == _format_2(_FP32)


def test_partial_attributes_read_with_defaults():
    s = StoreSettings.from_dict(SYNTHETIC)
    assert s.render_spec.backend == "synthetic" and s.render_spec.interpolation == "bilinear"
    assert s.teacher.extra == {"synthetic": True} and s.to_dict()["teacher"] == SYNTHETIC["teacher"]
    assert StoreSettings.from_dict(s.to_dict()) == s
    with pytest.raises(StoreError, match="lacks 'codec'"):
        StoreSettings.from_dict({k: v for k, v in BUILT.items() if k != "codec"})


def test_render_spec_rebuilds_the_recorded_renderer():
    spec = RenderSpec("torchvision", 24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", False)
    r = renderer_for(spec, device="cpu")
    assert (r.backend, r.size, r.interpolation, r.antialias, r.mean) == ("torchvision", 24, "bicubic", False,
                                                                         (0.5, 0.5, 0.5))
    assert RenderSpec.of(r) == RenderSpec("torchvision", 24, (0.5,) * 3, (0.25,) * 3, "bicubic", False,
                                          {"torchvision_version": r.describe()["torchvision_version"]})


def test_cli_names_flags_where_the_library_names_parameters():
    @click.command()
    @click.option("--crops-per-image", "-s", type=int)
    @click.option("--slc", type=int)
    @click.option("--device")
    @click.option("--resume", is_flag=True)
    def cmd(**_):
        pass

    def shown(message, *options):
        return flag_message(OptionError(message, *options), cmd)

    assert shown("give exactly one of crops_per_image and slc", "crops_per_image", "slc") == \
        "give exactly one of --crops-per-image and --slc"
    assert shown("slc=12 is not a multiple; try slc=16", "slc") == "--slc 12 is not a multiple; try --slc 16"
    assert shown("device='tpu': not a device", "device") == "--device tpu: not a device"
    assert shown("pass resume=True or overwrite=True", "resume", "overwrite") == "pass --resume or overwrite=True"
    assert shown("crops_per_image must be >= 1") == "crops_per_image must be >= 1"  # names only what it declares
