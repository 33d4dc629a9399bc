"""Fuzzing with hypothesis: every bad input ends in a result or a typed error (an ``AdaFocusError`` subclass,
or ``OSError``), never another exception, a hang or a crash.

Targets: mutated bundle manifests (``load_bundle``, ``Pipeline.from_bundle`` + one shipped video, ``adafocus
inspect``), mutated and random video files (``probe``, ``decode_frames``, the demo pipeline), mutated and random
checkpoints (``adafocus.models.load`` with and without a preset). Each case runs in a sandboxed worker process
(tests/fuzzing.py) with a time limit and a capped address space, so that a hang or a crash fails the case, not
the test run.

The default part is derandomized (the same cases every run); the ``slow`` part explores more cases with a
random seed (hypothesis prints a reproducer when one fails). Outcome counts per target are printed at the end
of the module (``pytest -s``) and written to ``fuzz_summary.json`` in pytest's base temp directory (or to the
path in ``$ADAFOCUS_FUZZ_SUMMARY``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import string
from collections import Counter
from pathlib import Path

import fuzzing
import pytest
import videos
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adafocus.bundle import MANIFEST_NAME
from adafocus.demo.shipped import bundle_path, sample_videos

CASE_TIMEOUT = 30.0  # seconds one case may take in the worker (a normal case takes well under one)
FAST = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TALLY = fuzzing.Tally()
KEEP_GOING = os.environ.get("ADAFOCUS_FUZZ_KEEP_GOING") == "1"  # record bugs instead of failing on the first


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The worker process with its own copy of the demo bundle (its manifest is rewritten per case), the
    base videos, and a work directory."""
    root = tmp_path_factory.mktemp("fuzz")
    bundle = Path(shutil.copytree(bundle_path(), root / "bundle"))
    pristine = Path(shutil.copy(bundle / MANIFEST_NAME, root / "manifest.pristine.json"))
    config = {"bundle": str(bundle), "manifest": str(pristine), "sample": str(sample_videos()[0]),
              "work": str(root / "work"),
              "videos": {name: str(p) for name, p in base_videos(root / "videos").items()},
              "memory_gb": float(os.environ.get("ADAFOCUS_FUZZ_MEMORY_GB", "6"))}  # the worker's address space
    stages = {f.name: f.read_bytes() for f in bundle.iterdir() if f.suffix == ".onnx"}
    box = fuzzing.Sandbox(config, root / "worker.log", timeout=CASE_TIMEOUT)
    yield box
    box.close()
    summary = {"tests": TALLY.as_dict(), "worker_restarts": box.restarts}
    out = Path(os.environ.get("ADAFOCUS_FUZZ_SUMMARY") or tmp_path_factory.getbasetemp() / "fuzz_summary.json")
    out.write_text(json.dumps(summary, indent=2))
    print("\n" + TALLY.format() + f"\n  worker restarts: {box.restarts}; summary written to {out}")
    assert all((bundle / name).read_bytes() == data for name, data in stages.items()), "a case changed a stage file"


def base_videos(folder: Path) -> dict[str, Path]:
    """The shipped sample videos and a few written with cv2.VideoWriter (mp4v, fast-start mp4, MJPG AVI,
    grey, one frame, odd sizes)."""
    folder.mkdir(parents=True)
    out = {p.stem: p for p in sample_videos()}
    out["numbered"] = videos.make_numbered_video(folder / "numbered.mp4", 40)
    out["faststart"] = videos.faststart(out["numbered"], folder / "faststart.mp4")
    out["mjpg"] = videos.make_numbered_video(folder / "mjpg.avi", 12, codec="MJPG")
    out["grey"] = videos.make_numbered_video(folder / "grey.mp4", 10, gray=True)
    out["one-frame"] = videos.make_numbered_video(folder / "one.mp4", 1)
    out["tiny"] = videos.write_video(folder / "tiny.mp4", videos.moving_frames(6, 16, 24))
    out["wide"] = videos.write_video(folder / "wide.mp4", videos.moving_frames(5, 16, 320))
    return out


# Bugs found by this fuzzing in code this file's author may not change; each has a minimal reproducer below
# marked xfail(strict=True) (it starts failing, as XPASS, once the bug is fixed: then delete its entry here).
# A fuzz test that meets one records it as "KNOWN <id>" and ends as XFAIL naming it; any other bug fails.
KNOWN_BUGS: list = []  # (id, target prefix, exception types, test on the adafocus frames); none open today
_FRAME = re.compile(r'File "[^"]*/adafocus/([\w/]+\.py)", line \d+, in (\w+)')


def known_bug(target: str, outcome: str, detail: str) -> str | None:
    """The KNOWN_BUGS id a BUG record matches, or None."""
    error = outcome.split()[1] if outcome.startswith("BUG ") and len(outcome.split()) == 2 else None
    frames = _FRAME.findall(detail)
    for bug_id, prefix, errors, where in KNOWN_BUGS:
        if target.startswith(prefix) and error in errors and frames and where(frames):
            return bug_id
    return None


def run_case(sandbox, test: str, kind: str, case, known: Counter | None = None) -> list:
    records, seconds = fuzzing.timed(sandbox.call, kind, case)
    if known is not None:
        for i, (target, outcome, detail) in enumerate(records):
            bug_id = known_bug(target, outcome, detail) if outcome.startswith("BUG") else None
            if bug_id:
                records[i] = (target, f"KNOWN {bug_id} ({outcome[4:]})", detail)
                known[bug_id] += 1
    TALLY.add(test, records, seconds, case)
    found = fuzzing.bugs(records)
    harness = [r for r in records if r[1].startswith("HARNESS")]
    assert not harness, f"the fuzz harness itself failed on {case!r}:\n{harness[0][2]}"
    if KEEP_GOING:  # exploring: count every bug kind (the summary shows one example of each), fail nothing
        return records
    assert not found, "\n\n".join(f"{target}: {outcome} for case {case!r}\n{detail}" for target, outcome, detail
                                  in found)
    return records


def fuzz(sandbox, test: str, kind: str, strategy, config: settings) -> None:
    """Run ``strategy``'s cases under hypothesis ``config``; a new bug fails (shrunk, with a reproducer), known
    bugs end the test as XFAIL naming them."""
    known: Counter = Counter()

    @config
    @given(case=strategy)
    def one(case):
        run_case(sandbox, test, kind, case, known)

    one()
    if known:
        pytest.xfail("known bugs (see KNOWN_BUGS and their xfail reproducers): "
                     + ", ".join(f"{k} x{n}" for k, n in sorted(known.items())))


# ------------------------------------------------------------------------------------------ strategies
def _json_paths(node, path=(), depth=0):
    """Every node of a JSON tree (lists: first two items and the last), up to depth 6."""
    yield path
    if depth >= 6:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_paths(v, path + (k,), depth + 1)
    elif isinstance(node, list):
        for i in sorted({0, 1, len(node) - 1} & set(range(len(node)))):
            yield from _json_paths(node[i], path + (i,), depth + 1)


BASE_MANIFEST = json.loads((bundle_path() / MANIFEST_NAME).read_text())  # paths to mutate (the worker has a copy)
FREE_FORM = ("verification", "training", "producer", "config", "created")  # Any-typed or cosmetic records
ALL_PATHS = [p for p in _json_paths(BASE_MANIFEST) if p]
TYPED_PATHS = [p for p in ALL_PATHS if p[0] not in FREE_FORM and not (
    len(p) > 3 and p[:2] == ("exit", "thresholds") and p[3] in ("calibration", "heldout"))]
DICT_PATHS = [()] + [p for p in ALL_PATHS if isinstance(fuzzing.resolve(BASE_MANIFEST, p)[0][p[-1]], dict)]
KNOWN_KEYS = sorted({k for p in ALL_PATHS for k in p if isinstance(k, str)})
SECTIONS = sorted({p[0] for p in ALL_PATHS})
PATHS_UNDER = {k: [p for p in ALL_PATHS if p[0] == k] for k in SECTIONS}
# every top-level record gets the same share (the free-form ones hold most of the nodes), plus the typed nodes
MANIFEST_PATHS = st.one_of(st.sampled_from(TYPED_PATHS),
                           st.sampled_from(SECTIONS).flatmap(lambda k: st.sampled_from(PATHS_UNDER[k])))

SPECIAL_VALUES = [
    None, True, False, 0, 1, -1, 2, 3, 7, 2**31, 2**63, 10**30, -10**9, 0.0, -0.0, 0.5, 1.5, -2.5, 1e-300, 1e300,
    float("nan"), float("inf"), float("-inf"), "", "0", "1", "64", "1.5", "-1", "NaN", "nan", "Infinity", "inf",
    "1e999", "null", "true", "batch", "float32", "int64", "float16", "fp16", "int8", "tsm", "base", "max_logit",
    "global.onnx", "backbone.onnx", "head.onnx", "dense.onnx", "manifest.json", "../global.onnx", "/etc/hostname",
    "sub/x.onnx", "x\\y.onnx", ".", "é☃", "a" * 300, [], {}, [0], [1, 2, 3], ["batch"], [None], [[1]], [-1, 0], [1.5],
    {"a": 1}, {"": None}, {"budget_gflops": 0.1, "thresholds": [None] * 9},
]
# JSON text json.dumps cannot write: huge literals, deep nesting, lone surrogates, control characters
RAW_SNIPPETS = ["1" * 5000, "-" + "9" * 4400, "1e999", "-1e999", "1" + "0" * 400, "[" * 3000 + "]" * 3000,
                '{"a":' * 3000 + "1" + "}" * 3000, '"\\ud800"', '"\\udc80x"', '"a\\u0000b"', '"\\u001b[2J"',
                '"line\\nbreak"', "NaN", "-Infinity", "1E400", "0e0", "-0", "[1,]", "1.0e-400"]


def _misspelled(draw, word: str) -> str:
    ops = ["drop", "double", "swap", "case", "plural", "dash", "space", "other"]
    op = draw(st.sampled_from(ops))
    i = draw(st.integers(0, max(0, len(word) - 1)))
    if op == "drop" and len(word) > 1:
        return word[:i] + word[i + 1:]
    if op == "double":
        return word[:i + 1] + word[i:]
    if op == "swap" and len(word) > 1:
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "case":
        return word.upper() if word.islower() else word.lower() + "X"
    if op == "plural":
        return word + "s"
    if op == "dash":
        return word.replace("_", "-") if "_" in word else "-" + word
    if op == "space":
        return " " + word
    return draw(st.sampled_from(KNOWN_KEYS)) + draw(st.sampled_from(["", "_", "2"]))


def _derived_values(cur) -> list:
    """Values made from the current one: another type holding the same content, off-by-one and scaled
    numbers, changed nesting."""
    if isinstance(cur, bool):
        return [int(cur), str(cur).lower(), not cur, [cur]]
    if isinstance(cur, int):
        return [str(cur), float(cur), cur + 0.5, -cur, cur - 1, cur + 1, cur * 1000, cur * 10**12, [cur], {"v": cur}]
    if isinstance(cur, float):
        return [str(cur), int(cur), -cur, cur * 1e6, cur / 1e6, cur + 1, cur - 1, [cur], {"v": cur}]
    if isinstance(cur, str):
        out = [cur.upper(), cur + "x", cur[:-1], [cur], {cur: cur}, " " + cur]
        with contextlib.suppress(ValueError):
            out.append(float(cur))
        return out
    if isinstance(cur, list):
        return [cur[:-1], cur + cur[-1:], cur[::-1], [], [cur], json.dumps(cur), ",".join(map(str, cur)),
                {str(i): v for i, v in enumerate(cur)}, cur[0] if cur else None, cur * 2, [str(v) for v in cur]]
    if isinstance(cur, dict):
        return [list(cur.values()), [[k, v] for k, v in cur.items()], [cur], {}, json.dumps(cur)[:200],
                next(iter(cur.values()), None)]
    return []


def _value_for(draw, cur):
    derived = _derived_values(cur)
    options = [st.sampled_from(SPECIAL_VALUES), st.integers(), st.floats(), st.text(max_size=6),
               st.lists(st.one_of(st.integers(-3, 300), st.floats(-1, 200), st.none()), max_size=10)]
    if derived:
        options = [st.sampled_from(derived)] * 2 + options
    return draw(st.one_of(*options))


@st.composite
def manifest_mutation(draw):
    path = draw(MANIFEST_PATHS)
    parent, key, _ = fuzzing.resolve(BASE_MANIFEST, path)
    cur = parent[key]
    op = draw(st.sampled_from(["set", "set", "set", "delete", "add", "rename", "wrap", "copy", "raw", "scale",
                               "scale"]))
    if op == "scale":  # mostly plausible values: what validation lets through reaches the runtime
        return ("scale", path, draw(st.sampled_from([0, 0.5, 0.999, 1.001, 1.5, 2, 3, -1, 1e6])))
    if op == "set":
        return ("set", path, _value_for(draw, cur))
    if op == "delete":
        return ("delete", path)
    if op == "add":
        where = draw(st.sampled_from(DICT_PATHS))
        node = BASE_MANIFEST if not where else fuzzing.resolve(BASE_MANIFEST, where)[0][where[-1]]
        near = draw(st.sampled_from(sorted(node) or ["x"]))
        if draw(st.booleans()):
            name = _misspelled(draw, near)
        else:
            name = draw(st.text(string.ascii_letters + "_", min_size=1, max_size=12))
        value = draw(st.one_of(st.sampled_from(SPECIAL_VALUES), st.just(node.get(near))))
        return ("add", where, name, value)
    if op == "rename":
        return ("rename", path, _misspelled(draw, str(path[-1])))
    if op == "wrap":
        return ("wrap", path, draw(st.sampled_from(["list", "dict"])))
    if op == "copy":
        return ("copy", path, draw(MANIFEST_PATHS))
    return ("raw", path, draw(st.sampled_from(RAW_SNIPPETS)))


def _frac():
    return st.floats(0, 1, exclude_max=True)


def byte_ops(regions=("all",), max_ops=3, text=False):
    """Byte mutations for fuzzing.mutate_bytes (positions as fractions of a region)."""
    region = st.sampled_from(list(regions))
    ops = [st.tuples(st.just("truncate"), region, _frac()),
           st.tuples(st.just("flip"), region, st.lists(st.tuples(_frac(), st.integers(0, 7)), min_size=1,
                                                       max_size=16)),
           st.tuples(st.just("zero"), region, _frac(), st.integers(1, 4096)),
           st.tuples(st.just("insert"), region, _frac(), st.binary(min_size=1, max_size=64)),
           st.tuples(st.just("delete"), region, _frac(), st.integers(1, 4096))]
    if text:  # JSON-text damage: wrong tokens, nesting, encodings
        ops += [st.tuples(st.just("insert"), region, _frac(), st.sampled_from(
                    [b",", b"}", b"]", b'"', b":", b"\\", b"\xff", b"\xc3", b"\x00", b"\xef\xbb\xbf", b"//"])),
                st.tuples(st.just("nest"), st.sampled_from([1, 2, 50, 2000])),
                st.tuples(st.just("replace"), st.sampled_from([b'"format_version": 1', b'"format": ',
                                                               b'"stages": ', b"true", b"null", b"[", b"."]),
                          st.sampled_from([b'"format_version": 2', b'"format_version": 0', b"", b"false",
                                           b"0", b'"x"', b"[[", b"e"])),
                st.tuples(st.just("prefix"), st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b" ", b"{}"])),
                st.tuples(st.just("append"), st.sampled_from([b"}", b"\n{}", b"\x00", b"garbage"]))]
    return st.lists(st.one_of(*ops), min_size=1, max_size=max_ops)


WHOLE_DOCUMENTS = [b"", b"[]", b"null", b"1", b'"adafocus-bundle"', b"{}", b'{"format": "adafocus-bundle"}',
                   b'{"format": "adafocus-bundle", "format_version": 1}',
                   b'{"format": "adafocus-bundle", "format_version": 1.0}',
                   b'{"format": "adafocus-bundle", "format_version": "1"}',
                   b'{"format": "adafocus-bundle", "format_version": 1e999}', b"NaN", b"\xff\xfe{\x00}\x00",
                   b"[" * 100000 + b"]" * 100000, b'{"a":' * 50000 + b"1" + b"}" * 50000, b"9" * 10000]


@st.composite
def manifest_case(draw):
    if draw(st.integers(0, 19)) == 0:  # a whole document of another kind
        return {"document": draw(st.sampled_from(WHOLE_DOCUMENTS))}
    mutations = draw(st.lists(manifest_mutation(), min_size=0, max_size=3))
    text = draw(st.one_of(st.just([]), st.just([]), st.just([]), byte_ops(max_ops=2, text=True)))
    if not mutations and not text:
        mutations = [draw(manifest_mutation())]
    return {"mutations": mutations, "text": text}


VIDEO_NAMES = sorted([p.stem for p in sample_videos()] + ["numbered", "faststart", "mjpg", "grey", "one-frame",
                                                          "tiny", "wide"])
VIDEO_PREFIXES = [b"", b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41", b"\x1aE\xdf\xa3",
                  b"RIFF\x00\x10\x00\x00AVI LIST", b"\x00\x00\x01\xba", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0",
                  b"GIF89a", b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00",
                  b"\x00\x00\x00\x18ftypavif", b"FLV\x01", b"OggS"]


@st.composite
def video_case(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "mixed", "random"]))
    if kind == "random":
        base, ops = None, [("append", draw(st.sampled_from(VIDEO_PREFIXES)) + draw(st.binary(min_size=1,
                                                                                            max_size=4096)))]
    else:
        base = draw(st.sampled_from(VIDEO_NAMES))
        if kind == "truncate":
            ops = [("truncate", "all", draw(_frac()))]
        elif kind == "flip":
            ops = [("flip", draw(st.sampled_from(["all", "moov", "head"])), draw(st.lists(
                st.tuples(_frac(), st.integers(0, 7)), min_size=1, max_size=24)))]
        else:
            ops = draw(byte_ops(("all", "moov", "head", "tail"), max_ops=3))
    suffix = ".avi" if base == "mjpg" else draw(st.sampled_from([".mp4", ".mp4", ".avi", ".mkv", ".png", ""]))
    return {"base": base, "ops": ops, "suffix": suffix, "segments": draw(st.sampled_from([1, 3, 16, 48])),
            "short_side": draw(st.sampled_from([None, 128, 17])), "exact": draw(st.booleans())}


CONFIG_KEYS = ["family", "num_classes", "frame_size", "resize_size", "glance_size", "num_segments", "num_glance",
               "num_focus", "patch_size", "crop_min", "crop_max", "glance_arch", "glance_width",
               "glance_last_channel", "local_arch", "local_width", "stn_hidden_dim", "temporal_hidden_dim",
               "mlp_dim", "temperature", "dropout", "fc_dropout", "shift_div", "mean", "std", "labels"]
CKPT_VALUES = [None, True, 0, -1, 1, 2, 3, 10**12, 0.5, -2.5, 2.0, float("nan"), "", "tiny", "base-p128", "tsm",
               "resnet50", "mobilenet_v2", "adafocus", [], {}, [1, 2], ["a"], {"a": 1}]


@st.composite
def checkpoint_edit(draw):
    op = draw(st.sampled_from(["config", "config", "config", "delete", "top-key", "tensor", "rename", "state",
                               "top"]))
    if op == "config":
        return ("set", ("config", draw(st.sampled_from(CONFIG_KEYS + ["extra_key"]))),
                draw(st.one_of(st.sampled_from(CKPT_VALUES), st.integers(-2, 64))))
    if op == "delete":
        path = draw(st.one_of(st.tuples(st.sampled_from(["config", "state_dict", "format", "format_version",
                                                         "preset", "training"])),
                              st.tuples(st.just("config"), st.sampled_from(CONFIG_KEYS))))
        return ("delete", path)
    if op == "top-key":
        return ("set", (draw(st.sampled_from(["format", "format_version", "preset", "config", "epoch"])),),
                draw(st.sampled_from(CKPT_VALUES)))
    if op == "tensor":
        return ("tensor", draw(st.integers(0, 10**6)), draw(st.sampled_from(
            ["empty", "scalar", "int", "half", "transpose", "bigger", "nan", "bool", "remove", "python"])))
    if op == "rename":
        return ("rename", draw(st.integers(0, 10**6)), draw(st.sampled_from(
            ["module.x", "global_CNN.classifier.1.weight", "", "junk"])))
    if op == "state":
        return ("state", draw(st.sampled_from([None, [], {}, "weights", {"a": 1}, [1, 2]])))
    return ("top", draw(st.sampled_from([None, [], "checkpoint", 3, {"format": "adafocus"},
                                         {"format": "adafocus", "config": {}, "state_dict": {}}])))


@st.composite
def checkpoint_case(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "mixed", "random", "edit", "edit", "edit"]))
    base = draw(st.sampled_from(["adafocus", "adafocus", "official"]))
    regions = ("all", "head", "pickle", "tail")
    if kind == "random":
        prefix = draw(st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"PK\x05\x06" + b"\0" * 18]))
        return {"base": None, "edits": [], "ops": [("append", prefix + draw(st.binary(min_size=1, max_size=4096)))]}
    if kind == "edit":
        return {"base": base, "edits": draw(st.lists(checkpoint_edit(), min_size=1, max_size=3)),
                "ops": draw(st.one_of(st.just([]), st.just([]), byte_ops(regions, max_ops=1)))}
    if kind == "truncate":
        return {"base": base, "edits": [], "ops": [("truncate", draw(st.sampled_from(regions)), draw(_frac()))]}
    if kind == "flip":
        return {"base": base, "edits": [], "ops": [("flip", draw(st.sampled_from(regions)), draw(st.lists(
            st.tuples(_frac(), st.integers(0, 7)), min_size=1, max_size=16)))]}
    return {"base": base, "edits": [], "ops": draw(byte_ops(regions, max_ops=3))}


# ------------------------------------------------------------------------------------------ fuzz tests
def test_fuzz_manifest(sandbox):
    fuzz(sandbox, "manifest", "manifest", manifest_case(), settings(FAST, max_examples=70))


@pytest.mark.slow
def test_fuzz_manifest_more(sandbox):
    fuzz(sandbox, "manifest (slow)", "manifest", manifest_case(), settings(SLOW, max_examples=500))


def test_fuzz_video(sandbox):
    fuzz(sandbox, "video", "video", video_case(), settings(FAST, max_examples=100))


@pytest.mark.slow
def test_fuzz_video_more(sandbox):
    fuzz(sandbox, "video (slow)", "video", video_case(), settings(SLOW, max_examples=600))


def test_fuzz_checkpoint(sandbox):
    fuzz(sandbox, "checkpoint", "checkpoint", checkpoint_case(), settings(FAST, max_examples=20))


@pytest.mark.slow
def test_fuzz_checkpoint_more(sandbox):
    fuzz(sandbox, "checkpoint (slow)", "checkpoint", checkpoint_case(), settings(SLOW, max_examples=120))


# ------------------------------------------------------------------------------- bugs found, reproduced
P = ("preprocessing",)
FIXED_MANIFEST_BUGS = {  # found by this fuzzing, fixed in adafocus/bundle.py: typed errors (or results) now
    "deeply nested JSON (RecursionError)": {"document": b"[" * 100000 + b"]" * 100000},
    "a 5000-digit integer (ValueError)": {"mutations": [("raw", ("opset",), "1" * 5000)]},
    "deep nesting in a free-form record": {"mutations": [("raw", ("training",), "[" * 900 + "]" * 900)]},
    "verification.stages holding a number (inspect AttributeError)": {
        "mutations": [("set", ("verification", "stages", 0), 1)]},
    "verification.videos a string (inspect AttributeError)": {"mutations": [("set", ("verification", "videos"), "ab")]},
    "a lone surrogate in producer.name (inspect UnicodeEncodeError)": {
        "mutations": [("raw", ("producer", "name"), '"\\udc80x"')]},
    "a lone surrogate in a thresholds key": {"mutations": [("rename", ("exit", "thresholds", "0.0562"), "\udc80")]},
    "resize_size 10**9 (cv2.error: Insufficient memory)": {"mutations": [("set", P + ("resize_size",), 10**9)]},
    "resize_size 100000 (cv2.error)": {"mutations": [("set", P + ("resize_size",), 100000)]},
    "10**6 candidate frames (MemoryError)": {"mutations": [("set", P + ("candidates",), 10**6),
                                                           ("set", P + ("num_segments",), 10**6)]},
    "a 401-digit integer where a number goes (OverflowError in schema.check)": {
        "mutations": [("raw", ("stages", "policy", "gflops"), "1" + "0" * 400)]},
    "a 401-digit integer where an integer goes (OverflowError in check_manifest)": {
        "mutations": [("raw", P + ("resize_size",), "1" + "0" * 400)]},
    "a NUL in a stage file name": {"mutations": [("raw", ("stages", "global", "file"), '"glo\\u0000bal.onnx"')]},
}


@pytest.mark.parametrize("case", FIXED_MANIFEST_BUGS.values(), ids=FIXED_MANIFEST_BUGS.keys())
def test_fixed_manifest_bug(sandbox, case):
    run_case(sandbox, "fixed manifest bugs", "manifest", case)


def _checkpoint_bug(edits, error, reason, base="adafocus", target="checkpoint.load"):
    """A checkpoint bug fuzzing found (now fixed): ``error`` is what load raised before the fix."""
    return pytest.param({"base": base, "edits": edits, "ops": []}, target, error, id=reason.split(":")[0],
                        marks=())


FIXED_CHECKPOINT_BUGS = [
    _checkpoint_bug([("delete", ("config",))], "KeyError",
                    "checkpoint-layout: load() reads ckpt['config'] of an adafocus-format checkpoint unchecked"),
    _checkpoint_bug([("delete", ("state_dict",))], "KeyError",
                    "checkpoint-layout: load() reads ckpt['state_dict'] unchecked"),
    _checkpoint_bug([("state", None)], "TypeError", "checkpoint-layout: a state_dict that is not a dict reaches "
                    "load_strict ('k not in None')"),
    _checkpoint_bug([("tensor", 0, "python")], "AttributeError", "checkpoint-layout: a state_dict value that is "
                    "not a tensor reaches load_strict (1.5.shape)"),
    _checkpoint_bug([("tensor", "module.classifier.local_classifiers.0.1.weight", "scalar")], "IndexError",
                    "checkpoint-layout: _infer_classes reads shape[0] of a 0-d class-count tensor of an official "
                    "checkpoint (load(path, preset='tiny'))", base="official", target="checkpoint.load_preset"),
    _checkpoint_bug([("set", ("config", "dropout"), 2.0)], "ValueError", "checkpoint-config-build: "
                    "ModelConfig accepts dropout 2.0, torch.nn.Dropout refuses it in build_model"),
    _checkpoint_bug([("set", ("config", "mlp_dim"), -1)], "RuntimeError", "checkpoint-config-build: "
                    "ModelConfig accepts mlp_dim -1 (negative dimension in build_model)"),
    _checkpoint_bug([("set", ("config", "num_classes"), 10**12)], "RuntimeError", "checkpoint-config-build: "
                    "num_classes 10**12 is allocated by build_model before any check (can't allocate memory)"),
    _checkpoint_bug([("set", ("config", "num_glance"), 0)], "ZeroDivisionError", "checkpoint-config-validate: "
                    "ModelConfig.validate computes num_segments % num_glance before checking num_glance >= 1"),
]


@pytest.mark.parametrize("case, target, error", FIXED_CHECKPOINT_BUGS)
def test_fixed_checkpoint_bug(sandbox, case, target, error):
    """load ends in a model or a typed error (before the fix it raised ``error``)."""
    (target, outcome, detail), = [r for r in sandbox.call("checkpoint", case) if r[0] == target]
    assert not outcome.startswith("BUG"), f"{outcome} (was {error})\n{detail}"


# ------------------------------------------------------------------------------- the harness catches
def test_sandbox_reports_a_hang_and_a_crash(sandbox):
    """The harness itself: a case that never answers is a 'BUG hang' (the worker is killed and restarted),
    one that kills the worker is a 'BUG crash'; either way the next call starts a fresh worker."""
    assert sandbox.call("manifest", {"mutations": [], "text": []})[0][1] == "ok"
    assert sandbox.call("sleep", 60, timeout=2)[0][1] == "BUG hang"
    assert sandbox.proc is None  # killed; the next call starts a fresh worker
    assert sandbox.call("die", 0)[0][1].startswith("BUG crash")
    assert sandbox.proc is None


def test_mutations_are_applied():
    doc = {"a": {"b": [1, 2]}, "c": 1}
    raws: list = []
    out = fuzzing.apply_mutation(json.loads(json.dumps(doc)), ("rename", ("a", "b"), "bb"), raws)
    assert out == {"a": {"bb": [1, 2]}, "c": 1}
    assert fuzzing.apply_mutation(json.loads(json.dumps(doc)), ("wrap", ("c",), "list"), raws)["c"] == [1]
    assert fuzzing.apply_mutation(json.loads(json.dumps(doc)), ("delete", ("x", "y")), raws) == doc  # no-op
    text = fuzzing.manifest_bytes(doc, {"mutations": [("raw", ("c",), "1e999")], "text": []})
    assert json.loads(text)["c"] == float("inf")
    assert fuzzing.mutate_bytes(b"abcdef", [("truncate", "all", 0.5)]) == b"abc"
    assert fuzzing.mutate_bytes(b"\x00", [("flip", "all", [(0.0, 7)])]) == b"\x80"
    assert fuzzing.mutate_bytes(b"\x01" * 8, [("zero", "all", 0.5, 100)]) == b"\x01" * 4 + b"\x00" * 4
    assert fuzzing.mutate_bytes(b"abcd", [("zero", "tail", 0.0, 1)], {"tail": (2, 4)}) == b"ab\x00d"
