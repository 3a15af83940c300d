"""`make run-all` (vdu.notebook.run_all): every (notebook, dataset) of the matrix runs its full profile once;
an interrupted run resumes without redoing finished notebooks; a failed one is kept for inspection."""
import json

import nbformat
import pytest

from vdu import notebook
from vdu.notebook import finished, run_all


def _toy(root, name, body):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('profile = "smoke"\ndataset = "none"\nmarker = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    (root / "notebooks" / "params").mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
    (root / "notebooks" / "params" / f"{name}-full.yaml").write_text(f"profile: full\nmarker: {root / 'ok'}\n")


def test_run_all_resumes_and_keeps_failures(tmp_path, monkeypatch):
    pytest.importorskip("papermill")
    monkeypatch.setitem(notebook.MATRIX, "toy", ["first", "second"])
    _toy(tmp_path, "first", "print('first ran on', dataset)")
    _toy(tmp_path, "second", "import os\nassert os.path.exists(marker), 'not yet'")   # fails until 'ok' exists
    out = tmp_path / "executed"
    with pytest.raises(Exception, match="not yet"):
        run_all(["toy"], root=tmp_path, out=out, log=lambda *_: None)
    assert finished(out / "first-toy.ipynb") and not (out / "second-toy.ipynb").exists()
    assert (out / "second-toy.failed.ipynb").exists()            # kept for inspection
    first_time = (out / "first-toy.ipynb").stat().st_mtime_ns
    (tmp_path / "ok").write_text("")
    rows = run_all(["toy"], root=tmp_path, out=out, log=lambda *_: None)
    assert [r["status"] for r in rows] == ["skipped", "ran"]     # resumed: the finished one is not redone
    assert (out / "first-toy.ipynb").stat().st_mtime_ns == first_time and finished(out / "second-toy.ipynb")
    assert not (out / "second-toy.failed.ipynb").exists()       # the earlier failure is cleared by the success
    meta = json.loads((out / "second-toy.ipynb").read_text())["metadata"]["papermill"]["parameters"]
    assert meta["profile"] == "full" and meta["dataset"] == "toy"
    rows = run_all(["toy"], ["second"], force=True, root=tmp_path, out=out, log=lambda *_: None)
    assert [(r["notebook"], r["status"]) for r in rows] == [("second", "ran")]
    with pytest.raises(ValueError, match="unknown dataset"):
        run_all(["cifar"], root=tmp_path, out=out)
    with pytest.raises(ValueError, match="unknown notebook"):
        run_all(["toy"], ["third"], root=tmp_path, out=out)
