"""The README keeps its word: its Python snippets run as written, every CLI flag is documented,
and the demo figures it quotes are the demo's own committed output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import torch

from hald_store.cli import main as store_cli
from hald_train.cli import demo as demo_cli
from hald_train.cli import main as train_cli
from hald_train.demo import README_BEGIN, README_END, summary_markdown

from .conftest import generated_images, random_teacher

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_python_snippets_run_as_written(tmp_path, monkeypatch):
    """Each ```python block, in order, in a fresh namespace, in a folder with what they name:
    data/train (10 classes of generated images) and cifar10-resnet56.th (a state dict)."""
    snippets = python_snippets(README)
    assert len(snippets) == 2
    generated_images(tmp_path / "data", classes=10, per_class=8)  # data/train
    torch.save(random_teacher(seed=0, spec="cifar_resnet56").state_dict(), tmp_path / "cifar10-resnet56.th")
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(snippets):
        namespace: dict = {}
        exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
    store = namespace["store"]
    assert store.num_images == 80 and store.complete and namespace["schedule"].epochs == 8


def _commands():
    yield from ((f"hald-store {name}", cmd) for name, cmd in store_cli.commands.items())
    yield "hald-train", train_cli
    yield "hald-demo", demo_cli


@pytest.mark.parametrize("name,command", list(_commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_flag_is_documented(name, command):
    """Each option of each command appears in the README in backticks (`--flag` or `-x/--flag`)."""
    missing = [max(p.opts, key=len) for p in command.params if isinstance(p, click.Option) and
               not any(re.search(rf"`[^`]*(?<![\w-]){re.escape(o)}(?![\w-])[^`]*`", README)
                   for o in p.opts + p.secondary_opts)]
    assert not missing, f"{name}: undocumented flags {missing}"


def test_tables_are_not_split():
    """A table row (a line starting with '|') is never separated from its table by prose."""
    lines = README.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i and lines[i - 1].strip() and not lines[i - 1].startswith("|"):
            pytest.fail(f"README.md line {i + 1}: a table row after prose: {line[:60]!r}")


def test_readme_quotes_the_committed_demo_output():
    """The README's demo block is docs/demo/summary.md, which is the demo's own rendering of
    docs/demo/summary.json (so neither was edited by hand)."""
    docs = ROOT / "docs" / "demo"
    summary = json.loads((docs / "summary.json").read_text())
    md = (docs / "summary.md").read_text()
    assert md == summary_markdown(summary)
    block = README.split(README_BEGIN)[1].split(README_END)[0]
    assert block == "\n" + md
    for value in (summary["teacher_test_top1"], *(s["test_top1"] for s in summary["students"].values())):
        assert f"{100 * value:.1f}%" in block
    assert f"time: {summary['seconds']['total']:.0f} s" in block
    assert summary["settings"]["teacher_epochs"] == 12 and not summary["reused"]  # the quick default, run whole


def test_install_size_and_data_are_stated():
    assert "about 6 GB" in README and "CUDA" in README and "docs/testing.md" in README
    assert (ROOT / "docs" / "testing.md").exists() and (ROOT / "docs" / "demo.md").exists()
