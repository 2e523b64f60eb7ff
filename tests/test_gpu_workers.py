"""`make test-gpu`'s plugin (tests/gpu_workers.py) spreads the tests marked gpu_long over the start of the run."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.gpu_workers import spread_long_first

ROOT = Path(__file__).resolve().parents[1]


def test_long_items_are_spread_over_the_first_third():
    items = list(range(60))
    long = {5, 6, 7, 40, 59}
    out = spread_long_first(items, lambda i: i in long)
    assert sorted(out) == items                                   # a reordering, nothing lost
    gap = 60 // (3 * 5)                                           # 4: one long item in every four
    assert [out[k * gap] for k in range(5)] == [5, 6, 7, 40, 59]
    assert not long & set(out[5 * gap:])
    assert [i for i in out if i not in long] == [i for i in items if i not in long]      # the rest keep their order
    assert spread_long_first(items, lambda i: False) == items


def test_long_tests_start_first_on_some_workers(tmp_path):
    long_ids = {3, 10, 17, 24, 31, 38}
    body = ["import pytest"]
    for i in range(48):
        if i in long_ids:
            body.append("@pytest.mark.gpu_long")
        body.append(f"def test_{i:02d}():\n    pass")
    (tmp_path / "test_many.py").write_text("\n".join(body) + "\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu_long: long\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-n", "3", "-p", "tests.gpu_workers",
                          "-p", "no:cacheprovider", "test_many.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ran = re.findall(r"\[(gw\d+)\] \[\s*\d+%\] PASSED test_many.py::test_(\d+)", out.stdout)
    assert len(ran) == 48
    first = {}                          # per worker, the tests it ran in order
    for worker, test in ran:
        first.setdefault(worker, []).append(int(test))
    # Two tests per worker first (--maxschedchunk 1), a long one and the test after it: 48 // (3 * 6) = 2.
    assert sorted(w[0] for w in first.values()) == [3, 10, 17], textwrap.shorten(str(first), 400)
