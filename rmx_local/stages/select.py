"""Stage 2: grade every rollout, keep the mixed problems, compute advantages.

- reward r = 1 if the verifier accepts the final answer, else 0 (unparseable answers are 0 and counted apart)
- mixed problems only (0 < mean reward < 1), closest to 50% correct first, at most `select.max_problems`
- A = (r - mean) / max(std, 1e-8) within a problem (population std), clipped to +-`select.advantage_clip`
- optionally drop the longest `select.trim_longest` fraction of the kept rollouts
Output: `selected.json` (the training sequences with their advantages, plus grading statistics).
"""

from __future__ import annotations

import numpy as np

from rmx_local.errors import RmxError
from rmx_local.io import atomic_write_json, read_json
from rmx_local.stages import RunContext
from rmx_local.tasks import Problem
from rmx_local.verify import gold_parses, verify_many


def advantages(rewards: list[float], clip: float) -> list[float]:
    r = np.asarray(rewards, dtype=np.float64)
    a = (r - r.mean()) / max(r.std(), 1e-8)
    return np.clip(a, -clip, clip).tolist()


def pick_mixed(rates: dict[str, float], max_problems: int) -> list[str]:
    """Problem ids with 0 < success rate < 1, closest to 0.5 first (stable for ties)."""
    mixed = [pid for pid, m in rates.items() if 0.0 < m < 1.0]
    return sorted(mixed, key=lambda pid: abs(rates[pid] - 0.5))[:max_problems]


def run_select(ctx: RunContext, problems: list[Problem], rollouts: list[dict]) -> dict:
    out = ctx.path("selected.json")
    key = ctx.recipe.section_hash("model", "task", "rollout", "select", "seed")
    ctx.check_stage_key("select", key, ["selected.json"])
    if out.exists():
        return read_json(out)
    gold = {p.id: p.answer for p in problems}
    texts = [t for rec in rollouts for t in rec["texts"]]
    golds = [gold[rec["id"]] for rec in rollouts for _ in rec["texts"]]
    with ctx.timed("verify"):
        verdicts = iter(verify_many(texts, golds))
    rates, graded = {}, {}
    n_unparsed = 0
    for rec in rollouts:
        vs = [next(verdicts) for _ in rec["texts"]]
        n_unparsed += sum(v.parsed is None for v in vs)
        graded[rec["id"]] = [float(v.correct) for v in vs]
        rates[rec["id"]] = float(np.mean(graded[rec["id"]]))
    chosen = pick_mixed(rates, ctx.recipe.select.max_problems)
    stats = {
        "problems": len(rollouts), "rollouts": len(texts), "accuracy": float(np.mean([x for g in graded.values() for x in g])),
        "unparseable": n_unparsed / max(len(texts), 1),
        "all_right": sum(m == 1.0 for m in rates.values()), "all_wrong": sum(m == 0.0 for m in rates.values()),
        "mixed": sum(0 < m < 1 for m in rates.values()), "selected_problems": len(chosen),
    }
    if not chosen:
        words = [rec["id"] for rec in rollouts if not gold_parses(gold[rec["id"]])]
        why = f"; {len(words)} of them have golds in words the verifier cannot grade (first: {words[0]})" if words else ""
        raise RmxError(
            f"select: no mixed problems among {len(rollouts)} (all right: {stats['all_right']}, all wrong: "
            f"{stats['all_wrong']}{why})",
            fix="raise rollout.n or task.train_size, or pick a task.difficulty the model gets partly right"
                + ("; make those golds final answers (numbers, math)" if words else ""),
        )
    by_id = {rec["id"]: rec for rec in rollouts}
    seqs = []
    for pid in chosen:
        rec, rewards = by_id[pid], graded[pid]
        for k, (comp, r, a) in enumerate(zip(rec["completions"], rewards, advantages(rewards, ctx.recipe.select.advantage_clip))):
            seqs.append({"id": pid, "k": k, "prompt_ids": rec["prompt_ids"], "completion_ids": comp, "reward": r, "advantage": a})
    trim = ctx.recipe.select.trim_longest
    if trim > 0:
        cut = sorted(len(s["completion_ids"]) for s in seqs)[int(len(seqs) * (1 - trim)) - 1]
        seqs = [s for s in seqs if len(s["completion_ids"]) <= cut]
    seqs = [s for s in seqs if s["completion_ids"]]  # an empty completion has no tokens to learn from
    stats["sequences"] = len(seqs)
    result = {"stats": stats, "sequences": seqs}
    atomic_write_json(out, result)
    return result


def rft_sequences(ctx: RunContext, problems: list[Problem], rollouts: list[dict]) -> list[dict]:
    """`train.objective = "rft"` (rejection-sampling fine-tuning, a baseline): every correct rollout of every
    problem, advantage 1. All-right problems are kept (unlike the mixed-only selection above): for plain
    cross-entropy they are signal, not noise. Duplicated correct completions are kept too, so a problem weighs
    in proportion to how often the base solves it, as in sampling-based self-training."""
    gold = {p.id: p.answer for p in problems}
    with ctx.timed("verify"):
        verdicts = iter(verify_many([t for rec in rollouts for t in rec["texts"]],
                                    [gold[rec["id"]] for rec in rollouts for _ in rec["texts"]]))
    seqs = [{"id": rec["id"], "k": k, "prompt_ids": rec["prompt_ids"], "completion_ids": comp, "reward": 1.0, "advantage": 1.0}
            for rec in rollouts for k, comp in enumerate(rec["completions"]) if next(verdicts).correct and comp]
    if not seqs:
        raise RmxError(f"rft: none of the {sum(len(r['texts']) for r in rollouts)} rollouts is correct",
                       fix="raise rollout.n or task.train_size, or pick a task.difficulty the model gets partly right")
    return seqs
