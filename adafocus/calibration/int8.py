"""INT8 encoders as Q/DQ ONNX, calibrated on real glance frames and patches, behind an accuracy gate.

``calibrate_int8(bundle, data)``:

1. runs the fp32 bundle on ``calib_videos`` videos of the calibration split and records what the global and
   backbone engines are fed (glance frames; patches);
2. quantizes ``global.onnx`` and ``backbone.onnx`` with onnxruntime's static quantizer: QDQ format, signed
   INT8 symmetric activations (what TensorRT's strongly typed Q/DQ networks take; UINT8 would be flagged
   by ``adafocus.export.readiness``), per-channel symmetric INT8 weights, float biases. Only convolutions
   are quantized: the policy (its own file), the classifier step (head.onnx) and the glance classifier stay float,
   because INT8 compresses exactly the confidences that the exit thresholds read;
3. runs fp32 and INT8 on the same held-out videos and compares them (:class:`~adafocus.calibration.report.
   GateReport`): top-1 of both, agreement of predictions, of exit steps and of patch locations, average
   GFLOPs, stage times;
4. when the top-1 drop is within ``max_drop`` points at every operating point, writes ``global.int8.onnx``
   and ``backbone.int8.onnx`` into the bundle and records them under ``manifest.precisions['int8']``.
   Otherwise (or on any error) the bundle is left exactly as it was.

Signed INT8 activations are what TensorRT takes, but onnxruntime's x86 CPU kernels are fast for unsigned
activations (u8 x s8) and slow for signed ones: measured on the development CPU, a ResNet-50 local stage
at 128 px ran 1.1x faster than fp32 with int8 activations and 1.8x with uint8, and the MobileNetV2 glance
ran 0.6x (slower) and 1.0x. ``activations='uint8'`` therefore writes a separate CPU precision ``int8-u8``
(``*.int8-u8.onnx``); ``stages`` picks the encoders to quantize (e.g. only ``backbone`` on CPUs).

NVIDIA ModelOpt is not used here (it is not installed in the reference environment); its Q/DQ graphs would
slot in at step 2.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adafocus.calibration.collect import collect, collect_many, load_labelled
from adafocus.calibration.report import GateReport, compare_caches
from adafocus.errors import AdaFocusError, BundleError, require
from adafocus.runtime.scheduler import host

QUANTIZED_STAGES = ("global", "backbone")
METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("int8", "uint8")
HEAD_NAME_HINTS = ("classifier", "mlp", "fc", "head")  # module names of the heads (a Conv head stays float too)
Log = Callable[[str], None]


@dataclass
class Int8Options:
    """How to calibrate and gate (the CLI's options, same names)."""

    calib_videos: int = 32  # videos of calib_split whose glance frames and patches calibrate activations
    calib_split: str = "train"
    heldout_split: str = "test"
    max_heldout: int | None = None  # at most this many held-out videos in the gate (None: all)
    method: str = "minmax"  # activation range: minmax, entropy or percentile (onnxruntime's calibrators)
    op_types: tuple[str, ...] = ("Conv",)
    stages: tuple[str, ...] = QUANTIZED_STAGES  # the others keep their fp32 files in the int8 precision
    # int8: signed symmetric, TensorRT's Q/DQ (the default). uint8: asymmetric, onnxruntime's fast path on
    # x86 CPUs (u8 x s8 VNNI/AVX2 kernels); TensorRT rejects it, so it is stored as precision 'int8-u8'
    activations: str = "int8"
    max_drop: float = 1.0  # percentage points of top-1 the INT8 bundle may lose at any operating point
    threads: int | None = None  # onnxruntime intra-op threads per engine
    criterion: str | None = None  # exit criterion (default: the bundle's)
    # when the gate fails with several encoders, try each alone (backbone first: the glance feeds the policy
    # and the glance exit, so it is the one most often kept in float) and keep the first that passes
    fallback: bool = True

    @property
    def precision(self) -> str:
        """The key under ``manifest.precisions`` (and in the file names) that this calibration writes."""
        return "int8" if self.activations == "int8" else "int8-u8"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise AdaFocusError(f"unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.calib_videos < 1:
            raise AdaFocusError(f"--calib-videos must be >= 1, got {self.calib_videos}")
        if not self.op_types:
            raise AdaFocusError("no op types to quantize")
        if self.activations not in ACTIVATIONS:
            raise AdaFocusError(f"unknown activation type {self.activations!r}; choose one of "
                                f"{', '.join(ACTIVATIONS)}")
        bad = [s for s in self.stages if s not in QUANTIZED_STAGES]
        if bad or not self.stages:
            raise AdaFocusError(f"stages to quantize must be among {', '.join(QUANTIZED_STAGES)}, got "
                                f"{', '.join(self.stages) or 'none'} (the policy stays float)")
        if self.max_drop != self.max_drop:
            raise AdaFocusError("--max-drop must be a number of percentage points")
        if self.max_drop < 0:
            raise AdaFocusError(f"--max-drop must be >= 0 percentage points, got {self.max_drop:g}")


@dataclass
class Int8Result:
    """What :func:`calibrate_int8` did: the gate report, and whether the INT8 files were written."""

    report: GateReport
    written: bool
    files: dict[str, str] = field(default_factory=dict)  # stage -> file in the bundle (when written)
    quantized_nodes: dict[str, int] = field(default_factory=dict)  # stage -> quantized (Q/DQ-wrapped) nodes
    seconds: dict[str, float] = field(default_factory=dict)
    stages: tuple[str, ...] = ()  # the encoders quantized in this result (the others stay float)
    attempts: list[dict] = field(default_factory=list)  # every try: stages, worst drop, passed

    @property
    def passed(self) -> bool:
        return self.report.passed


# ----------------------------------------------------------------------------------- calibration data
class _Recorder:
    """An engine wrapper that keeps a copy of every feed (host arrays) and passes the call through."""

    def __init__(self, engine: Any, feeds: list[dict[str, np.ndarray]]):
        self._engine = engine
        self._feeds = feeds

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self._feeds.append({k: np.array(host(v), copy=True) for k, v in feeds.items()})
        return self._engine.run(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def record_stage_inputs(pipe, videos: Sequence, stages: Sequence[str] = QUANTIZED_STAGES,
                        progress=None) -> dict[str, list[dict[str, np.ndarray]]]:
    """What each stage in ``stages`` is fed while ``pipe`` runs every step of every video (fp32 decisions:
    the glance frames, and every patch the backbone takes)."""
    feeds: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in stages}
    saved = dict(pipe.engines)
    try:
        for s in stages:
            pipe.engines[s] = _Recorder(saved[s], feeds[s])
        collect(pipe, videos, progress=progress)
    finally:
        pipe.engines.update(saved)
    return feeds


class _FeedReader:
    """onnxruntime CalibrationDataReader over recorded feeds (duck-typed: get_next / rewind)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], input_names: Sequence[str]):
        self._feeds = [{k: f[k] for k in input_names} for f in feeds]
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0


# -------------------------------------------------------------------------------------- quantization
def head_nodes(model_path: str | os.PathLike, op_types: Sequence[str]) -> list[str]:
    """Nodes of ``op_types`` that belong to a classifier head (by module name): kept float."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in op_types
            and any(h in part for part in n.name.lower().split("/") for h in HEAD_NAME_HINTS)]


def quantize_stage(src: str | os.PathLike, dst: str | os.PathLike, feeds: list[dict[str, np.ndarray]],
                   method: str = "minmax", op_types: Sequence[str] = ("Conv",),
                   exclude: Sequence[str] | None = None, activations: str = "int8") -> int:
    """Static Q/DQ quantization of one stage file (see the module docstring). Returns the number of
    quantized nodes (nodes of ``op_types`` whose inputs got Q/DQ pairs). ``activations``: ``int8`` (signed,
    symmetric: TensorRT) or ``uint8`` (asymmetric: onnxruntime's faster kernels on x86 CPUs)."""
    require("onnx", "export", "INT8 quantization")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise AdaFocusError(f"no calibration data recorded for {Path(src).name}")
    model = onnx.load(str(src), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    excluded = list(head_nodes(src, op_types) if exclude is None else exclude)
    calibrators = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
    with _quiet_quantizer():
        quantize_static(
            str(src), str(dst), _FeedReader(feeds, inputs),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            nodes_to_exclude=excluded,
            per_channel=True,
            # signed: TensorRT's Q/DQ (onnxruntime's default is UINT8)
            activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrators[method],
            extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True,
                           # float biases: int32 bias DequantizeLinear is not something TensorRT takes
                           "QuantizeBias": False},
        )
    quantized = onnx.load(str(dst), load_external_data=False)
    dq_outputs = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in quantized.graph.node if n.op_type in op_types and any(i in dq_outputs for i in n.input))


@contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizer logs 'consider pre-processing' on the root logger for every call (our graphs
    are already simplified by onnxslim, so the advice is noise here), and its histogram calibrators print
    progress to stdout, which would mix with a command's JSON output."""
    import contextlib
    import io

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    f = _Drop()
    root.addFilter(f)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(f)


# ------------------------------------------------------------------------------------------ pipeline
def pipeline_with_files(bundle_dir: str | os.PathLike, files: dict[str, str | os.PathLike],
                        threads: int | None = None, criterion: str | None = None, precision: str = "int8"):
    """A CPU onnxruntime Pipeline of a bundle whose stages in ``files`` (stage -> ONNX path, anywhere) replace
    the bundle's own: how the gate runs INT8 graphs before they are part of the bundle."""
    from adafocus.bundle import load_bundle
    from adafocus.runtime.engine_set import close_engines, open_engines
    from adafocus.runtime.pipeline import Pipeline

    bundle = load_bundle(bundle_dir, verify=False)  # verified when the fp32 pipeline was made
    name, engines = open_engines(bundle, "ort", "cpu", threads=threads,
                                 files={stage: path for stage, path in files.items() if path})
    try:
        pipe = Pipeline(bundle, engines, name, "cpu", criterion)
    except BaseException:
        close_engines(engines)
        raise
    pipe.precision = precision
    return pipe


# ------------------------------------------------------------------------------------------ the command
def calibrate_int8(bundle_dir: str | os.PathLike, data: str | os.PathLike, options: Int8Options | None = None,
                   log: Log | None = None, progress=None) -> Int8Result:
    """Quantize a bundle's encoders to INT8 and gate them against fp32 (see the module docstring).

    When the gate fails with several encoders and ``options.fallback`` is on, each encoder is tried alone
    (backbone, then global), and the first that passes is written: the result says which stages were kept in
    float (``result.stages``, ``result.attempts``). Returns the :class:`Int8Result`; ``result.written`` is
    False when every try failed (the bundle unchanged; the report is the first try's). User errors (bad data,
    unknown labels, a bundle that is not fp32) raise before anything is written.
    """
    import dataclasses

    opts = options or Int8Options()
    opts.validate()
    say = log or (lambda _line: None)
    tries = [tuple(opts.stages)]
    if opts.fallback and len(opts.stages) > 1:
        tries += [(stage,) for stage in ("backbone", "global") if stage in opts.stages]
    attempts: list[dict] = []
    first = None
    for stages in tries:
        if len(attempts):
            say(f"fallback   the gate failed with {', '.join(tries[0])} in INT8: trying {', '.join(stages)} alone "
                f"(the other encoder stays float)")
        result = _calibrate_once(bundle_dir, data, dataclasses.replace(opts, stages=stages), say, progress)
        attempts.append({"stages": list(stages), "worst_drop": round(result.report.worst_drop, 4),
                         "passed": result.written})
        result.attempts = attempts
        first = first or result
        if result.written:
            return result
    return first


def _calibrate_once(bundle_dir: str | os.PathLike, data: str | os.PathLike, opts: Int8Options, say: Log,
                    progress) -> Int8Result:
    """One quantize + gate (+ install when it passes) of ``opts.stages``."""
    from adafocus.runtime.pipeline import Pipeline

    bundle_dir = Path(bundle_dir)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    fp32 = Pipeline.from_bundle(bundle_dir, engine="ort", device="cpu", threads=opts.threads,
                                criterion=opts.criterion)
    tmp_dir: Path | None = None
    int8 = None
    try:
        m = fp32.manifest
        if m.precision != "fp32":
            raise BundleError(f"INT8 calibration needs an fp32 bundle; {bundle_dir} is {m.precision} "
                              "(re-export with --precision fp32)")
        calib_videos, _ = load_labelled(data, opts.calib_split, m.labels, opts.calib_videos)
        held_videos, held_labels = load_labelled(data, opts.heldout_split, m.labels, opts.max_heldout)
        feeds = record_stage_inputs(fp32, calib_videos, opts.stages, progress)
        seconds["record"] = time.perf_counter() - t
        say(f"recorded   {len(calib_videos)} {opts.calib_split} videos: "
            + ", ".join(f"{len(v)} {k} inputs" for k, v in feeds.items()) + f" ({seconds['record']:.1f}s)")

        tmp_dir = Path(tempfile.mkdtemp(prefix=".int8.", dir=bundle_dir))
        tmp_files: dict[str, Path] = {}
        quantized: dict[str, int] = {}
        for stage in opts.stages:
            t = time.perf_counter()
            src = fp32.bundle.stage_path(stage)
            tmp_files[stage] = tmp_dir / int8_name(src.name, opts.precision)
            # the module's name quantize_stage, looked up here on every call: tests replace it to force the gate
            # the backbone is exactly the local encoder (the classifier is head.onnx); the glance stage also
            # holds its classifier, whose nodes are found by module name and kept float
            exclude = [] if stage == "backbone" else None
            quantized[stage] = quantize_stage(src, tmp_files[stage], feeds[stage], opts.method, opts.op_types,
                                              exclude=exclude, activations=opts.activations)
            seconds[f"quantize_{stage}"] = time.perf_counter() - t
            say(f"quantize   {stage:<6} {quantized[stage]} {'/'.join(opts.op_types)} nodes -> {opts.activations} Q/DQ "
                f"({opts.method}, {seconds[f'quantize_{stage}']:.1f}s, "
                f"{tmp_files[stage].stat().st_size / 1e6:.1f} MB)")
        del feeds

        t = time.perf_counter()
        int8 = pipeline_with_files(bundle_dir, {s: str(p) for s, p in tmp_files.items()}, opts.threads,
                                   fp32.criterion, opts.precision)
        caches = collect_many({"fp32": fp32, "int8": int8}, held_videos, held_labels, opts.heldout_split, progress)
        table = list(m.exit.thresholds.values())
        own = solve_own_thresholds(int8, data, table, caches["int8"], fp32.criterion, progress, say)
        report = compare_caches(caches["fp32"], caches["int8"], table, fp32.criterion, opts.max_drop,
                                test_table=list(own.values()) if own else None)
        report.precision = opts.precision
        if own:
            report.thresholds = f"its own, solved on {table[0]['calibration']['split']} for the same budgets"
        seconds["gate"] = time.perf_counter() - t
        result = Int8Result(report, False, {}, quantized, seconds, tuple(opts.stages))
        if not report.passed:
            say(f"gate       FAILED: top-1 drop {report.worst_drop:.2f} points > {opts.max_drop:g}; bundle unchanged")
            return result
        int8.close()
        int8 = None
        fp32.close()
        result.files = install_int8(bundle_dir, tmp_files, opts.precision, thresholds=own)
        result.written = True
        say(f"wrote      {', '.join(result.files.values())} into {bundle_dir} "
            f"(manifest precisions[{opts.precision!r}])")
        return result
    finally:
        if int8 is not None:
            int8.close()
        fp32.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def int8_name(fp32_name: str, precision: str = "int8") -> str:
    """``global.onnx`` -> ``global.int8.onnx``."""
    stem, dot, ext = fp32_name.rpartition(".")
    return f"{stem}.{precision}.{ext}" if dot else f"{fp32_name}.{precision}"


def solve_own_thresholds(pipe, data, table: list[dict], heldout, criterion: str, progress=None,
                         say: Log = lambda _line: None) -> dict[str, dict]:
    """Exit thresholds for the quantized ``pipe``, solved for the budgets of the fp32 ``table`` on the split
    that table was calibrated on (the same scheme, per-video cap and criterion), evaluated on ``heldout``
    (its cache). Empty when the bundle has no table or the data has no such split."""
    from adafocus.calibration.thresholds import budget_key, solve_budgets

    if not table:
        return {}
    split = str(table[0].get("calibration", {}).get("split", "val"))
    if Path(data).suffix.lower() == ".csv" or not (Path(data) / f"{split}.csv").is_file():
        say(f"thresholds {pipe.precision} runs at the fp32 thresholds (no {split}.csv in {data} to solve its own)")
        return {}
    videos, labels = load_labelled(data, split, pipe.labels)
    t = time.perf_counter()
    cal = collect(pipe, videos, labels, split, progress)
    costs = [float(c) for c in cal.costs]
    out = {}
    held = (heldout.scores(criterion), heldout.preds, heldout.labels, heldout.split)
    for entry in sorted(table, key=lambda e: e["budget_gflops"]):  # one by one: each keeps its own per-video cap
        (sol,) = solve_budgets(cal.scores(criterion), cal.preds, cal.labels, costs, [float(entry["budget_gflops"])],
                               heldout=held, max_gflops=entry.get("max_gflops"), criterion=criterion,
                               calibration_split=split)
        out[budget_key(sol.budget_gflops)] = sol.to_entry()
    say(f"thresholds {pipe.precision}: solved for {len(out)} budgets on {len(cal)} {split} videos "
        f"({time.perf_counter() - t:.1f}s)")
    return out


def install_int8(bundle_dir: str | os.PathLike, tmp_files: dict[str, Path], precision: str = "int8",
                 thresholds: dict[str, dict] | None = None) -> dict[str, str]:
    """Move quantized stage files into the bundle and record them as ``precisions[precision]`` (the other
    stages keep their own files), with the precision's own exit ``thresholds`` table when given, all or
    nothing: ``update_manifest`` installs the files under the bundle's exclusive lock (readers never see a
    new file under the old manifest), keeps the files they replace aside until the manifest is written and
    puts them back on failure."""
    from adafocus.bundle import update_manifest

    names = {stage: Path(tmp).name for stage, tmp in tmp_files.items()}

    def edit(manifest):
        files = {s: st.file for s, st in manifest.stages.items()}
        files.update(names)
        manifest.precisions[precision] = files
        if thresholds:
            manifest.exit.by_precision[precision] = dict(thresholds)
        else:
            manifest.exit.by_precision.pop(precision, None)  # solved for the files replaced here
        for name in names.values():
            manifest.files[name] = None  # hashed by update_manifest
        return manifest

    update_manifest(bundle_dir, edit, install={names[stage]: tmp for stage, tmp in tmp_files.items()})
    return names
