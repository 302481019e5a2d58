"""``python -m bench --quick`` keeps working: every measurement runs on a few images.
(No speed is asserted: this machine is shared and noisy; ratios belong to the benchmark.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.helpers import REPO


def test_bench_quick_runs_every_measurement_and_writes_the_table(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = json.loads(out.read_text())
    groups = {row["group"] for row in table["rows"]}
    assert groups == {
        "ceiling",
        "embedded",
        "distributed",
        "queue",
        "notebook",
        "bf16",
        "cost",
        "search",
        "serve",
        "dedup",
        "runtime",
        "runtime-fidelity",
        "runtime-cost",
        "quality",
        "near-dup",
        "backbones",
        "embeddings",
    }
    for row in table["rows"]:
        assert row["value"] is not None and math.isfinite(row["value"]) and row["value"] >= 0, row
    assert table["machine"]["cores"] >= 1
    assert "Input([None,None,3]) -> Input([224,224,3])" in json.dumps(table)
