"""The services the distributed steps of the bench start and stop themselves.

``redis_server``: a private ``redis-server`` on a free loopback port, with a random
password and no persistence.  ``celery_worker``: ``celery -A worker worker`` as a user
starts it, from the checkout, with its own ``IMGENC_*`` settings, ready once its log says
both "model ready" and " ready.".  Both are context managers that stop what they started
(SIGTERM, then SIGKILL after a timeout).  ``producer_peak_rss_kb`` runs the producer in a
fresh Python process and reads its peak resident memory.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER_READY_MARKS = ("model ready", " ready.")


def _free_loopback_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_process_group(process: subprocess.Popen, grace_seconds: float) -> None:
    """SIGTERM to the process group, SIGKILL if it is still there after ``grace_seconds``."""
    if process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _wait_until(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.1)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private Redis for the duration of the block; yields its URL (with the password)."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    import redis

    workdir.mkdir(parents=True, exist_ok=True)
    port, password = _free_loopback_port(), secrets.token_hex(12)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    command = [
        executable,
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)),
        *("--requirepass", password, "--save", "", "--appendonly", "no"),
    ]
    with open(workdir / "redis.log", "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        _wait_until(answers, 15, "redis-server")
        client.close()
        yield url
    finally:
        _stop_process_group(process, grace_seconds=10)


@dataclass
class CeleryWorker:
    """A running ``celery -A worker worker`` (the main process leads its process group)."""

    process: subprocess.Popen
    log: Path
    startup_seconds: float  # from launch until the model is loaded and the worker consumes

    def peak_rss_kb(self) -> float:
        """The largest VmHWM of the main process and its children (the pool processes)."""
        peaks = [_status_kb(pid, "VmHWM") for pid in [self.process.pid, *self._children()]]
        return max(peaks)

    def _children(self) -> list[int]:
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.process.pid:  # fields: state, ppid, ...
                    children.append(int(stat.parent.name))
        return children


def _status_kb(pid: int, field: str) -> float:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return 0.0


def worker_environment(broker_url: str, backbone: str, **settings: str | int) -> dict[str, str]:
    """This process's environment without any ``IMGENC_*``/``AWS_*`` variable, plus the
    broker, the backbone, random weights and ``settings`` (``decode_threads=1`` becomes
    ``IMGENC_DECODE_THREADS=1``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGENC_", "AWS_"))}
    env.update(
        IMGENC_BROKER_URL=broker_url,
        IMGENC_BACKBONE=backbone,
        IMGENC_WEIGHTS="random",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"IMGENC_{name.upper()}": str(value) for name, value in settings.items()})
    return env


@contextmanager
def celery_worker(
    broker_url: str,
    log: Path,
    name: str,
    backbone: str,
    concurrency: int | None = None,
    **settings: str | int,
) -> Iterator[CeleryWorker]:
    """One worker for the duration of the block, started and ready (see the module docstring)."""
    command = [
        *(sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO"),
        *("-n", f"{name}@%h", "--without-gossip", "--without-mingle"),
        *(("-c", str(concurrency)) if concurrency else ()),
    ]
    started = time.monotonic()
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=worker_environment(broker_url, backbone, **settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def ready() -> bool:
            text = log.read_text(errors="replace")
            if process.poll() is not None:
                raise RuntimeError(
                    f"celery worker {name} exited with {process.returncode}:\n{text[-3000:]}"
                )
            return all(mark in text for mark in WORKER_READY_MARKS)

        _wait_until(ready, 300, f"celery worker {name}")
        yield CeleryWorker(process, log, time.monotonic() - started)
    finally:
        _stop_process_group(process, grace_seconds=60)


# Run in a fresh interpreter: VmHWM starts again at exec, so it is the producer's own peak.
_ENQUEUE_AND_REPORT_PEAK = """
import sys
import producer
from encoder.settings import Settings

folder, dest, broker = sys.argv[1:4]
settings = Settings.from_env({"backbone": "stub", "weights": "random"}, environ={})
producer.enqueue(folder, dest, settings=settings, broker=broker, queue="nobody-reads", chunk=256)
with open("/proc/self/status") as status:
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def producer_peak_rss_kb(folder: Path, dest: Path, broker_url: str) -> float:
    """Peak RSS of a fresh process that scans ``folder`` and enqueues all of it to a queue
    that no worker reads."""
    finished = subprocess.run(
        [sys.executable, "-c", _ENQUEUE_AND_REPORT_PEAK, str(folder), str(dest), broker_url],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(finished.stdout.split()[-1])
