"""``POST /encode`` on ``imgenc serve``: images in, codes (and on request the pooled float
features) out, embedded and through the Celery workers, under the same caps and auth as
the rest of the service (stub backbone, pooled codes, so it starts in seconds)."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import REPO, STUB, CeleryWorker, SearchServer, make_settings, worker_env

EXAMPLES = REPO / "examples" / "images"
MODEL = {**STUB, "layout": "pooled"}
ENV = {"IMGENC_BACKBONE": "stub", "IMGENC_WEIGHTS": "random"}


def encode_with_features(tmp: Path) -> tuple[Path, Path]:
    from encoder.folder_run import encode_folder

    folder = tmp / "catalogue"
    shutil.copytree(EXAMPLES, folder)
    dest = tmp / "codes"
    encode_folder(folder, str(dest), make_settings(**MODEL), progress=False, features=True)
    return folder, dest


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encode")
    folder, dest = encode_with_features(tmp)
    server = SearchServer(str(dest), tmp / "serve.log", ENV, "--max-images", "4")
    server.start()
    yield folder, dest, server
    server.stop()


def post(server: SearchServer, files: list[tuple[str, bytes]], **params) -> httpx.Response:
    return httpx.post(
        server.url + "/encode",
        files=[("image", (name, data)) for name, data in files],
        params=params,
        timeout=60,
    )


def stored(dest: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The code and the features ``imgenc encode`` stored for ``name``."""
    from encoder import load_codes, load_features

    ids, codes = load_codes(str(dest))
    feature_ids, features = load_features(str(dest))
    assert list(ids) == list(feature_ids)
    row = list(ids).index(name)
    return codes[row], features[row]


def assert_matches_the_destination(answer: dict, dest: Path, name: str, features: bool) -> None:
    code, stored_features = stored(dest, name)
    got = np.frombuffer(base64.b64decode(answer["code"]), np.uint8)
    assert answer["status"] == "ok" and answer["name"] == name
    assert answer["code_shape"] == [500]
    assert int(np.bitwise_count(got ^ code).sum()) == 0  # distance 0
    if features:
        floats = np.asarray(answer["features"], np.float32)
        expected = stored_features.astype(np.float32)
        # within float16 rounding: 2^-11 of the value, and a little for batch order
        assert np.allclose(floats, expected, rtol=2**-10, atol=1e-3 * np.abs(expected).max())
    else:
        assert "features" not in answer


def test_encode_returns_the_code_bits_imgenc_encode_stored_for_the_same_file(served):
    folder, dest, server = served
    name = sorted(p.name for p in folder.iterdir())[4]
    response = post(server, [(name, (folder / name).read_bytes())])
    assert response.status_code == 200
    body = response.json()
    from encoder import read_spec

    assert body["fingerprint"] == read_spec(str(dest)).fingerprint
    assert_matches_the_destination(body["images"][0], dest, name, features=False)


def test_features_true_returns_the_destinations_features_within_float16_rounding(served):
    folder, dest, server = served
    names = sorted(p.name for p in folder.iterdir())[:3]
    response = post(server, [(n, (folder / n).read_bytes()) for n in names], features="true")
    assert response.status_code == 200
    for name, answer in zip(names, response.json()["images"], strict=True):
        assert_matches_the_destination(answer, dest, name, features=True)
    # the form field says the same as the query parameter
    name = names[0]
    form = httpx.post(
        server.url + "/encode",
        files=[("image", (name, (folder / name).read_bytes()))],
        data={"features": "true"},
        timeout=60,
    )
    assert_matches_the_destination(form.json()["images"][0], dest, name, features=True)


def test_several_images_answer_200_with_a_status_each_a_broken_one_included(served):
    folder, _, server = served
    name = sorted(p.name for p in folder.iterdir())[0]
    photo = (folder / name).read_bytes()
    response = post(server, [(name, photo), ("broken.jpg", photo[: len(photo) // 2])])
    assert response.status_code == 200
    first, broken = response.json()["images"]
    assert first["status"] == "ok" and first["code"]
    assert broken["name"] == "broken.jpg" and broken["status"] == "truncated"
    assert broken["error"] and "code" not in broken


def test_a_lone_broken_image_gets_422_with_the_loaders_status(served):
    _, _, server = served
    response = post(server, [("page.html", b"<html>not a photo</html>")])
    assert response.status_code == 422
    answer = response.json()["images"][0]
    assert answer["status"] == "not_an_image" and answer["error"]
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_more_images_than_max_images_or_bytes_than_the_cap_get_413(served):
    folder, _, server = served
    photo = next(folder.iterdir()).read_bytes()
    assert post(server, [(f"{i}.jpg", photo) for i in range(5)]).status_code == 413  # max 4
    assert post(server, [(f"{i}.jpg", photo) for i in range(4)]).status_code == 200
    big = bytes(21 * 1024 * 1024)  # over the default 20 MB upload cap
    assert post(server, [("big.jpg", big)]).status_code == 413
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_openapi_pages_are_served_behind_the_same_auth_as_the_rest(tmp_path):
    _, dest = encode_with_features(tmp_path)
    server = SearchServer(str(dest), tmp_path / "s.log", ENV, "--auth", "ann:s3cret").start()
    try:
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(server.url + path).status_code == 401, path
            assert httpx.get(server.url + path, auth=("ann", "s3cret")).status_code == 200, path
        schema = httpx.get(server.url + "/openapi.json", auth=("ann", "s3cret")).json()
        assert "/encode" in schema["paths"] and "/search" in schema["paths"]
    finally:
        server.stop()


def test_with_workers_encode_answers_the_same_bits_and_features(redis_server, tmp_path):
    folder, dest = encode_with_features(tmp_path)
    env = {**ENV, "IMGENC_BROKER_URL": redis_server.url}
    server = SearchServer(
        str(dest), tmp_path / "s.log", env, "--workers", "--query-timeout", "20"
    ).start()
    worker = CeleryWorker(worker_env(redis_server.url, IMGENC_LAYOUT="pooled"), tmp_path / "w.log")
    worker.start()
    try:
        names = sorted(p.name for p in folder.iterdir())[:2]
        files = [(n, (folder / n).read_bytes()) for n in names] + [("bad.jpg", b"")]
        with_features = post(server, files, features="true")
        codes_only = post(server, files[:1])
    finally:
        worker.stop()
        server.stop()
    assert with_features.status_code == 200, with_features.text
    answers = with_features.json()["images"]
    for name, answer in zip(names, answers, strict=False):
        assert_matches_the_destination(answer, dest, name, features=True)
    assert answers[2]["status"] == "empty"
    assert_matches_the_destination(codes_only.json()["images"][0], dest, names[0], features=False)
    assert "Task imgenc.encode_images" in worker.text()
