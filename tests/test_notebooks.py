"""Every notebook runs top to bottom on CPU (code cells executed in order in one namespace)."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
    assert cells, f"{path} has no code cells"
    namespace: dict = {"__name__": "__main__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, cell in enumerate(cells):
            exec(compile("".join(cell["source"]), f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)
    assert out.getvalue(), "notebook printed nothing"
