"""The README and docs/ keep their word: their Python snippets run as written, every CLI flag is
documented, tables are intact, quoted results equal their results files, links resolve, and the
demo figures the README quotes are the demo's own committed output."""

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
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def python_snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page,count", [("README.md", 1), ("docs/api.md", 2)])
def test_python_snippets_run_as_written(page, count, tmp_path, monkeypatch):
    """Each ```python block of the page, in order, in a fresh namespace, in a folder with what
    they name: data/train (10 classes of generated images) and cifar10-resnet56.th (a state dict)."""
    snippets = python_snippets((ROOT / page).read_text())
    assert len(snippets) == count
    generated_images(tmp_path / "data", classes=10, per_class=8)  # data/train
    torch.save(random_teacher(seed=0, spec="cifar_resnet56").state_dict(), tmp_path / "cifar10-resnet56.th")
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(snippets):
        namespace: dict = {}
        exec(compile(code, f"{page} python snippet {i + 1}", "exec"), namespace)
    store = namespace["store"]
    assert store.num_images == 80 and store.complete


def _commands():
    yield from ((f"hald-store {name}", cmd) for name, cmd in store_cli.commands.items())
    yield "hald-train", train_cli
    yield "hald-demo", demo_cli


@pytest.mark.parametrize("name,command", list(_commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_flag_is_documented(name, command):
    """Each option of each command appears in the README or docs/cli.md in backticks (`--flag` or `-x/--flag`)."""
    documented = README + (ROOT / "docs" / "cli.md").read_text()
    missing = [max(p.opts, key=len) for p in command.params if isinstance(p, click.Option) and
               not any(re.search(rf"`[^`]*(?<![\w-]){re.escape(o)}(?![\w-])[^`]*`", documented)
                   for o in p.opts + p.secondary_opts)]
    assert not missing, f"{name}: undocumented flags {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_tables_are_not_split(page):
    """A table row (a line starting with '|') is never separated from its table by prose."""
    lines = (ROOT / page).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i and lines[i - 1].strip() and not lines[i - 1].startswith("|"):
            pytest.fail(f"{page} line {i + 1}: a table row after prose: {line[:60]!r}")


def quoted_blocks(text: str) -> list[tuple[str, str]]:
    """(file, block) for each ``<!-- quote: FILE -->`` marker: the table or fenced block after it."""
    found = []
    for m in re.finditer(r"^<!-- quote: (\S+) -->\n", text, flags=re.M):
        path, lines = m.group(1), text[m.end():].lstrip("\n").splitlines()
        if lines[0].startswith("```"):
            block = lines[1:lines.index("```", 1)]
        else:
            block = lines[:next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]
        found.append((path, "\n".join(block)))
    return found


@pytest.mark.parametrize("page", PAGES)
def test_quoted_results_equal_their_files(page):
    """A block marked as quoted appears verbatim in its results file (quoted, not rewritten)."""
    for path, block in quoted_blocks((ROOT / page).read_text()):
        source = (ROOT / path).resolve()
        assert source.is_relative_to(ROOT) and source.is_file(), f"{page}: quotes {path!r}, not a file of the repository"
        assert block.strip() and block in source.read_text(), f"{page}: the block quoted from {path} differs from it"


def test_readme_results_table_is_quoted():
    quotes = quoted_blocks(README)
    assert any(block.startswith(("| S | codec |", "| data | labels |")) and path.startswith("benchmarks/results/")
               for path, block in quotes)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    """Each relative link names a file of the repository, and a #anchor into a Markdown page names a heading there."""
    here = (ROOT / page).parent
    for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / page).read_text()):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (here / path).resolve() if path else ROOT / page
        assert dest.exists(), f"{page}: link to {target!r}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page}: link to {target!r}: no such heading"


def test_readme_is_a_front_page():
    """About 200 lines; the reference lives in docs/."""
    assert len(README.splitlines()) <= 220
    for page in ("cli", "api", "architecture", "data-path", "format", "benchmarks", "hald", "testing"):
        assert f"(docs/{page}.md)" in README


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


def test_readme_speed_against_ffcv_is_the_committed_benchmark():
    """The README's loader-against-FFCV ratios are those of the committed throughput.py runs."""
    quiet = ROOT / "benchmarks" / "results" / "throughput-issue19" / "quiet"
    ratios = {}
    for workload in ("cifar-32px", "photo-224px"):
        for row in json.loads((quiet / "five-rounds-both-workloads.json").read_text())["results"]:
            if row.get("workload") == workload and row.get("vs_ffcv_raw_per_round"):
                kind = ("cached" if row["what"].startswith("hald-store loader (default")
                        else "rendering" if row["what"].startswith("hald-store loader, pillow renderer")
                        else None)
                if kind:
                    ratios[workload, kind] = f"{row['vs_ffcv_raw_per_round']:.2f}x"
    said = re.search(r"Loader speed on 2 CPU cores.*?\*\*(\S+)\*\* at 32 px and \*\*(\S+)\*\* at 224 px.*?"
                     r"rendering every epoch, (\S+) at 32 px and (\S+)\s+at 224 px", README, re.S)
    assert said, "the README's speed sentence is missing"
    assert list(said.groups()) == [ratios["cifar-32px", "cached"], ratios["photo-224px", "cached"],
                                   ratios["cifar-32px", "rendering"], ratios["photo-224px", "rendering"]]
