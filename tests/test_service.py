"""``imgenc serve``: a real uvicorn server in its own process, queried over HTTP with the
photos in ``examples/`` (stub backbone, pooled codes, so it starts in seconds)."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers import (
    REPO,
    STUB,
    CeleryWorker,
    SearchServer,
    make_settings,
    png_header,
    wait_for,
    worker_env,
)

EXAMPLES = REPO / "examples" / "images"
MODEL = {**STUB, "layout": "pooled"}


def encode_examples(tmp: Path) -> tuple[Path, Path]:
    from encoder.folder_run import encode_folder

    folder = tmp / "catalogue"
    shutil.copytree(EXAMPLES, folder)
    dest = tmp / "codes"
    encode_folder(folder, str(dest), make_settings(**MODEL), progress=False)
    return folder, dest


def server_env(**extra: str) -> dict[str, str]:
    return {"IMGENC_BACKBONE": "stub", "IMGENC_WEIGHTS": "random", **extra}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    folder, dest = encode_examples(tmp)
    server = SearchServer(str(dest), tmp / "serve.log", server_env(), "--max-upload-mb", "1")
    server.start()
    yield folder, dest, server
    server.stop()


def upload(server: SearchServer, data: bytes, name: str = "q.jpg", k: int = 5) -> httpx.Response:
    return httpx.post(
        server.url + "/search", files={"image": (name, data)}, data={"k": str(k)}, timeout=60
    )


def test_an_uploaded_catalogue_photo_finds_itself_first_at_distance_zero(served):
    folder, _, server = served
    name = sorted(p.name for p in folder.iterdir())[3]
    response = upload(server, (folder / name).read_bytes(), name)
    assert response.status_code == 200
    answer = response.json()
    assert answer["query"] == name and answer["status"] == "ok"
    assert answer["results"][0] == {"id": name, "distance": 0} and len(answer["results"]) == 5


@pytest.mark.parametrize(
    "data,status",
    [
        (b"", "empty"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported"),
        (b"%PDF-1.7\n", "unsupported"),
        (b"<html>not a photo</html>", "not_an_image"),
        (png_header(100_000, 100_000), "too_large"),
        (None, "truncated"),
    ],
    ids=["empty", "svg", "pdf", "html", "bomb", "truncated"],
)
def test_broken_or_hostile_uploads_get_422_with_the_loaders_status_and_the_server_lives(
    served, data, status
):
    folder, _, server = served
    if data is None:
        whole = next(folder.iterdir()).read_bytes()
        data = whole[: len(whole) // 2]
    response = upload(server, data)
    assert response.status_code == 422
    answer = response.json()
    assert answer["status"] == status and answer["error"] and answer["results"] == []
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_uploads_over_the_cap_get_413_with_or_without_a_content_length(served):
    _, _, server = served
    big = bytes(2 * 1024 * 1024)  # the server runs with --max-upload-mb 1
    assert upload(server, big).status_code == 413

    def chunks():
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        for _ in range(40):
            yield bytes(64 * 1024)
        yield b"\r\n--x--\r\n"

    streamed = httpx.post(
        server.url + "/search",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=x"},
        timeout=60,
    )
    assert streamed.status_code == 413
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_unknown_ids_and_paths_outside_the_catalogue_get_404(served, tmp_path):
    folder, _, server = served
    (folder / "not-encoded.jpg").write_bytes(
        (folder / sorted(p.name for p in folder.iterdir())[0]).read_bytes()
    )
    for path in (
        "/similar/nope.jpg",
        "/thumb/nope.jpg",
        "/thumb/not-encoded.jpg",  # under the image root, but not in the manifest
        "/thumb/..%2F..%2Fetc%2Fpasswd",
        "/thumb/%2Fetc%2Fpasswd",
        "/thumb/../../etc/passwd",
    ):
        assert httpx.get(server.url + path).status_code == 404, path


def test_a_k_or_max_distance_that_is_no_valid_number_gets_422_and_the_server_lives(served):
    folder, _, server = served
    photo = next(folder.iterdir()).read_bytes()
    for k in ("abc", "5.0", "1e3", "-1", "0"):
        response = httpx.post(
            server.url + "/search", files={"image": ("q.jpg", photo)}, data={"k": k}, timeout=60
        )
        assert response.status_code == 422, k
    for distance in ("99999999999999999999", "-1", "abc"):
        response = httpx.get(server.url + "/duplicates", params={"max_distance": distance})
        assert response.status_code == 422, distance
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_only_loopback_addresses_count_as_loopback():
    from search.service import is_loopback

    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("127.evil.example", "0.0.0.0", "::", "", "10.0.0.1")))


def test_similar_and_thumbnails_serve_catalogue_images(served):
    folder, _, server = served
    name = sorted(p.name for p in folder.iterdir())[5]
    answer = httpx.get(f"{server.url}/similar/{name}", params={"k": 4}).json()
    assert answer["query"] == name and len(answer["results"]) == 4
    assert name not in [r["id"] for r in answer["results"]]
    thumb = httpx.get(f"{server.url}/thumb/{name}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256


def test_concurrent_clients_get_their_own_correct_answers(served):
    folder, _, server = served
    names = sorted(p.name for p in folder.iterdir() if p.name != "not-encoded.jpg")[:8]
    answers: dict[str, list[str]] = {}
    errors: list[Exception] = []

    def client(name: str) -> None:
        try:
            for _ in range(4):
                response = upload(server, (folder / name).read_bytes(), name, k=3)
                answers.setdefault(name, []).append(response.json()["results"][0]["id"])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert answers == {n: [n] * 4 for n in names}
    health = httpx.get(server.url + "/healthz").json()
    assert health["queries"] >= 32 and health["batches"] <= health["queries"]


def test_duplicates_endpoint_needs_a_fitted_threshold_or_a_max_distance(tmp_path):
    folder = tmp_path / "catalogue"
    shutil.copytree(EXAMPLES, folder)
    original = sorted(folder.iterdir())[2]
    Image.open(original).save(folder / "copy.jpg", quality=70)  # a recompressed copy
    from encoder.folder_run import encode_folder

    dest = tmp_path / "codes"
    encode_folder(folder, str(dest), make_settings(**MODEL), progress=False)
    server = SearchServer(str(dest), tmp_path / "serve.log", server_env()).start()
    try:
        unfitted = httpx.get(server.url + "/duplicates")  # 17 images: too few to fit on
        groups = httpx.get(server.url + "/duplicates?max_distance=7").json()
    finally:
        server.stop()
    assert unfitted.status_code == 409 and "imgenc fit-dedup" in unfitted.json()["detail"]
    assert groups["max_distance"] == 7 and groups["fitted"] is None
    assert any({original.name, "copy.jpg"} <= {m["id"] for m in g} for g in groups["groups"])


def test_basic_auth_guards_everything_but_healthz(tmp_path):
    _, dest = encode_examples(tmp_path)
    server = SearchServer(str(dest), tmp_path / "s.log", server_env(), "--auth", "ann:s3cret")
    server.start()
    try:
        assert httpx.get(server.url + "/").status_code == 401
        assert httpx.get(server.url + "/similar/x.jpg").status_code == 401
        assert httpx.get(server.url + "/", auth=("ann", "wrong")).status_code == 401
        assert httpx.get(server.url + "/", auth=("ann", "s3cret")).status_code == 200
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()


def test_serving_beyond_loopback_without_auth_is_refused(tmp_path):
    from tests.helpers import imgenc

    _, dest = encode_examples(tmp_path)
    run = imgenc("serve", str(dest), "--host", "0.0.0.0", env=server_env())
    assert run.returncode == 2 and "--auth" in run.stderr


def test_a_restarted_server_serves_the_persisted_index_and_takes_in_new_images(tmp_path):
    from encoder.folder_run import encode_folder

    folder, dest = encode_examples(tmp_path)
    args = ("--refresh-seconds", "1")
    first = SearchServer(str(dest), tmp_path / "1.log", server_env(), *args).start()
    assert httpx.get(first.url + "/healthz").json()["origin"] == "built"
    first.stop()
    second = SearchServer(str(dest), tmp_path / "2.log", server_env(), *args).start()
    try:
        health = httpx.get(second.url + "/healthz").json()
        assert health["origin"] == "loaded" and health["images"] == 16
        shutil.copy(sorted(folder.iterdir())[0], folder / "added.jpg")
        encode_folder(folder, str(dest), make_settings(**MODEL), resume=True, progress=False)
        wait_for(lambda: httpx.get(second.url + "/healthz").json()["images"] == 17, 30, "refresh")
        assert httpx.get(second.url + "/similar/added.jpg").status_code == 200
    finally:
        second.stop()


def test_a_thumbnail_follows_its_image_when_the_image_is_encoded_again(tmp_path):
    from encoder.folder_run import encode_folder

    folder, dest = encode_examples(tmp_path)
    server = SearchServer(str(dest), tmp_path / "s.log", server_env(), "--refresh-seconds", "1")
    server.start()
    try:
        name = sorted(p.name for p in folder.iterdir())[2]
        first = httpx.get(f"{server.url}/thumb/{name}")
        tag = first.headers["etag"]
        assert first.status_code == 200 and tag and first.headers["cache-control"] == "no-cache"
        again = httpx.get(f"{server.url}/thumb/{name}", headers={"if-none-match": tag})
        assert again.status_code == 304
        generation = httpx.get(server.url + "/healthz").json()["generation"]
        Image.new("RGB", (300, 120), (200, 30, 30)).save(folder / name, "JPEG")
        encode_folder(folder, str(dest), make_settings(**MODEL), resume=True, progress=False)
        wait_for(
            lambda: httpx.get(server.url + "/healthz").json()["generation"] != generation,
            30,
            "the index to take in the re-encoded image",
        )
        second = httpx.get(f"{server.url}/thumb/{name}", headers={"if-none-match": tag})
        assert second.status_code == 200 and second.headers["etag"] != tag
        assert Image.open(io.BytesIO(second.content)).size == (256, 102)  # the new picture
    finally:
        server.stop()


def test_with_workers_the_celery_workers_encode_the_queries(redis_server, tmp_path):
    folder, dest = encode_examples(tmp_path)
    env = server_env(IMGENC_BROKER_URL=redis_server.url)
    server = SearchServer(
        str(dest), tmp_path / "s.log", env, "--workers", "--query-timeout", "3"
    ).start()
    try:
        name = sorted(p.name for p in folder.iterdir())[1]
        started = time.monotonic()
        alone = upload(server, (folder / name).read_bytes(), name)
        waited = time.monotonic() - started
        assert alone.status_code == 503 and "no worker answered" in alone.json()["detail"]
        assert waited < 30  # the timeout, not a hang
        worker = CeleryWorker(
            worker_env(redis_server.url, IMGENC_LAYOUT="pooled"), tmp_path / "w.log"
        ).start()
        try:
            answer = upload(server, (folder / name).read_bytes(), name).json()
        finally:
            worker.stop()
        assert answer["results"][0] == {"id": name, "distance": 0}
        assert "Task imgenc.encode_images" in worker.text()
        assert "tensorflow" not in _loaded_modules(server)
    finally:
        server.stop()


def _loaded_modules(server: SearchServer) -> str:
    """The server process's memory map: whether TensorFlow's library was loaded."""
    return Path(f"/proc/{server.proc.pid}/maps").read_text() if server.proc else ""


def test_a_port_in_use_is_a_clear_error(tmp_path):
    from tests.helpers import imgenc

    _, dest = encode_examples(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = imgenc("serve", str(dest), "--port", str(port), env=server_env())
    assert run.returncode != 0 and "address already in use" in (run.stdout + run.stderr).lower()
