"""`make docs`: the site of the notebook series builds offline, with a page per notebook in reading order,
KaTeX served locally and nothing fetched from the network; where Chromium is installed, every page is
loaded headless and its mathematics must typeset without an error (docs/site/check.py)."""
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("mkdocs", path=str(REPO / ".venv" / "bin")) is None
                                and shutil.which("mkdocs") is None, reason="mkdocs not installed (make setup)")
KATEX = REPO / ".venv" / "node" / "node_modules" / "katex" / "dist" / "katex.min.js"


@pytest.mark.skipif(not KATEX.exists(), reason="KaTeX not installed (make setup with npm)")
def test_site_builds_offline_with_every_notebook():
    assert subprocess.run([sys.executable, str(REPO / "docs" / "site" / "assemble.py")], cwd=REPO).returncode == 0
    mkdocs = shutil.which("mkdocs", path=str(REPO / ".venv" / "bin")) or shutil.which("mkdocs")
    out = subprocess.run([mkdocs, "build", "--quiet"], cwd=REPO, capture_output=True, text=True,
                         env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(REPO / ".venv" / "bin") + ":/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    site = REPO / "build" / "site"
    names = [p.stem for p in sorted((REPO / "notebooks").glob("*.py"))]
    for name in names:
        html = (site / "notebooks" / f"{name}.html").read_text()
        assert "assets/katex/katex.min.js" in html and "render-math.js" in html
        assert not re.findall(r'<(?:script|link)[^>]+(?:src|href)="https?://', html), name
        assert "jp-Cell" in html or "jupyter-wrapper" in html, name
        if "Outputs of the full-profile run" in html:
            assert html.count("jp-OutputArea-output") >= 3, f"{name}: the executed run's outputs are missing"
            assert "injected-parameters" in html or "Parameters" in html, name
    assert (site / "mathematics.html").exists() and (site / "index.html").exists()
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        chk = subprocess.run([sys.executable, str(REPO / "docs" / "site" / "check.py")], cwd=REPO,
                             capture_output=True, text=True, timeout=900)
        assert chk.returncode == 0, chk.stdout[-3000:]
