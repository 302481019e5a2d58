"""Shared fixtures: generated image folders and one random-weight encoder per configuration."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from encoder.settings import Settings  # noqa: E402
from tests.imagegen import write_jpegs  # noqa: E402

_ENCODERS: dict = {}


def get_encoder(**overrides):
    """A cached ``Encoder`` with random weights (no download), built once per configuration."""
    from encoder.model import Encoder

    settings = Settings.from_env({"weights": "random", **overrides}, environ={})
    key = tuple(sorted(overrides.items()))
    if key not in _ENCODERS:
        _ENCODERS[key] = Encoder(settings)
    return _ENCODERS[key]


@pytest.fixture
def redis_server(tmp_path: Path):
    """A private redis-server (with a password) for one test, killed afterwards."""
    from tests.services import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def jpeg_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_jpegs(folder, 6)
    return folder


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("IMGENC_"):
            monkeypatch.delenv(key)


# --- reliability figures -------------------------------------------------------------------
RELIABILITY: list[dict] = []


@pytest.fixture
def reliability():
    """Fault and load tests record their figures here; they are printed at the end."""
    return RELIABILITY


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RELIABILITY:
        return
    import json

    terminalreporter.section("reliability figures")
    for figures in RELIABILITY:
        terminalreporter.write_line(json.dumps(figures, sort_keys=False))
