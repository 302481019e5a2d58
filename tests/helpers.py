"""Everything the tests share: images made on the spot, ``imgenc`` run as a user runs it,
cached random-weight encoders, real services started and killed by the tests themselves
(a ``redis-server`` on a free loopback port with a password, ``celery -A worker worker``
subprocesses, a SeaweedFS S3 server), a fault-injecting S3 proxy, the audit of what a
job really executed and wrote, and costly folders built once per test session."""

from __future__ import annotations

import csv
import fcntl
import http.client
import io
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from contextlib import closing, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STUB = {"backbone": "stub", "weights": "random"}


# --- images ------------------------------------------------------------------------------
def photo_like(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth random colour field with a few blocks: compressible like a photo, distinct per seed."""
    rng = np.random.RandomState(seed)
    w, h = size
    small = rng.randint(0, 256, size=(max(2, h // 16), max(2, w // 16), 3)).astype(np.uint8)
    im = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(im).copy()
    for _ in range(3):
        x, y = rng.randint(0, w // 2), rng.randint(0, h // 2)
        pixels[y : y + h // 4, x : x + w // 4] = rng.randint(0, 256, 3)
    return Image.fromarray(pixels, "RGB")


def write_jpegs(
    folder: Path, n: int, start: int = 0, size: tuple[int, int] = (160, 120)
) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        name = f"img_{i:05d}.jpg"
        photo_like(i, size).save(folder / name, quality=90)
        names.append(name)
    return names


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no real pixel data."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = b"IDAT"
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
        + struct.pack(">I", 0) + idat + struct.pack(">I", zlib.crc32(idat))
    )  # fmt: skip


def smooth_png(side: int) -> bytes:
    """A ``side x side`` RGB PNG of smooth gradients: 81 Mpx at 9,000, about 1.3 MB (PNG
    compresses it well) but about 1.3 s of one core to decode, with no reduced-scale
    decode.  Made in about 3 s."""
    red = Image.linear_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
    green = red.transpose(Image.Transpose.ROTATE_90)
    blue = Image.radial_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    Image.merge("RGB", (red, green, blue)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


# --- imgenc and encoders -------------------------------------------------------------------
MODEL_CACHE = "IMGENC_MODEL_CACHE"  # the session's OpenVINO model cache (tests/conftest.py)


def without_imgenc_settings(*prefixes: str) -> dict[str, str]:
    """This process's environment less every ``IMGENC_*`` variable (and ``prefixes``), but
    the session's model cache: where converted models are kept changes no result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGENC_", *prefixes))}
    if MODEL_CACHE in os.environ:
        env[MODEL_CACHE] = os.environ[MODEL_CACHE]
    return env


def imgenc(
    *args: str, env: dict | None = None, cwd: Path = REPO, **kwargs
) -> subprocess.CompletedProcess:
    """``imgenc ARGS`` in a subprocess, with no ``IMGENC_*`` variable but those in ``env``
    (and the session's model cache)."""
    full_env = without_imgenc_settings()
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "imgenc", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


_ENCODERS: dict = {}


def get_encoder(**overrides):
    """A cached ``Encoder`` with random weights (no download), built once per configuration."""
    from encoder.settings import Settings
    from encoder.tf_runtime import TensorFlowEncoder as Encoder

    key = tuple(sorted(overrides.items()))
    if key not in _ENCODERS:
        _ENCODERS[key] = Encoder(Settings.from_env({"weights": "random", **overrides}, environ={}))
    return _ENCODERS[key]


def make_settings(**overrides):
    """Settings from the defaults and ``overrides`` only (no environment but the session's
    model cache), random weights."""
    from encoder.settings import Settings

    cache = os.environ.get(MODEL_CACHE)
    return Settings.from_env({"weights": "random", "model_cache": cache, **overrides}, environ={})


# --- services ------------------------------------------------------------------------------


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen | None, grace: float, sig: int = signal.SIGTERM) -> None:
    """Signal a process started with ``start_new_session`` and its children; SIGKILL them
    if they are still there after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def port_open(port: int) -> bool:
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
        wait_for(lambda: port_open(self.port), 15, "redis-server")
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
            try:
                wait_for(lambda: self._ready(offset), 180, f"celery worker {self.name} to be ready")
            except BaseException:
                self.stop(kill=True)  # never leave a half-started worker behind
                raise
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
        stop_group(self.proc, 60, signal.SIGKILL if kill else signal.SIGTERM)
        self.proc = None


def worker_env(broker_url: str, **extra: str) -> dict[str, str]:
    env = without_imgenc_settings("AWS_")
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
        self.proc: subprocess.Popen | None = None
        s3, master, volume, filer = self._free_ports(4)
        self.port = s3
        self.ports = {"master": master, "volume": volume, "filer": filer}
        workdir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _free_ports(n: int) -> list[int]:
        """``n`` free ports whose gRPC twins (weed listens on port + 10000 too) are free and
        collide neither with each other nor with the others."""
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < n:
            port = free_port()
            if (
                port < 55000
                and {port, port + 10000}.isdisjoint(taken)
                and not port_open(port + 10000)
            ):
                chosen.append(port)
                taken |= {port, port + 10000}
        return chosen

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
                    "-s3.port.iceberg=0",  # its catalog server would take the fixed port 8181
                    "-s3.port.lance=0",  # and its Lance namespace server the fixed port 9101
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
        stop_group(self.proc, 20)
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


class SearchServer:
    """``imgenc serve DEST`` as a user runs it (a real uvicorn), on a free loopback port."""

    def __init__(self, dest: str, log: Path, env: dict[str, str] | None = None, *args: str):
        self.dest, self.log, self.args = dest, log, args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IMGENC_")}
        self.env.update({"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", **(env or {})})
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> SearchServer:
        command = [sys.executable, "-m", "imgenc", "serve", self.dest, "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, *self.args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            try:
                wait_for(self._up, 180, "imgenc serve")
            except BaseException:
                self.stop()
                raise
        return self

    def _up(self) -> bool:
        import httpx

        if self.proc.poll() is not None:
            raise RuntimeError(f"imgenc serve exited {self.proc.returncode}: {self.text()[-3000:]}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        stop_group(self.proc, 30)
        self.proc = None


# --- what a job executed and wrote ---------------------------------------------------------
COMPLETION = re.compile(r"job (\w+) chunk (\d+): recorded ")


def chunk_completions(logs: list[str], job_id: str) -> dict[int, int]:
    """``chunk -> times`` the worker logs say a chunk of ``job_id`` was run to the end."""
    counts = Counter(
        int(m.group(2)) for text in logs for m in COMPLETION.finditer(text) if m.group(1) == job_id
    )
    return dict(sorted(counts.items()))


def unacked_chunks(client, job_id: str) -> set[int]:
    """Chunks of ``job_id`` whose messages a worker holds unacknowledged, read from kombu's
    ``unacked`` hash (the messages a dead worker strands)."""
    import base64
    import json

    chunks = set()
    for raw in client.hvals("unacked"):
        message = json.loads(raw)[0]
        if message.get("headers", {}).get("task") != "imgenc.encode_chunk":
            continue
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        if kwargs.get("job_id") == job_id:
            chunks.add(int(kwargs["chunk"]))
    return chunks


def written_rows(dest: str) -> Counter:
    """``image id -> rows`` naming it across every manifest part written to ``dest``."""
    from encoder.manifest import PARTS_PREFIX, csv_to_rows
    from encoder.storage import open_storage

    storage = open_storage(dest)
    written = Counter()
    for key in storage.list(PARTS_PREFIX):
        written.update(r["id"] for r in csv_to_rows(storage.get(key)))
    return written


def audit(dest: str, enqueued: list[str], registry, job_ids: list[str], logs: list[str]) -> dict:
    """What was executed and written, counted where it happened, not in the merged
    manifest (which keeps one row per image whatever happened):

    - ``rows_written_in_parts``: every manifest row in every part file (a chunk that runs
      twice rewrites its own part; an image written by two chunks would count twice);
    - ``images_written_twice``: images named by more than one part row;
    - ``re_executions``: deliveries beyond the first, from the registry's attempt counts;
    - ``chunks_completed_twice``: chunks whose completion two worker log lines report.
    """
    from encoder.merged import read_manifest

    manifest_ids = set(read_manifest(dest, ["id"])["id"].to_pylist())
    written = written_rows(dest)
    attempts = chunks = 0
    for job_id in job_ids:
        attempts += sum(int(v) for v in registry.r.hvals(f"imgenc:job:{job_id}:attempts"))
        chunks += int(registry.r.hget(f"imgenc:job:{job_id}", "chunks") or 0)
    mine = {(j, c): n for j in job_ids for c, n in chunk_completions(logs, j).items()}
    return {
        "enqueued": len(enqueued),
        "manifest_rows": len(manifest_ids),
        "lost": len(set(enqueued) - manifest_ids),
        "rows_written_in_parts": sum(written.values()),
        "images_written_twice": sum(1 for n in written.values() if n > 1),
        "chunks": chunks,
        "chunk_completions_logged": sum(mine.values()),
        "chunks_completed_twice": sum(1 for n in mine.values() if n > 1),
        "re_executions": attempts - chunks,
    }


def codes_match_a_fresh_local_encode(dest: str, image_dir: Path, **model) -> bool:
    """Every stored code equals the code the embedded path computes for the same image."""
    from encoder.codes import load_codes
    from encoder.folder_run import encode_folder

    ids, codes = load_codes(dest)
    local = image_dir.parent / (image_dir.name + "-reference")
    encode_folder(image_dir, str(local), make_settings(**model), progress=False)
    ref_ids, ref_codes = load_codes(local)
    position = {i: n for n, i in enumerate(ref_ids)}
    return bool(len(ids)) and all(
        np.array_equal(codes[n], ref_codes[position[i]]) for n, i in enumerate(ids)
    )


# --- faults --------------------------------------------------------------------------------
class FaultyProxy:
    def __init__(self, upstream_port: int, failure_rate: float, seed: int = 7):
        self.upstream_port = upstream_port
        self.failure_rate = failure_rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = self.failed = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.requests += 1
                    fail = proxy.random.random() < proxy.failure_rate
                    drop = fail and proxy.random.random() < 0.3
                    if fail:
                        proxy.failed += 1
                if drop:
                    self.close_connection = True
                    self.connection.close()
                    return
                if fail:
                    payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("connection", "expect")
                }
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- built once per session ---------------------------------------------------------------
def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``build(folder)`` makes, built once per pytest session and shared by all
    of pytest-xdist's worker processes: the first to ask builds it under a file lock, the
    others wait for it and then read it.  Whoever changes it must work on a copy."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder = base / f"built-once-{name}"
    with open(base / f"built-once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


# --- trained weights --------------------------------------------------------------------
TEST_PHOTOS = REPO / "tests" / "data" / "photos"  # 99 CC0 photos beside the 16 samples


def photo_labels() -> dict[str, str]:
    """File name -> label of the sample photos and the test photos (their labels.csv)."""
    found = {}
    for table in (REPO / "examples" / "labels.csv", TEST_PHOTOS / "labels.csv"):
        with open(table, newline="") as f:
            found.update((row["image"] + ".jpg", row["label"]) for row in csv.DictReader(f))
    return found


LITE0 = {"backbone": "efficientnet_lite0", "weights": "imagenet", "layout": "pooled"}


def catalogue_of_photos(folder: Path) -> Path:
    """The 16 sample photos and the 99 test photos in ``folder``: 115 distinct photos."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in [*(REPO / "examples" / "images").glob("*.jpg"), *TEST_PHOTOS.glob("*.jpg")]:
        shutil.copy(path, folder / path.name)
    return folder


def encode_and_fit(folder: Path, dest: Path, **overrides) -> None:
    """``imgenc encode`` in this process: encode ``folder`` with the trained backbone (or
    ``overrides``), then fit the near-duplicate threshold, as the command does."""
    from encoder.folder_run import encode_folder
    from encoder.runtime import load_encoder
    from search import Index
    from search.duplicate_fit import fit_destination

    settings = make_settings(**{**LITE0, **overrides})
    encoder = load_encoder(settings)
    encode_folder(folder, str(dest), settings, progress=False, encoder=encoder)
    fit_destination(Index.open(str(dest)), encoder, settings.dedup_kinds.split(","), progress=False)


class MilvusServer:
    """A real Milvus standalone server (the ``milvus`` package's ``milvus-server``: embedded
    etcd and rocksmq, no Docker) on free ports, its data under ``workdir``."""

    START_SECONDS = 180

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MilvusServer:
        exe = shutil.which("milvus-server") or str(BIN / "milvus-server")
        with open(self.workdir / "milvus.log", "ab") as log:
            self.proc = subprocess.Popen(
                [exe, "--data", str(self.workdir / "data"), "--proxy-port", str(self.port),
                 *self._component_ports(),
                 # A server restarted after a kill waits for its dead self's sessions to
                 # expire: 5 s instead of 30.
                 "--extra-config", "common.session.ttl=5"],  # fmt: skip
                stdin=subprocess.DEVNULL,  # not pytest's
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for(self._up, self.START_SECONDS, "Milvus standalone", interval=0.5)
        except BaseException:
            self.stop(kill=True)
            raise
        return self

    @staticmethod
    def _component_ports() -> list[str]:
        """Free ports for its other components: left to itself, it probes from fixed
        defaults, and one still in TIME_WAIT from the last server stalls the start."""
        names = ("etcd", "root-coord", "proxy-internal", "query-coord", "query-node",
                 "index-coord", "index-node", "data-coord", "data-node")  # fmt: skip
        return [arg for name in names for arg in (f"--{name}-port", str(free_port()))]

    def _up(self) -> bool:
        """Up when a client call is answered (its HTTP health port moves off 9091 when
        that is taken, so the proxy is asked instead)."""
        from pymilvus import MilvusClient

        if self.proc.poll() is not None:
            log = (self.workdir / "milvus.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"milvus-server exited {self.proc.returncode}: {log}")
        if not port_open(self.port):
            return False
        try:
            client = MilvusClient(uri=self.uri, timeout=3)
            client.list_collections(timeout=3)  # (its retries are bounded by an int timeout)
            client.close()
            return True
        except Exception:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop (or kill) it, and then kill what is left of it: the server outlives the
        ``milvus-server`` wrapper it runs under."""
        proc = self.proc
        stop_group(proc, 0 if kill else 30, signal.SIGKILL if kill else signal.SIGTERM)
        if proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None
