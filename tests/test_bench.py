"""``python -m bench --quick`` keeps working: every measurement runs on a few images.
(No speed is asserted: this machine is shared and noisy; ratios belong to the benchmark.)"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, wait_for


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
        "cost",
        "distributed",
        "queue",
        "search",
        "serve",
        "quality",
        "methods",
        "near-dup",
        "backbones",
        "embeddings",
    }
    for row in table["rows"]:
        assert row["value"] is not None and math.isfinite(row["value"]) and row["value"] >= 0, row
    assert table["machine"]["cores"] >= 1
    names = {row["name"] for row in table["rows"]}
    # The figures the README cites are in the table.
    assert any(n.startswith("Index.search flat, ") for n in names)
    assert any(n.startswith("POST /search latency p50, 1 client") for n in names)
    assert any("heavy lane off" in n for n in names)
    assert any(n.startswith("queue path alone") for n in names)


def bench_processes() -> list[str]:
    """Command lines of the services a bench run starts (its Redis keeps its data in the
    run's ``imgenc-bench-`` folder; its workers are named ``queue-alone`` and ``stub-c*``)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "imgenc-bench-" in text or "queue-alone@" in text or "stub-c1@" in text:
            found.append(text)
    return found


def test_an_interrupted_bench_stops_every_process_it_started(tmp_path):
    assert bench_processes() == []
    log = tmp_path / "bench.log"
    with open(log, "w") as out:
        bench = subprocess.Popen(
            [sys.executable, "-m", "bench", "--quick", "--only", "queue", "--json", "-"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Redis and a worker are up: the worker's name is on a command line.
        wait_for(lambda: any("@" in p for p in bench_processes()), 300, "a bench worker")
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(120) == 130, log.read_text()[-3000:]
    finally:
        bench.kill()
    assert bench_processes() == [], log.read_text()[-3000:]
