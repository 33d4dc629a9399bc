"""Device profiles: what each stage of a bundle costs in milliseconds on one device, and the cost model
that plans by time from them.

``adafocus profile BUNDLE`` (:mod:`adafocus.bench.profile`) measures, on this device, the p50/p90 wall time
of every stage per batch size, of the backbone per number of patches, and the fixed costs around the engines
(preprocessing per frame, crop and orchestration per step, per video), and writes them to
``profiles/<key>.json`` inside the bundle. The key names what the figures depend on: the engine, the
precision, the device (and its model name) and the CPU threads. A profile is not part of the stage checksums;
it records the checksums of the stage files it measured, so a re-exported bundle's old profile is refused.

:class:`CostModel` reads one profile: the predicted time of the glance, the policy and a chunk of focus steps,
and the cumulative time at every exit. The runtime uses it for deadlines in milliseconds
(``--budget 25ms``), for ``--chunk auto`` and to report predicted against measured time.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adafocus.errors import ConfigError
from adafocus.runtime.preprocess import lazy_candidates
from adafocus.schema import SchemaError, read_record

PROFILE_DIR = "profiles"
PROFILE_FORMAT = 1
TIMED_STAGES = ("global", "policy", "backbone", "head")


@dataclass
class Quantiles:
    p50: float
    p90: float


@dataclass
class FixedCosts:
    """Host work around the engines, in ms (fitted from whole-pipeline runs on real video files)."""

    preprocess_frame: float  # resize + crop + normalise one decoded frame (as the runtime does it)
    video: float  # per video: everything but engine calls and preprocessing, up to the glance's exit
    step: float  # per focus step: crop, lazy preprocessing of a focus frame, the loop's bookkeeping
    policy: float = 0.0  # the policy stage's host work: frame sampling, boxes, the crop plan


@dataclass
class Profile:
    engine: str
    precision: str
    device: str  # "cpu" or "cuda:N"
    device_name: str  # CPU model or GPU name
    threads: int | None  # intra-op threads asked (None: the engine's default)
    stages: dict[str, dict[str, Quantiles]]  # stage -> batch size (as text) -> ms; backbone: patches per call
    fixed: FixedCosts
    stage_sha256: dict[str, str]  # stage file -> sha256 at the time of measuring
    measured: dict[str, float] = field(default_factory=dict)  # whole-pipeline checks: glance_only_ms, full_ms
    environment: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format: int = PROFILE_FORMAT
    # calibrated exit thresholds for average-time targets: "20ms" -> threshold entry with budget_ms
    thresholds: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return profile_key(self.engine, self.precision, self.device, self.device_name, self.threads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        t = "default" if self.threads is None else self.threads
        return f"{self.key} ({self.engine} {self.precision} on {self.device} '{self.device_name}', threads {t})"


def profile_key(engine: str, precision: str, device: str, device_name: str, threads: int | None) -> str:
    """The profile's file stem: ``ort-fp32-cpu-amd-epyc-7b13-t2`` (threads ``tdefault`` when not set)."""
    name = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")[:48] or "unknown"
    dev = device.replace(":", "")
    return f"{engine}-{precision}-{dev}-{name}-t{'default' if threads is None else threads}"


def device_name(device: str) -> str:
    """The model name of ``device`` ("cpu" -> the CPU model; "cuda:N" -> that GPU's name)."""
    from adafocus.bench.env import cpu_model, gpus

    if device == "cpu":
        return cpu_model()
    index = int(device.split(":")[1]) if ":" in device else 0
    found = gpus()
    return found[index]["name"] if index < len(found) else "unknown GPU"


# ------------------------------------------------------------------------------------------- files
def profile_paths(bundle_dir: str | Path) -> list[Path]:
    return sorted((Path(bundle_dir) / PROFILE_DIR).glob("*.json"))


def read_profile(path: str | Path, manifest=None) -> Profile:
    """One profile file, validated (typed keys; with ``manifest``, its stage checksums must match)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read profile {path}: {exc}") from exc
    try:
        prof = read_record(Profile, data, "profile")
    except SchemaError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if prof.format != PROFILE_FORMAT:
        raise ConfigError(f"{path}: profile format {prof.format} is not {PROFILE_FORMAT}: measure it again")
    for stage in TIMED_STAGES:
        if not prof.stages.get(stage):
            raise ConfigError(f"{path}: profile.stages.{stage} is missing")
        for size, q in prof.stages[stage].items():
            if not size.isdigit() or int(size) < 1 or not (0 <= q.p50 <= q.p90):
                raise ConfigError(f"{path}: profile.stages.{stage}.{size} must be a batch size with 0 <= p50 <= p90")
    if manifest is not None:
        stale = [f for f, sha in prof.stage_sha256.items() if manifest.files.get(f) is None
                 or manifest.files[f].sha256 != sha]
        if stale:
            raise ConfigError(f"profile {path.name} was measured on other stage files ({', '.join(stale)} changed "
                              f"since): measure it again with `adafocus profile`")
    return prof


def write_profile(bundle_dir: str | Path, prof: Profile) -> Path:
    """Write ``profiles/<key>.json`` atomically (it is not part of the bundle's checksums)."""
    from adafocus.bench.report import save_json

    return save_json(prof.to_dict(), Path(bundle_dir) / PROFILE_DIR / f"{prof.key}.json")


def find_profile(bundle, engine: str, precision: str, device: str, threads: int | None,
                 required: bool = True) -> Profile | None:
    """The bundle's profile for exactly this engine, precision, device and threads.

    None when there is none and ``required`` is False. Otherwise a ConfigError in one line: the profiles
    that exist and how they differ from this run (another engine, other threads are never used silently),
    or the ``adafocus profile`` command to run."""
    name = device_name(device)
    want = profile_key(engine, precision, device, name, threads)
    paths = profile_paths(bundle.path)
    for p in paths:
        if p.stem == want:
            try:
                return read_profile(p, bundle.manifest)
            except ConfigError:
                if required:
                    raise
                return None  # stale or damaged: not used (a time budget says why, in one line)
    if not required:
        return None
    cmd = (f"adafocus profile {bundle.path} --engine {engine} --device {device}"
           + (f" --threads {threads}" if threads is not None else "")
           + (f" --precision {precision}" if precision != bundle.manifest.precision else ""))
    if paths:
        raise ConfigError(f"no profile for this run ({want}); the bundle has {', '.join(p.stem for p in paths)}, "
                          f"which another engine, precision, device or thread count measured: run `{cmd}`")
    raise ConfigError(f"budgets in milliseconds need a profile of this device: run `{cmd}`")


# ------------------------------------------------------------------------------------------- costs
class CostModel:
    """Predicted milliseconds from a profile, for a bundle's preprocessing and number of steps."""

    def __init__(self, prof: Profile, manifest):
        self.profile = prof
        self.steps = len(manifest.costs.exits) - 1
        p = manifest.preprocessing
        self.glance_frames = p.num_glance if p.glance_positions is None else len(p.glance_positions)
        self.frames = p.candidates + (p.num_glance if p.glance_positions is None else 0)
        # the CPU base family preprocesses the glance frames first, the focus frames as steps read them
        self.lazy_frames = lazy_candidates(manifest.family, p, prof.device)
        self._tables = {(s, q): sorted((int(k), getattr(v, q)) for k, v in prof.stages[s].items())
                        for s in TIMED_STAGES for q in ("p50", "p90")}

    slow = 1.0  # how much longer than predicted this run's calls take (see ``observe``)

    def observe(self, measured_ms: float, predicted_ms: float) -> None:
        """Learn from a measured stage against its p50 prediction: ``slow`` follows their ratio (a moving
        average; one measurement counts within 0.67..1.5, so a single stall on a shared machine does not make
        every later plan timid), so deadlines plan with this run's speed when the machine is busier (or
        freer) than when it was profiled."""
        if predicted_ms > 0 and measured_ms > 0:
            ratio = min(1.5, max(0.67, measured_ms / predicted_ms))
            self.slow = 0.8 * self.slow + 0.2 * ratio

    def stage(self, stage: str, size: int = 1, q: str = "p50") -> float:
        """ms of one call of ``stage`` on ``size`` items: the measured sizes interpolated linearly, and past
        the largest extrapolated by its per-item cost."""
        pts = self._tables[stage, q]
        if size <= pts[0][0]:
            return pts[0][1]
        for (n0, t0), (n1, t1) in zip(pts, pts[1:], strict=False):
            if size <= n1:
                return t0 + (t1 - t0) * (size - n0) / (n1 - n0)
        n, t = pts[-1]
        return t * size / n

    def glance(self, batch: int = 1, q: str = "p50") -> float:
        """The glance of one video, ready to exit at step 0: preprocessing of what it reads, the global call."""
        f = self.profile.fixed
        pre = self.glance_frames if self.lazy_frames else self.frames
        return pre * f.preprocess_frame + self.stage("global", batch, q) / batch + f.video

    def policy(self, batch: int = 1, q: str = "p50") -> float:
        """One video's share of a policy call on ``batch`` videos, with its host work."""
        return self.stage("policy", batch, q) / batch + self.profile.fixed.policy

    def policy_round(self, batch: int = 1, q: str = "p50") -> float:
        """The policy stage of ``batch`` videos, which every one of them waits for."""
        return self.stage("policy", batch, q) + batch * self.profile.fixed.policy

    def chunk(self, n: int, batch: int = 1, q: str = "p50") -> float:
        """A chunk of ``n`` focus steps of each of ``batch`` videos (one backbone call, n head calls): the
        round's time, which every video in it waits for."""
        f = self.profile.fixed
        return self.stage("backbone", n * batch, q) + n * (self.stage("head", batch, q) + batch * f.step)

    def exit_times(self, chunks: list[int] | None = None, q: str = "p50") -> list[float]:
        """Cumulative ms of one video at every exit, with ``chunks`` (the chunk size for a chunk that starts at
        step k, ``chunks[k]``; None: chunk 1): a chunk's backbone call is paid at its first step, the head and
        the step's host work at every step."""
        f = self.profile.fixed
        head = self.stage("head", 1, q) + f.step
        out = [self.glance(q=q)]
        k = 0
        while k < self.steps:
            n = 1 if chunks is None else max(1, min(chunks[k], self.steps - k))
            t = out[-1] + (self.policy(q=q) if k == 0 else 0.0) + self.stage("backbone", n, q)
            for _ in range(n):
                t += head
                out.append(t)
            k += n
        return out
