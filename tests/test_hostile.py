"""Hostile and broken input, generated here: more than 25 kinds of file go through one real
job (and through ``imgenc encode``), each must get its expected status, and the job must
complete.  Then hostile messages (pickle, YAML, unknown tasks) and Redis over TLS.

When the tests run as root, the worker runs without the capability that lets root ignore
file permissions (``setpriv``), so that a file without read permission is really unreadable
to it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jobs.registry import JobRegistry
from tests.helpers import (
    STUB,
    CeleryWorker,
    free_port,
    imgenc,
    photo_like,
    png_header,
    port_open,
    wait_for,
    worker_env,
    write_jpegs,
)


def _jpeg(seed: int = 0, size=(64, 48), mode: str = "RGB", **kw) -> bytes:
    buffer = io.BytesIO()
    photo_like(seed, size).convert(mode).save(buffer, "JPEG", **kw)
    return buffer.getvalue()


def _saved(im: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **kw)
    return buffer.getvalue()


def build_hostile_folder(root: Path, outside: Path) -> dict[str, str]:
    """Write every case under ``root``; return {relative path: expected status}."""
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, status: str) -> None:
        (root / name).write_bytes(data)
        expected[name] = status

    good = _jpeg(1, (200, 150))
    put("good.jpg", good, "ok")
    put("zero-byte.jpg", b"", "empty")
    put("truncated.jpg", good[: len(good) // 2], "truncated")
    png = _saved(photo_like(2, (200, 150)), "PNG")
    put("truncated.png", png[: int(len(png) * 0.6)], "truncated")
    jpeg = bytearray(_jpeg(3))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65535, 65535)  # JPEG's largest possible claim
    put("claims-65535x65535.jpg", bytes(jpeg), "too_large")
    put("claims-100000x100000.png", png_header(100000, 100000), "too_large")
    side = int((Image.MAX_IMAGE_PIXELS + 10) ** 0.5) + 1
    put("bomb-just-over-limit.png", png_header(side, side), "too_large")
    frames = [Image.new("P", (16, 16), i % 256) for i in range(2000)]
    put("2000-frames.gif", _saved(frames[0], "GIF", save_all=True, append_images=frames[1:]), "ok")
    deep = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    put("16-bit.png", _saved(Image.fromarray(deep), "PNG"), "ok")
    put("cmyk.jpg", _jpeg(4, mode="CMYK"), "ok")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    put("palette-transparency.png", _saved(palette, "PNG", transparency=0), "ok")
    put("la.png", _saved(Image.new("LA", (16, 16), (100, 128)), "PNG"), "ok")
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        put(
            f"exif-orientation-{orientation}.jpg",
            _saved(photo_like(orientation, (60, 30)), "JPEG", exif=exif.tobytes()),
            "ok",
        )
    put("photo.webp", _saved(photo_like(5, (40, 30)), "WEBP"), "ok")
    put("photo.tif", _saved(photo_like(6, (40, 30)), "TIFF"), "ok")
    put("photo.bmp", _saved(photo_like(7, (40, 30)), "BMP"), "ok")
    put(
        "drawing-renamed.jpg",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
        "unsupported",
    )
    put("page-renamed.jpg", b"<!DOCTYPE html><html><body>not a photo</body></html>", "not_an_image")
    put("text-renamed.jpg", b"just some text\n", "not_an_image")
    put(
        "postscript.jpg",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n",
        "unsupported",
    )
    put("document.png", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n", "unsupported")
    put("layers.tif", b"8BPS\x00\x01" + bytes(40), "unsupported")
    put("name with spaces.jpg", good, "ok")
    put("ünïcødé 画像.jpg", good, "ok")
    put("new\nline.jpg", good, "ok")
    (root / "loop-a.jpg").symlink_to(root / "loop-b.jpg")
    (root / "loop-b.jpg").symlink_to(root / "loop-a.jpg")
    expected["loop-a.jpg"] = expected["loop-b.jpg"] = "unreadable"
    (outside / "secret.jpg").write_bytes(good)
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    expected["escape.jpg"] = "outside_root"
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    expected["dangling.jpg"] = "missing"
    (root / "album.jpg").mkdir()
    expected["album.jpg"] = "not_a_file"
    os.mkfifo(root / "pipe.jpg")
    expected["pipe.jpg"] = "not_a_file"
    put("vanishes.jpg", good, "missing")  # deleted between the scan and the encode
    put("no-permission.jpg", good, "unreadable")
    (root / "no-permission.jpg").chmod(0)
    return expected


@pytest.fixture
def world_readable_tmp():
    """A scratch folder an unprivileged worker can read (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="imgenc-hostile-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_every_kind_of_hostile_file_gets_its_own_status_and_the_job_completes(
    redis_server, world_readable_tmp, tmp_path
):
    import producer

    images, outside, out, home = (
        world_readable_tmp / n for n in ("images", "outside", "out", "home")
    )
    for folder in (images, outside, out, home):
        folder.mkdir()
        folder.chmod(0o777)
    expected = build_hostile_folder(images, outside)
    assert len(set(expected.values()) - {"ok"}) >= 9 and len(expected) >= 25

    job = producer.enqueue(
        images, str(out), broker=redis_server.url, chunk=8, queue="hostile", **STUB
    )
    (images / "vanishes.jpg").unlink()  # after the scan, before any worker sees it
    w = CeleryWorker(
        worker_env(redis_server.url, HOME=str(home), IMGENC_QUEUE="hostile"),
        tmp_path / "worker.log",
        extra_args=("-Q", "hostile"),
        drop_root_file_access=True,
    ).start()
    try:
        before = w.child_rss_kb()
        final = job.wait(timeout=180)
        peak = w.child_peak_rss_kb()
    finally:
        w.stop()
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("id")
    got = manifest["status"].to_dict()
    wrong = {
        name: (got.get(name), status)
        for name, status in expected.items()
        if got.get(name) != status
    }
    assert not wrong, f"(got, expected): {wrong}"
    assert set(got) == set(expected) and final.done and final.total == len(expected)
    assert (manifest.loc[manifest.status != "ok", "error"].str.len() > 0).all()
    assert peak - before < 300 * 1024, "decoding the hostile set grew the worker by >300 MB"
    assert JobRegistry.from_url(redis_server.url).status(job.id).processed == len(expected)


def test_embedded_encode_gives_the_same_statuses(world_readable_tmp, tmp_path):
    images, outside = world_readable_tmp / "images", world_readable_tmp / "outside"
    images.mkdir()
    outside.mkdir()
    expected = build_hostile_folder(images, outside)
    (images / "vanishes.jpg").unlink()
    del expected["vanishes.jpg"]
    if os.geteuid() == 0:
        del expected["no-permission.jpg"]  # root reads it; the job test drops that power
    run = imgenc(
        "encode",
        str(images),
        "--out",
        str(tmp_path / "o"),
        "--backbone",
        "stub",
        "--weights",
        "random",
        "--no-progress",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = pd.read_parquet(tmp_path / "o" / "manifest.parquet").set_index("id")
    wrong = {n: (got["status"].get(n), s) for n, s in expected.items() if got["status"].get(n) != s}
    assert not wrong, f"(got, expected): {wrong}"


# --- hostile messages ------------------------------------------------------------------------
@pytest.fixture
def worker(redis_server, tmp_path):
    w = CeleryWorker(worker_env(redis_server.url), tmp_path / "worker.log").start()
    yield w
    w.stop()


def _publish(url: str, body, serializer: str, task: str, content_type: str | None = None):
    from kombu import Connection, Exchange, Producer

    exchange = Exchange("imgenc", type="direct")
    with Connection(url) as conn:
        Producer(conn).publish(
            body,
            exchange=exchange,
            routing_key="imgenc",
            serializer=serializer,
            content_type=content_type,
            content_encoding="utf-8" if content_type else None,
            headers={
                "task": task,
                "id": f"hostile-{serializer}-{task}",
                "argsrepr": "()",
                "kwargsrepr": "{}",
            },
            declare=[exchange],
        )


def test_yaml_message_is_refused_never_deserialized(redis_server, worker, tmp_path):
    canary = tmp_path / "yaml-pwned"
    payload = f"!!python/object/apply:os.system ['touch {canary}']"
    before = len(worker.text())
    _publish(
        redis_server.url,
        payload,
        serializer=None,
        task="imgenc.encode_chunk",
        content_type="application/x-yaml",
    )
    wait_for(lambda: "ContentDisallowed" in worker.text()[before:], 30, "the refusal")
    # the refused message is dropped, not put back (the drop may follow the log line)
    wait_for(lambda: redis_server.client().llen("imgenc") == 0, 15, "the queue to be empty")
    assert not canary.exists()


def test_unknown_task_name_does_nothing_and_is_logged(redis_server, worker, tmp_path):
    before = len(worker.text())
    _publish(
        redis_server.url, [[], {"path": "/etc/passwd"}, {}], serializer="json", task="os.system"
    )
    wait_for(lambda: "unregistered task" in worker.text()[before:].lower(), 30, "the log line")
    wait_for(lambda: redis_server.client().llen("imgenc") == 0, 15, "the queue to be empty")
    assert "imgenc.encode_chunk" not in worker.text()[before:]


# --- Redis with a password over TLS ------------------------------------------------------------
def _certificates(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.crt", "redis.key", "redis.csr", "redis.crt")
    )
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=imgenc test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        str(cert),
        "-extfile",
        str(ext),
    )
    return {"ca": ca, "key": key, "cert": cert}


@contextlib.contextmanager
def tls_redis(certs: dict[str, Path], password: str):
    """A redis-server that speaks TLS only, with a password; yields its port."""
    port = free_port()
    redis = subprocess.Popen(
        [
            "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
            "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
            "--requirepass", password, "--save", "", "--appendonly", "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: port_open(port), 15, "redis over TLS")
        yield port
    finally:
        redis.kill()
        redis.wait(10)


def _rediss_url(password: str, port: int, ca: Path) -> str:
    return f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"


@pytest.fixture
def certificates(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return _certificates(tmp_path / "certs")


def test_a_job_runs_over_rediss_with_a_password_and_a_verified_certificate(certificates, tmp_path):
    import producer

    password = "tls-secret-pw"
    with tls_redis(certificates, password) as port:
        url = _rediss_url(password, port, certificates["ca"])
        w = CeleryWorker(worker_env(url), tmp_path / "worker.log").start()
        try:
            write_jpegs(tmp_path / "images", 5)
            job = producer.enqueue(tmp_path / "images", str(tmp_path / "out"), broker=url, **STUB)
            final = job.wait(timeout=60)
        finally:
            w.stop()
    assert final.counts == {"ok": 5}
    assert password not in w.text()
    assert json.dumps(final.to_dict()).find(password) == -1


def test_a_server_certificate_from_another_ca_is_refused_by_producer_and_worker(
    certificates, tmp_path
):
    other_ca = _certificates(tmp_path / "other")["ca"]  # a CA that did not sign the server
    password = "tls-secret-pw"
    with tls_redis(certificates, password) as port:
        url = _rediss_url(password, port, other_ca)
        w = CeleryWorker(worker_env(url), tmp_path / "worker.log").start(wait=False)
        try:
            write_jpegs(tmp_path / "images", 2)
            run = imgenc(
                "enqueue", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                env={"IMGENC_BROKER_URL": url, "IMGENC_WEIGHTS": "random"},
            )  # fmt: skip
            wait_for(lambda: "certificate verify failed" in w.text(), 60, "the worker's refusal")
            assert " ready." not in w.text()  # it never started consuming
        finally:
            w.stop()
        good = JobRegistry.from_url(_rediss_url(password, port, certificates["ca"]))
        assert good.recent() == []  # the producer registered nothing
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "certificate verify failed" in run.stderr and "cannot reach the broker" in run.stderr
    assert password not in run.stderr + w.text()
    assert not (tmp_path / "out").exists()
