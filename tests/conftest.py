"""Shared fixtures; the helpers themselves are in ``tests/helpers.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers import RedisServer, write_jpegs  # noqa: E402


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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RELIABILITY:
        return
    terminalreporter.section("reliability figures")
    for figures in RELIABILITY:
        terminalreporter.write_line(json.dumps(figures, sort_keys=False))
