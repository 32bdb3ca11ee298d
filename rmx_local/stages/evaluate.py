"""Stage 5: base vs adapted on held-out problems.

Metrics per model: greedy accuracy, pass@1 over `eval.n_samples` sampled completions (mean ± standard error
over problems), and the unparseable rate. The adapted-minus-base difference is paired per problem, and its
standard error is the SE of the per-problem differences (the honest test for "better by k SE").
Base results are cached in the run folder (`eval/base-<key>.json`); adapted results per training key.
"""

from __future__ import annotations

import numpy as np

from rmx_local.backends import SampleParams
from rmx_local.io import atomic_write_json, read_json
from rmx_local.scoring import Prompt, mean_se, score_problems
from rmx_local.stages import RunContext
from rmx_local.tasks import Problem


def score(ctx: RunContext, problems: list[Problem], params: SampleParams, label: str,
          shots: tuple[Problem, ...] = ()) -> dict:
    """Per-problem correctness for the backend's current adapter state, by the scorer `rmx-local eval` uses
    (`shots`: worked examples before each question, `rmx_local.tasks.build_prompt`)."""
    t = ctx.recipe.task
    records = score_problems(ctx.backend, problems, Prompt(t.template, t.instruction, shots), params,
                             batch_size=ctx.recipe.eval.batch_size or ctx.recipe.rollout.batch_size, ui=ctx.ui, label=label)
    parsed = [p for r in records for p in r.parsed]
    return {"per_problem": [r.score for r in records], "unparseable": sum(p is None for p in parsed) / max(len(parsed), 1),
            "tokens": sum(t for r in records for t in r.tokens), "example": records[0].completions[0] if records else ""}


def evaluate_model(ctx: RunContext, problems: list[Problem], label: str) -> dict:
    e = ctx.recipe.eval
    result = {}
    if e.greedy:
        result["greedy"] = score(ctx, problems, SampleParams(1, 0.0, 1.0, e.max_tokens, ctx.recipe.seed), f"eval {label} greedy")
    if e.n_samples:
        params = SampleParams(e.n_samples, e.temperature, e.top_p, e.max_tokens, ctx.recipe.seed + 17)
        result["sampled"] = score(ctx, problems, params, f"eval {label} pass@1")
    return result


def cached_eval(ctx: RunContext, problems: list[Problem], label: str, key: str) -> dict:
    path = ctx.path("eval", f"{label}-{key}.json")
    if path.exists():
        return read_json(path)
    with ctx.timed(f"eval {label}"):
        result = evaluate_model(ctx, problems, label)
    atomic_write_json(path, result)
    return result


def summarize(base: dict, adapted: dict | None) -> dict:
    """Mean ± SE per metric, and the paired difference."""
    table = {}
    for metric in ("greedy", "sampled"):
        if metric not in base:
            continue
        row = {"base": mean_se(base[metric]["per_problem"]), "base_unparseable": base[metric]["unparseable"]}
        if adapted and metric in adapted:
            row["adapted"] = mean_se(adapted[metric]["per_problem"])
            row["adapted_unparseable"] = adapted[metric]["unparseable"]
            diff = np.asarray(adapted[metric]["per_problem"]) - np.asarray(base[metric]["per_problem"])
            row["delta"] = mean_se(diff.tolist())
        table[metric] = row
    return table
