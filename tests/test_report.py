"""README tables come from the results files (vdu.report): the committed README matches them, a changed
number makes the check fail, and a missing results file is said, not invented."""
import json
import shutil

import pytest

from conftest import REPO
from vdu import report


def test_the_readme_tables_match_the_results_files():
    assert report.main(check=True) == 0


def test_a_changed_number_is_caught_and_rewritten(tmp_path):
    (tmp_path / "results" / "gmm").mkdir(parents=True)
    shutil.copy(REPO / "results" / "gmm" / "duality.json", tmp_path / "results" / "gmm")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:duality -->\nstale\n<!-- /report -->\noutro\n")
    assert report.main(check=True, readme=readme, root=tmp_path) == 1
    assert report.main(readme=readme, root=tmp_path) == 0
    assert report.main(check=True, readme=readme, root=tmp_path) == 0
    d = json.loads((tmp_path / "results" / "gmm" / "duality.json").read_text())
    d["exact"]["ru"]["lambda"] = [0.5]
    (tmp_path / "results" / "gmm" / "duality.json").write_text(json.dumps(d))
    assert report.main(check=True, readme=readme, root=tmp_path) == 1
    report.main(readme=readme, root=tmp_path)
    text = readme.read_text()
    assert "| exact dual optimum lambda* | 0.5 |" in text and text.startswith("intro\n") and text.endswith("outro\n")


def test_missing_results_and_unknown_blocks(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- report:data -->\n<!-- /report -->\n")
    report.main(readme=readme, root=tmp_path)
    assert "not written yet" in readme.read_text()
    readme.write_text("<!-- report:nosuch -->\n<!-- /report -->\n")
    with pytest.raises(ValueError, match="no table"):
        report.main(readme=readme, root=tmp_path)
