"""Measure #15 on this CPU: profile a bundle, bench deadlines at 25/50/75% of glance->full, print a table."""
import json, shutil, sys, subprocess
from pathlib import Path
src, name, threads, videos = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
work = Path(f"/tmp/m/{name}")
import os
keep = os.environ.get("KEEP_PROFILE") == "1" and work.exists()
if not keep:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src, work)
ad = "/work/main/.venv/bin/adafocus"
if not keep:
  subprocess.run([ad, "profile", str(work), "--engine", "ort", "--threads", threads, "--seconds", "1.0",
                "--batches", os.environ.get("BATCHES", "1,2,4,8")], check=True,
                 stdout=subprocess.DEVNULL)
prof = json.loads(next((work / "profiles").glob("*.json")).read_text())
g, f = prof["measured"]["glance_only_ms"], prof["measured"]["full_ms"]
budgets = [round(g + x * (f - g), 2) for x in (0.25, 0.5, 0.75)]
print(name, "glance-only", g, "full", f, "budgets", budgets, flush=True)
out = f"/tmp/m/{name}_bench.json"
subprocess.run([ad, "bench", *videos, "--model", str(work), "--engine", "ort", "--threads", threads, "--no-dense",
                "--budgets", ",".join(f"{b}ms" for b in budgets), "--repeats", "5", "--warmup", "3",
                "--json", out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
rep = json.loads(Path(out).read_text())
for r in rep["results"]:
    if r["model"] != "adafocus":
        continue
    print(f"{name} budget {r['budget']:>9}: measured mean {r['ms_model']:.2f} ms, predicted {r['predicted_ms']:.2f} "
          f"({100 * (r['predicted_ms'] / r['ms_model'] - 1):+.1f}%), p95/budget {r['p95_over_budget']:.3f}, "
          f"deadline stops {r['deadline_stops']}/{r['samples']}, least share used "
          f"{r['deadline_min_used']}, over 1.1x {r['over_budget']} (in the glance {r['over_in_glance']}), mean exit {r['mean_exit_step']}", flush=True)
