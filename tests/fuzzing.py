"""Fuzzing helpers for tests/test_fuzz.py: a sandboxed worker process that runs one case at a time, the
mutations it applies, and a tally of outcomes.

Every case runs in a separate (spawned) worker process, so that a hang (no answer within the case's time
limit), a crash (a segfault in FFmpeg, onnxruntime or torch) or a runaway allocation (the worker's address
space is capped) fails the case instead of the test run. The worker stays up between cases (imports and
engines are paid once) and is restarted after a hang or a crash.

A case is plain data (a list of mutation tuples), so hypothesis can shrink it and print it; the worker
applies it to its base file (the demo manifest, a video, a checkpoint) and reports, per target it ran, one
record ``(target, outcome, detail)``: outcome ``"ok"``, the name of a typed error (an ``AdaFocusError``
subclass or ``OSError``), or ``"BUG ..."`` (any other exception, a hang, a crash, a broken invariant) with
the traceback or explanation as detail.
"""

from __future__ import annotations

import copy
import io
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------- tally


class Tally:
    """Outcome counts per (test, target), with the first detail seen for each BUG outcome."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
        self.cases: Counter = Counter()
        self.examples: dict[tuple[str, str, str], str] = {}
        self.seconds: Counter = Counter()

    def add(self, test: str, records: list[tuple[str, str, str]], seconds: float = 0.0, case: Any = None) -> None:
        self.cases[test] += 1
        self.seconds[test] += seconds
        for target, outcome, detail in records:
            self.counts[test][target][outcome] += 1
            if outcome.startswith("BUG"):
                last = detail.strip().splitlines()[-3:]
                shown = repr(case) if len(repr(case)) < 400 else repr(case)[:400] + "..."
                self.examples.setdefault((test, target, outcome), f"case {shown}\n" + "\n".join(last))

    def as_dict(self) -> dict:
        return {test: {"cases": self.cases[test], "seconds": round(self.seconds[test], 1),
                       "targets": {t: dict(sorted(c.items())) for t, c in targets.items()}}
                for test, targets in self.counts.items()}

    def format(self) -> str:
        lines = ["fuzz summary (cases per test; outcomes per target)"]
        for test, info in self.as_dict().items():
            lines.append(f"  {test}: {info['cases']} cases, {info['seconds']} s in the worker")
            for target, outcomes in info["targets"].items():
                shown = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]))
                lines.append(f"    {target:<22} {shown}")
        if self.examples:
            lines.append("bugs (one example each):")
            for (test, target, outcome), text in self.examples.items():
                lines.append(f"  {test} / {target}: {outcome}\n    " + text.replace("\n", "\n    "))
        return "\n".join(lines)


def bugs(records: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [r for r in records if r[1].startswith("BUG")]


# ------------------------------------------------------------------------------------- parent side
class Sandbox:
    """A worker process (spawned, so no state leaks from the test process) that runs cases one at a time.

    ``call(kind, case)`` returns the worker's records; a worker that does not answer within ``timeout``
    seconds is killed and the case gets a ``BUG hang`` record; one that dies gets ``BUG crash``.
    """

    def __init__(self, config: dict[str, Any], log: Path, timeout: float = 30.0, start_timeout: float = 180.0):
        self.config = config
        self.log = Path(log)
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.proc = None
        self.conn = None
        self.restarts = 0

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(child, self.config, str(self.log)), daemon=True,
                           name="adafocus-fuzz-worker")
        proc.start()
        child.close()
        if not parent.poll(self.start_timeout):
            proc.kill()
            proc.join(5)
            raise RuntimeError(f"the fuzz worker did not start within {self.start_timeout:.0f} s; log:\n"
                               f"{self.log_tail()}")
        ready = parent.recv()
        if ready != "ready":
            raise RuntimeError(f"the fuzz worker failed to start: {ready}")
        self.proc, self.conn = proc, parent

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def call(self, kind: str, case: Any, timeout: float | None = None) -> list[tuple[str, str, str]]:
        if self.proc is None or not self.proc.is_alive():
            if self.proc is not None:
                self._stop()
                self.restarts += 1
            self._start()
        limit = timeout or self.timeout
        self.conn.send((kind, case))
        if not self.conn.poll(limit):
            self._stop()
            self.restarts += 1
            return [(kind, "BUG hang", f"no answer within {limit:.0f} s (worker killed); case: {case!r}")]
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(10)
            code = self.proc.exitcode
            self._stop()
            self.restarts += 1
            return [(kind, f"BUG crash (exit code {code})", f"worker died; log tail:\n{self.log_tail()}")]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
                self.proc.join(10)
            except (OSError, BrokenPipeError):
                pass
        self._stop()


# ------------------------------------------------------------------------------------- worker side
def serve(conn, config: dict[str, Any], log: str) -> None:
    """The worker's loop: set limits, import, answer ``(kind, case)`` messages until ``None``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)  # FFmpeg's warnings, our prints: a log file, shown when the worker crashes
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    try:
        import resource

        limit = int(config.get("memory_gb", 6) * 2**30)  # a runaway allocation fails instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        worker = Worker(config)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        kind, case = msg
        try:
            records = getattr(worker, kind)(case)
        except BaseException as exc:  # noqa: BLE001 - a bug in the harness itself, not in adafocus
            records = [(kind, f"HARNESS {type(exc).__name__}", traceback.format_exc())]
        conn.send(records)


class Worker:
    """Holds the base files and lazily built state (the demo pipeline, the base checkpoint)."""

    def __init__(self, config: dict[str, Any]):
        import cv2

        cv2.setNumThreads(1)
        self.config = config
        self.work = Path(config["work"])
        self.work.mkdir(parents=True, exist_ok=True)
        self._pipe = None
        self._ckpt: dict[str, bytes] = {}
        self._ckpt_regions: dict[str, dict[str, tuple[int, int]]] = {}
        self.manifest_base = json.loads(Path(config["manifest"]).read_text())  # the bundle's copy is rewritten
        self.videos = {name: Path(p).read_bytes() for name, p in config["videos"].items()}
        from adafocus.errors import AdaFocusError  # noqa: F401 - imports paid before the first case
        from adafocus.runtime.pipeline import Pipeline  # noqa: F401

    # ------------------------------------------------------------------------------ harness self-test
    def sleep(self, seconds: float) -> list:
        time.sleep(seconds)
        return [("sleep", "ok", "")]

    def die(self, _case) -> list:
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)
        return [("die", "ok", "")]

    # -------------------------------------------------------------------------------------- manifests
    def manifest(self, case: dict) -> list:
        """``case``: {"mutations": [...], "text": [...]} applied to the demo manifest."""
        from adafocus.bundle import load_bundle
        from adafocus.errors import BundleError
        from adafocus.runtime.pipeline import Pipeline

        bundle = Path(self.config["bundle"])
        (bundle / "manifest.json").write_bytes(manifest_bytes(self.manifest_base, case))
        records: list = []
        loaded, err = attempt(records, "manifest.load", lambda: load_bundle(bundle))
        if err is not None and not isinstance(err, (BundleError, OSError)) and not records[-1][1].startswith("BUG"):
            records[-1] = ("manifest.load", f"BUG typed but not BundleError: {type(err).__name__}", str(err))
        if loaded is not None:
            pipe, _ = attempt(records, "manifest.pipeline", lambda: Pipeline.from_bundle(bundle, threads=1))
            if pipe is not None:
                try:
                    for budget in (None, "30%"):
                        res, _ = attempt(records, "manifest.run", lambda b=budget: pipe(self.config["sample"], b))
                        if res is not None:
                            problem = result_problem(res, pipe)
                            if problem:
                                records[-1] = ("manifest.run", "BUG bad result", problem)
                finally:
                    attempt([], "close", pipe.close)
        records.append(cli_record("manifest.cli", ["inspect", str(bundle), "--no-readiness"],
                                  must_fail=loaded is None))
        if loaded is not None:  # a refused manifest fails in load_bundle, as above, whatever the output format
            records.append(cli_record("manifest.cli_json", ["inspect", str(bundle), "--json"], must_fail=False))
        return records

    # ----------------------------------------------------------------------------------------- videos
    def video(self, case: dict) -> list:
        """``case``: {"base": name | None, "ops": [...], "suffix": ".mp4", "segments": n, "short_side": s,
        "exact": bool}; the mutated bytes go through probe, decode_frames and the demo pipeline."""
        from adafocus.runtime.decode import decode_frames, probe

        base = self.videos[case["base"]] if case["base"] else b""
        data = mutate_bytes(base, case["ops"], mp4_regions(base))
        path = self.work / f"case{case['suffix']}"
        path.write_bytes(data)
        records: list = []
        attempt(records, "video.probe", lambda: probe(path))
        n = case["segments"]
        dec, _ = attempt(records, "video.decode", lambda: decode_frames(
            path, n, short_side=case["short_side"], exact_count=case["exact"]))
        if dec is not None:
            f = dec.frames
            ok = (f.dtype.name == "uint8" and f.ndim == 4 and f.shape[0] == n and f.shape[3] == 3
                  and len(dec.indices) == n and int(dec.indices.min()) >= 0
                  and int(dec.indices.max()) < dec.num_frames)
            if not ok:
                records[-1] = ("video.decode", "BUG bad result",
                               f"frames {f.dtype}{list(f.shape)}, indices {dec.indices.tolist()}, "
                               f"num_frames {dec.num_frames}")
        pipe = self.demo_pipeline()
        res, _ = attempt(records, "video.pipeline", lambda: pipe(path))
        if res is not None:
            problem = result_problem(res, pipe)
            if problem:
                records[-1] = ("video.pipeline", "BUG bad result", problem)
        return records

    def demo_pipeline(self):
        if self._pipe is None:
            from adafocus.demo.shipped import bundle_path
            from adafocus.runtime.pipeline import Pipeline

            self._pipe = Pipeline.from_bundle(bundle_path(), threads=1)
        return self._pipe

    # ------------------------------------------------------------------------------------ checkpoints
    def checkpoint(self, case: dict) -> list:
        """``case``: {"base": "adafocus" | "official" | None, "edits": [...], "ops": [...]}: dict edits
        re-saved with torch.save, then byte mutations; loaded with and without a preset."""
        import torch

        from adafocus.models import load

        torch.set_num_threads(1)
        path = self.work / "case.pt"
        if case["base"] is None:
            data = mutate_bytes(b"", case["ops"])
        elif case["edits"]:
            obj = edit_checkpoint(torch.load(self.base_checkpoint(case["base"]), weights_only=True), case["edits"])
            tmp = self.work / "edited.pt"
            torch.save(obj, tmp)
            data = mutate_bytes(tmp.read_bytes(), case["ops"], zip_regions(tmp.read_bytes()))
        else:
            self.base_checkpoint(case["base"])
            data = mutate_bytes(self._ckpt[case["base"]], case["ops"], self._ckpt_regions[case["base"]])
        path.write_bytes(data)
        records: list = []
        for target, kwargs in (("checkpoint.load", {}), ("checkpoint.load_preset", {"preset": "tiny"})):
            model, _ = attempt(records, target, lambda kw=kwargs: load(path, **kw))
            if model is not None and (not isinstance(model, torch.nn.Module) or model.training):
                records[-1] = (target, "BUG bad result", f"load returned {type(model).__name__} "
                               f"(training={getattr(model, 'training', None)})")
        return records

    def base_checkpoint(self, name: str) -> Path:
        path = self.work / f"base-{name}.pt"
        if name not in self._ckpt:
            import torch

            from adafocus.models import init_checkpoint

            src = self.work / "base-adafocus.pt"
            if not src.is_file():
                init_checkpoint("tiny", src)
            if name == "official":  # the layout of upstream's DDP checkpoints: module. keys, epoch, optimizer
                ckpt = torch.load(src, weights_only=True)
                state = {f"module.{k}": v for k, v in ckpt["state_dict"].items()}
                torch.save({"epoch": 3, "arch": "uniadafocus", "state_dict": state, "best_acc1": 0.5}, path)
            self._ckpt[name] = path.read_bytes()
            self._ckpt_regions[name] = zip_regions(self._ckpt[name])
        return path


def attempt(records: list, target: str, fn):
    """Run ``fn``; append (target, "ok" | typed error name | "BUG <type>", detail); return (value, error)."""
    from adafocus.errors import AdaFocusError

    try:
        value = fn()
    except (AdaFocusError, OSError) as exc:
        records.append((target, type(exc).__name__, one_line(exc)))
        return None, exc
    except Exception as exc:  # noqa: BLE001 - what the fuzzing looks for
        records.append((target, f"BUG {type(exc).__name__}", traceback.format_exc()))
        return None, exc
    records.append((target, "ok", ""))
    return value, None


def one_line(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


def result_problem(res, pipe) -> str:
    """Why a VideoResult is not a valid answer of ``pipe`` ('' when it is)."""
    if res.label not in pipe.labels:
        return f"label {res.label!r} is not one of the bundle's labels"
    if not 0 <= res.exit_step < len(pipe.exits):
        return f"exit_step {res.exit_step} outside [0, {len(pipe.exits)})"
    return ""


def cli_record(target: str, argv: list[str], must_fail: bool) -> tuple[str, str, str]:
    """Run ``adafocus.cli.main(argv)`` in this process with stdout/stderr as strict UTF-8 text streams (as a
    terminal or pipe): exit 0, or 1 with exactly one ``error:`` line and no 'internal error'."""
    from adafocus.cli import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else repr(exc.code))
    except BaseException as exc:  # noqa: BLE001 - an exception escaping main() is a bug
        sys.stdout, sys.stderr = saved
        return target, f"BUG escaped main: {type(exc).__name__}", traceback.format_exc()
    finally:
        sys.stdout, sys.stderr = saved
    text = err.buffer.getvalue().decode("utf-8", "replace")
    lines = text.strip().splitlines()
    if "internal error" in text or "Traceback" in text:
        return target, "BUG internal error", text
    if code == 0:
        if must_fail:
            return target, "BUG exit 0 for a manifest load_bundle refused", text
        return target, "exit 0", ""
    if code != 1:
        return target, f"BUG exit code {code}", text
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return target, "BUG not one error line", text
    return target, "exit 1", lines[0]


# ------------------------------------------------------------------------------------------ mutations
_RAW = "\x00raw:{}\x00"  # placeholder for a raw JSON snippet (a value json.dumps cannot write)


def manifest_bytes(base: dict, case: dict) -> bytes:
    """The demo manifest with ``case["mutations"]`` applied to its JSON tree, serialised, then
    ``case["text"]`` byte operations applied to the text."""
    if "document" in case:
        return case["document"]
    doc = copy.deepcopy(base)
    raws: list[str] = []
    for mutation in case.get("mutations", []):
        doc = apply_mutation(doc, mutation, raws)
    text = json.dumps(doc, indent=2)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_RAW.format(i)), raw)
    return mutate_bytes(text.encode("utf-8"), case.get("text", []))


def resolve(doc: Any, path: tuple) -> tuple[Any, Any, bool]:
    """(parent, key, found) of ``path`` in ``doc``; path items that no longer exist (an earlier mutation
    removed or retyped them) make ``found`` False."""
    parent, key, node = None, None, doc
    for item in path:
        in_dict = isinstance(node, dict) and item in node
        in_list = isinstance(node, list) and isinstance(item, int) and -len(node) <= item < len(node)
        if in_dict or in_list:
            parent, key, node = node, item, node[item]
        else:
            return parent, key, False
    return parent, key, True


def apply_mutation(doc: Any, mutation: tuple, raws: list[str]) -> Any:
    """One mutation of a JSON tree (a no-op where its path no longer exists):

    ("set", path, value), ("raw", path, json_text), ("delete", path), ("add", path, key, value),
    ("rename", path, new_key), ("wrap", path, how) with how "list"/"dict", ("copy", path, from_path),
    ("scale", path, factor)
    """
    op, path = mutation[0], tuple(mutation[1])
    parent, key, found = resolve(doc, path)
    if not found:
        return doc

    def put(value):
        nonlocal doc
        if parent is None:
            doc = value
        else:
            parent[key] = value

    node = doc if parent is None else parent[key]
    if op == "set":
        put(copy.deepcopy(mutation[2]))
    elif op == "raw":
        raws.append(mutation[2])
        put(_RAW.format(len(raws) - 1))
    elif op == "delete" and parent is not None:
        del parent[key]
    elif op == "add" and isinstance(node, dict):
        node[mutation[2]] = copy.deepcopy(mutation[3])
    elif op == "rename" and isinstance(parent, dict) and mutation[2] not in parent:
        items = [(mutation[2] if k == key else k, v) for k, v in parent.items()]  # keeps the key order
        parent.clear()
        parent.update(items)
    elif op == "wrap":
        put([node] if mutation[2] == "list" else {"value": node})
    elif op == "scale":  # every number under the node times a factor (ints stay ints)
        put(_scaled(node, mutation[2]))
    elif op == "copy":
        _, _, src_found = resolve(doc, tuple(mutation[2]))
        if src_found:
            src_parent, src_key, _ = resolve(doc, tuple(mutation[2]))
            put(copy.deepcopy(doc if src_parent is None else src_parent[src_key]))
    return doc


def _scaled(node: Any, factor: float) -> Any:
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return node
    if isinstance(node, int):
        return int(round(node * factor))
    if isinstance(node, float):
        return node * factor
    if isinstance(node, list):
        return [_scaled(v, factor) for v in node]
    if isinstance(node, dict):
        return {k: _scaled(v, factor) for k, v in node.items()}
    return node


def mp4_regions(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of a video: "all", "head" and "tail" (4 KiB each), "moov" (an mp4's header box: sample
    tables, sizes, codec parameters; the head elsewhere)."""
    import videos

    regions = {"all": (0, len(data)), "head": (0, min(len(data), 4096)), "tail": (max(0, len(data) - 4096),
                                                                                   len(data))}
    regions["moov"] = regions["head"]
    try:
        for kind, start, _head, size in videos._boxes(data, 0, len(data)):
            if kind == b"moov":
                regions["moov"] = (start, start + size)
    except Exception:  # noqa: BLE001 - not an mp4 (AVI, random bytes): no moov box
        pass
    return regions


def zip_regions(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of a torch zip checkpoint: "all", "head" (the first 4 KiB: local header, start of
    data.pkl), "pickle" (data.pkl's bytes), "tail" (the central directory and end record)."""
    import zipfile

    regions = {"all": (0, len(data)), "head": (0, min(len(data), 4096)),
               "tail": (max(0, len(data) - 65536), len(data))}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            data_end = 0
            for info in z.infolist():
                start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                data_end = max(data_end, start + info.compress_size)
                if info.filename.endswith("data.pkl"):
                    regions["pickle"] = (start, start + info.compress_size)
            regions["tail"] = (data_end, len(data))
    except zipfile.BadZipFile:
        pass
    regions.setdefault("pickle", regions["head"])
    return regions


def mutate_bytes(data: bytes, ops: list[tuple], regions: dict[str, tuple[int, int]] | None = None) -> bytes:
    """Byte-level mutations; positions are fractions of a region (``regions[name]`` or the whole data), so
    that a case is meaningful for any file:

    ("truncate", region, frac), ("flip", region, [(frac, bit), ...]), ("zero", region, frac, n),
    ("insert", region, frac, bytes), ("delete", region, frac, n), ("append", bytes), ("prefix", bytes),
    ("nest", depth) (JSON text wrapped in ``depth`` lists), ("replace", old, new) (first occurrence)
    """
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind in ("append", "prefix", "nest", "replace"):
            if kind == "append":
                buf += op[1]
            elif kind == "prefix":
                buf[:0] = op[1]
            elif kind == "nest":
                buf = bytearray(b"[" * op[1] + bytes(buf) + b"]" * op[1])
            else:
                buf = bytearray(bytes(buf).replace(op[1], op[2], 1))
            continue
        lo, hi = (regions or {}).get(op[1], (0, len(buf)))
        lo, hi = min(lo, len(buf)), min(hi, len(buf))

        def at(frac: float, lo=lo, hi=hi) -> int:
            return min(hi, lo + int(frac * (hi - lo)))

        if kind == "truncate":
            del buf[at(op[2]):]
        elif kind == "flip":
            for frac, bit in op[2]:
                i = at(frac)
                if i < len(buf):
                    buf[i] ^= 1 << bit
        elif kind == "zero":
            i = at(op[2])
            buf[i:i + op[3]] = bytes(len(buf[i:i + op[3]]))
        elif kind == "insert":
            i = at(op[2])
            buf[i:i] = op[3]
        elif kind == "delete":
            i = at(op[2])
            del buf[i:i + op[3]]
    return bytes(buf)


def edit_checkpoint(obj: Any, edits: list[tuple]) -> Any:
    """Edits of a loaded checkpoint dict (before re-saving): ("set", path, value), ("delete", path),
    ("tensor", index, how) (the state_dict entry at ``index`` mod its size, or named ``index``, replaced),
    ("rename", index, new),
    ("state", value) (the whole state_dict replaced), ("top", value) (the whole checkpoint replaced)."""
    import torch

    for edit in edits:
        op = edit[0]
        state = obj.get("state_dict") if isinstance(obj, dict) else None
        if op == "top":
            obj = copy.deepcopy(edit[1])
        elif op == "state" and isinstance(obj, dict):
            obj["state_dict"] = copy.deepcopy(edit[1])
        elif op in ("set", "delete"):
            parent, key, found = resolve(obj, tuple(edit[1]))
            if found and parent is not None:
                if op == "set":
                    parent[key] = copy.deepcopy(edit[2])
                else:
                    del parent[key]
            elif not found and op == "set" and isinstance(parent, dict) and len(edit[1]) >= 1:
                _, _, parent_found = resolve(obj, tuple(edit[1][:-1]))
                if parent_found:
                    parent_node = resolve(obj, tuple(edit[1][:-1]))
                    node = obj if parent_node[0] is None else parent_node[0][parent_node[1]]
                    if isinstance(node, dict):
                        node[edit[1][-1]] = copy.deepcopy(edit[2])
        elif op in ("tensor", "rename") and isinstance(state, dict) and state:
            key = edit[1] if isinstance(edit[1], str) else sorted(state, key=str)[edit[1] % len(state)]
            if key not in state:
                continue
            if op == "rename":
                state[edit[2]] = state.pop(key)
                continue
            t = state[key]
            how = edit[2]
            if not isinstance(t, torch.Tensor):
                state[key] = torch.zeros(1)
            elif how == "empty":
                state[key] = t.new_zeros((0,) + tuple(t.shape[1:]))
            elif how == "scalar":
                state[key] = torch.tensor(1.0)
            elif how == "int":
                state[key] = t.to(torch.int64) if t.is_floating_point() else t.float()
            elif how == "half":
                state[key] = t.half() if t.is_floating_point() else t
            elif how == "transpose":
                state[key] = t.t().contiguous() if t.ndim == 2 else t.reshape(-1)
            elif how == "bigger":
                state[key] = torch.cat([t, t]) if t.ndim >= 1 else t.reshape(1, 1)
            elif how == "nan":
                state[key] = torch.full_like(t, float("nan")) if t.is_floating_point() else t
            elif how == "bool":
                state[key] = t > 0
            elif how == "remove":
                del state[key]
            elif how == "python":  # not a tensor at all
                state[key] = 1.5
    return obj


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start
