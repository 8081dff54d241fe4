"""The Litestar application: JSON API under /api, probes, Prometheus metrics, OpenAPI at /schema, the web UI at /.

    jaxmr serve --index INDEX_DIR --host 127.0.0.1 --port 8000

The model and the index load in the lifespan hook, in the background: /healthz answers at once, /readyz and
the API answer 503 until the encoders are loaded and every padding bucket is compiled.

The route handlers are made per application (`_routes(settings)`), so that the OpenAPI schema states the
server's own limits (k, offset, text length, projection size): a client, or a fuzzer, can read every limit
from /schema. Every error is a JSON body {status_code, detail} with the status the route documents; a body
the server cannot parse is a 400, never a 500.
"""

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import mimetypes
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import msgspec
from litestar import Litestar, MediaType, Request, Response, delete, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State, UploadFile
from litestar.exceptions import HTTPException, NotAuthorizedException, NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import FromQuery, JSONBody, MultipartBody, PathParameter, QueryParameter
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Message, Receive, Scope, Send

import jaxmr
from jaxmr.index.store import verify_index
from jaxmr.serving.engine import Engine, NoThumbnail, Query
from jaxmr.serving.settings import Settings
from jaxmr.serving.telemetry import Metrics
from jaxmr.serving.uploads import BadRequest, TooLarge, decode_upload

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_FILES = 16
ImageId = Annotated[int, PathParameter(ge=0, le=2**63 - 1, description="an image id from a search result")]


class ErrorBody(msgspec.Struct):
    """Every error response: the status again and a message meant for the client."""

    status_code: int
    detail: str


def _error(why: str) -> ResponseSpec:
    return ResponseSpec(ErrorBody, description=why, generate_examples=False)


BAD = {400: _error("the request breaks a limit or is malformed (detail says which)")}
UNAVAILABLE = {503: _error("the model is loading or warming up, or the index could not be loaded")}
UNKNOWN = {404: _error("no image with this id")}
KEY = {401: _error("this route needs the server's API key in the X-API-Key header")}
TOO_LARGE = {413: _error("an image (or the whole body) is over the size or pixel limits")}


class ServiceUnavailable(HTTPException):
    status_code = 503


def _engine(request: Request) -> Engine:
    state = request.app.state
    if state.get("load_error"):  # the reason is in the server's log, not in an answer to any client
        raise ServiceUnavailable("the index could not be loaded; the server's log says why")
    engine = state.get("engine")
    if engine is None or not engine.ready:
        raise ServiceUnavailable("the model is loading and warming up; try again in a moment")
    return engine


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


def _search_request(settings: Settings) -> type:
    """The body of POST /api/search, with this server's limits in its schema."""
    text = Annotated[str, msgspec.Meta(min_length=1, max_length=settings.max_text_chars,
                                       description="the query text (not only spaces)")]  # fmt: skip
    limits = f"at most {settings.max_upload_bytes} bytes and {settings.max_pixels} pixels"
    image = Annotated[str, msgspec.Meta(description=f"an image as base64, optionally a data: URL; {limits}")]
    return msgspec.defstruct(
        "SearchRequest",
        [
            ("text", text | None, None),
            ("image", image | None, None),
            ("k", Annotated[int, msgspec.Meta(ge=1, le=settings.max_k)], 10),
            ("offset", Annotated[int, msgspec.Meta(ge=0, le=settings.max_offset)], 0),
            ("target", Annotated[str, msgspec.Meta(pattern="^(images|captions)$")], "images"),
        ],
        module=__name__,
    )


def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    key = connection.app.state.settings.api_key
    if key and not hmac.compare_digest(connection.headers.get("x-api-key", "").encode(), key.encode()):
        raise NotAuthorizedException("this route needs the server's API key in the X-API-Key header")


class UploadForm(msgspec.Struct):
    files: list[UploadFile]
    captions: str | None = None  # one line of captions per file, captions on a line separated by " | "


def _routes(settings: Settings) -> list:
    """The route handlers of one application, their limits taken from `settings`."""
    SearchRequest = _search_request(settings)
    K = Annotated[int, QueryParameter(ge=1, le=settings.max_k, description="results per page")]
    Offset = Annotated[int, QueryParameter(ge=0, le=settings.max_offset, description="results to skip")]

    @post("/api/search", status_code=200, responses={**BAD, **TOO_LARGE, **UNAVAILABLE})
    async def search(request: Request, data: JSONBody[SearchRequest]) -> dict[str, Any]:
        """Text -> images or captions; image -> similar images or captions; image + text -> images (composed)."""
        engine = _engine(request)
        if data.target == "captions" and not engine.searcher.manifest.get("captions"):
            raise BadRequest("this index has no captions to search")
        if data.text is None and data.image is None:
            raise BadRequest("give a text, an image, or both")
        text = _check_text(settings, data.text) if data.text is not None else None
        pixels = None
        if data.image is not None:
            try:
                raw = data.image.split(",", 1)[-1] if data.image.startswith("data:") else data.image
                raw = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest("image must be base64 (optionally a data: URL)") from None
            pixels = await asyncio.to_thread(lambda: engine.encoder.preprocess(decode_upload(raw, settings)))
        query = Query(text=text, image=pixels, k=data.k, offset=data.offset, target=data.target)
        answer = await engine.search(query)
        return {"results": _results(engine, answer.ids, answer.scores, data.target), "timing_ms": answer.timing_ms}

    @get("/api/similar/{image_id:int}", responses={**BAD, **UNKNOWN, **UNAVAILABLE})
    async def similar(request: Request, image_id: ImageId, k: K = 10, offset: Offset = 0) -> dict[str, Any]:
        """Images nearest to an indexed image (itself left out): click-to-find-similar."""
        engine = _engine(request)
        vector = engine.image_vector(image_id)
        if vector is None:
            raise NotFoundException(f"no image with id {image_id}")
        answer = await engine.search(Query(vector=vector, k=k, offset=offset, exclude=image_id))
        return {"results": _results(engine, answer.ids, answer.scores, "images"), "timing_ms": answer.timing_ms}

    @get("/api/images/{image_id:int}", media_type="image/*", responses={**BAD, **UNKNOWN, **UNAVAILABLE})
    async def image_file(request: Request, image_id: ImageId) -> bytes:
        """The image as stored (ids are opaque; the path comes from the index's own metadata)."""
        path = _engine(request).searcher.image_file(image_id)
        try:
            data = await asyncio.to_thread(path.read_bytes) if path is not None else None
        except OSError:  # gone or unreadable since it was indexed
            data = None
        if data is None:
            raise NotFoundException(f"no image with id {image_id}")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @get("/api/thumbnails/{image_id:int}", media_type="image/jpeg", responses={**BAD, **UNKNOWN, **UNAVAILABLE})
    async def thumbnail(
        request: Request, image_id: ImageId, size: Annotated[int, QueryParameter(ge=16, le=512)] = 160
    ) -> bytes:
        """A JPEG thumbnail, at most `size` pixels on its longer side (404 when the image's file cannot be read)."""
        try:
            data = await asyncio.to_thread(_engine(request).thumbnail, image_id, size)
        except NoThumbnail as e:
            log.warning("%s", e)
            raise NotFoundException(str(e)) from None
        if data is None:
            raise NotFoundException(f"no image with id {image_id}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    upload_errors = {**BAD, **KEY, **TOO_LARGE, **UNAVAILABLE}

    @post("/api/images", guards=[api_key_guard], status_code=201, responses=upload_errors)
    async def upload(request: Request, data: MultipartBody[UploadForm]) -> dict[str, Any]:
        """Adds images (multipart field `files`, optional `captions`) to the index; returns their ids."""
        engine = _engine(request)
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

    @delete("/api/images/{image_id:int}", guards=[api_key_guard], status_code=200,
            responses={**BAD, **KEY, **UNKNOWN, **UNAVAILABLE})  # fmt: skip
    async def remove(request: Request, image_id: ImageId) -> dict[str, Any]:
        """Removes an image and its captions from the index."""
        engine = _engine(request)
        if not await asyncio.to_thread(engine.delete, image_id):
            raise NotFoundException(f"no image with id {image_id}")
        return {"deleted": image_id}

    GraphK = Annotated[int, QueryParameter(ge=2, le=settings.max_k, description="results in the graph")]
    Q = Annotated[str, QueryParameter(min_length=1, max_length=settings.max_text_chars, description="query text")]

    @get("/api/graph", responses={**BAD, **UNAVAILABLE})
    async def graph(request: Request, q: FromQuery[Q], k: GraphK = 50) -> dict[str, Any]:
        """The top k for a text query as a graph: k-means clusters, edges between similar results."""
        engine = _engine(request)
        answer = await engine.search(Query(text=_check_text(settings, q), k=k))
        result = await asyncio.to_thread(engine.graph, answer.ids, answer.scores)
        records = {r["id"]: r for r in _results(engine, answer.ids, answer.scores, "images")}
        for node in result["nodes"]:
            node.update(records.get(node["id"], {}))
        return {**result, "timing_ms": answer.timing_ms}

    N = Annotated[int, QueryParameter(ge=2, le=settings.projection_points, description="points to return")]
    default_points = min(500, settings.projection_points)

    @get("/api/projection", responses={**BAD, **UNAVAILABLE})
    async def projection(request: Request, n: N = default_points) -> dict[str, Any]:
        """A 2-D t-SNE of a fixed sample of the index, each image with its k-means group (the map's colours) and
        each group with the caption words most typical of it: computed once per index version, then sliced."""
        engine = _engine(request)
        result = await asyncio.to_thread(engine.projection, n)
        ids = [p["id"] for p in result["points"]]
        captions = {r["id"]: r["captions"] for r in engine.records(ids) if r is not None}
        points = [{**p, "thumbnail": f"/api/thumbnails/{p['id']}", "captions": captions[p["id"]][:1]}
                  for p in result["points"] if p["id"] in captions]  # fmt: skip
        return {"method": result["method"], "clusters": result["clusters"], "points": points}

    @get("/api/info", responses=UNAVAILABLE)
    async def info(request: Request) -> dict[str, Any]:
        """What the index holds: counts, model, whether captions are searchable, the limits, and how image + text
        queries are fused (a trained composer, or the normalised sum of the two embeddings)."""
        engine = _engine(request)
        m = engine.searcher.manifest
        model = {k: m["model"].get(k) for k in ("fingerprint", "step", "embed_dim", "image_size")}  # no paths
        counts = engine.searcher.counts()
        return {
            "images": counts["images"]["count"],
            "captions": counts["captions"]["count"] if counts["captions"] else 0,
            "backend": engine.searcher.backends(),
            "index": {"base_version": m["version"], "writes_logged": counts["log_writes"],
                      "log_bytes": counts["log_bytes"], "images": counts["images"], "captions": counts["captions"]},
            "source": {k: m["source"].get(k) for k in ("spec", "split")}, "model": model, "version": m["version"],
            "jaxmr_version": jaxmr.__version__,
            "limits": {"max_k": settings.max_k, "max_text_chars": settings.max_text_chars,
                       "max_upload_bytes": settings.max_upload_bytes},
            "uploads_need_key": bool(settings.api_key),
            "composed_queries": "trained composer" if engine.encoder.has_composer else "normalised sum",
        }  # fmt: skip

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive (answers while the model is still loading)."""
        return {"status": "ok"}

    @get("/readyz", responses=UNAVAILABLE)
    async def readyz(request: Request) -> dict[str, Any]:
        """Ready: the encoders are loaded and compiled for every padding bucket."""
        engine = _engine(request)
        return {"status": "ready", "compiled": engine.compiled_after_warm_up}

    @get("/metrics", media_type="text/plain; version=0.0.4")
    async def metrics(request: Request) -> str:
        """Prometheus metrics."""
        return Response(request.app.state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    return [search, similar, image_file, thumbnail, upload, remove, graph, projection, info, healthz, readyz, metrics]


def _nosniff(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: every response (API, files, the UI's static files, errors) says
    `X-Content-Type-Options: nosniff`, so a browser never runs a served file as something else."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        await app(scope, receive, send_with_header if scope["type"] == "http" else send)

    return middleware


def _json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response({"status_code": status, "detail": detail}, status_code=status, media_type=MediaType.JSON,
                    headers=headers)  # fmt: skip


def _bad_request(_: Request, exc: BadRequest) -> Response:
    return _json_error(413 if isinstance(exc, TooLarge) else 400, str(exc))


def _http_error(_: Request, exc: HTTPException) -> Response:
    """Litestar's own errors (validation, 401, 404, 405, 413) as JSON whatever the route's media type; the
    validation messages name the field and the limit it broke."""
    detail = exc.detail
    extra = getattr(exc, "extra", None)
    if isinstance(extra, list) and extra:
        detail += ": " + "; ".join(
            f"{e.get('key', '')} {e.get('message', '')}".strip() if isinstance(e, dict) else str(e) for e in extra
        )
    return _json_error(exc.status_code, detail, exc.headers)


def _unparsable(_: Request, exc: RecursionError) -> Response:
    return _json_error(400, "the request body is nested too deeply to parse")


def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error answering %s %s", request.method, request.url.path)
    return _json_error(500, "internal error; the server's log has the details")


def create_app(settings: Settings) -> Litestar:
    """The application for one index. Raises a clear error at once when the index directory is not one or fails
    the cheap checks (`verify_index(full=False)`: manifest, file sizes, counts)."""
    verify_index(settings.index, full=False)
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

    ui = create_static_files_router("/", directories=[STATIC], html_mode=True, name="ui")
    return Litestar(
        route_handlers=[*_routes(settings), ui],
        lifespan=[lifespan],
        state=State({"settings": settings, "metrics": metrics_, "engine": None, "load_error": None}),
        middleware=[metrics_.middleware, _nosniff],
        exception_handlers={
            BadRequest: _bad_request,
            HTTPException: _http_error,
            RecursionError: _unparsable,
            Exception: _unexpected,
        },
        openapi_config=OpenAPIConfig(title="jaxmr search", version=jaxmr.__version__, path="/schema"),
        request_max_body_size=settings.max_upload_bytes * MAX_FILES + 1_000_000,
    )


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, or a clear ValueError (port taken, address not here) before
    the model loads; uvicorn serves on it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, OverflowError) as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(settings: Settings, on_ready_message: str = "") -> None:
    """Serves until Ctrl-C (uvicorn, one process: the encoders and the index live in it). The address is bound
    and the index checked before anything loads, so a bad setting fails at once."""
    import uvicorn  # only running a server needs it (tests use the ASGI app directly)

    sock = listen(settings.host, settings.port)
    try:
        app = create_app(settings)
        print(f"serving {settings.index} at http://{settings.host}:{settings.port}  (Ctrl-C stops){on_ready_message}",
              flush=True)  # fmt: skip
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down cleanly (as uvicorn.run does, exit 0)
        pass
    finally:
        sock.close()
