"""The sweep's proof: the variant chosen on validation against every single variant and against an oracle that
peeks at the held-out set, per seed, with the time the sweep costs over a single run.

    python benchmarks/sweep.py RECIPE --seeds 0 1 2 --root runs/sweep [--threads 1] [key=value ...]

Each seed runs `rmx-local run RECIPE sweep.enabled=true seed=S run_dir=ROOT/<recipe>-s<S> threads=T key=value ...`
(resumable), then, after the sweep has chosen and finished, scores every other variant's adapter on the same
held-out problems (greedy; cached as eval/adapted-<train key>-<eval key>.json, the file a single run of that variant
writes). The oracle is the variant with the best held-out accuracy (ties to the earlier); regret = oracle - chosen.
"single run s" is the sweep's wall time less the wall time of the variants it did not choose (the shared stages,
the chosen variant and the held-out evaluations): what `rmx-local run` with the chosen variant alone would have
taken on this machine. Prints a markdown table and writes ROOT/<recipe>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def held_out(run: Path, row: dict) -> float:
    """Greedy held-out accuracy of one variant's adapter (the pipeline's own cached evaluation)."""
    from rmx_local.adapter import load_peft
    from rmx_local.recipe import load_recipe
    from rmx_local.stages import RunContext
    from rmx_local.stages.evaluate import cached_eval
    from rmx_local.stages.rollouts import split_problems
    from rmx_local.ui import UI

    recipe = load_recipe(run / "recipe.toml")
    eval_key = recipe.section_hash("model", "task", "eval", "seed")
    path = run / "eval" / f"adapted-{row['key']}-{eval_key}.json"
    if not path.exists():
        ctx = RunContext(recipe, run, UI(rich=False))
        ctx.backend.set_adapter(load_peft(run / row["folder"] / "adapter"))
        ctx.backend.set_adapter_enabled(True)
        cached_eval(ctx, split_problems(ctx)["eval"], "adapted", f"{row['key']}-{eval_key}")
    return float(np.mean(json.loads(path.read_text())["greedy"]["per_problem"]))


def one_seed(recipe_path: str, seed: int, root: Path, threads: int, overrides: list[str]) -> dict:
    from rmx_local.cli import _recipe_path
    from rmx_local.pipeline import run_pipeline
    from rmx_local.recipe import load_recipe
    from rmx_local.ui import UI

    path = _recipe_path(recipe_path)
    run = root / f"{path.stem}-s{seed}"
    r = load_recipe(path, ["sweep.enabled=true", f"seed={seed}", f"run_dir={json.dumps(str(run))}", f"threads={threads}",
                           *overrides])
    summary = run_pipeline(r, UI(rich=False))  # a finished sweep is read back in seconds (and re-chosen)
    done = run / "sweep-time.json"  # the first complete sweep's wall time: a rerun must not replace it
    if not done.exists():
        done.write_text(json.dumps({"total_s": summary["total_s"]}))
    sweep_s = json.loads(done.read_text())["total_s"]
    sweep = summary["sweep"]
    rows = json.loads((run / "sweep.json").read_text())["variants"]
    scores = {row["name"]: held_out(run, row) for row in rows}  # after the sweep chose: the proof only
    oracle = max(scores, key=lambda n: (scores[n], -list(scores).index(n)))
    chosen = sweep["chosen"]
    lost = sum(row["wall_s"] for row in rows if row["name"] != chosen)
    return {"seed": seed, "run": str(run), "chosen": chosen, "reason": sweep["reason"], "oracle": oracle,
            "base": summary["eval"]["greedy"]["base"][0], "held_out": scores, "chosen_held_out": scores[chosen],
            "regret": scores[oracle] - scores[chosen], "val": {row["name"]: row["val"][0] for row in rows},
            "sweep_s": sweep_s, "single_s": sweep_s - lost,
            "eval_problems": summary["eval_problems"], "val_problems": sweep["val_problems"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None, help="results JSON (default ROOT/<recipe>.json)")
    ap.add_argument("--root", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    results = []
    for seed in a.seeds:
        results.append(one_seed(a.recipe, seed, a.root, a.threads, a.overrides))
        out = {"recipe": a.recipe, "overrides": a.overrides, "threads": a.threads, "machine": platform.processor() or platform.machine(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seeds": results}
        Path(a.out or a.root / f"{Path(a.recipe).stem}.json").write_text(json.dumps(out, indent=1))
    names = list(results[0]["held_out"])
    print(f"\n{a.recipe} {' '.join(a.overrides)}: greedy held-out accuracy ({results[0]['eval_problems']} problems), "
          f"chosen on {results[0]['val_problems']} validation problems\n")
    print("| seed | base | " + " | ".join(names) + " | chosen | oracle | regret | sweep s | single run s |")
    print("|---" * (len(names) + 7) + "|")
    for s in results:
        cells = [f"**{s['held_out'][n]:.3f}**" if n == s["chosen"] else f"{s['held_out'][n]:.3f}" for n in names]
        print(f"| {s['seed']} | {s['base']:.3f} | " + " | ".join(cells) + f" | {s['chosen']} {s['chosen_held_out']:.3f} | "
              f"{s['oracle']} {s['held_out'][s['oracle']]:.3f} | {s['regret']:.3f} | {s['sweep_s']:.0f} | {s['single_s']:.0f} |")
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    print(f"| mean | {mean([s['base'] for s in results]):.3f} | " + " | ".join(f"{mean([s['held_out'][n] for s in results]):.3f}" for n in names)
          + f" | {mean([s['chosen_held_out'] for s in results]):.3f} | {mean([s['held_out'][s['oracle']] for s in results]):.3f} | "
          f"{mean([s['regret'] for s in results]):.3f} | {mean([s['sweep_s'] for s in results]):.0f} | {mean([s['single_s'] for s in results]):.0f} |")
    for s in results:
        print(f"seed {s['seed']}: chose {s['chosen']} ({s['reason']}); validation " + ", ".join(f"{n} {v:.3f}" for n, v in s["val"].items()))


if __name__ == "__main__":
    main()
