"""The README's headline figures are made from the committed results (bench/headline.py): the check passes on the
repository, and fails when a record changes, goes missing or a README figure is typed by hand."""

import json
import shutil
import subprocess
import sys

from bench import headline
from bench.common import RESULTS

from conftest import ROOT


def test_the_readme_headline_figures_are_their_records():
    assert headline.check(headline.README.read_text()) == []
    done = subprocess.run([sys.executable, "-m", "bench.headline", "--check"], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for row in headline.ROWS:  # every row names its records, each of them committed, and a command
        assert row.files and row.command.startswith("python -m bench.")
        assert all((RESULTS / f"{name}.json").is_file() and (RESULTS / f"{name}.md").is_file() for name in row.files)


def _copy_results(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder, ignore=shutil.ignore_patterns("*.png"))
    return folder


def test_a_changed_record_a_missing_record_and_a_typed_figure_each_fail(tmp_path):
    readme = headline.README.read_text()
    folder = _copy_results(tmp_path)
    writes = folder / "index_writes-cpu2.json"
    data = json.loads(writes.read_text())
    data["verdict"]["add_p50_ms"] *= 2  # re-measured, README not rewritten
    writes.write_text(json.dumps(data))
    problems = headline.check(readme, headline.Results(folder))
    assert len(problems) == 2 and all("index writes" in p for p in problems), problems

    (folder / "composed-cpu2.json").unlink()  # a figure with no record behind it
    problems = headline.check(readme, headline.Results(folder))
    assert any("composed queries" in p and "no result file" in p for p in problems), problems

    typed = readme.replace("| [train step vs PyTorch]", "| [train step vs PyTorch] (by hand)")
    problems = headline.check(typed)
    assert any("not made from its records" in p and "by hand" in p for p in problems), problems
    assert headline.check(readme.replace(headline.BEGIN, "")) != []  # no markers: nothing checked is a failure


def test_write_puts_the_table_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{headline.BEGIN}\n| stale |\n{headline.END}\n\nafter\n")
    done = subprocess.run([sys.executable, "-m", "bench.headline", "--write", "--readme", str(readme)], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "| stale |" not in text and text.endswith("\n\nafter\n") and headline.check(text) == []
