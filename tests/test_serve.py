"""adafocus serve: a real Ray Serve HTTP server on 127.0.0.1 (a free port), spoken to with urllib."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import scale_helpers

from adafocus.demo.shipped import bundle_path, sample_videos
from adafocus.errors import ConfigError
from adafocus.scale.serve import HTTPError, ServeConfig, parse_multipart

MAX_BODY_MB = 0.1  # the sample videos are 17-21 kB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """One local Ray and the demo bundle served on a free port of 127.0.0.1 for this module."""
    pytest.importorskip("ray")
    from adafocus.scale.serve import start, stop

    ray = scale_helpers.start_ray()
    try:
        url = start(ServeConfig(bundle=str(bundle_path()), port=_free_port(), max_body_mb=MAX_BODY_MB, max_batch=8))
        yield url
        stop()
    finally:
        ray.shutdown()


def _multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _call(url: str, path: str, data: bytes | None = None, content_type: str | None = None,
          method: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_multipart_parsing():
    body, kind = _multipart("video", "clip.mp4", b"\x00\x01binary\r\n--not-a-boundary")
    assert parse_multipart(kind, body) == ("clip.mp4", b"\x00\x01binary\r\n--not-a-boundary")
    body, kind = _multipart("file", "clip.mp4", b"data")
    with pytest.raises(HTTPError, match="no multipart field 'video'"):
        parse_multipart(kind, body)


def test_config_checked():
    for bad, message in (({"port": 0}, "--port"), ({"max_body_mb": 0}, "--max-body"), ({"replicas": 0}, "--replicas")):
        with pytest.raises(ConfigError, match=message):
            ServeConfig(bundle="b", **bad).validate()


@pytest.mark.slow
def test_100_concurrent_requests_answer_the_labels_of_run(server):
    videos = sample_videos()
    ref = scale_helpers.reference([str(v) for v in videos])
    status, health = _call(server, "/healthz")
    assert status == 200 and health["status"] == "ok"

    def classify(i: int):
        video = videos[i % len(videos)]
        data = video.read_bytes()
        if i % 2:  # half as multipart form uploads, half as raw bodies
            body, kind = _multipart("video", video.name, data)
            return video, _call(server, "/classify", body, kind)
        return video, _call(server, "/classify", data, "application/octet-stream")

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(classify, range(100)))
    for i, (video, (status, body)) in enumerate(answers):
        assert status == 200, body
        assert (body["label"], body["exit_step"]) == ref[str(video)]
        assert body["video"] == (video.name if i % 2 else "upload")
        assert set(body) >= {"score", "topk", "gflops", "timings_ms", "patches"}  # what adafocus-run --json prints
    assert _call(server, "/healthz")[1]["served"] >= 100


@pytest.mark.slow
def test_errors_are_json_and_the_server_stays_up(server):
    status, body = _call(server, "/classify", b"\0" * int(10 * MAX_BODY_MB * 1e6), "application/octet-stream")
    assert status == 413 and body["status"] == 413 and "over the limit" in body["error"]
    status, body = _call(server, "/classify", b"this is not a video", "application/octet-stream")
    assert status == 422 and "not a video" in body["error"]
    assert _call(server, "/classify", b"")[0] == 400
    data, kind = _multipart("file", "x.mp4", sample_videos()[0].read_bytes())
    status, body = _call(server, "/classify", data, kind)
    assert status == 400 and "no multipart field 'video'" in body["error"]
    assert _call(server, "/nowhere")[0] == 404
    assert _call(server, "/classify", method="GET")[0] == 405
    assert _call(server, "/healthz")[0] == 200
    status, body = _call(server, "/classify", sample_videos()[0].read_bytes())
    assert status == 200 and body["label"]


def test_cli_errors_before_ray_starts(tmp_path, capsys):
    from adafocus.cli import main

    for args, message in (([str(tmp_path / "none")], f"error: bundle not found: {tmp_path / 'none'}"),
                          (["--max-body", "0"], "error: --max-body and --timeout must be > 0"),
                          (["--ray", "off"], "error: adafocus serve runs on Ray Serve"),
                          (["--budget", "0.001"], "error: budget 0.001 GFLOPs is below the glance cost")):
        with pytest.raises(SystemExit) as exc:
            main(["serve", *args])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and err.startswith(message) and err.count("\n") == 1, err
