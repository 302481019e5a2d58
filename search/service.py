"""The search service (``imgenc serve``): a FastAPI app over one destination's ``Index``.

Endpoints:

- ``GET /``: the results page (plain HTML and a little JS, no CDN);
- ``POST /search``: a multipart upload (field ``image``) and ``k``; answers with the
  same JSON as ``imgenc search --json``: ``{"query", "status", "results": [{"id",
  "distance"}...]}``.  A broken or hostile image gets 422 with the loader's status and
  reason; an upload over the cap gets 413; one that its decode lane cannot admit now gets
  503 with ``Retry-After`` (``search.admission``);
- ``POST /encode``: one or more images (multipart, fields named ``image``) to their codes
  (``encode_uploads``: loader status, base64 code and its shape, and with
  ``features=true`` the pooled float features) and the spec ``fingerprint``.  One image
  answers like ``/search`` (422 with the loader's status when broken); several answer
  200 with a status each; more than ``max_images`` get 413;
- ``GET /similar/{id}``: the neighbours of a catalogue image (404 for an unknown id);
- ``GET /duplicates``: the near-duplicate groups (``?max_distance=``);
- ``GET /thumb/{id}``: a small JPEG of a catalogue image: only ids of the index, read
  inside the image root;
- ``GET /healthz``: what is indexed, when it was last compared with the destination
  (``checked_at``, every ``refresh_seconds``), batching figures, and the uploads in
  progress and refused (``uploads_in_progress``, ``refused_uploads``).  It never goes
  through the decode lanes, so it answers during a flood of uploads.

Uploads are admitted by their header's pixel count and decoded in ``DecodeLanes``
(``search.admission``), outside the ``MicroBatcher``; decoded images that arrive together
share one model call.  The encoder is the destination's model in this process, or the
Celery workers (``--workers``: they decode; the service admits, and keeps several
micro-batches in flight).  A background thread brings the index up to date with the
destination every ``refresh_seconds``; the app's lifespan starts and stops both threads.
``auth=(user, password)`` puts everything but ``/healthz`` (the OpenAPI pages ``/docs``
and ``/openapi.json`` included) behind HTTP basic auth
(Starlette's ``AuthenticationMiddleware``); uploads are capped by ``UploadCap``, a route
dependency.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, UploadFile
from fastapi import Query as QueryParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    SimpleUser,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection

from encoder.images import ImageLoader, LoadResult
from encoder.storage import StorageError
from search.admission import DecodeLanes, Overloaded
from search.batching import MicroBatcher
from search.duplicate_fit import NoThreshold
from search.duplicates import DuplicateGroups, find_duplicates
from search.index import Index
from search.query_encoder import (
    QueryEncoder,
    QueryImage,
    QueryResult,
    answer_queries,
    check_encoder,
    encode_uploads,
    search_codes,
)

log = logging.getLogger("imgenc.search")

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
THUMB_SIDE = 256  # px, the longer side of a thumbnail
THUMB_CACHE = 512  # thumbnails kept in memory
MAX_K = 200
DEFAULT_MAX_IMAGES = 32  # images per POST /encode
FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass
class Query:
    name: str
    data: bytes  # the upload, when the encoder decodes it (the Celery workers)
    k: int
    loaded: LoadResult | None = None  # the upload decoded here, with its pixels


@dataclass
class EncodeUpload:
    name: str
    data: bytes
    features: bool


class SearchService:
    """Everything the endpoints share: the index, the query encoder and the caches."""

    def __init__(
        self,
        index: Index,
        encoder: QueryEncoder,
        image_root: str | None = None,
        max_batch: int = 32,
        max_wait: float = 0.005,
        refresh_seconds: float = 30.0,
        lanes: DecodeLanes | None = None,
    ) -> None:
        self.index = index
        self.encoder = encoder
        self.image_root = image_root
        self.lanes = lanes or DecodeLanes()
        # The embedded model decodes uploads here, in the lanes; the workers decode their own.
        self.decodes_here = callable(getattr(encoder, "decode", None))
        self.batcher: MicroBatcher[Query, QueryResult] = MicroBatcher(
            self._answer, max_batch, max_wait, getattr(encoder, "concurrent_batches", 1)
        )
        self.encode_batcher: MicroBatcher[EncodeUpload, dict[str, Any]] = MicroBatcher(
            self._encode_uploads, max_batch, max_wait
        )
        self._thumbs: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self._duplicates: dict[tuple[str, int | None], DuplicateGroups] = {}
        self.refresh_seconds = refresh_seconds
        self.checked_at = time.time()  # when the index was last compared with DEST
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def start(self) -> None:
        """Start the batching thread and, with ``refresh_seconds``, the refresh thread."""
        self._stop.clear()
        self.batcher.start()
        self.encode_batcher.start()
        if self.refresh_seconds > 0:
            self._refresher = threading.Thread(
                target=self._keep_fresh, name="index-refresh", daemon=True
            )
            self._refresher.start()

    def stop(self) -> None:
        """Stop both threads; queries already batched are answered first."""
        self._stop.set()
        self.batcher.stop()
        self.encode_batcher.stop()
        if self._refresher is not None:
            self._refresher.join(timeout=10)

    async def answer_upload(self, name: str, data: bytes, k: int) -> QueryResult:
        """An upload's answer: admitted to its lane by the header's pixel count (else
        ``Overloaded``), decoded there, then encoded in a micro-batch and searched.  With
        the workers, a heavy upload is sent alone, holding its place until answered."""
        admission = self.lanes.admit(self.encoder.decoded_pixels(data))
        if self.decodes_here:
            decode = self.encoder.decode  # type: ignore[attr-defined]
            loaded = await asyncio.wrap_future(
                self.lanes.run(admission, lambda: decode(data, name))
            )
            if not loaded.ok:
                return QueryResult(name, str(loaded.status), loaded.error)
            future = self.batcher.submit(Query(name, b"", k, loaded))
        elif admission.heavy:
            future = self.lanes.run(admission, lambda: self._answer([Query(name, data, k)])[0])
        else:
            future = self.batcher.submit(Query(name, data, k))
            future.add_done_callback(admission.release)
        return await asyncio.wrap_future(future)

    def _answer(self, queries: list[Query]) -> list[QueryResult]:
        k = max(q.k for q in queries)
        if self.decodes_here:  # decoded in the lanes (a query that was not is decoded now)
            check_encoder(self.index, self.encoder)
            encoder: Any = self.encoder  # an EmbeddedQueryEncoder
            loaded = [q.loaded or encoder.decode(q.data, q.name) for q in queries]
            codes = encoder.encode_pixels([r.pixels for r in loaded if r.ok])
            for r in loaded:
                r.pixels = None
            answers = search_codes(self.index, loaded, codes, k)
        else:
            images: list[QueryImage] = [(q.name, q.data) for q in queries]
            answers = answer_queries(self.index, self.encoder, images, k)
        for query, answer in zip(queries, answers, strict=True):
            answer.results = answer.results[: query.k]
        return answers

    async def encode_upload(self, upload: EncodeUpload) -> dict[str, Any]:
        """One ``POST /encode`` image, admitted as ``answer_upload`` admits (else
        ``Overloaded``): a light one in a micro-batch, a heavy one alone in its lane."""
        admission = self.lanes.admit(self.encoder.decoded_pixels(upload.data))
        if admission.heavy:
            future = self.lanes.run(admission, lambda: self._encode_uploads([upload])[0])
        else:
            future = self.encode_batcher.submit(upload)
            future.add_done_callback(admission.release)
        return await asyncio.wrap_future(future)

    def _encode_uploads(self, uploads: list[EncodeUpload]) -> list[dict[str, Any]]:
        images: list[QueryImage] = [(u.name, u.data) for u in uploads]
        return encode_uploads(self.encoder, images, [u.features for u in uploads])

    def _keep_fresh(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                changed = self.index.refresh(save=False)
                self.checked_at = time.time()
                if changed and not self.index.remote:  # (an engine's sync saved itself)
                    log.info("index updated: %d images", len(self.index))
                    try:
                        self.index.save()
                    except StorageError as exc:
                        log.warning("updated index not saved (%s); serving it from memory", exc)
            except Exception:
                log.exception("index refresh failed; serving the previous index")

    def duplicates(self, max_distance: int | None) -> DuplicateGroups:
        key = (self.index.generation, max_distance)
        if key not in self._duplicates:
            self._duplicates = {key: find_duplicates(self.index, max_distance)}
        return self._duplicates[key]

    def thumbnail_tag(self, image_id: str) -> str | None:
        """An ETag for the thumbnail of an indexed image as it is encoded now (its pixel
        count and file size), or None when the id is not indexed."""
        try:
            pixels, file_bytes, _ = self.index.image(image_id)
        except KeyError:
            return None
        digest = hashlib.sha256(f"{image_id}\0{pixels}\0{file_bytes}".encode()).hexdigest()
        return f'"{digest[:20]}"'

    def thumbnail(self, image_id: str, tag: str | None = None) -> bytes | None:
        """A JPEG of an indexed image, or None when it is not one or cannot be read.
        Cached by id and ``thumbnail_tag`` (pass it when already known): an image encoded
        again gets a new one."""
        tag = tag or self.thumbnail_tag(image_id)
        if tag is None:
            return None
        key = (image_id, tag)
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        root = self.image_root or self.index.image(image_id)[2]
        if not root:
            return None
        result, picture = ImageLoader(root, THUMB_SIDE).load_picture(image_id, THUMB_SIDE)
        if picture is None:
            log.info("no thumbnail for %r: %s %s", image_id, result.status, result.error)
            return None
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=85)
        data = buffer.getvalue()
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            **self.index.describe(),
            "checked_at": self.checked_at,
            "refresh_seconds": self.refresh_seconds,
            "batches": self.batcher.batches,
            "queries": self.batcher.items,
            **self.lanes.figures(),
        }


class UploadCap:
    """A route dependency: the request, its body read up to ``limit`` bytes.  Over the
    limit, 413, from ``Content-Length`` before anything is read, or as soon as a body
    without one has streamed past it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    async def __call__(self, request: Request) -> Request:
        detail = f"upload over the {self.limit}-byte limit"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            raise HTTPException(413, detail)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limit:
                raise HTTPException(413, detail)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return Request(request.scope, replay)


class BasicAuthBackend(AuthenticationBackend):
    """HTTP basic auth for Starlette's ``AuthenticationMiddleware``: one user, everything
    but ``/healthz``."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if conn.url.path == "/healthz":
            return None
        scheme, _, encoded = conn.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        good = hmac.compare_digest(
            f"{user}:{password}".encode(), f"{self.user}:{self.password}".encode()
        )
        if scheme.lower() != "basic" or not good:
            raise AuthenticationError("authentication required")
        return AuthCredentials(["authenticated"]), SimpleUser(user)


def _refuse(conn: HTTPConnection, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": str(exc)}, 401, headers={"WWW-Authenticate": 'Basic realm="imgenc"'}
    )


def create_app(
    service: SearchService,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    auth: tuple[str, str] | None = None,
    query_timeout: float = 60.0,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    middleware = []
    if auth is not None:
        middleware.append(
            Middleware(AuthenticationMiddleware, backend=BasicAuthBackend(*auth), on_error=_refuse)
        )
    app = FastAPI(
        title="imgenc search",
        docs_url="/docs",  # behind the same auth as the rest
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
        middleware=middleware,
    )
    app.state.service = service

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)}, 503, headers={"Retry-After": str(exc.retry_after)}
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    capped_upload = Depends(UploadCap(max_upload_bytes))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return service.health()

    @app.post("/search")
    async def search(
        request: Request = capped_upload, k: int = QueryParam(10, ge=1, le=MAX_K)
    ) -> Response:
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("image")
        if not isinstance(upload, UploadFile) and not hasattr(upload, "read"):
            raise HTTPException(400, "send the image as a multipart field named 'image'")
        data = await upload.read()
        field = form.get("k")
        if field is not None and field != "":
            if not isinstance(field, str) or not field.strip().isdigit():
                raise HTTPException(422, f"k must be a whole number from 1 to {MAX_K}")
            k = int(field)
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k must be between 1 and {MAX_K}")
        try:
            answer = await asyncio.wait_for(
                service.answer_upload(upload.filename or "upload", data, k), query_timeout
            )
        except TimeoutError as exc:  # also NoWorkerAnswered, from the Celery workers
            raise HTTPException(503, str(exc) or "the query encoder did not answer") from None
        status_code = 200 if answer.status == "ok" else 422
        return JSONResponse(answer.to_json(), status_code=status_code)

    @app.post("/encode")
    async def encode(request: Request = capped_upload, features: bool = False) -> Response:
        """Images in (multipart fields ``image``), per image its loader ``status``, its
        ``code`` (base64 of the packed bits) and ``code_shape``, and with
        ``features=true`` its pooled float ``features``; with the spec ``fingerprint``."""
        try:
            form = await request.form(max_files=max_images, max_fields=4)
        except StarletteHTTPException as exc:
            if "too many files" in str(exc.detail).lower():
                raise HTTPException(
                    413, f"more than {max_images} images in one request (--max-images)"
                ) from None
            raise
        uploads = [u for u in form.getlist("image") if hasattr(u, "read")]
        if not uploads:
            raise HTTPException(400, "send the images as multipart fields named 'image'")
        field = form.get("features")
        if field is not None and field != "":
            if not isinstance(field, str) or field.lower() not in FLAGS:
                raise HTTPException(422, "features must be true or false")
            features = FLAGS[field.lower()]
        futures = []
        for number, upload in enumerate(uploads):
            name = upload.filename or f"upload-{number}"
            item = EncodeUpload(name, await upload.read(), features)
            futures.append(service.encode_upload(item))
        try:
            answers = await asyncio.wait_for(asyncio.gather(*futures), query_timeout)
        except TimeoutError as exc:  # also NoWorkerAnswered, from the Celery workers
            raise HTTPException(503, str(exc) or "the encoder did not answer") from None
        body = {"fingerprint": service.encoder.spec.fingerprint, "images": answers}
        lone_failure = len(answers) == 1 and answers[0]["status"] != "ok"
        return JSONResponse(body, status_code=422 if lone_failure else 200)

    @app.get("/similar/{image_id:path}")
    def similar(image_id: str, k: int = QueryParam(10, ge=1, le=MAX_K)) -> dict[str, Any]:
        if image_id not in service.index:
            raise HTTPException(404, f"no image {image_id!r} in the index")
        found = service.index.similar(image_id, k)
        return QueryResult(image_id, "ok", "", found.to_json()).to_json()

    @app.get("/duplicates")
    def duplicates(max_distance: int | None = QueryParam(None, ge=0)) -> dict[str, Any]:
        try:
            return service.duplicates(max_distance).to_json()
        except ValueError as exc:  # beyond half the code's bits
            raise HTTPException(422, str(exc)) from None
        except NoThreshold:
            raise HTTPException(
                409,
                "no near-duplicate threshold is fitted for these codes yet: run `imgenc "
                "fit-dedup DEST` where the images are, or give a max distance",
            ) from None

    @app.get("/thumb/{image_id:path}")
    def thumb(image_id: str, request: Request) -> Response:
        tag = service.thumbnail_tag(image_id)
        # Browsers revalidate (no-cache) and get 304 while the image is encoded the same.
        headers = {"Cache-Control": "no-cache", "ETag": tag or ""}
        if tag is not None and request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers=headers)
        data = service.thumbnail(image_id, tag) if tag is not None else None
        if data is None:
            raise HTTPException(404, f"no thumbnail for {image_id!r}")
        return Response(data, media_type="image/jpeg", headers=headers)

    return app


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``); a name that merely looks
    like one (``127.example.com``) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(app: Any, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
