"""``adafocus batch``: classify a corpus of videos, in-process or on Ray Data, into result rows on disk.

    from adafocus.scale.batch import BatchConfig, run_batch
    from adafocus.scale.rows import RunnerOptions

    summary = run_batch(BatchConfig(source="videos/", out="out/", ray="local", actors=2,
                                    runner=RunnerOptions(bundle="bundle", threads=1)))
    print(summary.videos_per_s, summary.errors, summary.accuracy)

On Ray, the list of videos (id, path, label) goes into ``map_batches`` with :class:`~adafocus.scale.rows.RowClassifier`
in an actor pool (one actor per CPU share or GPU); each actor opens the bundle once, decodes its videos and runs the
step scheduler over them; only the small result rows come back to the driver, which writes them as part files
(:mod:`adafocus.scale.output`). Without Ray (``ray="off"``, or Ray not installed with ``ray="auto"``) the same row
function runs in this process. Faults: a bad video is an error row (the scheduler isolates it); an actor that dies is
restarted by Ray and its batch retried (Ray Data's actor pools retry by default); ids still missing at the end are run
once more; a job that makes no progress for ``stall_timeout`` seconds stops with an error, keeping what it wrote.
Resume: the ids already in ``out`` are skipped (a skip list read from the written parts).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from adafocus.errors import AdaFocusError, ConfigError
from adafocus.scale.corpus import VideoItem, read_corpus
from adafocus.scale.output import PartWriter, check_format, read_rows, write_summary
from adafocus.scale.rows import INPUT_COLUMNS, RunnerOptions, check_runner, iter_rows

Log = Callable[[str], None]


@dataclass(kw_only=True)
class BatchConfig:
    """One ``adafocus batch`` job (the CLI's options)."""

    source: str  # a directory, a glob, a video, or a CSV / JSONL list (see adafocus.scale.corpus)
    out: str  # output directory (part files + summary.json); a second run resumes into it
    runner: RunnerOptions
    ray: str = "auto"  # auto | off | local | a cluster address (ray://host:10001, host:6379, auto)
    actors: int = 1  # actor pool size on Ray
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    task_size: int = 32  # most videos per map_batches call (the unit Ray retries after a fault)
    fmt: str = "parquet"
    part_rows: int = 500  # rows per output part file
    stall_timeout: float = 600.0  # seconds without a finished batch before the job is stopped

    def validate(self) -> None:
        if self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ConfigError("--cpus-per-actor must be > 0 and --gpus-per-actor >= 0")
        if self.task_size < 1 or self.runner.batch < 1:
            raise ConfigError("--task-size and --batch must be >= 1")
        if self.stall_timeout <= 0:
            raise ConfigError(f"--stall-timeout must be > 0, got {self.stall_timeout}")
        self.fmt = check_format(self.fmt)


@dataclass
class BatchSummary:
    """What a run did (``processed`` .. ``videos_per_s``: this run) and what ``out`` holds (``rows`` ..
    ``accuracy``: all runs)."""

    backend: str  # "in-process" or "ray (N actors)"
    processed: int  # videos run by this run
    skipped: int  # videos already in out (resumed)
    failed: int  # this run's error rows
    seconds: float  # this run's wall time after start-up (Ray's start excluded), to the last row written
    startup_s: float  # time to start or join Ray (0 in-process)
    videos_per_s: float
    first_rows_s: float | None  # from the start to the first rows written (workers starting, bundle opened)
    steady_videos_per_s: float | None  # videos/s after the first rows (the workers' rate once they are up)
    rows: int  # rows in out, all runs
    errors: int  # error rows in out
    mean_gflops: float | None  # over the ok rows in out
    accuracy: float | None  # over the ok rows in out that have a label
    labelled: int
    rerun: int = 0  # ids missing after the first pass and run again
    out: str = ""
    parts: list[str] = field(default_factory=list)  # part files this run wrote

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        acc = f", accuracy {self.accuracy:.1%} of {self.labelled}" if self.accuracy is not None else ""
        gf = f", mean {self.mean_gflops:.4g} GFLOPs" if self.mean_gflops is not None else ""
        return (f"{self.backend}: {self.processed} videos in {self.seconds:.1f} s ({self.videos_per_s:.2f} videos/s), "
                f"{self.failed} failed, {self.skipped} skipped (already in {self.out})\n"
                f"{self.out}: {self.rows} rows, {self.errors} errors{gf}{acc}")


def run_batch(config: BatchConfig, log: Log | None = None,
              progress: Callable[[int, int], None] | None = None) -> BatchSummary:
    """Run ``config``; ``progress(done, total)`` after each batch of rows written. Returns the summary (also
    written to ``out/summary.json``)."""
    log = log or (lambda _msg: None)
    config.validate()
    check_runner(config.runner)
    items = read_corpus(config.source)
    writer = PartWriter(config.out, config.fmt, config.part_rows)
    done = {row["id"] for row in read_rows(config.out)}
    todo = [it for it in items if it.id not in done]
    skipped = len(items) - len(todo)
    if skipped:
        log(f"resuming: {skipped} of {len(items)} videos already in {config.out}, {len(todo)} to run")
    backend = _backend(config.ray, log) if todo else _Nothing()  # nothing left: no Ray to start
    with backend.session(config, log) as session:
        start = time.perf_counter()
        finished: set[str] = set()
        run_rows: list[dict] = []
        rerun, first = 0, None
        try:
            for attempt in range(2):  # the second pass runs ids missing after the first (should be none)
                left = [it for it in todo if it.id not in finished]
                if not left:
                    break
                if attempt:
                    rerun = len(left)
                    log(f"{rerun} videos have no row after the first pass: running them again")
                for rows in session.rows(left):
                    rows = [r for r in rows if r["id"] not in finished]  # a retried batch may repeat rows
                    finished.update(r["id"] for r in rows)
                    writer.add(rows)
                    run_rows += rows
                    if first is None:
                        first = (time.perf_counter() - start, len(run_rows))
                    if progress:
                        progress(len(finished), len(todo))
        finally:  # a job that stops (an error, Ctrl-C) keeps the rows it has: the next run resumes after them
            writer.flush()
        seconds = time.perf_counter() - start
    missing = len(todo) - len(finished)
    summary = _summary(config, session, run_rows, skipped, seconds, writer, rerun, first)
    write_summary(config.out, summary.to_dict())
    if missing:
        raise AdaFocusError(f"{missing} videos have no row after a re-run; run the same command again to resume")
    return summary


def _summary(config, session, run_rows, skipped, seconds, writer, rerun, first) -> BatchSummary:
    rows = read_rows(config.out)
    steady = None
    if first is not None and seconds > first[0] and len(run_rows) > first[1]:
        steady = round((len(run_rows) - first[1]) / (seconds - first[0]), 3)
    ok = [r for r in rows if r["status"] == "ok"]
    labelled = [r for r in ok if r["truth"] is not None]
    return BatchSummary(
        backend=session.name, processed=len(run_rows), skipped=skipped,
        failed=sum(r["status"] != "ok" for r in run_rows), seconds=round(seconds, 3),
        startup_s=round(session.startup_s, 3), videos_per_s=round(len(run_rows) / seconds, 3) if seconds > 0 else 0.0,
        first_rows_s=round(first[0], 3) if first else None, steady_videos_per_s=steady,
        rows=len(rows), errors=len(rows) - len(ok),
        mean_gflops=sum(r["gflops"] for r in ok) / len(ok) if ok else None,
        accuracy=sum(bool(r["correct"]) for r in labelled) / len(labelled) if labelled else None,
        labelled=len(labelled), rerun=rerun, out=str(config.out), parts=[str(p) for p in writer.parts])


# ------------------------------------------------------------------------------------------ backends
class _Nothing:
    """The backend of a run with nothing left to do."""

    name = "nothing to run"
    startup_s = 0.0

    def session(self, config: BatchConfig, log: Log):
        return contextlib.nullcontext(self)


class _InProcess:
    """The embedded default: one Pipeline in this process, the same row function as the actors."""

    def session(self, config: BatchConfig, log: Log):
        return _InProcessSession(config)


class _InProcessSession:
    name = "in-process"
    startup_s = 0.0

    def __init__(self, config: BatchConfig):
        self.config = config
        self.pipe = None

    def __enter__(self):
        self.pipe = self.config.runner.open()
        return self

    def __exit__(self, *exc):
        self.pipe.close()

    def rows(self, items: list[VideoItem]) -> Iterator[list[dict]]:
        budget = self.pipe.budget(self.config.runner.budget, self.config.runner.average)
        size = self.config.task_size
        rows = iter_rows(self.pipe, items, budget, self.config.runner.batch)
        batch: list[dict] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch


class _Ray:
    """Ray Data over a local instance, a cluster, or the instance this process already joined (``--ray``)."""

    def __init__(self, mode: str):
        self.mode = mode

    def session(self, config: BatchConfig, log: Log):
        return _RaySession(config, self.mode, log)


class _RaySession:
    def __init__(self, config: BatchConfig, mode: str, log: Log):
        self.config, self.mode, self.log = config, mode, log
        self.startup_s = 0.0
        self.name = f"ray ({config.actors} actor{'s' if config.actors > 1 else ''})"
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        from adafocus.scale.cluster import check_room, connect

        c = self.config
        if c.runner.device.strip().lower() != "cpu" and c.gpus_per_actor <= 0:
            raise ConfigError("on Ray, actors run on a GPU with --gpus-per-actor G (--device is for --ray off)")
        with contextlib.ExitStack() as stack:
            self.startup_s = stack.enter_context(connect(self.mode, self.log)).startup_s
            check_room(c.actors, c.cpus_per_actor, c.gpus_per_actor, "actors")
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        self._stack.__exit__(*exc)

    def rows(self, items: list[VideoItem]) -> Iterator[list[dict]]:
        import ray.data

        from adafocus.scale.rows import RowClassifier

        c = self.config
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        runner = c.runner
        if runner.threads is None:  # one engine thread per CPU the actor holds, not the machine's count
            runner = RunnerOptions(**{**asdict(runner), "threads": max(1, int(c.cpus_per_actor))})
        if c.gpus_per_actor > 0 and runner.device == "cpu":
            runner = RunnerOptions(**{**asdict(runner), "device": "cuda"})  # Ray sets CUDA_VISIBLE_DEVICES
        records = [{k: getattr(it, k) for k in INPUT_COLUMNS} for it in items]
        # one block per task: Ray schedules, and retries after an actor's death, a block at a time; at most
        # task_size videos a block, and at least 4 blocks per actor (while there are videos), so all actors work
        blocks = max(math.ceil(len(records) / c.task_size), min(len(records), 4 * c.actors))
        size = math.ceil(len(records) / blocks)
        ds = ray.data.from_items(records, override_num_blocks=math.ceil(len(records) / size))
        ds = ds.map_batches(RowClassifier, fn_constructor_kwargs={"options": runner}, batch_size=size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=c.actors),
                            num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor or None)
        yield from _watched((b.to_pylist() for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")),
                            c.stall_timeout)


def _watched(batches: Iterator[list[dict]], timeout: float) -> Iterator[list[dict]]:
    """``batches``, read in a thread; a wait of more than ``timeout`` seconds for the next one raises (an actor
    pool can wait forever on an actor that never comes back)."""
    box: queue.Queue = queue.Queue(maxsize=4)
    end = object()

    def pump():
        try:
            for b in batches:
                box.put(b)
            box.put(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box.put(exc)

    threading.Thread(target=pump, name="adafocus-batch-rows", daemon=True).start()
    while True:
        try:
            got = box.get(timeout=timeout)
        except queue.Empty:
            raise AdaFocusError(f"no batch finished for {timeout:g} s: stopped (the rows written so far are kept; "
                                "run the same command again to resume)") from None
        if got is end:
            return
        if isinstance(got, BaseException):
            if isinstance(got, AdaFocusError):
                raise got
            raise AdaFocusError(f"the Ray job failed: {_reason(got)}") from got
        yield got


def _reason(exc: BaseException) -> str:
    """One line for a failed Ray job: the adafocus error a worker raised (Ray passes on its traceback as text),
    else the exception's first line."""
    text = str(exc).strip()
    ours = [line.split(": ", 1)[1] for line in text.splitlines()
            if line.startswith("adafocus.errors.") and ": " in line]
    return ours[-1] if ours else f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _backend(ray: str, log: Log):
    """The in-process backend for ``off`` (and ``auto`` without Ray installed), Ray Data otherwise."""
    mode = ray.strip().lower()
    if mode == "off":
        return _InProcess()
    if importlib.util.find_spec("ray") is None:
        if mode == "auto":
            log("ray is not installed: running in-process (pip install 'adafocus[ray]' for Ray)")
            return _InProcess()
        from adafocus.errors import require

        require("ray", "ray", f"--ray {ray}")
    return _Ray(ray)
