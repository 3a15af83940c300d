"""Assemble the sources of the static site (``make docs``) in ``build/docs-src``: the README as the home
page, docs/mathematics.md, every notebook of the series in reading order and the offline KaTeX assets.

A notebook page shows the executed full-profile notebook of ``docs/executed/`` (what ``make run-all``
wrote, with the numbers and figures the README reports) when there is one, and otherwise the paired
``notebooks/<name>.ipynb`` with a note that it holds smoke-profile outputs. The text and code shown are
always the current source (``notebooks/<name>.py``); the outputs of an executed run are attached to the
cells whose code is unchanged since that run (jupytext's ``combine_inputs_with_outputs``), and a note
says how many cells were added or changed since and have no outputs on the page.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "build" / "docs-src"
KATEX = REPO / ".venv" / "node" / "node_modules" / "katex" / "dist"
# reading order, and the dataset whose full run a page shows
SERIES = [("pretrain", "mnist"), ("vdu_unlearning", "mnist"), ("duality", "gmm"), ("benchmark", "mnist"),
          ("constrained_unlearning", "mnist"), ("data_unlearning", "mnist"), ("evaluation", "mnist"),
          ("posteriors", "mnist")]
RENDER = """// render $...$ and $$...$$ (notebook cells) and arithmatex's \\( \\) / \\[ \\] (markdown pages) with KaTeX
document$.subscribe(function () {
  renderMathInElement(document.body, {
    delimiters: [{left: "$$", right: "$$", display: true}, {left: "\\\\[", right: "\\\\]", display: true},
                 {left: "$", right: "$", display: false}, {left: "\\\\(", right: "\\\\)", display: false}],
    throwOnError: false, ignoredClasses: ["highlight", "jp-OutputArea"]
  });
});
"""


def _offline(nb: dict) -> dict:
    """Drop ipywidgets state and views (progress bars of a run): they would make the page load the widget
    manager from a CDN; their plain-text form stays."""
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            out.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
    return nb


def _note(nb: dict, text: str) -> dict:
    nb["cells"].insert(1, {"cell_type": "markdown", "metadata": {}, "source": text, "id": "site-note"})
    return nb


def _current_source_with_outputs(name: str, executed: Path) -> tuple[dict, int]:
    """The current ``notebooks/<name>.py`` with the outputs of ``executed`` on the unchanged code cells."""
    import jupytext
    from jupytext.combine import combine_inputs_with_outputs
    source = jupytext.read(REPO / "notebooks" / f"{name}.py")
    run = jupytext.read(executed)
    injected = [c for c in run.cells if "injected-parameters" in c.metadata.get("tags", [])]
    run.cells = [c for c in run.cells if c not in injected]
    nb = combine_inputs_with_outputs(source, run)
    ran = {c.source for c in run.cells if c.cell_type == "code"}
    stale = sum(1 for c in nb.cells if c.cell_type == "code" and c.source not in ran)
    at = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if injected and at is not None:          # the parameters the run used, right after the defaults
        nb.cells.insert(at + 1, injected[0])
    return json.loads(jupytext.writes(nb, fmt="ipynb")), stale


def main() -> int:
    if not (KATEX / "katex.min.js").exists():
        print(f"KaTeX not found in {KATEX}: run `make setup` on a machine with npm", file=sys.stderr)
        return 1
    if SRC.exists():
        shutil.rmtree(SRC)
    (SRC / "notebooks").mkdir(parents=True)
    readme = (REPO / "README.md").read_text()
    readme = readme.replace("(docs/mathematics.md)", "(mathematics.md)")
    readme = re.sub(r"<!-- /?report[^>]*-->\n", "", readme)
    (SRC / "index.md").write_text(readme)
    shutil.copy(REPO / "docs" / "mathematics.md", SRC / "mathematics.md")
    shutil.copytree(KATEX, SRC / "assets" / "katex", ignore=shutil.ignore_patterns("*.mjs", "katex.js", "*.ttf", "*.woff", "*.md"))
    (SRC / "assets" / "render-math.js").write_text(RENDER)
    (SRC / "assets" / "site.css").write_text(".katex-display { overflow-x: auto; overflow-y: hidden; }\n")
    shown = {}
    for name, dataset in SERIES:
        executed = REPO / "docs" / "executed" / f"{name}-{dataset}.ipynb"
        meta = json.loads(executed.read_text())["metadata"].get("papermill", {}) if executed.exists() else {}
        if meta.get("end_time") and not meta.get("exception"):       # a finished run (not one in progress)
            nb, stale = _current_source_with_outputs(name, executed)
            when = meta["end_time"][:10]
            note = f"> **Outputs of the full-profile run** (`{executed.relative_to(REPO)}`, {when}; `make run-all`)."
            if stale:
                note += (f" {stale} code cell(s) were added or changed after that run and show no output here; "
                         f"the next `make run-all` fills them in.")
            nb = _note(nb, note)
            shown[name] = f"full profile ({executed.relative_to(REPO)}; {stale} cell(s) newer than the run)"
        else:
            nb = _note(json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text()),
                       f"> **This page holds the smoke-profile notebook** (tiny settings, toy numbers): its full-profile "
                       f"run is not committed yet. The README reports what the full profile measured.")
            shown[name] = "smoke profile (notebooks/)"
        (SRC / "notebooks" / f"{name}.ipynb").write_text(json.dumps(_offline(nb)))
    for name, what in shown.items():
        print(f"{name:<24} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
