"""The embedded demo (hald_train.demo): says what it does and where, reuses only matching
steps and says so, starts over on request, and writes its summary; the shipped teacher is
checked, loads, and meets the scenes it was trained on byte for byte."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace

import pytest
from click.testing import CliRunner

from hald_store.errors import HaldStoreError
from hald_train.cli import demo as demo_cli
from hald_store import EvalLoader
from hald_train.demo import (ASSETS, QUICK, SHIPPED_TEACHER, SHIPPED_TEACHER_INFO, DemoSettings, demo_scenes,
                             format_table, load_shipped_teacher, make_teacher, run_demo, scenes_sha256,
                             summary_markdown)
from hald_train.trainer import evaluate

TINY = DemoSettings(num_classes=3, train_per_class=8, test_per_class=4, teacher_epochs=1, student_epochs=2,
                    batch_size=8, teacher_batch_size=8, train_teacher=True)
SHIPPED = json.loads((ASSETS / SHIPPED_TEACHER_INFO).read_text())


def test_demo_says_what_it_does_reuses_and_starts_fresh(tmp_path):
    out, lines = tmp_path / "demo", []
    r = run_demo(out, TINY, progress=False, log=lines.append)
    assert str(out.resolve()) in lines[0]
    steps = [ln for ln in lines if ln.startswith("[")]
    assert [ln[:5] for ln in steps] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert str(out / "teacher.pt") in steps[1] and str(out / "labels.zarr") in steps[2]
    assert not any("reused" in ln for ln in lines) and r["reused"] == []
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.md").read_text() == summary_markdown(summary)
    assert summary["students"]["shs"]["test_top1"] == r["students"]["shs"]["test_top1"]
    assert set(summary["seconds"]) == {"scenes", "teacher", "store", "student-shs", "student-soft-only", "total"}
    table = format_table(r)
    assert "B of label chunks" in table and "zarr metadata" in table and "time: " in table

    again = []  # every step reused, and said to be
    r2 = run_demo(out, TINY, progress=False, log=again.append)
    assert sum("reused from an earlier run; --fresh starts over" in ln for ln in again) == 5
    assert r2["reused"] == ["scenes", "teacher", "store", "student-shs", "student-soft-only"]
    assert r2["students"] == r["students"]

    other = replace(TINY, student_epochs=3)
    with pytest.raises(HaldStoreError, match="holds a demo made with other settings"):
        run_demo(out, other, progress=False)
    (out / "mine.txt").write_text("not the demo's")
    fresh = []
    r3 = run_demo(out, other, progress=False, fresh=True, log=fresh.append)
    assert fresh[0].startswith("--fresh: removed the earlier demo's scenes, teacher.pt")
    assert r3["reused"] == [] and r3["students"]["shs"]["schedule"] == "soft:1,hard:1,soft:1"
    assert (out / "mine.txt").read_text() == "not the demo's"  # only the demo's own files go


def test_cli_refuses_a_folder_of_another_demo_naming_flags(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo-settings.json").write_text(json.dumps({"teacher_epochs": 99}))
    r = CliRunner().invoke(demo_cli, ["--out", str(out), "-q"])
    assert r.exit_code == 1 and "pass --fresh to replace it or --out to write elsewhere" in r.output, r.output
    (out / "demo-settings.json").unlink()
    (out / "teacher.pt").write_bytes(b"")
    r = CliRunner().invoke(demo_cli, ["--out", str(out), "-q"])
    assert r.exit_code == 1 and "without demo-settings.json" in r.output, r.output


def test_cli_train_teacher_reaches_the_settings(tmp_path):
    """--train-teacher is a setting: a folder made with the shipped teacher is refused for it."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo-settings.json").write_text(json.dumps(asdict(QUICK)))
    r = CliRunner().invoke(demo_cli, ["--out", str(out), "-q", "--train-teacher"])
    assert r.exit_code == 1 and "holds a demo made with other settings" in r.output, r.output


def test_quick_is_the_default_and_full_is_longer():
    from hald_train.demo import FULL

    assert DemoSettings() == QUICK and QUICK.teacher_epochs < FULL.teacher_epochs
    assert QUICK.student_epochs < FULL.student_epochs


def test_scenes_are_deterministic_and_those_the_shipped_teacher_learnt(tmp_path):
    """The generator, run twice, writes the same bytes, and they are the bytes the shipped teacher
    was trained and tested on: its recorded top-1 is met exactly here."""
    a, b = demo_scenes(tmp_path / "a", QUICK), demo_scenes(tmp_path / "b", QUICK)
    assert scenes_sha256(a) == scenes_sha256(b) == SHIPPED["scenes_sha256"]
    assert scenes_sha256(a) != scenes_sha256(demo_scenes(tmp_path / "c", replace(QUICK, seed=1)))
    teacher, info = load_shipped_teacher(QUICK)
    assert info == SHIPPED and 0 < info["bytes"] <= 600_000
    top1 = evaluate(teacher, EvalLoader(a / "test", input_size=QUICK.input_size, device="cpu"))["top1"]
    assert top1 == SHIPPED["test_top1"] > 2 / QUICK.num_classes


def test_make_teacher_is_deterministic(tmp_path):
    """Two runs of the script that made the shipped teacher write the same bytes (a tiny size)."""
    tiny = replace(TINY, num_classes=2, train_per_class=4, test_per_class=2, teacher_batch_size=4)
    a, b = (make_teacher(tmp_path / name, tiny, epochs=1, progress=False) for name in ("a", "b"))
    assert a["sha256"] == b["sha256"] and a["scenes_sha256"] == b["scenes_sha256"]
    assert (tmp_path / "a" / SHIPPED_TEACHER).read_bytes() == (tmp_path / "b" / SHIPPED_TEACHER).read_bytes()
    _, info = load_shipped_teacher(tiny, tmp_path / "a")
    assert info == a and a["settings"]["num_classes"] == 2


def test_shipped_teacher_is_checked_before_loading(tmp_path):
    """A damaged file or other scenes are refused, naming --train-teacher; nothing is unpickled."""
    with pytest.raises(HaldStoreError, match=r"trained on scenes .*--train-teacher"):
        load_shipped_teacher(replace(QUICK, num_classes=5))
    shutil.copytree(ASSETS, tmp_path / "assets")
    blob = bytearray((tmp_path / "assets" / SHIPPED_TEACHER).read_bytes())
    blob[-100] ^= 1
    (tmp_path / "assets" / SHIPPED_TEACHER).write_bytes(bytes(blob))
    with pytest.raises(HaldStoreError, match=r"does not match the sha256 .*--train-teacher"):
        load_shipped_teacher(QUICK, tmp_path / "assets")


def test_quick_demo_uses_the_shipped_teacher_and_says_so(tmp_path):
    lines = []
    r = run_demo(tmp_path / "demo", replace(QUICK, crops_per_image=1, student_epochs=3, batch_size=60), progress=False,
                 log=lines.append)
    said = next(ln for ln in lines if ln.startswith("[2/5]"))
    assert "using the shipped demo teacher" in said and f"{100 * SHIPPED['test_top1']:.1f}%" in said
    assert "--train-teacher" in said and not any(ln.startswith("note:") for ln in lines)
    assert r["teacher_test_top1"] == SHIPPED["test_top1"] and not (tmp_path / "demo" / "teacher.pt").exists()
    assert "the shipped teacher" in format_table(r)
