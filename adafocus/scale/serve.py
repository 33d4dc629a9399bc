"""``adafocus serve``: a bundle behind HTTP on Ray Serve.

    POST /classify   the video as the raw request body, or as the multipart form field ``video``
                     (or, with ``allow_paths``, a JSON body ``{"path": "..."}`` naming a file the server reads)
                     -> 200 and the JSON object ``adafocus-run --json`` prints for the video
    GET  /healthz    -> 200 {"status": "ok", ...}

Errors are JSON ``{"error": "...", "status": N}``: 400 (empty or malformed upload), 404/405 (route, method),
413 (body over ``max_body_mb``, from its Content-Length or as it passes the limit; the rest is read and dropped,
up to ``DRAIN_FACTOR`` limits, so that the client reads the answer), 422 (not a video adafocus can decode),
504 (over ``timeout_s``), 500 (anything else). Each replica opens the bundle once; the requests it has in flight
are batched (``serve.batch``) into one ``Pipeline.run_many`` call, so their engine calls are batched per stage by
the step scheduler. The server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adafocus.errors import AdaFocusError, ConfigError, VideoError

APP_NAME = "adafocus"
DRAIN_FACTOR = 16  # an oversized body is read (and dropped) up to this many limits, then the connection closed


@dataclass(kw_only=True)
class ServeConfig:
    """One ``adafocus serve`` (the CLI's options)."""

    bundle: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_body_mb: float = 64.0
    budget: str | None = None
    average: bool = False  # the budget is a calibrated average over requests, not a per-video cap
    max_batch: int = 8  # requests per scheduler run
    max_ongoing: int = 64  # requests a replica accepts at once (more wait in the proxy)
    batch_wait_s: float = 0.005  # how long a replica waits for more requests to batch
    threads: int | None = None  # engine threads (default: cpus_per_replica)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    timeout_s: float = 60.0
    allow_paths: bool = False
    engine: str = "auto"
    ray: str = "auto"

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.replicas < 1 or self.max_batch < 1:
            raise ConfigError("--replicas and --max-batch must be >= 1")
        if self.max_body_mb <= 0 or self.timeout_s <= 0:
            raise ConfigError("--max-body and --timeout must be > 0")
        if self.cpus_per_replica <= 0 or self.gpus_per_replica < 0:
            raise ConfigError("--cpus-per-replica must be > 0 and --gpus-per-replica >= 0")
        if self.ray.strip().lower() == "off":
            raise ConfigError("adafocus serve runs on Ray Serve: --ray must be auto, local or a cluster address")

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * 1e6)


class HTTPError(Exception):
    """An answer other than 200: its status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Classifier:
    """The Serve deployment (one per replica): the bundle opened once; requests batched into ``run_many``."""

    def __init__(self, config: ServeConfig):
        from ray import serve

        from adafocus.runtime.pipeline import Pipeline

        self.config = config
        device = "cuda" if config.gpus_per_replica > 0 else "cpu"
        threads = config.threads or max(1, int(config.cpus_per_replica))
        self.pipe = Pipeline.from_bundle(config.bundle, engine=config.engine, device=device, threads=threads)
        self.budget = self.pipe.budget(config.budget, config.average)
        self.tmp = Path(tempfile.mkdtemp(prefix="adafocus-serve-"))
        self.served = 0
        self._batched = serve.batch(max_batch_size=config.max_batch,
                                    batch_wait_timeout_s=config.batch_wait_s)(self._classify_many)

    def __del__(self):
        shutil.rmtree(getattr(self, "tmp", ""), ignore_errors=True)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        try:
            path, method = request.url.path.rstrip("/") or "/", request.method
            if path == "/healthz":
                _allow(method, "GET")
                return JSONResponse({"status": "ok", "bundle": Path(self.config.bundle).name,
                                     "engine": self.pipe.engine_name, "served": self.served, "pid": os.getpid()})
            if path == "/classify":
                _allow(method, "POST")
                name, data = await self._upload(request)
                result = await asyncio.wait_for(self._batched((name, data)), self.config.timeout_s)
                if isinstance(result, BaseException):
                    raise result
                self.served += 1
                return JSONResponse(result)
            raise HTTPError(404, f"no route {path}: POST /classify or GET /healthz")
        except HTTPError as exc:
            return _error(exc.status, str(exc))
        except asyncio.TimeoutError:
            return _error(504, f"the video took longer than {self.config.timeout_s:g} s")
        except VideoError as exc:
            return _error(422, str(exc))
        except AdaFocusError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - a JSON 500, never a bare traceback page
            return _error(500, f"internal error {type(exc).__name__}: {exc}")

    async def _upload(self, request) -> tuple[str, bytes | str]:
        """(name, video bytes) of a request, or (name, path) for ``{"path": ...}`` with allow_paths."""
        limit = self.config.max_body
        declared = request.headers.get("content-length")
        over = declared is not None and declared.isdigit() and int(declared) > limit
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                over = True
            if over:  # read on without keeping it, so the client gets the 413 and not a reset connection
                body = bytearray()
                if size > DRAIN_FACTOR * limit:
                    break
                continue
            body += chunk
        if over:
            raise HTTPError(413, f"body of {declared or 'more than ' + str(limit)} bytes is over the limit of {limit} "
                                 "(--max-body)")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            return parse_multipart(request.headers["content-type"], bytes(body))
        if kind == "application/json" and self.config.allow_paths:
            try:
                path = json.loads(body)["path"]
            except (ValueError, KeyError, TypeError):
                raise HTTPError(400, 'a JSON body must be {"path": "..."}') from None
            return str(path), str(path)
        if not body:
            raise HTTPError(400, "empty body: send the video as the body or as the multipart field 'video'")
        return "upload", bytes(body)

    async def _classify_many(self, uploads: list[tuple[str, bytes | str]]) -> list:
        return await asyncio.get_running_loop().run_in_executor(None, self._run, uploads)

    def _run(self, uploads: list[tuple[str, bytes | str]]) -> list:
        """The results (or errors) of a batch of uploads, in order: written to temporary files, one run_many."""
        paths = []
        for i, (name, data) in enumerate(uploads):
            if isinstance(data, str):
                paths.append(data)
                continue
            path = self.tmp / f"{time.monotonic_ns()}-{i}{_suffix(name)}"
            path.write_bytes(data)
            paths.append(str(path))
        try:
            out: dict[str, object] = {}
            for path, res in self.pipe.run_many(paths, self.budget, batch=len(paths)):
                out[path] = res
        finally:
            for path, (_, data) in zip(paths, uploads, strict=True):
                if not isinstance(data, str):
                    Path(path).unlink(missing_ok=True)
        answers = []
        for path, (name, _) in zip(paths, uploads, strict=True):
            res = out.get(path, AdaFocusError("no result"))
            if isinstance(res, BaseException):
                answers.append(VideoError(str(res).replace(path, name)) if isinstance(res, VideoError) else res)
            else:
                d = res.to_dict()
                d["video"] = name
                answers.append(d)
        return answers


def parse_multipart(content_type: str, body: bytes) -> tuple[str, bytes]:
    """The ``video`` field of a multipart/form-data body: (its file name or "video", its bytes)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                   + body)
    if not message.is_multipart():
        raise HTTPError(400, "malformed multipart body")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "video":
            data = part.get_payload(decode=True) or b""
            if not data:
                raise HTTPError(400, "the multipart field 'video' is empty")
            return part.get_filename() or "video", data
    raise HTTPError(400, "no multipart field 'video'")


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise HTTPError(405, f"method {method} not allowed here (use {allowed})")


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "status": status}, status_code=status)


def _suffix(name: str) -> str:
    from adafocus.runtime.pipeline import VIDEO_SUFFIXES

    suffix = Path(name).suffix.lower()
    return suffix if suffix in VIDEO_SUFFIXES else ".mp4"


# ---------------------------------------------------------------------------------------------- lifetime
def start(config: ServeConfig) -> str:
    """Deploy ``config`` on the Ray instance this process has joined; returns the base URL. The bundle and the
    budget are checked here first (a bad one is one ConfigError/BundleError line, not a replica that keeps dying)."""
    from adafocus.errors import require
    from adafocus.scale.cluster import check_room
    from adafocus.scale.rows import RunnerOptions, check_runner

    config.validate()
    check_runner(RunnerOptions(bundle=config.bundle, budget=config.budget))
    serve = require("ray.serve", "ray", "adafocus serve")
    check_room(config.replicas, config.cpus_per_replica, config.gpus_per_replica, "replicas")
    serve.start(http_options={"host": config.host, "port": config.port,
                              "request_timeout_s": config.timeout_s + 30})
    deployment = serve.deployment(
        Classifier, name="classifier", num_replicas=config.replicas,
        max_ongoing_requests=max(config.max_ongoing, config.max_batch),
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica})
    serve.run(deployment.bind(config), name=APP_NAME, route_prefix="/", blocking=False,
              logging_config={"enable_access_log": False, "log_level": "WARNING"})
    return f"http://{config.host}:{config.port}"


def stop() -> None:
    """Remove the application and stop Serve on the Ray instance joined."""
    from ray import serve

    serve.shutdown()


def serve_forever(config: ServeConfig, log: Callable[[str], None] | None = None) -> None:
    """Join Ray (``config.ray``), deploy, and serve until interrupted (Ctrl-C or SIGTERM); then stop Serve and the
    Ray instance this call started."""
    import signal

    from adafocus.scale.cluster import connect
    from adafocus.scale.rows import RunnerOptions, check_runner

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    log = log or (lambda _msg: None)
    config.validate()
    check_runner(RunnerOptions(bundle=config.bundle, budget=config.budget))  # before Ray starts
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:  # before Ray starts: a signal during start-up stops it too (and SIGINT is caught even
        signal.signal(sig, interrupted)  # where the shell started us with it ignored)
    try:
        with connect(config.ray, log):
            url = start(config)
            try:
                log(f"serving {config.bundle} on {url} ({config.replicas} replica(s), batches of <= "
                    f"{config.max_batch}, bodies <= {config.max_body_mb:g} MB): POST {url}/classify, "
                    f"GET {url}/healthz; Ctrl-C stops")
                while True:  # short sleeps: a signal may land on one of Ray's threads, and is seen between them
                    time.sleep(0.5)
            finally:
                stop()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
