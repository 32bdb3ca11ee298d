"""Where a run's peak RSS goes: the pipeline in this process, with the peak resident set of every stage.

    python benchmarks/memory_profile.py [--recipe recipes/quickstart.toml] [--run-dir runs/memprofile] [key=value ...]

Linux only: before each stage the kernel's high-water mark is reset (`echo 5 > /proc/self/clear_refs`), so
`VmHWM` after the stage is that stage's own peak, not the run's so far. Stages are the pipeline's timed
sections (`RunContext.timed`) plus the model load. Printed per stage: RSS before, peak during, RSS after, and
the peak above the RSS before it (what the stage itself needed). tracemalloc would miss all of this: torch
allocates its tensors outside Python's allocator, and its CPU allocator keeps no statistics (on CUDA,
`torch.cuda.max_memory_allocated` is the number to read).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class StageMemory:
    """Records (stage, RSS before, peak during, RSS after, seconds, CPU seconds) for each measured section."""

    def __init__(self):
        self.rows: list[dict] = []
        self.run_peak = 0.0  # the resets hide earlier peaks from ru_maxrss: keep the maximum here

    def whole_run_peak(self) -> float:
        self.run_peak = max(self.run_peak, status_mb("VmHWM"))
        return self.run_peak

    @contextlib.contextmanager
    def measure(self, stage: str):
        before = status_mb("VmRSS")
        self.whole_run_peak()
        reset_peak()
        t0, c0 = time.time(), time.process_time()
        try:
            yield
        finally:
            row = {"stage": stage, "before_mb": before, "peak_mb": status_mb("VmHWM"),
                   "after_mb": status_mb("VmRSS"), "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
            self.rows.append(row)
            print(f"memory: {stage}: peak {row['peak_mb']:,.0f} MB (before {before:,.0f}), {row['cpu_s']:.1f} CPU s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="recipes/quickstart.toml")
    ap.add_argument("--run-dir", default="runs/memprofile")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    ap.add_argument("--unchunked", action="store_true", help="full-logits passes, as before torch_vocab (a baseline)")
    ap.add_argument("--keep", action="store_true", help="resume the run folder (e.g. one holding rollouts) instead of deleting it")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    mem = StageMemory()
    with mem.measure("imports (torch, transformers)"):
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import rmx_local.backends as backends
        from rmx_local.pipeline import run_pipeline
        from rmx_local.recipe import load_recipe
        from rmx_local.stages import RunContext
        from rmx_local.ui import UI

    if args.unchunked:
        import rmx_local.backends.torch_backend as torch_backend

        torch_backend.split_head = lambda model: None
    load = backends.load_backend

    def measured_load(*a, **k):
        with mem.measure("load model"):
            return load(*a, **k)

    backends.load_backend = measured_load
    timed = RunContext.timed

    @contextlib.contextmanager
    def measured_timed(self, stage):
        with mem.measure(stage), timed(self, stage):
            yield

    RunContext.timed = measured_timed

    run_dir = Path(args.run_dir)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    recipe = load_recipe(args.recipe, [*args.overrides, f"run_dir={json.dumps(str(run_dir))}"])
    t0 = time.time()
    summary = run_pipeline(recipe, UI(rich=False))
    total = time.time() - t0
    peak = mem.whole_run_peak()

    print(f"\nmemory by stage: {args.recipe} {' '.join(args.overrides)}  (MB; peak = VmHWM during the stage)")
    print(f"{'stage':<32}{'before':>9}{'peak':>9}{'after':>9}{'peak-before':>13}{'wall s':>9}{'cpu s':>9}")
    for r in mem.rows:
        print(f"{r['stage']:<32}{r['before_mb']:>9,.0f}{r['peak_mb']:>9,.0f}{r['after_mb']:>9,.0f}"
              f"{r['peak_mb'] - r['before_mb']:>13,.0f}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}")
    print(f"{'whole run':<32}{'':>9}{peak:>9,.0f}{'':>9}{'':>13}{total:>9.1f}{time.process_time():>9.1f}")
    print(f"greedy accuracy base -> adapted: {summary['eval'].get('greedy', {}).get('base', ['-'])[0]} -> "
          f"{summary['eval'].get('greedy', {}).get('adapted', ['-'])[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": mem.rows, "peak_mb": peak, "wall_s": total,
                                               "cpu_s": time.process_time()}, indent=1))


if __name__ == "__main__":
    main()
