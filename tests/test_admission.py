"""Uploads under load: the decode lanes (``search.admission``), the micro-batcher's batches
in flight, and ``imgenc serve`` (a real uvicorn server) while large lossless PNGs are
being uploaded.  Order is checked, never timing: timing belongs in ``python -m bench``."""

from __future__ import annotations

import io
import os
import sys
import threading
from concurrent.futures import Future

import httpx
import pytest
from PIL import Image

from tests.helpers import (
    CeleryWorker,
    SearchServer,
    photo_like,
    smooth_png,
    wait_for,
    worker_env,
)
from tests.test_service import encode_examples, server_env, upload

HEAVY_SIDE = 9000  # 81 Mpx: well above the 16-Mpx heavy line, under the 89.5-Mpx bomb one


@pytest.fixture(scope="module")
def heavy_png() -> bytes:
    return smooth_png(HEAVY_SIDE)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# --- the lanes and the batcher, in process -------------------------------------------------
def test_the_header_gives_the_pixels_to_decode_with_jpegs_counted_at_reduced_scale():
    from encoder.images import ImageLoader

    loader = ImageLoader("/", 224)
    big_jpeg = jpeg(Image.new("RGB", (4000, 3000), (10, 20, 30)))
    assert loader.decoded_pixels(big_jpeg) == 500 * 375  # draft() at 1/8
    assert loader.decoded_pixels(jpeg(photo_like(1, (300, 200)))) == 300 * 200
    png = io.BytesIO()
    Image.new("RGB", (4000, 3000)).save(png, "PNG")
    assert loader.decoded_pixels(png.getvalue()) == 4000 * 3000  # no reduced-scale decode
    for broken in (b"", b"<html>", b"%PDF-1.7\n", big_jpeg[:20]):
        assert loader.decoded_pixels(broken) is None
    result = loader.load_bytes(big_jpeg)  # the loader decodes at the scale it announced
    assert result.ok and result.pixels.shape == (224, 224, 3)


def test_a_full_heavy_lane_refuses_at_once_and_never_holds_a_light_upload():
    from search.admission import DecodeLanes, Overloaded

    lanes = DecodeLanes(threads=2, heavy_mpx=1, heavy_uploads=2, light_uploads=3)
    release = threading.Event()
    heavy = [lanes.run(lanes.admit(2_000_000), release.wait) for _ in range(2)]
    with pytest.raises(Overloaded) as refused:
        lanes.admit(5_000_000)
    assert refused.value.retry_after >= 1
    light = lanes.admit(500_000)  # under the line (or unknown): the light lane
    assert not light.heavy and not lanes.admit(None).heavy
    assert lanes.run(light, lambda: "decoded").result(timeout=60) == "decoded"
    assert not any(f.done() for f in heavy)  # the light one went first
    figures = lanes.figures()
    assert figures["heavy_uploads_in_progress"] == 2 and figures["refused_uploads"] == 1
    release.set()
    for future in heavy:
        future.result(timeout=60)
    wait_for(lambda: lanes.figures()["heavy_uploads_in_progress"] == 0, 30, "places released")
    lanes.admit(5_000_000).release()  # a place again
    if sys.platform == "linux":  # heavy decodes run at a lower CPU priority than light ones

        def nice() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        heavy_nice = lanes.run(lanes.admit(5_000_000), nice).result(timeout=60)
        assert heavy_nice > lanes.run(lanes.admit(None), nice).result(timeout=60)
    lanes.shutdown()


def test_with_concurrency_a_slow_batch_does_not_hold_the_next_and_cancelled_items_drop():
    from search.batching import MicroBatcher

    release = threading.Event()
    seen: list[list[str]] = []

    def process(items: list[str]) -> list[str]:
        seen.append(items)
        if "slow" in items:
            release.wait(60)
        return [item.upper() for item in items]

    batcher: MicroBatcher[str, str] = MicroBatcher(process, max_wait=0.001, concurrency=2)
    batcher.start()
    try:
        slow = batcher.submit("slow")
        wait_for(lambda: seen, 30, "the slow batch to start")
        assert batcher.submit("fast").result(timeout=60) == "FAST"
        assert not slow.done()
        release.set()
        assert slow.result(timeout=60) == "SLOW"
    finally:
        release.set()
        batcher.stop()
    single: MicroBatcher[str, str] = MicroBatcher(lambda items: items, concurrency=1)
    gone: Future[str] = single.submit("gone")
    gone.cancel()  # its client gave up before the batcher started
    single.start()
    try:
        assert single.submit("kept").result(timeout=60) == "kept"
        assert single.items == 1
    finally:
        single.stop()


# --- imgenc serve under a flood of heavy uploads ---------------------------------------------
class Uploads:
    """Uploads sent from threads; ``order`` records which were answered first."""

    def __init__(self, server: SearchServer) -> None:
        self.server = server
        self.order: list[str] = []
        self.responses: dict[str, httpx.Response] = {}
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def send(self, label: str, data: bytes, name: str) -> None:
        def run() -> None:
            response = upload(self.server, data, name)
            with self._lock:
                self.order.append(label)
                self.responses[label] = response

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(300)


def health(server: SearchServer) -> dict:
    response = httpx.get(server.url + "/healthz", timeout=30)
    assert response.status_code == 200
    return response.json()


def test_a_normal_query_is_answered_before_heavy_pngs_and_beyond_the_limit_503(tmp_path, heavy_png):
    folder, dest = encode_examples(tmp_path)
    args = ("--heavy-uploads", "2", "--decode-threads", "2", "--refresh-seconds", "0")
    server = SearchServer(str(dest), tmp_path / "s.log", server_env(), *args).start()
    try:
        uploads = Uploads(server)
        uploads.send("heavy1", heavy_png, "scan1.png")
        uploads.send("heavy2", heavy_png, "scan2.png")
        wait_for(lambda: health(server)["heavy_uploads_in_progress"] == 2, 120, "2 heavy uploads")

        refused = upload(server, heavy_png, "scan3.png")  # the heavy lane is full
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1

        during = health(server)  # /healthz answers during the flood, and counts it
        assert during["uploads_in_progress"] >= 2 and during["refused_uploads"] >= 1

        name = sorted(p.name for p in folder.iterdir())[4]
        uploads.send("normal", (folder / name).read_bytes(), name)
        uploads.join()
        assert uploads.order[0] == "normal", uploads.order
        normal = uploads.responses["normal"]
        assert normal.status_code == 200
        assert normal.json()["results"][0] == {"id": name, "distance": 0}
        assert all(uploads.responses[h].status_code == 200 for h in ("heavy1", "heavy2"))

        truncated = upload(server, heavy_png[: len(heavy_png) // 2], "cut.png")
        assert truncated.status_code == 422 and truncated.json()["status"] == "truncated"
        garbage = upload(server, b"<html>not a photo</html>", "page.png")
        assert garbage.status_code == 422 and garbage.json()["status"] == "not_an_image"
        after = health(server)
        assert after["uploads_in_progress"] == 0 and after["heavy_uploads_admitted"] >= 3
    finally:
        server.stop()


def test_with_workers_a_heavy_upload_goes_alone_and_a_normal_query_passes_it(
    redis_server, tmp_path, heavy_png
):
    folder, dest = encode_examples(tmp_path)
    env = server_env(IMGENC_BROKER_URL=redis_server.url)
    args = ("--workers", "--heavy-uploads", "1", "--refresh-seconds", "0")
    server = SearchServer(str(dest), tmp_path / "s.log", env, *args).start()
    worker = CeleryWorker(
        worker_env(redis_server.url, IMGENC_LAYOUT="pooled"),
        tmp_path / "w.log",
        extra_args=("-c", "2"),
    ).start()
    try:
        uploads = Uploads(server)
        uploads.send("heavy", heavy_png, "scan.png")
        wait_for(lambda: health(server)["heavy_uploads_in_progress"] == 1, 120, "the heavy upload")
        refused = upload(server, heavy_png, "again.png")
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        name = sorted(p.name for p in folder.iterdir())[6]
        uploads.send("normal", (folder / name).read_bytes(), name)
        uploads.join()
        assert uploads.order == ["normal", "heavy"]
        assert uploads.responses["normal"].json()["results"][0] == {"id": name, "distance": 0}
        assert uploads.responses["heavy"].status_code == 200
    finally:
        worker.stop()
        server.stop()
