"""The embedded demo (hald_train.demo): says what it does and where, reuses only matching
steps and says so, starts over on request, and writes its summary."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from hald_store.errors import HaldStoreError
from hald_train.cli import demo as demo_cli
from hald_train.demo import QUICK, DemoSettings, format_table, run_demo, summary_markdown

TINY = DemoSettings(num_classes=3, train_per_class=8, test_per_class=4, teacher_epochs=1, student_epochs=2,
                    batch_size=8, teacher_batch_size=8)


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


def test_quick_is_the_default_and_full_is_longer():
    from hald_train.demo import FULL

    assert DemoSettings() == QUICK and QUICK.teacher_epochs < FULL.teacher_epochs
    assert QUICK.student_epochs < FULL.student_epochs
