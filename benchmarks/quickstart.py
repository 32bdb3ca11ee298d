"""Run the quickstart recipe from scratch and print the table docs/results.md quotes.

    python benchmarks/quickstart.py [--recipe recipes/quickstart.toml] [--run-dir runs/bench-quickstart] [key=value ...]

It runs `rmx-local run` in a fresh run folder (the dequantized model cache is kept: that one-time step is
set-up, not the method), then reads summary.json: wall time end to end and per stage, rollout tokens/s,
peak RSS, gated fraction and implied tau, base vs adapted accuracy with standard errors on the held-out
problems, and the paired difference in standard errors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/quickstart.toml")
    ap.add_argument("--run-dir", default="runs/bench-quickstart")
    ap.add_argument("--keep", action="store_true", help="reuse the run folder (resume) instead of starting fresh")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not args.keep:
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "rmx_local", "run", args.recipe, f"run_dir={json.dumps(str(run_dir))}", "--plain", *args.overrides]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    s = json.loads((run_dir / "summary.json").read_text())

    rows = [("end to end (s)", f"{wall:.0f}")]
    rows += [(f"  {k} (s)", f"{v:.0f}") for k, v in s["timings_s"].items()]
    rows += [(k, f"{v:,.0f}") for k, v in s["rates"].items()]
    rows += [("peak RSS (MB)", f"{s['peak_rss_mb']:,.0f}"),
             ("gated fraction / tau", f"{s['gated_fraction']:.3f} / {s['tau']:.2f}"),
             ("train problems / sequences / steps", f"{s['train_problems']} / {s['train_sequences']} / {s['train']['steps']}"),
             ("held-out problems", str(s["eval_problems"]))]
    for metric, row in s["eval"].items():
        b, a, d = row["base"], row.get("adapted"), row.get("delta")
        rows.append((f"{metric}: base", f"{b[0]:.3f} ± {b[1]:.3f}"))
        if a:
            rows.append((f"{metric}: adapted", f"{a[0]:.3f} ± {a[1]:.3f}"))
            rows.append((f"{metric}: adapted - base (paired)", f"{d[0]:+.3f} ± {d[1]:.3f} = {d[0] / max(d[1], 1e-12):+.1f} SE"))
        rows.append((f"{metric}: unparseable base / adapted", f"{row['base_unparseable']:.3f} / {row.get('adapted_unparseable', float('nan')):.3f}"))
    width = max(len(r[0]) for r in rows)
    print(f"\nquickstart benchmark: {args.recipe} {' '.join(args.overrides)}")
    print("-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
