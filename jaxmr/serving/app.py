"""The Litestar application: JSON API under /api, probes, Prometheus metrics, OpenAPI at /schema, the web UI at /.

    jaxmr serve --index INDEX_DIR --host 127.0.0.1 --port 8000

The model and the index load in the lifespan hook, in the background: /healthz answers at once, /readyz and
the API answer 503 until the encoders are loaded and every padding bucket is compiled.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import logging
import mimetypes
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from litestar import Litestar, Request, Response, delete, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State, UploadFile
from litestar.exceptions import HTTPException, NotAuthorizedException, NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.params import FromQuery, JSONBody, MultipartBody, PathParameter, QueryParameter
from litestar.response import File
from litestar.static_files import create_static_files_router

import jaxmr
from jaxmr.index.store import read_manifest
from jaxmr.serving.engine import Engine, Query
from jaxmr.serving.settings import Settings
from jaxmr.serving.telemetry import Metrics
from jaxmr.serving.uploads import BadRequest, TooLarge, decode_upload

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_FILES = 16
ImageId = Annotated[int, PathParameter(ge=0, le=2**63 - 1, description="an image id from a search result")]


@dataclasses.dataclass
class SearchRequest:
    """A text query, an image (base64) query, or both (the image modified by the text)."""

    text: str | None = None
    image: str | None = None
    k: int = 10
    offset: int = 0
    target: str = "images"


@dataclasses.dataclass
class UploadForm:
    files: list[UploadFile]
    captions: str | None = None  # one line of captions per file, captions on a line separated by " | "


class ServiceUnavailable(HTTPException):
    status_code = 503


def _engine(request: Request) -> Engine:
    state = request.app.state
    if state.get("load_error"):
        raise ServiceUnavailable(f"the index could not be loaded: {state.load_error}")
    engine = state.get("engine")
    if engine is None or not engine.ready:
        raise ServiceUnavailable("the model is loading and warming up; try again in a moment")
    return engine


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _check_page(settings: Settings, k: int, offset: int) -> None:
    if not 1 <= k <= settings.max_k:
        raise BadRequest(f"k must be between 1 and {settings.max_k}, got {k}")
    if not 0 <= offset <= settings.max_offset:
        raise BadRequest(f"offset must be between 0 and {settings.max_offset}, got {offset}")


def _check_text(settings: Settings, text: str) -> str:
    if not text.strip():
        raise BadRequest("the text query is empty")
    if len(text) > settings.max_text_chars:
        raise BadRequest(f"the text query has {len(text)} characters; the limit is {settings.max_text_chars}")
    return text.strip()


def _image_result(record: dict[str, Any], score: float | None = None) -> dict[str, Any]:
    i = record["id"]
    out = {"id": i, "url": f"/api/images/{i}", "thumbnail": f"/api/thumbnails/{i}", "captions": record["captions"],
           "width": record["width"], "height": record["height"]}  # fmt: skip
    return out if score is None else {**out, "score": score}


def _results(engine: Engine, ids: list[int], scores: list[float], target: str) -> list[dict[str, Any]]:
    records = engine.records(ids, target)
    if target == "images":
        return [_image_result(r, s) for r, s in zip(records, scores, strict=True) if r is not None]
    return [
        {"id": r["id"], "score": s, "text": r["text"], "image_id": r["image_id"], "url": f"/api/images/{r['image_id']}",
         "thumbnail": f"/api/thumbnails/{r['image_id']}"}
        for r, s in zip(records, scores, strict=True) if r is not None
    ]  # fmt: skip


@post("/api/search", status_code=200)
async def search(request: Request, data: JSONBody[SearchRequest]) -> dict[str, Any]:
    """Text -> images or captions; image -> similar images or captions; image + text -> images (composed)."""
    engine, settings = _engine(request), _settings(request)
    _check_page(settings, data.k, data.offset)
    if data.target not in ("images", "captions"):
        raise BadRequest(f"target must be 'images' or 'captions', got {data.target!r}")
    if data.target == "captions" and not engine.searcher.manifest.get("captions"):
        raise BadRequest("this index has no captions to search")
    if data.text is None and data.image is None:
        raise BadRequest("give a text, an image, or both")
    text = _check_text(settings, data.text) if data.text is not None else None
    pixels = None
    if data.image is not None:
        try:
            raw = base64.b64decode(data.image.split(",", 1)[-1] if data.image.startswith("data:") else data.image,
                                   validate=True)  # fmt: skip
        except (binascii.Error, ValueError):
            raise BadRequest("image must be base64 (optionally a data: URL)") from None
        pixels = await asyncio.to_thread(lambda: engine.encoder.preprocess(decode_upload(raw, settings)))
    answer = await engine.search(Query(text=text, image=pixels, k=data.k, offset=data.offset, target=data.target))
    return {"results": _results(engine, answer.ids, answer.scores, data.target), "timing_ms": answer.timing_ms}


@get("/api/similar/{image_id:int}")
async def similar(
    request: Request,
    image_id: ImageId,
    k: Annotated[int, QueryParameter(ge=1)] = 10,
    offset: Annotated[int, QueryParameter(ge=0)] = 0,
) -> dict[str, Any]:
    """Images nearest to an indexed image (itself left out): click-to-find-similar."""
    engine = _engine(request)
    _check_page(_settings(request), k, offset)
    vector = engine.image_vector(image_id)
    if vector is None:
        raise NotFoundException(f"no image with id {image_id}")
    answer = await engine.search(Query(vector=vector, k=k, offset=offset, exclude=image_id))
    return {"results": _results(engine, answer.ids, answer.scores, "images"), "timing_ms": answer.timing_ms}


@get("/api/images/{image_id:int}")
async def image_file(request: Request, image_id: ImageId) -> File:
    """The image as stored (ids are opaque; the path comes from the index's own metadata)."""
    path = _engine(request).searcher.image_file(image_id)
    if path is None or not path.is_file():
        raise NotFoundException(f"no image with id {image_id}")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return File(path=path, media_type=media_type, content_disposition_type="inline")


@get("/api/thumbnails/{image_id:int}", media_type="image/jpeg")
async def thumbnail(
    request: Request, image_id: ImageId, size: Annotated[int, QueryParameter(ge=16, le=512)] = 160
) -> Response:
    data = await asyncio.to_thread(_engine(request).thumbnail, image_id, size)
    if data is None:
        raise NotFoundException(f"no image with id {image_id}")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    key = connection.app.state.settings.api_key
    if key and not hmac.compare_digest(connection.headers.get("x-api-key", "").encode(), key.encode()):
        raise NotAuthorizedException("this route needs the server's API key in the X-API-Key header")


@post("/api/images", guards=[api_key_guard], status_code=201)
async def upload(request: Request, data: MultipartBody[UploadForm]) -> dict[str, Any]:
    """Adds images (multipart field `files`, optional `captions`) to the index; returns their ids."""
    engine, settings = _engine(request), _settings(request)
    files = data.files if isinstance(data.files, list) else [data.files]
    if not files:
        raise BadRequest("no files uploaded (multipart field 'files')")
    if len(files) > MAX_FILES:
        raise BadRequest(f"at most {MAX_FILES} files per upload, got {len(files)}")
    lines = (data.captions or "").splitlines()
    if len(lines) > len(files):
        raise BadRequest(f"{len(lines)} caption lines for {len(files)} files")
    captions = [[c.strip() for c in line.split(" | ") if c.strip()] for line in lines]
    captions += [[] for _ in range(len(files) - len(captions))]
    for caps in captions:
        for c in caps:
            _check_text(settings, c)
    images = [await f.read() for f in files]
    ids = await asyncio.to_thread(engine.add, images, captions)
    return {"ids": ids, "records": [_image_result(r) for r in engine.records(ids)]}


@delete("/api/images/{image_id:int}", guards=[api_key_guard], status_code=200)
async def remove(request: Request, image_id: ImageId) -> dict[str, Any]:
    engine = _engine(request)
    if not await asyncio.to_thread(engine.delete, image_id):
        raise NotFoundException(f"no image with id {image_id}")
    return {"deleted": image_id}


@get("/api/graph")
async def graph(request: Request, q: FromQuery[str], k: Annotated[int, QueryParameter(ge=2)] = 50) -> dict[str, Any]:
    """The top k for a text query as a graph: k-means clusters, edges between similar results."""
    engine, settings = _engine(request), _settings(request)
    _check_page(settings, k, 0)
    answer = await engine.search(Query(text=_check_text(settings, q), k=k))
    result = await asyncio.to_thread(engine.graph, answer.ids, answer.scores)
    records = {r["id"]: r for r in _results(engine, answer.ids, answer.scores, "images")}
    for node in result["nodes"]:
        node.update(records.get(node["id"], {}))
    return {**result, "timing_ms": answer.timing_ms}


@get("/api/projection")
async def projection(request: Request, n: Annotated[int, QueryParameter(ge=2)] = 500) -> dict[str, Any]:
    """A 2-D t-SNE of a sample of the index (cached per index version and n)."""
    engine, settings = _engine(request), _settings(request)
    if n > settings.projection_max:
        raise BadRequest(f"n must be at most {settings.projection_max}, got {n}")
    result = await asyncio.to_thread(engine.projection, n)
    ids = [p["id"] for p in result["points"]]
    captions = {r["id"]: r["captions"][:1] for r in engine.records(ids) if r is not None}
    points = [{**p, "thumbnail": f"/api/thumbnails/{p['id']}", "captions": captions.get(p["id"], [])}
              for p in result["points"]]  # fmt: skip
    return {"method": result["method"], "points": points}


@get("/api/info")
async def info(request: Request) -> dict[str, Any]:
    """What the index holds: counts, model, whether captions are searchable, the limits, and how image + text
    queries are fused (a trained composer, or the normalised sum of the two embeddings)."""
    engine, settings = _engine(request), _settings(request)
    m = engine.searcher.manifest
    return {
        "images": len(engine.searcher.collection("images")),
        "captions": len(engine.searcher.collection("captions")) if m.get("captions") else 0,
        "source": m["source"], "model": m["model"], "version": m["version"], "jaxmr_version": jaxmr.__version__,
        "limits": {"max_k": settings.max_k, "max_text_chars": settings.max_text_chars,
                   "max_upload_bytes": settings.max_upload_bytes},
        "uploads_need_key": bool(settings.api_key),
        "composed_queries": "trained composer" if engine.encoder.has_composer else "normalised sum",
    }  # fmt: skip


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz")
async def readyz(request: Request) -> dict[str, Any]:
    engine = _engine(request)
    return {"status": "ready", "compiled": engine.compiled_after_warm_up}


@get("/metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type="text/plain; version=0.0.4")


def _bad_request(_: Request, exc: BadRequest) -> Response:
    status = 413 if isinstance(exc, TooLarge) else 400
    return Response({"status_code": status, "detail": str(exc)}, status_code=status)


def create_app(settings: Settings) -> Litestar:
    """The application for one index. Raises a clear error at once when the index directory is not one."""
    read_manifest(settings.index)
    metrics_ = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                engine = await asyncio.to_thread(Engine, settings, metrics_)
                app.state.engine = engine
                await engine.start()
                log.info("ready: %d images, %d compiled encoder shapes", len(engine.searcher.collection()),
                         engine.compiled_after_warm_up)  # fmt: skip
            except Exception as e:  # reported by /readyz and every API call
                log.exception("loading the index failed")
                app.state.load_error = str(e)

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if app.state.get("engine") is not None:
                await app.state.engine.stop()

    return Litestar(
        route_handlers=[
            search, similar, image_file, thumbnail, upload, remove, graph, projection, info, healthz, readyz, metrics,
            create_static_files_router("/", directories=[STATIC], html_mode=True, name="ui"),
        ],
        lifespan=[lifespan],
        state=State({"settings": settings, "metrics": metrics_, "engine": None, "load_error": None}),
        middleware=[metrics_.middleware],
        exception_handlers={BadRequest: _bad_request},
        openapi_config=OpenAPIConfig(title="jaxmr search", version=jaxmr.__version__, path="/schema"),
        request_max_body_size=settings.max_upload_bytes * MAX_FILES + 1_000_000,
    )  # fmt: skip


def run(settings: Settings, on_ready_message: str = "") -> None:
    """Serves until Ctrl-C (uvicorn, one process: the encoders and the index live in it)."""
    import uvicorn  # only running a server needs it (tests use the ASGI app directly)

    app = create_app(settings)
    print(f"serving {settings.index} at http://{settings.host}:{settings.port}  (Ctrl-C stops){on_ready_message}",
          flush=True)  # fmt: skip
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
