"""The recipe READMEs' tables of committed runs: a table whose paragraph just above links a
folder of run records under ``results/`` has exactly the rows ``scripts/summarize_runs.py``
prints from that folder (every run in it, in the README's order), and every link into
``results/`` resolves."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from helpers import ROOT
from summarize_runs import main as summarize

RESULTS = ROOT / "results"
READMES = sorted((ROOT / "examples").glob("*/README.md"))
RESULTS_LINK = re.compile(r"\]\(((?:\.\./)+results/[^)#\s]*)\)")


def paragraphs(readme: Path) -> list[str]:
    return re.split(r"\n[ \t]*\n", readme.read_text())


def is_table(paragraph: str) -> bool:
    lines = paragraph.strip().splitlines()
    return bool(lines) and all(line.startswith("|") for line in lines)


def record_tables() -> list[tuple[Path, Path, list[str]]]:
    """(README, records folder, table lines) of every table right below a link into results/."""
    tables = []
    for readme in READMES:
        parts = paragraphs(readme)
        for above, table in itertools.pairwise(parts):
            links = RESULTS_LINK.findall(above)
            if links and is_table(table):
                folder = (readme.parent / links[-1]).resolve()
                tables.append((readme, folder, table.strip().splitlines()))
    return tables


TABLES = record_tables()


def test_the_readmes_have_tables_of_both_studies():
    folders = {folder.relative_to(RESULTS).parts[0] for _, folder, _ in TABLES}
    assert folders == {"cifar_noisy_labels", "translation_lr_study"}


@pytest.mark.parametrize(
    ("readme", "folder", "lines"),
    TABLES,
    ids=[f"{r.parent.name}:{f.relative_to(RESULTS)}" for r, f, _ in TABLES],
)
def test_readme_table_is_what_the_records_give(readme, folder, lines, capsys):
    header, rows = lines[0], lines[2:]
    kind = "noisy" if "noise fitted" in header else "translation"
    names = [row.split("|")[1].strip() for row in rows]
    runs = sorted(folder.glob("*_seed*/all_results.json"))
    assert runs, f"{folder}: no run records"

    def order(path: Path) -> tuple[int, str]:  # the README's order, unlisted runs last
        name = re.sub(r"_seed\d+$", "", path.parent.name)
        return (names.index(name) if name in names else len(names), path.parent.name)

    summarize(["--kind", kind, *(str(p.parent) for p in sorted(runs, key=order))])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].count("|") == header.count("|")
    assert printed[2:] == rows, f"{readme.relative_to(ROOT)}: the table of {folder.name}"


def test_every_link_into_results_resolves():
    for readme in [*READMES, RESULTS / "README.md"]:
        for link in re.findall(r"\]\(([^)#\s]+)\)", readme.read_text()):
            if "results" in link and "://" not in link:
                assert (readme.parent / link).exists(), f"{readme.relative_to(ROOT)}: {link}"


def test_the_results_index_names_every_records_folder():
    index = (RESULTS / "README.md").read_text()
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        assert f"`{folder.name}/" in index, f"results/README.md does not list {folder.name}"
