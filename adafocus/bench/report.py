"""Benchmark reports: the console tables (Ultralytics style), the saved JSON and the plot.

The JSON (``format: adafocus-bench``, ``version: 1``) is the record; the tables and the plot are views of
it, so a report saved on a Jetson can be printed or plotted again anywhere (:func:`load_json`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from adafocus.errors import AdaFocusError

FORMAT = "adafocus-bench"
VERSION = 1
STATUS_MARK = {"ok": "ok", "unavailable": "n/a", "skipped": "skip", "failed": "FAIL"}
# keys every report and every row has (tests check them; readers may rely on them)
REPORT_KEYS = ("format", "version", "created", "environment", "bundle", "settings", "definitions", "results",
               "throughput")
ROW_KEYS = ("engine", "precision", "model", "budget", "budget_gflops", "status", "reason", "videos", "samples",
            "accuracy", "gflops", "mean_exit_step", "ms_e2e", "ms_model", "ms_compute", "videos_per_s",
            "speedup_e2e", "speedup_model", "speedup_compute", "gflops_ratio", "efficiency", "overhead_pct",
            "stages", "peak_rss_mb", "gpu_memory_mb", "dense_precision")
STAT_KEYS = ("p50", "p90", "p99", "mean", "n")
STAGE_LABELS = {"local": "local (all steps)", "local_step": "local (per step)", "overhead": "orchestration",
                "model": "total w/o decode", "total": "total (e2e)"}


def _fmt(value: Any, spec: str = ".2f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def _model_name(row: dict[str, Any]) -> str:
    if row["model"] == "dense":
        other = row.get("dense_precision")
        return "dense" if not other or other == row["precision"] else f"dense({other})"
    return "adafocus" if row.get("budget") is None else f"adafocus@{row['budget']}"


def results_table(report: dict[str, Any]):
    """The main table: one line per engine x precision x model (x budget)."""
    from rich.table import Table

    table = Table(box=None, title="adafocus bench (ms/video: mean; e2e = with decode, model = without)",
                  title_justify="left")
    cols = ("engine", "precision", "model", "status", "accuracy", "GFLOPs", "ms/video e2e", "ms/video model",
            "predicted", "videos/s", "speedup", "GFLOPs ratio", "overhead", "peak RSS MB")
    for col in cols:
        table.add_column(col, justify="left" if col in ("engine", "precision", "model", "status") else "right")
    for r in report["results"]:
        model = _model_name(r)
        if r["status"] != "ok":
            table.add_row(r["engine"], r["precision"], model, STATUS_MARK.get(r["status"], r["status"]),
                          *["-"] * (len(cols) - 4))
            continue
        table.add_row(
            r["engine"], r["precision"], model, "ok", _fmt(r["accuracy"], ".1%"), _fmt(r["gflops"], ".4g"),
            _fmt(r["ms_e2e"]), _fmt(r["ms_model"]), _fmt(r.get("predicted_ms")), _fmt(r["videos_per_s"], ".1f"),
            _fmt(r["speedup_model"], ".2f") + ("x" if r["speedup_model"] else ""),
            _fmt(r["gflops_ratio"], ".2f") + ("x" if r["gflops_ratio"] else ""),
            _fmt(r["overhead_pct"], ".1f") + ("%" if r["overhead_pct"] is not None else ""),
            _fmt(r["peak_rss_mb"], ".0f"))
    return table


def stages_tables(report: dict[str, Any]) -> list:
    """Per-stage latency (ms per video, p50 / p90 / p99), one table per engine and precision: a row per
    stage, a column per measured model."""
    from rich.table import Table

    from adafocus.bench.runner import STAGE_ORDER

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in report["results"]:
        if r["status"] == "ok":
            groups.setdefault((r["engine"], r["precision"]), []).append(r)
    tables = []
    for (engine, precision), rows in groups.items():
        table = Table(box=None, title=f"{engine} {precision}: ms per video, p50 / p90 / p99", title_justify="left")
        table.add_column("stage", justify="left")
        for r in rows:
            table.add_column(_model_name(r), justify="right")
        for stage in STAGE_ORDER:
            if not any(stage in r["stages"] for r in rows):
                continue
            cells = []
            for r in rows:
                st = r["stages"].get(stage)
                cells.append("-" if st is None else f"{st['p50']:.2f} / {st['p90']:.2f} / {st['p99']:.2f}")
            table.add_row(STAGE_LABELS.get(stage, stage), *cells)
        tables.append(table)
    return tables


def throughput_table(report: dict[str, Any]):
    """Videos/s against batch size (throughput mode), or None when it was not run."""
    from rich.table import Table

    rows = report.get("throughput") or []
    if not rows:
        return None
    table = Table(box=None, title="throughput: videos/s (decode overlapped, videos batched per engine call)",
                  title_justify="left")
    for col in ("engine", "precision", "model", "batch", "videos/s", "videos per head call", "videos"):
        table.add_column(col, justify="left" if col in ("engine", "precision", "model") else "right")
    for t in rows:
        model = _model_name(t)
        table.add_row(t["engine"], t["precision"], model, str(t["batch"]), _fmt(t["videos_per_s"], ".1f"),
                      _fmt(t["mean_batch"], ".2f"), str(t["videos"]))
    return table


def print_report(report: dict[str, Any], console=None) -> None:
    """Environment block, results table, reasons for rows that did not run, stage and throughput tables."""
    from rich.console import Console

    from adafocus.bench.env import format_environment

    console = console or Console(width=200)
    console.print(format_environment(report["environment"]), highlight=False)
    b = report["bundle"]
    dense = "none" if b.get("dense_gflops") is None else (
        f"{b['dense_gflops']:.4g} GFLOPs ({b.get('dense_source')}"
        + (", random weights: timing only" if b.get("dense_random_init") else "") + ")")
    console.print(f"bundle  {b['path']} ({b.get('preset') or b['family']}, {b['precision']}), adaptive "
                  f"{b['exits_gflops'][0]:.4g}..{b['exits_gflops'][-1]:.4g} GFLOPs, dense {dense}", highlight=False)
    s = report["settings"]
    console.print(f"run     {s['videos']} videos x {s['repeats']} repeats after {s['warmup_s']:g} s warm-up, "
                  f"device {s['device']}", highlight=False)
    console.print(results_table(report))
    for r in report["results"]:
        if r["status"] != "ok":
            what = "dense" if r["model"] == "dense" else "adafocus"
            console.print(f"  {r['engine']} {r['precision']} {what}: {r['status']}: {r['reason']}", highlight=False)
    for table in stages_tables(report):
        console.print(table)
    table = throughput_table(report)
    if table is not None:
        console.print(table)


def check_report(report: dict[str, Any]) -> None:
    """Raise AdaFocusError when ``report`` lacks a key of the schema (for readers of saved files)."""
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        found = report.get("format") if isinstance(report, dict) else None
        raise AdaFocusError(f"not an adafocus bench report (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in REPORT_KEYS if k not in report]
    for i, r in enumerate(report.get("results", [])):
        missing += [f"results[{i}].{k}" for k in ROW_KEYS if k not in r]
        for name, st in (r.get("stages") or {}).items():
            missing += [f"results[{i}].stages.{name}.{k}" for k in STAT_KEYS if k not in st]
    if missing:
        raise AdaFocusError(f"bench report lacks {', '.join(missing[:8])}")


def save_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a saved report and check its schema."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdaFocusError(f"cannot read bench report {path}: {exc}") from exc
    check_report(report)
    return report


def default_name(report: dict[str, Any]) -> str:
    """A file name that says what produced the numbers: ``bench_<preset>_<device>_<cpu or gpu>.json``."""
    env = report["environment"]
    device = report["settings"]["device"]
    hw = env.get("gpu") if device != "cpu" else env.get("cpu")
    safe = "".join(ch if ch.isalnum() else "-" for ch in f"{report['bundle'].get('preset') or 'model'}_{device}_{hw}")
    return f"bench_{'-'.join(filter(None, safe.split('-')))}.json"


def save_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Two panels: model-only ms/video per engine (adaptive budgets beside dense), and videos/s against batch
    size when the throughput mode ran. Needs matplotlib (``pip install 'adafocus[plot]'``)."""
    from adafocus.errors import require

    matplotlib = require("matplotlib", "plot", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    tp = report.get("throughput") or []
    fig, axes = plt.subplots(1, 2 if tp else 1, figsize=(12 if tp else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    labels = [f"{r['engine']} {r['precision']}\n" + ("dense" if r["model"] == "dense" else f"@{r['budget']}")
              for r in ok]
    values = [r["ms_model"] for r in ok]
    colors = ["#888888" if r["model"] == "dense" else "#1f77b4" for r in ok]
    bars = ax.bar(range(len(ok)), values, color=colors)
    for bar, r in zip(bars, ok, strict=True):
        note = f"{r['gflops']:.3g} GF" if r["gflops"] else ""
        if r.get("speedup_model"):
            note += f"\n{r['speedup_model']:.2f}x"
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(range(len(ok)), labels, fontsize=7)
    ax.set_ylabel("ms per video, model only (no decode)")
    ax.set_title("latency: adafocus (blue) vs dense baseline (grey)", fontsize=9)
    if tp:
        ax2 = axes[0][1]
        series: dict[str, list[tuple[int, float]]] = {}
        for t in tp:
            if t["status"] != "ok" or not t["videos_per_s"]:
                continue
            key = f"{t['engine']} {t['precision']} " + ("dense" if t["model"] == "dense" else f"@{t['budget']}")
            series.setdefault(key, []).append((t["batch"], t["videos_per_s"]))
        for key, pts in series.items():
            pts.sort()
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if "dense" in key else "-",
                     label=key)
        ax2.set_xscale("log", base=2)
        sizes = sorted({t["batch"] for t in tp})
        ax2.set_xticks(sizes, [str(b) for b in sizes])
        ax2.minorticks_off()
        ax2.set_xlabel("videos in flight (batch)")
        ax2.set_ylabel("videos/s (decode overlapped)")
        ax2.set_title("throughput", fontsize=9)
        ax2.legend(fontsize=7)
    env = report["environment"]
    hw = env.get("gpu") if report["settings"]["device"] != "cpu" else env.get("cpu")
    fig.suptitle(f"{report['bundle'].get('preset') or 'model'} on {hw} ({report['settings']['device']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


__all__ = ["FORMAT", "REPORT_KEYS", "ROW_KEYS", "STAT_KEYS", "VERSION", "check_report", "default_name", "load_json",
           "print_report", "results_table", "save_json", "save_plot", "stages_tables", "throughput_table"]
