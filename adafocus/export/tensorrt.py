"""Build TensorRT engines from the exported stage ONNX files (TensorRT 10.x and 11.x).

    >>> info = build_engine("bundle/local.onnx", "bundle/local.engine", fp16=True,
    ...                     timing_cache="~/.cache/adafocus/trt.cache", profiles={"patch": (1, 4, 16)})
    >>> manifest["engines"]["local"] = info.to_dict()

What changed between versions, and how this module handles it:

- TensorRT 10 removed implicit batch: ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` is only set on
  TensorRT < 10 (where it is needed).
- INT8 comes from Q/DQ nodes in the ONNX (explicit quantization). Such graphs are built *strongly typed*
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): each tensor keeps the type the graph gives it.
  ``strongly_typed='auto'`` turns it on when the graph has Q/DQ nodes, and always on TensorRT 11, which
  builds nothing else (the flag is accepted and ignored there).
- ``BuilderFlag.FP16`` is not allowed with strongly typed networks, and TensorRT 11 removed it (and
  implicit INT8 calibration) altogether: there, FP16 means an FP16 ONNX (e.g. ModelOpt AutoCast).
  ``fp16=True`` in those cases raises one clear EngineError instead of a TensorRT error.

Builds on Jetson take minutes: pass ``timing_cache`` (a file path). It is loaded when present and
saved after every build (to a temporary file, then renamed), so the next build reuses the tactic
timings. Engines are written the same way, never half-written.
"""

from __future__ import annotations

import difflib
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adafocus.engines.base import cuda_device_info
from adafocus.errors import EngineError, require

Shape = tuple[int, ...]
ProfileSpec = tuple[int, int, int] | tuple[Sequence[int], Sequence[int], Sequence[int]]

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class TrtBuildInfo:
    """What the manifest records about one built engine (``to_dict()`` is JSON-ready)."""

    engine_path: str
    onnx_path: str
    trt_version: str
    compute_capability: str
    device_name: str
    fp16: bool
    strongly_typed: bool
    has_qdq: bool
    workspace_mb: int
    profiles: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max]
    onnx_bytes: int = 0
    engine_bytes: int = 0
    build_seconds: float = 0.0
    timing_cache: str | None = None
    timing_cache_loaded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: file, size, time, precision, versions."""
        precision = "fp16" if self.fp16 else ("int8 q/dq" if self.has_qdq else "fp32")
        cache = " (timing cache reused)" if self.timing_cache_loaded else ""
        return (
            f"{Path(self.engine_path).name}: {self.engine_bytes / 1e6:.1f} MB in {self.build_seconds:.1f} s{cache}, "
            f"{precision}{', strongly typed' if self.strongly_typed else ''}, TensorRT {self.trt_version}, "
            f"sm {self.compute_capability} ({self.device_name})"
        )


def onnx_has_qdq(onnx_path: str | os.PathLike) -> bool:
    """Whether the graph (subgraphs included) has QuantizeLinear/DequantizeLinear nodes.

    Uses onnx when installed; otherwise looks for the op-type strings in the file, which protobuf
    stores verbatim (enough on a Jetson that has TensorRT but not onnx).
    """
    try:
        import onnx
    except ImportError:
        data = Path(onnx_path).read_bytes()
        return b"QuantizeLinear" in data
    model = onnx.load(str(onnx_path), load_external_data=False)

    def walk(graph: Any) -> bool:
        for node in graph.node:
            if node.op_type in _QDQ_OPS:
                return True
            for attr in node.attribute:
                subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
                if any(walk(g) for g in subgraphs):
                    return True
        return False

    return walk(model.graph)


def _write_atomic(path: Path, data: Any) -> None:
    """Write bytes (or a buffer such as TensorRT's IHostMemory) to a temp file, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_precision(trt_major: int, fp16: bool, strongly_typed: bool | str, has_qdq: bool) -> bool:
    """Decide strongly typed or not, and refuse combinations TensorRT would reject. Returns strongly_typed."""
    if strongly_typed not in (True, False, "auto"):
        raise EngineError(f"strongly_typed must be True, False or 'auto', not {strongly_typed!r}")
    if trt_major >= 11:
        if strongly_typed is False:
            raise EngineError("TensorRT 11 builds strongly typed networks only: use strongly_typed='auto' or True")
        if fp16:
            raise EngineError(
                "TensorRT 11 has no FP16 builder flag (strongly typed networks only): convert the ONNX to FP16 "
                "first (e.g. python -m modelopt.onnx.autocast) and build it with fp16=False"
            )
        return True
    resolved = has_qdq if strongly_typed == "auto" else bool(strongly_typed)
    if resolved and fp16:
        why = "the graph has Q/DQ nodes, so it is built strongly typed" if has_qdq else "strongly_typed=True"
        raise EngineError(
            f"fp16=True is not allowed with a strongly typed network ({why}): TensorRT takes the precision "
            "from the graph; build with fp16=False, or quantize/convert the ONNX itself"
        )
    return resolved


def _profile_shapes(
    name: str, network_shape: Shape, spec: Any
) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) full shapes for one input from a batch triple or a triple of full shapes."""
    if not isinstance(spec, (tuple, list)) or len(spec) != 3:
        raise EngineError(f"profile for {name!r} must be (min, opt, max), got {spec!r}")
    if all(isinstance(v, int) for v in spec):
        lo, opt, hi = (int(v) for v in spec)
        if not 1 <= lo <= opt <= hi:
            raise EngineError(f"profile for {name!r}: need 1 <= min <= opt <= max batch, got {spec!r}")
        rest = network_shape[1:]
        if any(d < 0 for d in rest):
            raise EngineError(
                f"input {name!r} has dynamic dims besides the batch {tuple(network_shape)}: give full shapes "
                "(min_shape, opt_shape, max_shape), or export with static spatial dims (TensorRT builds faster)"
            )
        return (lo, *rest), (opt, *rest), (hi, *rest)
    shapes = tuple(tuple(int(d) for d in s) for s in spec)
    for s in shapes:
        if len(s) != len(network_shape) or any(n >= 0 and n != d for n, d in zip(network_shape, s, strict=True)):
            raise EngineError(f"profile shape {s} for {name!r} does not fit its network shape {tuple(network_shape)}")
    lo, opt, hi = shapes
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
        raise EngineError(f"profile for {name!r}: need min <= opt <= max in every dim, got {spec!r}")
    return lo, opt, hi


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = False,
    workspace_mb: int = 1024,
    timing_cache: str | os.PathLike | None = None,
    profiles: Mapping[str, ProfileSpec] | tuple[int, int, int] | None = None,
    strongly_typed: bool | str = "auto",
    optimization_level: int | None = None,
    device: int = 0,
    log_level: str = "warning",
) -> TrtBuildInfo:
    """Build a TensorRT engine from an ONNX stage and return what the manifest records.

    Args:
        onnx_path, engine_path: input ONNX and output engine (written atomically).
        fp16: allow FP16 kernels (TensorRT 10 weakly typed builds only; see the module docstring).
        workspace_mb: builder workspace pool limit. Lower it on Jetson when the build runs out of memory.
        timing_cache: file to load the tactic timing cache from (if present) and save it to.
        profiles: optimisation profile per input with dynamic dims: ``{name: (min, opt, max)}`` batch
            sizes (other dims static) or three full shapes. A bare ``(min, opt, max)`` applies to every
            dynamic input. Needed when the ONNX has a dynamic batch.
        strongly_typed: ``'auto'`` (on for Q/DQ graphs and on TensorRT 11), True or False.
        optimization_level: builder optimisation level 0..5 (None: TensorRT's default, 3).
        device: CUDA device index to build on (engines are specific to its compute capability).
        log_level: TensorRT logger severity: ``'error'``, ``'warning'``, ``'info'`` or ``'verbose'``.
    """
    trt = require("tensorrt", "gpu", "building TensorRT engines")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise EngineError(f"ONNX file not found: {onnx_path}")
    info = cuda_device_info(device)
    if info is None:
        raise EngineError(f"no CUDA device {device} found: TensorRT engines are built on the GPU they will run on")
    if device != 0:
        from adafocus.engines.tensorrt import open_cuda

        open_cuda(device)  # makes `device` current for TensorRT's builder
    trt_version = str(trt.__version__)
    major = int(trt_version.split(".")[0])
    has_qdq = onnx_has_qdq(onnx_path)
    typed = resolve_precision(major, fp16, strongly_typed, has_qdq)

    severity = {"error": trt.Logger.ERROR, "warning": trt.Logger.WARNING,
                "info": trt.Logger.INFO, "verbose": trt.Logger.VERBOSE}.get(log_level, trt.Logger.WARNING)
    logger = trt.Logger(severity)
    builder = trt.Builder(logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if major < 10 and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights are found
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(
            f"TensorRT's ONNX parser rejected {onnx_path.name}: " + " | ".join(errors[:3])
            + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else "")
            + "; run adafocus.export.readiness.check_readiness on it for the full list"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if has_qdq and not typed:  # TensorRT 10 weakly typed explicit quantization needs the INT8 flag
        config.set_flag(trt.BuilderFlag.INT8)

    used_profiles = _add_profile(trt, builder, network, config, profiles)

    cache_path = Path(timing_cache).expanduser() if timing_cache is not None else None
    cache_loaded = False
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache_loaded = bool(blob) and _use_timing_cache(config, blob)
        if not cache_loaded:
            _use_timing_cache(config, b"")

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineError(
            f"TensorRT could not build {onnx_path.name} (see its log above); if it ran out of memory "
            f"(common on Jetson), lower workspace_mb (now {workspace_mb}) or close other GPU programs"
        )
    _write_atomic(engine_path, serialized)
    if cache_path is not None:
        _write_atomic(cache_path, config.get_timing_cache().serialize())

    return TrtBuildInfo(
        engine_path=str(engine_path),
        onnx_path=str(onnx_path),
        trt_version=trt_version,
        compute_capability=info[1],
        device_name=info[0],
        fp16=bool(fp16),
        strongly_typed=typed,
        has_qdq=has_qdq,
        workspace_mb=int(workspace_mb),
        profiles=used_profiles,
        onnx_bytes=onnx_path.stat().st_size,
        engine_bytes=engine_path.stat().st_size,
        build_seconds=round(seconds, 3),
        timing_cache=str(cache_path) if cache_path is not None else None,
        timing_cache_loaded=cache_loaded,
    )


def _use_timing_cache(config: Any, blob: bytes) -> bool:
    """Attach a timing cache made from ``blob``; False when TensorRT refuses it (other version or GPU)."""
    try:
        cache = config.create_timing_cache(blob)
    except Exception:
        return False
    return cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))


def _add_profile(
    trt: Any, builder: Any, network: Any, config: Any, profiles: Mapping[str, Any] | tuple | None
) -> dict[str, list[list[int]]]:
    """Add one optimisation profile covering every dynamic input; return it as JSON-ready lists."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if profiles is None:
        per_input: dict[str, Any] = {}
    elif isinstance(profiles, Mapping):
        per_input = dict(profiles)
    else:
        per_input = {name: profiles for name, shape in inputs.items() if any(d < 0 for d in shape)}
    for name in per_input:
        if name not in inputs:
            close = difflib.get_close_matches(name, list(inputs), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EngineError(f"profile for unknown input {name!r}{hint}; the network's inputs: {list(inputs)}")
    dynamic = [n for n, s in inputs.items() if any(d < 0 for d in s)]
    static_asked = [n for n in per_input if n not in dynamic]
    if static_asked:
        n = static_asked[0]
        raise EngineError(
            f"input {n!r} has the static shape {inputs[n]}, so a profile cannot change it: "
            "export the ONNX with a dynamic batch dim"
        )
    missing = [n for n in dynamic if n not in per_input]
    if missing:
        shapes = ", ".join(f"{n} {inputs[n]}" for n in missing)
        raise EngineError(
            f"inputs with dynamic dims need a profile: {shapes}; pass e.g. profiles={{{missing[0]!r}: (1, 4, 16)}}"
        )
    if not dynamic:
        return {}
    profile = builder.create_optimization_profile()
    used: dict[str, list[list[int]]] = {}
    for name in dynamic:
        lo, opt, hi = _profile_shapes(name, inputs[name], per_input[name])
        profile.set_shape(name, lo, opt, hi)
        used[name] = [list(lo), list(opt), list(hi)]
    config.add_optimization_profile(profile)
    return used
