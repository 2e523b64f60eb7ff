"""Every notebook runs top to bottom on CPU (code cells executed in order in one namespace), its own asserts hold,
and it prints the results it claims in its text."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re

import pytest

# Lines each notebook must print (its claims, as computed); the notebooks also assert them in their cells.
CLAIMS = {
    "msa_selection.ipynb": [r"layer \d+: the last token reads \[16, 16, 16, 16\] of 64 blocks per group",
                            r"^mean recall at 3584\.\.4095: [\d.]+ vs 0\.265 of the blocks kept$",
                            r"^layer \d+: groups share [\d.]+ of their blocks"],
    "sharding.ipynb": [r"^8 devices: cpu$", r"KV heads after replication: 4$", r"same MSA block selections: True",
                       r"same greedy tokens as one device: True$", r"^data shard 1: requests \[\d+(, \d+)*\]"],
    "train_msa.ipynb": [r"^LM loss [\d.]+ -> [\d.]+ \(mean of the first / last 20 steps\)$",
                        r"^indexer KL, dense warm-up: [\d.]+ -> [\d.]+; ",
                        r"^held-out: [\d.]+ nats/token sparse \([\d.]+ bits/byte\)"],
    "vision.ipynb": [r"-> grid_thw \[\[1, 10, 16\]\]", r"40 placeholders at positions 72\.\.111 \(expected 40\)",
                     r"layer \d+: queries after the image pick image blocks in [\d.]+% of their choices"],
}
NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.slow, pytest.mark.multi_device])
                                  if p.endswith("sharding.ipynb") else p for p in NOTEBOOKS], ids=os.path.basename)
@pytest.mark.gpu_long
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
    assert cells, f"{path} has no code cells"
    namespace: dict = {"__name__": "__main__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, cell in enumerate(cells):
            exec(compile("".join(cell["source"]), f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)
    printed = out.getvalue()
    claims = CLAIMS[os.path.basename(path)]
    for claim in claims:
        assert re.search(claim, printed, re.MULTILINE), f"{os.path.basename(path)} did not print {claim!r}:\n{printed}"
