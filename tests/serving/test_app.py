"""The search server: every route, every bad input (4xx, never 5xx), no compilation after warm-up,
micro-batching, uploads and deletes, and a schema-driven fuzz run against a live server."""

import asyncio
import base64
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxmr.data import parse_source
from jaxmr.index.ann import AnnConfig
from jaxmr.index.build import BuildOptions, build_index
from jaxmr.serving.app import create_app
from jaxmr.serving.engine import Engine, Query
from jaxmr.serving.settings import Settings
from jaxmr.serving.views import cluster_words, kmeans, map_clusters

from conftest import SMOKE_SOURCE, wait_ready

KEY = "s3cret"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def index_dir(smoke_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "index"
    build_index(smoke_run, SMOKE_SOURCE, out, split="test", options=BuildOptions(), progress=False)
    return out


@pytest.fixture(scope="module", params=["", "mesh"], ids=["index's own (scann)", "mesh"])
def backend(request) -> str:
    """Every API test runs against the index's own backend (ScaNN) and the mesh backend (`--backend mesh`)."""
    return request.param


@pytest.fixture(scope="module")
def client(index_dir, backend, tmp_path_factory):
    from litestar.testing import TestClient

    copy = tmp_path_factory.mktemp("serve_copy") / "index"
    shutil.copytree(index_dir, copy, symlinks=True)
    settings = Settings(index=str(copy), api_key=KEY, max_upload_bytes=60_000, max_pixels=1_000_000,
                        backend=backend)  # fmt: skip
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").json() == {"status": "ok"}  # alive while still loading
        wait_ready(c.get)
        yield c


def test_search_routes(client, backend):
    source = parse_source(SMOKE_SOURCE, "test")
    caption = source.captions(7)[0]
    body = client.post("/api/search", json={"text": caption, "k": 5}).json()
    assert len(body["results"]) == 5 and set(body["timing_ms"]) >= {"encode", "search", "total"}
    first = body["results"][0]
    assert {"id", "score", "url", "thumbnail", "captions", "width", "height"} <= set(first)
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    page2 = client.post("/api/search", json={"text": caption, "k": 2, "offset": 2}).json()["results"]
    assert [r["id"] for r in page2] == [r["id"] for r in body["results"][2:4]]

    captions = client.post("/api/search", json={"text": caption, "k": 3, "target": "captions"}).json()["results"]
    assert captions[0]["text"] == caption and captions[0]["image_id"] == 7  # a caption finds itself

    image = png(source[7]["image"])
    by_image = client.post("/api/search", json={"image": b64(image), "k": 3}).json()["results"]
    assert by_image[0]["id"] == 7 and by_image[0]["score"] > 0.99
    data_url = "data:image/png;base64," + b64(image)
    composed = client.post("/api/search", json={"image": data_url, "text": "a blue star", "k": 3}).json()
    assert len(composed["results"]) == 3
    assert client.post("/api/search", json={"image": b64(image), "k": 2, "target": "captions"}).status_code == 200

    similar = client.get("/api/similar/7?k=4").json()["results"]
    assert len(similar) == 4 and 7 not in [r["id"] for r in similar]
    response = client.get("/api/images/7")
    assert response.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.content))), source[7]["image"])
    thumb = client.get("/api/thumbnails/7?size=64")
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size == (64, 64)

    graph = client.get("/api/graph", params={"q": caption, "k": 20}).json()
    assert len(graph["nodes"]) == 20 and 2 <= graph["clusters"] <= 8
    ids = {n["id"] for n in graph["nodes"]}
    assert graph["edges"] and all(e["source"] in ids and e["target"] in ids for e in graph["edges"])
    assert all(-1 <= e["weight"] <= 1 for e in graph["edges"]) and "thumbnail" in graph["nodes"][0]
    projection = client.get("/api/projection?n=40").json()
    assert projection["method"] == "tsne" and len(projection["points"]) == 40
    assert all(-1 <= p["x"] <= 1 and -1 <= p["y"] <= 1 for p in projection["points"])
    assert client.get("/api/projection?n=40").json() == projection  # cached
    groups = projection["clusters"]  # k-means over all 64 sampled images, each group named by caption words
    assert [g["cluster"] for g in groups] == list(range(8)) and sum(g["size"] for g in groups) == 64
    assert all(0 <= p["cluster"] < 8 for p in projection["points"]) and all(g["words"] for g in groups if g["size"])

    info = client.get("/api/info").json()
    assert info["images"] == 64 and info["captions"] == 320 and info["uploads_need_key"]
    running = backend or "scann"
    assert info["backend"] == {"images": running, "captions": running}
    assert client.get("/").text.startswith("<!doctype html>") and client.get("/app.js").status_code == 200
    schema = client.get("/schema/openapi.json").json()
    assert {"/api/search", "/api/similar/{image_id}", "/api/images", "/api/graph"} <= set(schema["paths"])
    metrics = client.get("/metrics").text
    assert 'jaxmr_requests_total{method="POST",route="/api/search",status="200"}' in metrics
    assert 'jaxmr_stage_seconds_count{stage="encode"}' in metrics and "jaxmr_stage_seconds_bucket" in metrics
    assert 'route="/api/similar/{image_id}"' in metrics and "/api/similar/7" not in metrics  # templates, not paths
    assert f'jaxmr_search_backend{{backend="{running}",target="images"}} 1.0' in metrics


def bomb() -> bytes:
    """A 4000 x 4000 PNG of a few kB: 16M pixels, over the fixture's 1M limit."""
    buffer = io.BytesIO()
    Image.new("1", (4000, 4000)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_SEARCHES = [  # the limits are in the OpenAPI schema too; each message names the field and the limit
    ({"text": ""}, 400, "length >= 1"),
    ({"text": "   "}, 400, "empty"),
    ({"text": "x" * 1001}, 400, "length <= 1000"),
    ({"text": "x", "k": 0}, 400, "k Expected `int` >= 1"),
    ({"text": "x", "k": 101}, 400, "k Expected `int` <= 100"),
    ({"text": "x", "offset": -1}, 400, "offset Expected `int` >= 0"),
    ({"text": "x", "offset": 5000}, 400, "offset Expected `int` <= 1000"),
    ({"text": "x", "target": "videos"}, 400, "target Expected `str` matching"),
    ({}, 400, "give a text, an image, or both"),
    ({"image": "%%%not base64%%%"}, 400, "base64"),
    ({"image": b64(b"just some text, not an image")}, 400, "not a readable image"),
    (
        {"image": b64(np.random.default_rng(0).integers(0, 255, 70_000, dtype=np.uint8).tobytes())},
        413,
        "over the limit",
    ),
    ({"image": b64(bomb())}, 413, "pixels is over the limit"),
    ({"text": 5}, 400, "Validation failed"),
    ({"text": "x", "k": "many"}, 400, "Validation failed"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_SEARCHES)
def test_bad_search_requests_get_clear_4xx(client, body, status, message):
    response = client.post("/api/search", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_bad_routes_ids_and_path_tricks(client):
    assert (
        client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 400
    )
    for path in ["/api/images/99999", "/api/thumbnails/99999", "/api/similar/99999"]:
        response = client.get(path)
        assert response.status_code == 404 and "no image with id 99999" in response.json()["detail"]
    for path in ["/api/images/abc", "/api/images/..%2F..%2Fetc%2Fpasswd", "/..%2F..%2Fetc%2Fpasswd",
                 "/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd", "/api/images/7/../../../../etc/passwd",
                 "/app.js/../../../pyproject.toml"]:  # fmt: skip
        response = client.get(path)
        assert response.status_code in (400, 404), path
        assert b"root:" not in response.content and b"[project]" not in response.content
    assert client.get("/api/thumbnails/7?size=4").status_code == 400
    assert client.get("/api/similar/7?k=0").status_code == 400
    assert client.get("/api/graph").status_code == 400  # q is required
    assert client.get("/api/graph", params={"q": " "}).status_code == 400
    assert client.get("/api/projection?n=999999").status_code == 400
    assert client.delete("/api/images/99999", headers={"x-api-key": KEY}).status_code == 404


def test_uploads_need_the_key_and_round_trip(client):
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 8:24] = (250, 20, 200)
    files = [("files", ("magenta.png", png(pixels), "image/png"))]
    assert client.post("/api/images", files=files).status_code == 401
    assert client.post("/api/images", files=files, headers={"x-api-key": "wrong"}).status_code == 401
    assert client.delete("/api/images/3").status_code == 401

    headers = {"x-api-key": KEY}
    bad = client.post("/api/images", files=[("files", ("x.png", b"not an image", "image/png"))], headers=headers)
    assert bad.status_code == 400 and "not a readable image" in bad.json()["detail"]
    lines = client.post("/api/images", files=files, data={"captions": "one\ntwo"}, headers=headers)
    assert lines.status_code == 400 and "2 caption lines for 1 files" in lines.json()["detail"]
    before = client.get("/api/info").json()["images"]

    response = client.post("/api/images", files=files, data={"captions": "a magenta square | pink block"},
                           headers=headers)  # fmt: skip
    assert response.status_code == 201, response.text
    (new,) = response.json()["ids"]
    assert response.json()["records"][0]["captions"] == ["a magenta square", "pink block"]
    assert client.get("/api/info").json()["images"] == before + 1
    found = client.post("/api/search", json={"image": b64(png(pixels)), "k": 1}).json()["results"][0]
    assert found["id"] == new and found["score"] > 0.99
    assert client.get(f"/api/images/{new}").content == png(pixels)  # stored as sent
    caption_hit = client.post("/api/search", json={"text": "pink block", "k": 1, "target": "captions"}).json()
    assert caption_hit["results"][0]["image_id"] == new

    assert client.delete(f"/api/images/{new}", headers=headers).json() == {"deleted": new}
    assert client.get(f"/api/images/{new}").status_code == 404
    assert client.get("/api/info").json()["images"] == before


def test_soar_index_takes_uploads_and_deletes(smoke_run, tmp_path):
    """An index built with SOAR (where ScaNN's own delete would crash the server) takes uploads and deletes
    through the API: a deleted image is never returned again, also after the server restarts."""
    from litestar.testing import TestClient

    out = tmp_path / "soar"
    ann = AnnConfig(method="tree_ah", num_leaves=4, soar_lambda=1.5)
    build_index(smoke_run, SMOKE_SOURCE, out, split="test", options=BuildOptions(ann=ann), progress=False)
    headers = {"x-api-key": KEY}
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 8:24] = (250, 20, 200)
    query, by_image = {"text": "a red circle", "k": 5}, {"image": b64(png(pixels)), "k": 1}

    def searched(c) -> tuple[list[int], int]:
        ids = [r["id"] for r in c.post("/api/search", json=query).json()["results"]]
        return ids, c.post("/api/search", json=by_image).json()["results"][0]["id"]

    with TestClient(create_app(Settings(index=str(out), api_key=KEY))) as c:
        wait_ready(c.get)
        first, _ = searched(c)
        up = c.post("/api/images", files=[("files", ("a.png", png(pixels), "image/png"))], headers=headers)
        assert up.status_code == 201, up.text
        (added,) = up.json()["ids"]
        assert c.delete(f"/api/images/{first[0]}", headers=headers).json() == {"deleted": first[0]}
        assert c.get("/api/info").json()["images"] == 64
        ids, best = searched(c)
        assert first[0] not in ids and ids[:4] == first[1:] and best == added
    with TestClient(create_app(Settings(index=str(out), api_key=KEY))) as c:
        wait_ready(c.get)
        assert searched(c) == (ids, best)


@pytest.mark.parametrize("backend", ["", "mesh"])
def test_no_compilation_after_warm_up_and_micro_batching(index_dir, backend):
    engine = Engine(Settings(index=str(index_dir), backend=backend))
    source = parse_source(SMOKE_SOURCE, "test")

    async def scenario():
        await engine.start()
        compiled = engine.encoder.compiled_count()
        shapes = (1 + len(engine.encoder.text_lengths)) * len(engine.encoder.buckets)  # images; text at each length
        assert compiled == engine.compiled_after_warm_up == shapes
        searches = engine.searcher.compiled_searches()
        assert (searches > 0) == (backend == "mesh")
        queries = [Query(text=source.captions(i)[0], k=3) for i in range(10)]
        queries += [Query(image=engine.encoder.preprocess(source[i]["image"]), k=2) for i in range(5)]
        queries += [Query(image=engine.encoder.preprocess(source[0]["image"]), text="red", k=4, target="captions")]
        answers = await asyncio.gather(*(engine.search(q) for q in queries))  # all queued before the worker runs
        sizes = {a.timing_ms["batch"] for a in answers}
        for n in (1, 3, 7, 33, 64):  # batches of every size: bucket padding, never a new shape
            await asyncio.gather(*(engine.search(Query(text=f"a shape {i}", k=1)) for i in range(n)))
        for k in (1, 10, 100):  # every page depth up to max_k, and "more like this" (k + 1)
            await engine.search(Query(text="a red circle", k=k))
            await engine.search(Query(text="a red circle", k=k, target="captions"))
        assert engine.searcher.compiled_searches() == searches  # the mesh compiled it all in the warm-up
        await engine.stop()
        return answers, sizes, compiled

    answers, sizes, compiled = asyncio.run(scenario())
    assert sizes == {16}  # one encoder call per modality and one search per target for all 16
    for i, a in enumerate(answers[10:15]):  # each image finds itself ...
        # ... or, on the mesh's bfloat16 vectors (8-bit mantissa), one of the shapes world's near-copies that ties
        # with it (image 2 found 54 at 0.99995 and 30 at 0.9996): a cosine within bfloat16 rounding of 1
        assert a.ids[0] == i or (backend == "mesh" and a.scores[0] > 1 - 2**-7)
    assert len(answers[15].ids) == 4 and all(len(a.ids) == 3 for a in answers[:10])
    assert engine.encoder.compiled_count() == compiled


def test_kmeans_by_hand():
    x = np.array([[0, 0], [0, 0.1], [5, 5], [5.1, 5], [10, 0], [10, 0.2]], np.float32)
    labels = kmeans(x, 3)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[4] == labels[5]
    assert len(set(labels.tolist())) == 3


def test_map_groups_are_named_by_their_typical_caption_words():
    captions = [["a red circle", "red round circle"], ["a red circle on grey"], ["a blue square", "blue box"],
                ["the blue square in front"], ["a lonely triangle"]]  # fmt: skip
    labels = np.array([0, 0, 1, 1, 2])
    # "red" and "circle" are in every caption of group 0 and nowhere else; a word used once says nothing
    assert cluster_words(captions, labels, 3) == [["circle", "red"], ["blue", "square"], []]
    assert [map_clusters(n) for n in (0, 7, 16, 64, 600)] == [1, 1, 2, 8, 8]


def test_settings_from_environment():
    s = Settings.from_env({"JAXMR_PORT": "9000", "JAXMR_API_KEY": "k", "JAXMR_WARM_UP": "false"}, index="x", port=None)
    assert (s.port, s.api_key, s.warm_up, s.index) == (9000, "k", False, "x")
    assert Settings.from_env({"JAXMR_WARM_UP": "On"}).warm_up and not Settings.from_env({"JAXMR_WARM_UP": "0"}).warm_up
    with pytest.raises(ValueError, match="JAXMR_MAX_K='lots' is not a int"):
        Settings.from_env({"JAXMR_MAX_K": "lots"})
    with pytest.raises(ValueError, match="JAXMR_WARM_UP='maybe' is not true or false"):
        Settings.from_env({"JAXMR_WARM_UP": "maybe"})
    with pytest.raises(ValueError, match="max_k must be positive"):
        Settings(max_k=0)
    with pytest.raises(ValueError, match="TCP port"):
        Settings(port=99999)


def test_malformed_bodies_are_400_never_500(client):
    nested = '{"text": ' + "[" * 5000 + "]" * 5000 + "}"
    for body in (nested, '{"text": "x", "k": 1e999}', '{"text": "\\ud800"}', "\xff\xfe", "[]", "null"):
        response = client.post("/api/search", content=body.encode("utf-8", "surrogatepass"),
                               headers={"content-type": "application/json"})  # fmt: skip
        assert response.status_code == 400, (body[:40], response.status_code, response.text[:200])
        assert response.headers["content-type"].startswith("application/json") and response.json()["detail"]


def test_thumbnail_of_an_unreadable_or_huge_indexed_file_is_a_json_404(client, monkeypatch):
    engine = client.app.state.engine
    for image_id, content in ((11, bomb()), (12, b"not an image any more")):
        engine.searcher.image_file(image_id).write_bytes(content)  # the file changed under the index
        response = client.get(f"/api/thumbnails/{image_id}?size=48")
        assert response.status_code == 404 and response.headers["content-type"].startswith("application/json")
        assert f"image {image_id}" in response.json()["detail"]
    # over Pillow's own limit (a JPEG skips the server's pixel check: its draft decodes small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "JPEG")
    engine.searcher.image_file(13).write_bytes(buffer.getvalue())
    response = client.get("/api/thumbnails/13?size=48")
    assert response.status_code == 404 and "cannot be read" in response.json()["detail"]


def test_projection_is_computed_once_per_index_version(client, monkeypatch):
    from jaxmr.serving import engine as engine_module

    calls = []
    real = engine_module.project_2d
    monkeypatch.setattr(engine_module, "project_2d", lambda v: calls.append(len(v)) or real(v))
    client.app.state.engine._projection = {}
    sizes = [len(client.get(f"/api/projection?n={n}").json()["points"]) for n in (2, 17, 40, 600, 33)]
    assert calls == [64] and sizes == [2, 17, 40, 64, 33]  # one t-SNE of every image (64 < 600 points)
    assert client.get("/api/projection?n=601").status_code == 400


def test_responses_leak_no_paths_and_downloads_are_not_sniffed(client, index_dir):
    info = client.get("/api/info").json()
    assert "workdir" not in info["model"] and str(index_dir.parent) not in str(info)
    for path in ("/api/images/7", "/api/thumbnails/7", "/api/info", "/api/images/99999", "/"):
        assert client.get(path).headers["x-content-type-options"] == "nosniff", path


def test_a_broken_index_answers_503_without_its_path(index_dir, tmp_path):
    from litestar.testing import TestClient

    out = tmp_path / "broken"
    shutil.copytree(index_dir, out, symlinks=True)
    ids = next(out.glob("v*")) / "images" / "ids.npy"
    data = bytearray(ids.read_bytes())
    data[-1] ^= 0xFF  # damaged in a way only the checksum sees: the server starts, the load fails
    ids.write_bytes(bytes(data))
    with TestClient(create_app(Settings(index=str(out)))) as c:
        deadline = time.time() + 60
        while c.get("/readyz").status_code == 503 and "could not" not in c.get("/readyz").text:
            assert time.time() < deadline
            time.sleep(0.1)
        response = c.get("/api/info")
        assert response.status_code == 503 and str(out) not in response.text and str(tmp_path) not in response.text


# ------------------------------------------------------------------------------------------- live server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(index_dir, tmp_path_factory):
    """The app under uvicorn on a free localhost port, in a thread (for the fuzz and browser tests)."""
    import httpx
    import uvicorn

    copy = tmp_path_factory.mktemp("live") / "index"
    shutil.copytree(index_dir, copy, symlinks=True)
    port = free_port()
    settings = Settings(index=str(copy), port=port, api_key=KEY, max_upload_bytes=200_000)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    wait_ready(lambda path: httpx.get(url + path))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_fuzz_the_api_from_its_openapi_schema(live_server):
    """schemathesis over every route of the server's own schema: no 5xx, every status code, content type and
    JSON body as documented, and data outside the documented limits refused. (Not checked: that all data
    inside the schema is accepted, since a schema cannot say "a decodable image" or "not only spaces".)"""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks

    schema = schemathesis.openapi.from_url(f"{live_server}/schema/openapi.json")
    run = [not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
           checks.response_schema_conformance, checks.response_headers_conformance,
           checks.negative_data_rejection]  # fmt: skip
    failures, calls = [], []

    @given(case=schema.as_strategy())
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case):
        calls.append(case.operation.label)
        try:
            case.call_and_validate(base_url=live_server, headers={"x-api-key": KEY}, timeout=30, checks=run)
        except AssertionError as e:  # schemathesis' failures; each is kept, the run goes on
            failures.append(f"{case.method} {case.formatted_path}: {str(e)[:300]}")

    fuzz()
    assert len(set(calls)) >= 12, sorted(set(calls))  # every operation was tried
    assert not failures, "\n".join(failures[:10])


def test_browser_search_then_click_for_similar(live_server, tmp_path):
    """Headless Chromium types a query, sees result images, clicks one and sees similar images."""
    pytest.importorskip("playwright.sync_api")
    from serve.screenshot import find_chromium, search_and_click

    if find_chromium() is None:
        pytest.skip("no Chromium on this machine (apt install chromium)")
    shot = tmp_path / "ui.png"
    seen = search_and_click(live_server, "a large red circle", shot)
    assert not seen["errors"], seen["errors"]
    before, after = seen["before"], seen["after"]
    assert len(before["ids"]) == 55 and before["status"].startswith("“a large red circle”: 55 results")
    assert "q=a+large+red+circle" in before["url"]
    assert after["url"].endswith(f"?similar={before['ids'][0]}") and before["ids"][0] not in after["ids"]
    assert len(after["ids"]) == 55 and after["ids"] != before["ids"]
    assert Image.open(shot).size == (1280, 860)


def test_browser_map_shows_thumbnails_framed_by_group(live_server, tmp_path):
    """The map view: every sampled image drawn as a loaded thumbnail, framed in its k-means group's colour, a
    legend entry per group; scrolling zooms (the view box shrinks), hovering shows the image large, clicking finds
    similar images."""
    pytest.importorskip("playwright.sync_api")
    from serve.screenshot import find_chromium, open_map

    if find_chromium() is None:
        pytest.skip("no Chromium on this machine (apt install chromium)")
    import httpx

    seen = open_map(live_server, tmp_path / "map.png", zoom_steps=2)
    assert not seen["errors"], seen["errors"]
    points = seen["points"]
    # the fuzz test before this one may have added images to the shared live index: the map holds what the server's
    # projection holds (the built 64 at least), each once, in the group the server gave it
    served = {p["id"]: p["cluster"] for p in httpx.get(live_server + "/api/projection?n=600").json()["points"]}
    assert len(served) >= 64 and len(points) == len(served) and len({p["id"] for p in points}) == len(served)
    assert all(served[p["id"]] == p["cluster"] for p in points)
    colours = {p["cluster"]: p["fill"] for p in points}
    assert len(colours) >= 2 and len(set(colours.values())) == len(colours)  # one colour per group
    assert len(seen["legend"]) == 8
    assert seen["box"] == "0.0 0.0 1000.0 640.0"
    width = float(seen["zoomed"].split()[2])
    assert width < 1000 * 0.75  # two wheel steps in
    assert seen["hover"] and seen["status"].startswith("similar to")
    assert Image.open(tmp_path / "map.png").size == (1280, 940)
