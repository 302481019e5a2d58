"""Shared fixtures; the helpers themselves are in ``tests/helpers.py``."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers import MODEL_CACHE, RedisServer, write_jpegs  # noqa: E402

# The suite runs four test processes (pytest-xdist), each starting more processes that load
# TensorFlow, on as few as two cores.  With TensorFlow's default thread pools (one thread
# per core, per process) the processes wait on each other's threads: four `imgenc encode`
# runs side by side on two cores took 75 s each, against 25 s with one thread each, for the
# same CPU time and the same codes bit for bit.  So every TensorFlow process the tests
# start, in this process or below it, uses one intra-op and one inter-op thread.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")


@pytest.fixture
def redis_server(tmp_path: Path):
    """A private redis-server (with a password) for one test, killed afterwards."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def jpeg_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_jpegs(folder, 6)
    return folder


# --- reliability figures -------------------------------------------------------------------
RELIABILITY: list[dict] = []


@pytest.fixture
def reliability():
    """Fault and load tests record their figures here; they are printed at the end."""
    return RELIABILITY


FIGURES_DIR = "IMGENC_TEST_RELIABILITY_DIR"


_MADE: list[str] = []  # folders this session made, removed at its end


def pytest_configure(config):
    """The controlling process makes a folder where xdist workers leave their figures, and
    one where every test process keeps the OpenVINO models it converts: a conversion is
    shared within the session (its cache key covers everything that decides the model),
    and nothing is written under the user's home."""
    if hasattr(config, "workerinput"):
        return
    for name, prefix in ((FIGURES_DIR, "imgenc-reliability-"), (MODEL_CACHE, "imgenc-models-")):
        if name not in os.environ:
            os.environ[name] = tempfile.mkdtemp(prefix=prefix)
            _MADE.append(os.environ[name])


def pytest_unconfigure(config):
    for folder in _MADE:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if worker and RELIABILITY and FIGURES_DIR in os.environ:
        path = Path(os.environ[FIGURES_DIR]) / f"{worker}.json"
        path.write_text(json.dumps(RELIABILITY))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figures = list(RELIABILITY)
    if FIGURES_DIR in os.environ:
        for path in sorted(Path(os.environ[FIGURES_DIR]).glob("*.json")):
            figures.extend(json.loads(path.read_text()))
    if not figures:
        return
    terminalreporter.section("reliability figures")
    for row in figures:
        terminalreporter.write_line(json.dumps(row, sort_keys=False))
