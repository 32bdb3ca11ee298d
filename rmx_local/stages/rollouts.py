"""Stage 1: problems and base-model rollouts.

Problems are split once into train / val / eval (frozen in `problems.json`). K rollouts per train problem
are sampled from the frozen base and journaled one problem per line in `rollouts.jsonl`, so a killed run
resumes at the first unfinished problem. Problems are sampled in fixed groups (`batch_size // n` consecutive
train problems, the group's seed derived from its first index), the same groups on every run: a resumed run
skips finished groups and samples a group that was cut short whole again, journaling only its missing
problems, so its rollouts equal an uninterrupted run's (samplers seed per call, not per problem).
"""

from __future__ import annotations

import random
from dataclasses import asdict

from rmx_local.backends import SampleParams
from rmx_local.data import load_problems
from rmx_local.engines import make_engine
from rmx_local.errors import RmxError
from rmx_local.io import Journal, atomic_write_json, read_json
from rmx_local.stages import RunContext
from rmx_local.tasks import (Problem, arith_problems, arith_space_size, encode_prompts as encode_questions,
                             resolve_template)


def split_problems(ctx: RunContext) -> dict[str, list[Problem]]:
    """Train / val / eval problems, frozen in the run folder on first use."""
    path = ctx.path("problems.json")
    t = ctx.recipe.task
    ctx.check_stage_key("problems", ctx.recipe.section_hash("task", "seed"), ["problems.json"])
    if path.exists():
        data = read_json(path)
        return {k: [Problem(**p) for p in v] for k, v in data.items()}
    if t.name == "arith":
        space = arith_space_size(t.difficulty)  # held-out sets come from the end of the seeded sequence
        if t.train_size + t.val_size + t.eval_size > space:
            raise RmxError(f"task: train_size + val_size + eval_size = {t.train_size + t.val_size + t.eval_size} exceeds "
                           f"the {space} distinct `{t.difficulty}` problems", fix="lower the sizes or pick another task.difficulty")
        splits = {
            "train": arith_problems(t.difficulty, t.train_size, ctx.recipe.seed),
            "val": arith_problems(t.difficulty, t.val_size, ctx.recipe.seed, offset=space - t.eval_size - t.val_size),
            "eval": arith_problems(t.difficulty, t.eval_size, ctx.recipe.seed, offset=space - t.eval_size),
        }
    else:
        pool = load_problems(t.path, warn=ctx.ui.line)
        random.Random(ctx.recipe.seed).shuffle(pool)
        held = load_problems(t.eval_path, warn=ctx.ui.line) if t.eval_path else []
        if not held:
            held, pool = pool[: t.eval_size], pool[t.eval_size :]
        splits = {"eval": held[: t.eval_size], "val": pool[: t.val_size],
                  "train": pool[t.val_size : t.val_size + t.train_size]}
        seen: dict[str, str] = {}
        for p in (p for split in splits.values() for p in split):  # a repeat could sit in both training and held-out
            if p.question in seen:
                raise RmxError(f"{t.path}: problems {seen[p.question]} and {p.id} have the same question",
                               fix="remove the repeated rows (or the training rows from task.eval_path)")
            seen[p.question] = p.id
    if not splits["train"]:
        raise RmxError(f"task: no training problems (task.train_size = {t.train_size}, source: {t.path or t.name})",
                       fix="use a larger dataset or a smaller task.eval_size / task.val_size")
    atomic_write_json(path, {k: [asdict(p) for p in v] for k, v in splits.items()})
    return splits


def encode_prompts(ctx: RunContext, problems: list[Problem]) -> tuple[list[str], list[list[int]]]:
    t = ctx.recipe.task
    if "template" not in ctx.said:
        used = resolve_template(ctx.tokenizer, t.template)
        why = {"raw": "raw completion prompt (the paper's for base models)", "chat": "the tokenizer's chat template"}[used]
        ctx.ui.line(f"prompt: {why}" + (" · task.template = auto" if t.template == "auto" else ""))
        ctx.said.add("template")
    return encode_questions(ctx.tokenizer, [p.question for p in problems], t.template, t.instruction)


def make_rollout_engine(ctx: RunContext):
    return make_engine(ctx.recipe, ctx.source, ctx.tokenizer, lambda: ctx.backend)


def run_rollouts(ctx: RunContext, problems: list[Problem]) -> list[dict]:
    r = ctx.recipe.rollout
    ctx.check_stage_key("rollouts", ctx.recipe.section_hash("model", "task", "rollout", "seed"), ["rollouts.jsonl"])
    journal = Journal(ctx.path("rollouts.jsonl"))
    done = {rec["id"]: rec for rec in journal.read()}
    group = max(1, r.batch_size // r.n)
    starts = [i for i in range(0, len(problems), group) if any(p.id not in done for p in problems[i : i + group])]
    if starts:
        engine = make_rollout_engine(ctx)
        todo = sum(p.id not in done for p in problems)
        ctx.ui.line(f"rollouts: engine {engine.name}, {todo} problems x {r.n} samples to go ({len(done)} done)")
        with ctx.timed("rollouts"), ctx.ui.stage("rollouts", len(problems), "problems") as bar:
            bar.advance(len(problems) - todo)
            for start in starts:
                chunk = problems[start : start + group]
                texts, ids = encode_prompts(ctx, chunk)
                params = SampleParams(r.n, r.temperature, r.top_p, r.max_tokens,
                                      ctx.recipe.seed * 1_000_003 + start + (ctx.round_no - 1) * 7919)
                outs = engine.sample(texts, ids, params, progress=lambda k: bar.advance(0, k))
                missing = [(p, pids, c) for p, pids, c in zip(chunk, ids, outs) if p.id not in done]
                for p, pids, completions in missing:
                    rec = {"id": p.id, "prompt_ids": pids, "completions": completions,
                           "texts": [ctx.tokenizer.decode(c, skip_special_tokens=True) for c in completions]}
                    journal.append(rec)
                    done[p.id] = rec
                bar.advance(len(missing))
            ctx.rates["rollout tok/s"] = bar.tokens_per_s
    return [done[p.id] for p in problems]
