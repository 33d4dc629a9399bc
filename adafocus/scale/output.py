"""The output directory of ``adafocus batch``: result rows in part files, and the summary.

``OUT/part-<run>-<n>.parquet`` (or ``.jsonl``) holds up to ``part_rows`` rows each; a part is written to a
hidden temporary file and moved into place with ``os.replace``, so a reader (or a resumed run) sees whole
parts only, never half a file. Resuming reads the ids of every part already there (the skip list) and runs
the others. ``OUT/summary.json`` is written the same way at the end of a run.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

from adafocus.errors import ConfigError, DataError

FORMATS = ("parquet", "jsonl")
SUMMARY = "summary.json"


def check_format(fmt: str) -> str:
    value = fmt.strip().lower()
    if value not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if value == "parquet":
        from adafocus.errors import require

        require("pyarrow", "ray", "parquet output (or pass --format jsonl)")
    return value


def part_files(out: Path) -> list[Path]:
    """The finished part files in ``out`` (any format), sorted."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name.startswith("part-") and p.suffix in (".parquet", ".jsonl"))


def read_rows(out: str | os.PathLike) -> list[dict]:
    """Every row written to ``out`` so far (all parts, both formats)."""
    rows: list[dict] = []
    for part in part_files(Path(out)):
        try:
            if part.suffix == ".jsonl":
                with open(part, encoding="utf-8") as fh:
                    rows += [json.loads(line) for line in fh if line.strip()]
            else:
                import pyarrow.parquet as pq

                rows += pq.read_table(part).to_pylist()
        except (OSError, ValueError) as exc:
            raise DataError(f"{part}: cannot read this part of the output ({exc})") from None
    return rows


class PartWriter:
    """Writes rows to new part files of one run in ``out``, each complete or absent."""

    def __init__(self, out: str | os.PathLike, fmt: str, part_rows: int = 1000):
        if part_rows < 1:
            raise ConfigError(f"part_rows must be >= 1, got {part_rows}")
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} exists and is not a directory")
        self.fmt = fmt
        self.part_rows = part_rows
        self.run = uuid.uuid4().hex[:8]
        self.parts: list[Path] = []
        self._pending: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        self._pending += rows
        while len(self._pending) >= self.part_rows:
            self._write(self._pending[:self.part_rows])
            self._pending = self._pending[self.part_rows:]

    def flush(self) -> None:
        if self._pending:
            self._write(self._pending)
            self._pending = []

    def _write(self, rows: list[dict]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)  # made with the first part: a job that fails first leaves none
        path = self.out / f"part-{self.run}-{len(self.parts):05d}.{self.fmt}"
        if self.fmt == "jsonl":
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            atomic_write(path, lambda fh: fh.write(data))
        else:
            import pyarrow.parquet as pq

            from adafocus.scale.rows import to_table

            table = to_table(rows)
            atomic_write(path, lambda fh: pq.write_table(table, fh))
        self.parts.append(path)


def write_summary(out: str | os.PathLike, summary: dict) -> Path:
    path = Path(out) / SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(summary, indent=2) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(data))
    return path


def atomic_write(path: Path, write) -> None:
    """``write(binary file)`` into a temporary file beside ``path``, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
