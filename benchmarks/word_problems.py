"""The word-problem recipe's table: seeds x gate conditions, paired gains on (a) held-out generated problems and
(b) a transfer set of word problems the generator did not make.

    python benchmarks/word_problems.py RUNS [--data recipes/data/one-step-word-problems.jsonl] [--threads 1]

RUNS holds one finished run folder per seed and condition, RUNS/seed<S>/<condition>/ (`rmx-local run
recipes/word-problems.toml run_dir=RUNS/seed0/entropy seed=0 ...`). (a) is read from each run's summary.json;
(b) is scored here, greedily with the run's own prompt and eval.max_tokens: the base once (cached in
RUNS/transfer-base-<hash>.json) and each run's chosen adapter (cached in <run>/eval/transfer-<train key>-<hash>.json).
Gains are paired per problem (adapted - base, ± SE of the differences); the mean over seeds is reported with
the SE across seeds. Shortcut: the base is scored with the first run's recipe; all runs must share the model,
the prompt and eval.max_tokens (checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import numpy as np


def mean_se(xs) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0


def transfer_scores(runs: list[Path], root: Path, data: Path) -> tuple[list[float], dict[Path, list[float]]]:
    """Per-problem greedy correctness on `data`: the base, and each run's adapter (cached)."""
    from rmx_local.adapter import load_peft
    from rmx_local.backends import SampleParams
    from rmx_local.data import load_problems
    from rmx_local.recipe import load_recipe
    from rmx_local.stages import RunContext
    from rmx_local.stages.evaluate import score
    from rmx_local.ui import UI

    problems = load_problems(str(data))
    recipes = {run: load_recipe(run / "recipe.toml") for run in runs}
    first = recipes[runs[0]]
    prompt = lambda r: (r.model, r.task.template, r.task.instruction, r.eval.max_tokens)  # noqa: E731
    if any(prompt(r) != prompt(first) for r in recipes.values()):
        raise SystemExit("runs differ in model, prompt or eval.max_tokens: score them separately")
    key = hashlib.sha256(json.dumps([data.read_text(), prompt(first)]).encode()).hexdigest()[:12]
    params = SampleParams(1, 0.0, 1.0, first.eval.max_tokens, 0)
    ui = UI(rich=False)
    backend = None

    def cached(path: Path, run: Path, adapter: Path | None) -> list[float]:
        nonlocal backend
        if path.exists():
            return json.loads(path.read_text())["per_problem"]
        ctx = RunContext(recipes[run], run, ui)
        if backend is not None:
            ctx._backend = backend
        backend = ctx.backend
        if adapter is None:
            backend.set_adapter_enabled(False)
        else:
            backend.set_adapter(load_peft(adapter))
            backend.set_adapter_enabled(True)
        result = score(ctx, problems, params, f"transfer {run.name if adapter else 'base'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        return result["per_problem"]

    base = cached(root / f"transfer-base-{key}.json", runs[0], None)
    trained = {run: json.loads((run / "summary.json").read_text())["train"]["key"] for run in runs}
    return base, {run: cached(run / "eval" / f"transfer-{trained[run]}-{key}.json", run, run / "adapter") for run in runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path)
    ap.add_argument("--data", type=Path, default=Path("recipes/data/one-step-word-problems.jsonl"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runs = sorted(p.parent for p in args.runs.glob("seed*/*/summary.json") if (p.parent / "adapter").is_dir())
    if not runs:
        raise SystemExit(f"no finished runs under {args.runs}/seed*/*/")
    base, adapted = transfer_scores(runs, args.runs, args.data)

    rows: dict[str, dict[str, tuple]] = {}
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        a = s["eval"]["greedy"]
        b = mean_se(np.asarray(adapted[run]) - np.asarray(base))
        rows.setdefault(run.name, {})[run.parent.name] = (a["base"][0], a["adapted"][0], a["delta"], b,
                                                          s["gated_fraction"], s["total_s"])
    print(f"(b) {args.data}: {len(base)} problems, base greedy {np.mean(base):.3f}\n")
    gain = lambda d, se: f"{d:+.3f} ± {se:.3f} ({d / max(se, 1e-12):+.1f})"  # noqa: E731
    print("| condition | seed | (a) base | (a) adapted | (a) gain ± SE (in SE) | (b) gain ± SE (in SE) | gated | run s |")
    print("|---|---|---:|---:|---|---|---:|---:|")
    for cond, seeds in sorted(rows.items()):
        for seed, (ab, aa, (d, se), (bd, bse), frac, secs) in sorted(seeds.items()):
            print(f"| {cond} | {seed.removeprefix('seed')} | {ab:.3f} | {aa:.3f} | {gain(d, se)} | {gain(bd, bse)} | "
                  f"{frac:.0%} | {secs:.0f} |")
        if len(seeds) > 1:
            ma, sa = mean_se([v[2][0] for v in seeds.values()])
            mb, sb = mean_se([v[3][0] for v in seeds.values()])
            print(f"| **{cond}** | **mean of {len(seeds)}** | | | **{gain(ma, sa)}** | **{gain(mb, sb)}** | | |")


if __name__ == "__main__":
    main()
