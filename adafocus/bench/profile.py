"""``adafocus profile``: measure what each stage of a bundle costs on this device, for planning by time.

For every stage the p50 and p90 wall time of one engine call per batch size (the backbone per number of
patches: a chunk of one video's steps, or the chunks of several videos), after a warm-up, on random inputs of
the manifest's shapes; then the fixed costs around the engines, fitted from whole-pipeline runs on real video
files (glance only, and every step without early exit) so that the cost model adds up to what the runtime
measures. See :mod:`adafocus.runtime.profile` for the file and the cost model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from adafocus.errors import ConfigError
from adafocus.runtime.profile import (
    TIMED_STAGES,
    CostModel,
    FixedCosts,
    Profile,
    Quantiles,
    device_name,
    write_profile,
)

DEFAULT_BATCHES = (1, 2, 4, 8)


def measure_profile(bundle: str | os.PathLike, engine: str = "auto", device: str = "cpu", threads: int | None = None,
                    precision: str | None = None, batches: Iterable[int] = DEFAULT_BATCHES, seconds: float = 0.6,
                    min_reps: int = 15, write: bool = True, videos: Iterable[str] | None = None,
                    log: Callable[[str], None] | None = None) -> tuple[Profile, Any]:
    """Measure the bundle's stages on ``device`` and (``write``) store ``profiles/<key>.json`` in it.

    ``videos``: real files the fixed costs are fitted on (default: the bundled sample videos); give videos
    like the ones the bundle will see where their size differs much from 128 px.

    ``seconds``: time spent per measured configuration (at least ``min_reps`` calls, after 3 warm-up calls).
    Returns the profile and the path written (None without ``write``)."""
    from adafocus.bench.env import environment
    from adafocus.bundle import now_iso
    from adafocus.runtime.pipeline import Pipeline

    say = log or (lambda _line: None)
    sizes = sorted({int(b) for b in batches})
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"batch sizes must be positive integers, got {list(batches)}")
    with Pipeline.from_bundle(bundle, engine=engine, device=device, threads=threads, precision=precision,
                              chunk=1) as pipe:
        m = pipe.manifest
        steps = len(m.costs.exits) - 1
        rng = np.random.default_rng(0)
        stages: dict[str, dict[str, Quantiles]] = {}
        for stage in TIMED_STAGES:
            todo = _backbone_sizes(steps, sizes) if stage == "backbone" and m.family == "base" else sizes
            stages[stage] = {}
            for n in todo:
                feeds = _random_feeds(m.stages[stage].inputs, n, steps, rng, pipe)
                q = _time_calls(lambda s=stage, f=feeds: pipe.engines[s].run(f), seconds, min_reps, pipe)
                stages[stage][str(n)] = q
                say(f"{stage:<8} x{n:<3} p50 {q.p50:8.3f} ms   p90 {q.p90:8.3f} ms")
        fixed, measured = _fixed_costs(pipe, stages, min_reps, list(videos or _default_videos()))
        say(f"fixed    preprocess {fixed.preprocess_frame:.3f} ms/frame, {fixed.video:.3f} ms/video, "
            f"policy host {fixed.policy:.3f} ms, {fixed.step:.3f} ms/step")
        used = [m.stages[s].file for s in TIMED_STAGES]
        if pipe.precision != m.precision:
            used = [m.precisions[pipe.precision].get(s, m.stages[s].file) for s in TIMED_STAGES]
        prof = Profile(engine=pipe.engine_name, precision=pipe.precision, device=pipe.device,
                       device_name=device_name(pipe.device), threads=threads, stages=stages, fixed=fixed,
                       stage_sha256={f: m.files[f].sha256 for f in used if f in m.files}, measured=measured,
                       environment=environment(threads), created=now_iso())
        path = write_profile(pipe.bundle.path, prof) if write else None
    return prof, path


def _default_videos() -> list[str]:
    from adafocus.demo.shipped import sample_videos

    return [str(v) for v in sample_videos()]


def _backbone_sizes(steps: int, batches: list[int]) -> list[int]:
    """Patches per backbone call worth measuring: every chunk of one video (1..K), and K per video batched."""
    wanted = {n for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if n <= steps} | {steps}
    wanted |= {steps * b for b in batches}
    return sorted(wanted)


def _random_feeds(inputs, n: int, steps: int, rng, pipe) -> dict[str, Any]:
    """Random inputs of the manifest's shapes with ``n`` on the batch axis (on the device for a GPU)."""
    feeds = {}
    for t in inputs:
        shape = [n] + [int(d) for d in t.shape[1:]]
        if np.dtype(t.dtype).kind in "iu":
            value = np.zeros(shape, t.dtype) + min(steps - 1, 1)
        else:
            value = rng.standard_normal(shape).astype(t.dtype)
        feeds[t.name] = pipe._xp.asarray(value) if pipe._on_gpu else value
    return feeds


def _time_calls(fn: Callable[[], Any], seconds: float, min_reps: int, pipe) -> Quantiles:
    for _ in range(3):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < end:
        tick = time.perf_counter()
        fn()
        if pipe._on_gpu:
            pipe._xp.cuda.Device().synchronize()
        times.append((time.perf_counter() - tick) * 1e3)
        if len(times) >= 2000:
            break
    return _quantiles(times)


def _quantiles(times: list[float]) -> Quantiles:
    a = np.asarray(times, np.float64)
    return Quantiles(round(float(np.percentile(a, 50)), 4), round(float(np.percentile(a, 90)), 4))


def _fixed_costs(pipe, stages, min_reps: int, videos: list[str]) -> tuple[FixedCosts, dict[str, float]]:
    """The host work around the engine calls, fitted from whole-pipeline runs on real video files (glance
    only, and every step without early exit; each run decodes its video first, as the runtime does, so the
    caches are in the state the model finds them in) and the runtime's own timings of them: preprocessing
    per frame, the rest of a glance-only run, the policy stage's host work (sampling, boxes, the crop
    plan), and what each focus step adds beyond its backbone and head calls."""
    from adafocus.runtime.budget import Budget

    if not videos:
        raise ConfigError("adafocus profile needs video files to fit the fixed costs on: give VIDEOS")
    exits = pipe.exits
    steps = len(exits) - 1
    runs = (("glance_only", Budget(exits[0], 0, None)), ("full", Budget(exits[-1], steps, None)))
    for _, b in runs:  # warm-up
        for v in videos[:2]:
            pipe(v, b)
    # alternating the two budgets over the videos; the model time as the runtime reports it (decode
    # excluded), and its parts
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, _ in runs}
    for i in range(max(12, min_reps)):
        for name, b in runs:
            samples[name].append(pipe(videos[i % len(videos)], b).timings_ms)

    def med(name: str, key: str) -> float:
        return float(np.median([t[key] - (t["decode"] if key == "total" else 0.0) for t in samples[name]]))

    model = CostModel(Profile("", "", pipe.device, "", None, stages, FixedCosts(0.0, 0.0, 0.0), {}), pipe.manifest)
    glance_ms, full_ms = med("glance_only", "total"), med("full", "total")
    pre_frames = model.glance_frames if model.lazy_frames else model.frames
    pre = med("glance_only", "preprocess") / pre_frames
    per_video = glance_ms - pre * pre_frames - model.stage("global")
    policy_host = med("full", "policy") - model.stage("policy")
    engines_full = model.stage("policy") + steps * (model.stage("backbone", 1) + model.stage("head", 1))
    per_step = (full_ms - glance_ms - engines_full - max(0.0, policy_host)) / max(1, steps)
    fixed = FixedCosts(round(pre, 4), round(max(0.0, per_video), 4), round(max(0.0, per_step), 4),
                       round(max(0.0, policy_host), 4))
    return fixed, {"glance_only_ms": round(glance_ms, 4), "full_ms": round(full_ms, 4)}
