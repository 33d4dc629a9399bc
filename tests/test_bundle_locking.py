"""Bundle locking (adafocus.bundle.lock_bundle): updates are seen whole by readers, and never lost.

A bundle is locked with flock(2) on its directory itself (no lock file: nothing appears among a bundle's
files): shared while ``load_bundle`` verifies the files (and while ``Pipeline.from_bundle`` opens its engines
on them), exclusive for ``update_manifest``'s whole read, install, edit, hash and write. The races run in
real processes with the overlap forced, not timed: the writer stops inside its update (after the new files
are installed, before the manifest is written) until a reader has started a load, then gives the reader time
to get into it; without the lock that load verifies the half-done update. Every wait has a timeout and every
process is killed if it outlives the test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

import adafocus.bundle as bm
from adafocus.bundle import load_bundle, lock_bundle, read_manifest, update_manifest, write_manifest
from adafocus.errors import BundleError

fcntl = pytest.importorskip("fcntl", reason="bundles are locked with flock (not on Windows)")

WAIT_S = 120  # the longest the test waits for one process
ROUNDS = 6  # int8 re-installs, each with a reader forced into its window

PRELUDE = r"""
import os, sys, time
from pathlib import Path

def put(path, text):  # atomic, so that a reader never sees half of it
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

def get(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None

def wait_for(what, timeout=60.0):
    end = time.monotonic() + timeout
    while not what():
        if time.monotonic() > end:
            raise SystemExit("timed out waiting")
        time.sleep(0.005)
"""

WRITER = PRELUDE + r"""
import shutil, tempfile
import adafocus.bundle as bm
from adafocus.calibration.int8 import install_int8

bundle, work, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
real, current = bm.checksum_files, [0]

def in_the_window(d, names):  # update_manifest: global.int8.onnx is replaced, the manifest not yet written
    put(work / "open", str(current[0]))
    wait_for(lambda: get(work / "loading") == str(current[0]))
    time.sleep(0.3)  # the reader is in its load now: unlocked, it verifies the new file against the old manifest
    return real(d, names)

bm.checksum_files = in_the_window
for i in range(rounds):
    current[0] = i
    tmp = Path(tempfile.mkdtemp(prefix=".int8.", dir=bundle))
    shutil.copy(bundle / ("global.onnx" if i % 2 else "policy.onnx"), tmp / "global.int8.onnx")
    put(work / "pending", str(i))  # the reader finishes the load it is in and waits for the window
    wait_for(lambda: get(work / "paused") == str(i))
    install_int8(bundle, {"global": tmp / "global.int8.onnx"})
    shutil.rmtree(tmp)
    with open(work / "written.txt", "a") as log:
        log.write(bm.sha256_file(bundle / "global.int8.onnx") + "\n")
"""

READER = PRELUDE + r"""
import json, traceback
from adafocus.bundle import load_bundle
from adafocus.runtime.pipeline import Pipeline

bundle, work, deadline = sys.argv[1], Path(sys.argv[2]), time.monotonic() + float(sys.argv[3])
seen = None
with open(work / "reads.jsonl", "w") as log:
    while time.monotonic() < deadline:
        rec = {"stopping": os.path.exists(work / "stop")}  # seen before this iteration reads anything
        pending = get(work / "pending")
        if pending is not None and pending != seen:  # an update is coming: read inside its window
            seen = rec["window"] = pending
            put(work / "paused", pending)
            wait_for(lambda: get(work / "open") == pending)
            put(work / "loading", pending)  # not in a load (nor its lock) while waiting: no deadlock
        try:
            if "window" in rec and int(rec["window"]) % 2:  # odd windows: the runtime's way in
                with Pipeline.from_bundle(bundle, threads=1) as pipe:
                    entry = pipe.manifest.files.get("global.int8.onnx")
            else:
                entry = load_bundle(bundle).manifest.files.get("global.int8.onnx")
            rec["int8"] = entry.sha256 if entry is not None else None
        except BaseException as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc(limit=6)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if not os.path.exists(work / "ready"):
            open(work / "ready", "w").close()
        if rec["stopping"]:
            break
"""

UPDATER = PRELUDE + r"""
from adafocus.bundle import update_manifest

bundle, work, key, role = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]

def edit(manifest):
    manifest.verification[key] = {"written_by": key}
    if role == "first":
        put(work / "first-inside", "1")  # holds the exclusive lock now, the manifest read
        wait_for(lambda: get(work / "second-started") is not None)
        time.sleep(0.3)  # the second is in update_manifest now: unlocked, it reads the manifest without our key
    return manifest

if role == "second":
    wait_for(lambda: get(work / "first-inside") is not None)
    put(work / "second-started", "1")
update_manifest(bundle, edit)
"""


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A copy of the shipped demo bundle."""
    from adafocus.demo.shipped import bundle_path

    b = tmp_path / "bundle"
    shutil.copytree(bundle_path(), b)
    return b


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _kill(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_file(path: Path, procs, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        dead = [p.args[-1] for p in procs if p.poll() is not None]
        assert not dead, f"a process exited early: {dead}"
        assert time.monotonic() < end, f"{path.name} not there after {timeout}s"
        time.sleep(0.02)


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _int8_file(bundle: Path, source: str, name: str = "global.int8.onnx") -> Path:
    """A stand-in quantized file in a temporary directory of the bundle (its content is all that matters)."""
    tmp = Path(tempfile.mkdtemp(prefix=".int8.", dir=bundle))
    shutil.copy(bundle / source, tmp / name)
    return tmp / name


def _other_fd_lock(bundle: Path, exclusive: bool) -> bool:
    """Whether another open file description could take the bundle's lock right now (then released)."""
    fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


# --------------------------------------------------------------------------------- races (processes)
@pytest.mark.slow
def test_int8_reinstalls_never_fail_a_reader(bundle, tmp_path):
    """repro 1: ``calibrate int8`` run again replaces global.int8.onnx, which the manifest references; a
    reader forced into every update's window (load_bundle, or Pipeline.from_bundle) waits for the update
    and reads the old or the new bundle, never a checksum error."""
    from adafocus.calibration.int8 import install_int8

    staged = _int8_file(bundle, "global.onnx")
    install_int8(bundle, {"global": staged})
    shutil.rmtree(staged.parent)
    first = bm.sha256_file(bundle / "global.int8.onnx")
    work = tmp_path / "work"
    work.mkdir()
    with open(work / "reader.err", "w") as err:
        reader = subprocess.Popen([sys.executable, "-c", READER, str(bundle), str(work), str(2 * WAIT_S)],
                                  env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_file(work / "ready", [reader])
        writer = subprocess.run([sys.executable, "-c", WRITER, str(bundle), str(work), str(ROUNDS)],
                                env=_env(), capture_output=True, text=True, timeout=WAIT_S)
        assert writer.returncode == 0, writer.stderr[-2000:]
        (work / "stop").touch()
        assert reader.wait(timeout=WAIT_S) == 0, (work / "reader.err").read_text()[-2000:]
    finally:
        _kill([reader])

    written = (work / "written.txt").read_text().split()
    records = [json.loads(line) for line in (work / "reads.jsonl").read_text().splitlines()]
    errors = [r for r in records if "error" in r]
    assert not errors, f"{len(errors)} of {len(records)} reads failed; first:\n{errors[0]['traceback']}"
    assert [r["window"] for r in records if "window" in r] == [str(i) for i in range(ROUNDS)], \
        "a read was forced into every update"
    assert {r["int8"] for r in records} <= {first, *written}, "a read saw a manifest the bundle never had"
    assert records[0]["int8"] == first and records[-1]["stopping"] and records[-1]["int8"] == written[-1]
    load_bundle(bundle)
    assert not [n for n in _listing(bundle) if n.startswith(".")], "no temporary files left behind"


def test_concurrent_updates_keep_both_edits(bundle, tmp_path):
    """repro 3: two update_manifest calls at once (calibrate thresholds and calibrate int8, say), the second
    started while the first is inside its edit: the second waits and edits what the first wrote."""
    work = tmp_path / "work"
    work.mkdir()
    procs = []
    try:
        for key, role in (("first-key", "first"), ("second-key", "second")):
            procs.append(subprocess.Popen([sys.executable, "-c", UPDATER, str(bundle), str(work), key, role],
                                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for proc in procs:
            _, err = proc.communicate(timeout=WAIT_S)
            assert proc.returncode == 0, err[-2000:]
    finally:
        _kill(procs)
    m = load_bundle(bundle).manifest
    assert m.verification["first-key"] == {"written_by": "first-key"}
    assert m.verification["second-key"] == {"written_by": "second-key"}


# ------------------------------------------------------------------------ lock semantics (one process)
def test_a_reader_thread_waits_for_an_update(bundle):
    """Another thread's verified load waits while an update holds the exclusive lock, then reads the update."""
    result: dict = {}

    def read():
        try:
            result["keys"] = sorted(load_bundle(bundle).manifest.verification)
        except BaseException as exc:  # reported below
            result["error"] = exc

    def edit(m):
        m.verification["mine"] = {}
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(0.5)
        result["blocked"] = reader.is_alive()
        result["thread"] = reader
        return m

    update_manifest(bundle, edit)
    result["thread"].join(WAIT_S)
    assert result["blocked"], "the reader waited for the update"
    assert "error" not in result and "mine" in result["keys"]


def test_locks_nest_within_a_thread(bundle):
    """A read inside an update (or a read) is covered by the lock already held; an update inside an update
    (which the outer one would overwrite) is a BundleError, not a deadlock or a lost update."""
    before = (bundle / "manifest.json").read_bytes()

    def edit(m):
        assert load_bundle(bundle).manifest.labels == m.labels  # shared inside exclusive: no deadlock
        assert not _other_fd_lock(bundle, exclusive=False)  # the exclusive lock is really held
        update_manifest(bundle, lambda inner: None)

    with pytest.raises(BundleError, match="holds its exclusive lock"):
        update_manifest(bundle, edit)
    assert (bundle / "manifest.json").read_bytes() == before
    with lock_bundle(bundle), lock_bundle(bundle / "manifest.json"):
        load_bundle(bundle)
        assert _other_fd_lock(bundle, exclusive=False) and not _other_fd_lock(bundle, exclusive=True)
        with pytest.raises(BundleError, match="holds its shared lock"):
            update_manifest(bundle, lambda m: None)
    assert _other_fd_lock(bundle, exclusive=True), "released at the end of the block"
    assert bm._held_locks() == {}


def test_pipeline_holds_the_shared_lock_until_its_engines_are_open(bundle, monkeypatch):
    """Pipeline.from_bundle verifies the files and opens them under one shared lock: an update cannot
    replace a file between the two."""
    import adafocus.runtime.engine_set as engine_set
    from adafocus.runtime.pipeline import Pipeline

    real, seen = engine_set.open_engines, []

    def opening(*args, **kwargs):
        seen.append((_other_fd_lock(bundle, exclusive=True), _other_fd_lock(bundle, exclusive=False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_set, "open_engines", opening)
    with Pipeline.from_bundle(bundle, threads=1) as pipe:
        assert pipe.engines
        assert _other_fd_lock(bundle, exclusive=True), "released once the engines are open"
    assert seen == [(False, True)], "writers are kept out, other readers are not"


def test_a_failed_update_puts_the_replaced_files_back(bundle):
    """install= is all or nothing: when the update fails after the files were installed, the old files are
    back (byte for byte), the manifest is unchanged, and nothing temporary is left."""
    from adafocus.calibration.int8 import install_int8

    staged = _int8_file(bundle, "global.onnx")
    install_int8(bundle, {"global": staged})
    shutil.rmtree(staged.parent)
    old, manifest = (bundle / "global.int8.onnx").read_bytes(), (bundle / "manifest.json").read_bytes()
    listing = _listing(bundle)

    def fail(m):
        assert (bundle / "global.int8.onnx").read_bytes() != old  # installed before the edit
        raise RuntimeError("edit failed")

    new, extra = _int8_file(bundle, "policy.onnx"), _int8_file(bundle, "policy.onnx", "local.int8.onnx")
    with pytest.raises(RuntimeError, match="edit failed"):
        update_manifest(bundle, fail, install={"global.int8.onnx": new, "local.int8.onnx": extra})
    for tmp in (new, extra):
        shutil.rmtree(tmp.parent)
    assert (bundle / "global.int8.onnx").read_bytes() == old and not (bundle / "local.int8.onnx").exists()
    assert (bundle / "manifest.json").read_bytes() == manifest and _listing(bundle) == listing
    load_bundle(bundle)
    with pytest.raises(BundleError, match="is not a file"):
        update_manifest(bundle, lambda m: None, install={"global.int8.onnx": bundle / "missing.onnx"})
    with pytest.raises(BundleError, match="manifest is written, not installed"):
        update_manifest(bundle, lambda m: None, install={"manifest.json": bundle / "global.onnx"})
    assert (bundle / "manifest.json").read_bytes() == manifest and _listing(bundle) == listing


# ------------------------------------------------------------------------------------------ file modes
def test_manifest_and_installed_files_keep_their_mode(bundle):
    """repro 4: an update leaves a 0644 manifest 0644 (mkstemp's 0600 does not survive); a replaced file
    keeps its mode, a new one takes the manifest's (producers write 0600 temp files)."""
    from adafocus.calibration.int8 import install_int8

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    for m in (0o644, 0o640):
        os.chmod(bundle / "manifest.json", m)
        update_manifest(bundle, lambda man: None)
        assert mode(bundle / "manifest.json") == m
    os.chmod(bundle / "manifest.json", 0o644)
    new = _int8_file(bundle, "global.onnx")
    os.chmod(new, 0o600)
    install_int8(bundle, {"global": new})
    assert mode(bundle / "global.int8.onnx") == 0o644
    os.chmod(bundle / "global.int8.onnx", 0o664)
    install_int8(bundle, {"global": _int8_file(bundle, "policy.onnx")})
    assert mode(bundle / "global.int8.onnx") == 0o664
    shutil.rmtree(new.parent)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_first_manifest_follows_the_umask(bundle, tmp_path, umask):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    old = os.umask(umask)
    try:
        write_manifest(fresh, read_manifest(bundle))
    finally:
        os.umask(old)
    assert stat.S_IMODE((fresh / "manifest.json").stat().st_mode) == 0o666 & ~umask
    assert _listing(fresh) == ["manifest.json"]


# ---------------------------------------------------------------------------- where there is no lock
@pytest.mark.parametrize("dir_mode", [0o555, 0o111])
def test_a_read_only_bundle_still_loads(bundle, dir_mode):
    """A bundle directory the user cannot write (0555: flock needs no write access, the shared lock is
    taken) or even list (0111: the directory cannot be opened, so it is read unlocked) still loads, and a
    0555 one runs. Tests run as root, where permissions do not bite: then the check runs in a child that
    ``setpriv`` starts without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, for which they do (the child checks
    that it cannot create a file in the bundle)."""
    code = ("import sys\nfrom pathlib import Path\nfrom adafocus.bundle import load_bundle\n"
            "try:\n    (Path(sys.argv[1]) / 'x').touch()\n    sys.exit('the bundle directory is writable')\n"
            "except PermissionError:\n    pass\n"
            "print(len(load_bundle(sys.argv[1]).manifest.files))\n")
    if dir_mode == 0o555:
        code += ("from adafocus.runtime.pipeline import Pipeline\n"
                 "from adafocus.demo.shipped import sample_videos\n"
                 "with Pipeline.from_bundle(sys.argv[1], threads=1) as pipe:\n"
                 "    print(pipe(sample_videos()[0]).label)\n")
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be made to bite")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    os.chmod(bundle, dir_mode)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", code, str(bundle)], env=_env(), capture_output=True,
                              text=True, timeout=WAIT_S)
    finally:
        os.chmod(bundle, 0o755)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == str(len(read_manifest(bundle).files))


def test_a_directory_that_cannot_be_opened_is_used_unlocked(bundle, monkeypatch):
    """The same path without a second user: opening the directory fails (as for a 0111 directory), so
    load_bundle and update_manifest run unlocked instead of failing."""
    real = os.open

    def refusing(path, flags, *args, **kwargs):
        if flags & os.O_DIRECTORY and os.path.realpath(path) == os.path.realpath(bundle):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(bm.os, "open", refusing)
    with lock_bundle(bundle, exclusive=True):
        monkeypatch.setattr(bm.os, "open", real)
        assert _other_fd_lock(bundle, exclusive=True), "nothing was locked"
        monkeypatch.setattr(bm.os, "open", refusing)
    update_manifest(bundle, lambda m: m.verification.update(unlocked=True))
    assert load_bundle(bundle).manifest.verification["unlocked"] is True


@pytest.mark.parametrize("fake", ["no fcntl (Windows)", "flock fails (NFS)"])
def test_no_flock_means_unlocked_not_broken(bundle, monkeypatch, fake):
    if fake.startswith("no fcntl"):
        monkeypatch.setattr(bm, "fcntl", None)
    else:
        def flock(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(bm, "fcntl", types.SimpleNamespace(LOCK_SH=fcntl.LOCK_SH, LOCK_EX=fcntl.LOCK_EX,
                                                               LOCK_UN=fcntl.LOCK_UN, flock=flock))
    update_manifest(bundle, lambda m: m.verification.update(unlocked=True))
    assert load_bundle(bundle).manifest.verification["unlocked"] is True
    assert bm._held_locks() == {}


# ----------------------------------------------------------------------- build_engines (TensorRT faked)
@pytest.fixture()
def fake_trt(monkeypatch):
    """TensorRT cannot be installed here: a stand-in module (only its version is read) and a builder that
    writes a few bytes per engine; ``state`` lets a test look in during a build or make a stage fail."""
    from adafocus.export import tensorrt as trt_builder
    from adafocus.export.tensorrt import TrtBuildInfo

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    state = {"build": 0, "during": None, "fail": None}

    def fake_build(onnx_path, engine_path, **kwargs):
        stage = Path(onnx_path).stem
        if state["during"] is not None:
            state["during"](stage)
        if stage == state["fail"]:
            raise RuntimeError("builder out of memory (simulated)")
        fd, tmp = tempfile.mkstemp(dir=Path(engine_path).parent)  # 0600, as the real builder's
        with os.fdopen(fd, "wb") as f:
            f.write(f"engine {state['build']} of {stage}".encode())
        os.replace(tmp, engine_path)
        return TrtBuildInfo(str(engine_path), str(onnx_path), "10.3.0", "8.7", "Orin", kwargs["fp16"], False,
                            False, kwargs.get("workspace_mb", 1024))

    monkeypatch.setattr(trt_builder, "build_engine", fake_build)
    return state


def test_a_failed_engine_rebuild_leaves_the_bundle_as_it_was(bundle, fake_trt):
    """repro 2: rebuilding the engines of the same key writes nowhere the manifest points at while it builds
    (readers load the old engines, and no lock is held for the minutes a build takes); a failure leaves the
    old engines, byte for byte; a rebuild that succeeds installs its engines with the manifest."""
    from adafocus.bundle import STAGES
    from adafocus.export.exporter import build_engines

    fake_trt["build"] = 1
    m = build_engines(bundle, log=None)
    (key,) = m.engines
    names = [m.engines[key].files[s] for s in STAGES]
    engines = {n: (bundle / n).read_bytes() for n in names}
    manifest, listing = (bundle / "manifest.json").read_bytes(), _listing(bundle)

    seen = []

    def look(stage):
        seen.append((stage, _other_fd_lock(bundle, exclusive=True)))
        load_bundle(bundle)  # the old engines are still there, as the manifest says

    fake_trt.update(build=2, during=look, fail=STAGES[-1])
    with pytest.raises(RuntimeError, match="out of memory"):
        build_engines(bundle, log=None)
    assert seen == [(s, True) for s in STAGES]
    assert {n: (bundle / n).read_bytes() for n in names} == engines
    assert (bundle / "manifest.json").read_bytes() == manifest and _listing(bundle) == listing
    load_bundle(bundle)

    fake_trt.update(build=3, during=None, fail=None)
    m = build_engines(bundle, log=None)
    assert list(m.engines) == [key] and _listing(bundle) == listing
    assert (bundle / names[0]).read_bytes() == f"engine 3 of {STAGES[0]}".encode()
    assert load_bundle(bundle).manifest.files[names[0]].sha256 == bm.sha256_file(bundle / names[0])
    manifest_mode = stat.S_IMODE((bundle / "manifest.json").stat().st_mode)
    assert {stat.S_IMODE((bundle / n).stat().st_mode) for n in names} == {manifest_mode & 0o666}, \
        "engines take the manifest's mode, not the builder's 0600"
