"""Every formula in the notebooks' markdown and in docs/*.md renders with a real TeX-math renderer (KaTeX, run by node):
a corrupted equation (a stray TAB where ``\\t`` of ``\\theta`` was, an unbalanced brace, an unknown macro)
fails here instead of reaching a reader. ``make setup`` installs KaTeX from the npm registry into
``.venv/node``; without node or KaTeX the test is skipped with the reason (and fails under CI)."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KATEX = REPO / ".venv" / "node" / "node_modules" / "katex"


def markdown_cells(path: Path):
    """(first line number, text) of each markdown cell of a jupytext percent file (a .md file: one cell)."""
    if path.suffix == ".md":
        return [(1, path.read_text())]
    cells, cur, start = [], None, 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("# %%"):
            if cur is not None:
                cells.append((start, "\n".join(cur)))
            cur, start = ([] if "[markdown]" in line else None), i + 1
        elif cur is not None:
            cur.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    if cur is not None:
        cells.append((start, "\n".join(cur)))
    return cells


def formulas(path: Path):
    for start, text in markdown_cells(path):
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        text = re.sub(r"`[^`\n]*`", "", text)                    # code spans: `$VDU_DATA` is not math
        for m in re.finditer(r"\$\$(.+?)\$\$", text, flags=re.S):
            yield {"tex": m.group(1), "display": True, "where": f"{path.name}:{start + text[:m.start()].count(chr(10))}"}
        inline = re.sub(r"\$\$(.+?)\$\$", "", text, flags=re.S)
        for m in re.finditer(r"(?<![\\$])\$(?!\$)(.+?)(?<!\\)\$", inline, flags=re.S):
            yield {"tex": m.group(1), "display": False, "where": f"{path.name}:{start + inline[:m.start()].count(chr(10))}"}


CONTROL = r"[\x00-\x09\x0b-\x1f]"         # every control character but the newline
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py")) + sorted((REPO / "docs").glob("*.md"))


def test_a_lost_escape_is_caught(tmp_path):
    """What happened to a formula once: '\t' of '\theta' written through a Python string became a TAB."""
    good = "# %% [markdown]\n# $$B_\\text{fn}(\\theta)$$\n"
    nb = tmp_path / "x.py"
    nb.write_text(good)
    assert [f["tex"] for f in formulas(nb)] == ["B_\\text{fn}(\\theta)"]
    nb.write_text(good.replace("\\t", "\t"))
    (item,) = formulas(nb)
    assert re.search(CONTROL, item["tex"])


def test_extraction_finds_display_and_inline_math(tmp_path):
    nb = tmp_path / "x.py"
    nb.write_text("# %% [markdown]\n# Inline $a_t$ and `$HOME`,\n# $$\\frac{1}{2}\n# x$$\n\n# %%\nx = '$not$'\n")
    got = list(formulas(nb))
    assert [(f["tex"], f["display"]) for f in got] == [("\\frac{1}{2}\nx", True), ("a_t", False)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_formula_renders(path):
    node = shutil.which("node")
    if node is None or not KATEX.exists():
        msg = f"node ({node}) or KaTeX ({KATEX}) missing: run `make setup`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    items = list(formulas(path))
    out = subprocess.run([node, str(REPO / "tests" / "render_math.js")], input=json.dumps(items), text=True,
                         capture_output=True, env={**os.environ, "KATEX_PATH": str(KATEX)}, timeout=120)
    assert out.returncode == 0, out.stderr
    errors = json.loads(out.stdout)
    # a Python string escape eaten by the source (\t of \theta, \b of \beta, \f of \frac, \v of \varepsilon)
    # leaves a control character that still parses as TeX: refuse it outright
    errors += [{"where": f["where"], "tex": f["tex"], "error": "control character (a lost backslash escape?)"}
               for f in items if re.search(CONTROL, f["tex"])]
    assert not errors, "\n".join(f"{e['where']}: {e['error']}\n    {e['tex']!r}" for e in errors)
