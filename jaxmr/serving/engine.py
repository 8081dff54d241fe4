"""What the server does, without HTTP: micro-batched query encoding and search, uploads, graph and projection.

Concurrent queries wait in one asyncio queue; a single worker takes everything that queued up (at most
`max_batch`), encodes all their texts in one call and all their images in another, and runs one batched
search per target. The encoders pad to fixed buckets that were compiled at start-up, so no request compiles."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from jaxmr.data.images import ImageReadError
from jaxmr.index.store import Searcher
from jaxmr.serving.settings import Settings
from jaxmr.serving.telemetry import Metrics
from jaxmr.serving.uploads import BadRequest, decode_upload
from jaxmr.serving.views import cluster_words, kmeans, map_clusters, project_2d

log = logging.getLogger(__name__)


class NoThumbnail(Exception):
    """An indexed image whose file cannot be made into a thumbnail (unreadable, or over the pixel limit)."""


@dataclasses.dataclass
class Query:
    """One search: text, image pixels, or both (composed); `vector` skips encoding (find-similar)."""

    text: str | None = None
    image: np.ndarray | None = None  # uint8 [S, S, 3]
    vector: np.ndarray | None = None  # float32 [E]
    k: int = 10
    offset: int = 0
    target: str = "images"
    exclude: int | None = None  # an id to leave out of the results (the query image itself)


@dataclasses.dataclass
class Answer:
    ids: list[int]
    scores: list[float]
    timing_ms: dict[str, float]


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.searcher = Searcher(settings.index, backend=settings.backend or None)
        self.searcher.clean()  # the server writes to the index: first remove what a killed writer left
        self.encoder = self.searcher.encoder
        self.ready = False
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._device_lock = threading.Lock()  # encoders and searches from the batch worker and uploads
        self._projection: dict[str, Any] = {}
        self._projection_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple[Any, int, int], bytes] = OrderedDict()
        self.compiled_after_warm_up: int | None = None
        self._compactor: threading.Thread | None = None

    # ---- life cycle

    def warm_up(self) -> None:
        """Compiles every bucket of both encoders and runs one search per target."""
        if self.settings.warm_up:
            self.encoder.warm_up()
        z = self.encoder.encode_texts(["warm up"])
        self.searcher.search(z, 1)
        if self.searcher.manifest.get("captions"):
            self.searcher.search(z, 1, target="captions")
        # the mesh backend's programs for every micro-batch size and page depth (+ 1 for "more like this",
        # + 8 fetched past tombstones); deeper pagination (max_offset) compiles on first use
        self.searcher.warm_up(self.settings.max_batch, self.settings.max_k + 9)
        self.compiled_after_warm_up = self.encoder.compiled_count()
        self._after_write()

    async def start(self) -> None:
        await asyncio.to_thread(self.warm_up)
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    # ---- search

    async def search(self, query: Query) -> Answer:
        if self._queue is None:
            raise RuntimeError("the engine is not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((query, future, time.perf_counter()))
        return await future

    async def _run(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            if self.settings.batch_window_ms:
                await asyncio.sleep(self.settings.batch_window_ms / 1000)
            while len(jobs) < self.settings.max_batch and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            try:
                answers = await asyncio.to_thread(self._answer, [q for q, _, _ in jobs])
            except Exception as e:  # delivered to each waiting request (a 500 there), the worker lives on
                for _, future, _ in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            now = time.perf_counter()
            for (_, future, started), answer in zip(jobs, answers, strict=True):
                answer.timing_ms["total"] = (now - started) * 1e3
                if not future.done():
                    future.set_result(answer)

    def _answer(self, queries: list[Query]) -> list[Answer]:
        """Encodes and searches a micro-batch: one encoder call per modality, one search per target."""
        with self._device_lock:
            self.searcher.refresh()  # another writer (a CLI, a second server) may have committed a version
            start = time.perf_counter()
            dim = self.searcher.manifest["model"]["embed_dim"]
            # With a trained composer, image + text queries go through it (its own text tower reads the text).
            fuse = lambda q: self.encoder.has_composer and q.text is not None and q.image is not None
            texts = [q.text for q in queries if q.text is not None and not fuse(q)]
            images = [q.image for q in queries if q.image is not None]
            ztxt = self.encoder.encode_texts(texts) if texts else np.zeros((0, dim), np.float32)
            zimg = self.encoder.encode_images(np.stack(images)) if images else np.zeros((0, dim), np.float32)
            vectors, t, i, fused = [], iter(ztxt), iter(zimg), []
            for n, q in enumerate(queries):
                zt = next(t) if q.text is not None and not fuse(q) else None
                zi = next(i) if q.image is not None else None
                if q.vector is None and fuse(q):
                    fused.append((n, zi))
                vectors.append(q.vector if q.vector is not None else self._compose(zi, zt))
            if fused:
                composed = self.encoder.compose(np.stack([z for _, z in fused]), [queries[n].text for n, _ in fused])
                for (n, _), z in zip(fused, composed, strict=True):
                    vectors[n] = z
            encode = time.perf_counter() - start
            results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(queries)
            for target in ("images", "captions"):
                members = [n for n, q in enumerate(queries) if q.target == target]
                if not members:
                    continue
                depth = max(queries[n].k + queries[n].offset + (queries[n].exclude is not None) for n in members)
                ids, scores = self.searcher.search(np.stack([vectors[n] for n in members]), depth, target)
                for row, n in enumerate(members):
                    results[n] = (ids[row], scores[row])
            search = time.perf_counter() - start - encode
        self.metrics.stage.labels("encode").observe(encode)
        self.metrics.stage.labels("search").observe(search)
        self.metrics.batch_size.observe(len(queries))
        answers = []
        for q, (ids, scores) in zip(queries, results, strict=True):
            keep = ids != q.exclude if q.exclude is not None else np.ones(len(ids), bool)
            ids, scores = ids[keep][q.offset : q.offset + q.k], scores[keep][q.offset : q.offset + q.k]
            timing = {"encode": encode * 1e3, "search": search * 1e3, "batch": len(queries)}
            answers.append(Answer([int(x) for x in ids], [float(x) for x in scores], timing))
        return answers

    def _compose(self, zimg: np.ndarray | None, ztxt: np.ndarray | None) -> np.ndarray:
        if zimg is None:
            return ztxt
        if ztxt is None:
            return zimg
        z = zimg + self.settings.compose_text_weight * ztxt
        return z / max(float(np.linalg.norm(z)), 1e-6)

    # ---- reading the index

    def records(self, ids: list[int], target: str = "images") -> list[dict[str, Any] | None]:
        start = time.perf_counter()
        records = self.searcher.records(ids, target)
        self.metrics.stage.labels("metadata").observe(time.perf_counter() - start)
        return records

    def image_vector(self, image_id: int) -> np.ndarray | None:
        try:
            return self.searcher.collection("images").vectors([image_id])[0]
        except KeyError:
            return None

    def thumbnail(self, image_id: int, size: int) -> bytes | None:
        """A JPEG at most `size` pixels on its longer side (an in-memory LRU of 2,048); None for an unknown id.
        Raises NoThumbnail when the image's file cannot be read or is over the pixel limits."""
        key = (self.searcher.generation, image_id, size)
        if key in self._thumbs:
            self._thumbs.move_to_end(key)
            return self._thumbs[key]
        path = self.searcher.image_file(image_id)
        if path is None:
            return None
        try:
            with Image.open(path) as pil:
                big = pil.width * pil.height > self.settings.max_pixels
                if big and pil.format != "JPEG":  # a JPEG's draft decodes it small
                    raise NoThumbnail(f"image {image_id} has {pil.width}x{pil.height} pixels, over the server's limit")
                pil.draft("RGB", (size, size))
                pil = pil.convert("RGB")
                pil.thumbnail((size, size), Image.Resampling.BICUBIC)  # only ever shrinks
                if max(pil.size) < size:  # tiny images (the shapes world) are upscaled crisply
                    scale = size / max(pil.size)
                    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.Resampling.NEAREST)
                buffer = io.BytesIO()
                pil.save(buffer, "JPEG", quality=85)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise NoThumbnail(f"image {image_id} cannot be read for a thumbnail ({type(e).__name__})") from None
        self._thumbs[key] = buffer.getvalue()
        if len(self._thumbs) > 2048:
            self._thumbs.popitem(last=False)
        return self._thumbs[key]

    # ---- writing

    def add(self, images: list[bytes], captions: list[list[str]]) -> list[int]:
        for data in images:  # every upload checked before the index changes; it stores the bytes as sent
            decode_upload(data, self.settings)
        with self._device_lock:
            try:
                ids = self.searcher.add(images, captions)
            except ImageReadError as e:
                raise BadRequest(str(e)) from None
        self._after_write()
        return ids

    def delete(self, image_id: int) -> bool:
        with self._device_lock:
            removed = self.searcher.delete([image_id]) == 1
        self._after_write()
        return removed

    def _after_write(self) -> None:
        """Updates the index gauges, and starts a background compaction when one is due (and none runs)."""
        counts = self.searcher.counts()
        for target in ("images", "captions"):
            if counts[target] is not None:
                self.metrics.index_size.labels(target).set(counts[target]["count"])
                self.metrics.index_delta.labels(target).set(counts[target]["delta"])
                self.metrics.index_tombstones.labels(target).set(counts[target]["tombstones"])
        self.metrics.log_bytes.set(counts["log_bytes"])
        self.metrics.backend.clear()
        for target, backend in self.searcher.backends().items():
            if backend is not None:
                self.metrics.backend.labels(target, backend).set(1)
        self.metrics.search_programs.set(self.searcher.compiled_searches())
        share = self.settings.compact_share
        if share <= 0 or (self._compactor is not None and self._compactor.is_alive()):
            return
        if self.searcher.compaction_due(share, self.settings.compact_min):
            self._compactor = threading.Thread(target=self._compact, name="jaxmr-compaction", daemon=True)
            self._compactor.start()

    def _compact(self) -> None:
        """The background compaction (searches and writes go on; see `Searcher.compact`)."""
        self.metrics.compacting.set(1)
        try:
            done = self.searcher.compact()
            self.metrics.compactions.labels("done" if done else "nothing").inc()
        except Exception:  # the index stays as it was (the old base and its log): logged, tried again later
            log.exception("background compaction of %s failed", self.settings.index)
            self.metrics.compactions.labels("failed").inc()
        finally:
            self.metrics.compacting.set(0)
        self._after_write()

    # ---- views

    def graph(self, ids: list[int], scores: list[float], neighbours: int = 3) -> dict[str, Any]:
        """Results grouped by k-means (k ~ sqrt(n / 2)), each linked to its nearest results by cosine."""
        vectors = self.searcher.collection("images").vectors(ids)
        n = len(ids)
        k = int(min(8, max(1, round(np.sqrt(n / 2)))))
        labels = kmeans(vectors, k) if n > k else np.arange(n)
        sim = vectors @ vectors.T
        np.fill_diagonal(sim, -np.inf)
        edges = {}
        for a in range(n):
            for b in np.argsort(-sim[a])[: min(neighbours, n - 1)]:
                key = (min(a, int(b)), max(a, int(b)))
                edges[key] = float(sim[a, b])
        return {
            "nodes": [{"id": i, "score": s, "cluster": int(c)} for i, s, c in zip(ids, scores, labels, strict=True)],
            "edges": [{"source": ids[a], "target": ids[b], "weight": w} for (a, b), w in sorted(edges.items())],
            "clusters": k,
        }

    def projection(self, n: int) -> dict[str, Any]:
        """A 2-D t-SNE of `settings.projection_points` images (a fixed random sample) with each image's k-means
        group (over the embeddings, not the 2-D points) and each group's size and most typical caption words,
        computed once per index version: the first `n` of its points (a random subset). Requests that arrive while
        it is computed wait for that one computation, so no request costs more than one t-SNE per change of the
        index."""
        with self._projection_lock:
            version = self.searcher.generation
            if self._projection.get("version") != version:
                collection = self.searcher.collection("images")
                rng = np.random.default_rng(0)
                rows = rng.permutation(len(collection))[: self.settings.projection_points]
                vectors = np.asarray(collection.embeddings[rows], np.float32)
                xy, method = project_2d(vectors)
                k = map_clusters(len(rows))
                groups = kmeans(vectors, k) if len(rows) else np.zeros(0, np.int64)
                ids = [int(i) for i in collection.ids[rows]]
                points = [{"id": i, "x": float(x), "y": float(y), "cluster": int(c)}
                          for i, (x, y), c in zip(ids, xy, groups, strict=True)]  # fmt: skip
                captions = [(r or {}).get("captions") or [] for r in self.records(ids)]
                words = cluster_words(captions, groups, k)
                clusters = [{"cluster": c, "size": int((groups == c).sum()), "words": w} for c, w in enumerate(words)]
                self._projection = {"version": version, "method": method, "clusters": clusters, "points": points}
            p = self._projection
            return {"method": p["method"], "clusters": p["clusters"], "points": p["points"][:n]}
