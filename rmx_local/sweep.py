"""`sweep.enabled`: train several gate/train variants on the run's one set of rollouts, keep the best on validation.

A variant is `NAME: key=value ...`, overrides of gate.* / train.* fields (no spaces inside a value). Layout, one run
folder: the shared stages as a plain run writes them (problems.json, rollouts.jsonl, entropies.jsonl); each variant
trains in train/<key>/ exactly as `rmx-local run RECIPE <its overrides>` would (so that single run reuses it), and
its row lands in sweep/<name>.json once finished. sweep.json holds the table and the choice; then the chosen variant
runs as a plain run (round.py's run_round: everything cached but the held-out evaluation), which writes adapter/,
gate.json, summary.json (plus a "sweep" table). recipe.toml stays the sweep's recipe (a rerun is the same sweep);
sweep/chosen.toml is the chosen variant as a single-run recipe.

Choice, on validation only (task.val_size problems, greedy): each variant's candidate is its best checkpoint
(train.py; ties to the earlier step). The best variant by validation accuracy loses to any earlier variant within 1 SE
of it (the SE of their paired per-problem difference): the list is in order of simplicity, the earliest such one is
kept. Held-out problems are scored only after sweep.json records the choice, once, for the chosen adapter.

Resume: a finished variant is read back from sweep/<name>.json (no model load); an unfinished one resumes from its
newest checkpoint (train.py). Budget: with `sweep.max_minutes`, variants whose estimated time (plan.py) does not fit
are dropped, in list order, and named; the decision is frozen in sweep/plan.json so a resumed sweep keeps it.

Shortcuts: each variant loads the model afresh (a resumed sweep then equals an uninterrupted one); CPU s is this
process's CPU time for the variant (a resumed variant counts only the resumed part); "KL to base" is the mean
per-token KL(base || adapted) over the completion tokens of the selected rollouts (every variant scored on the same
tokens; torch backend only, None elsewhere); the time estimate assumes half the rollouts positive (positive_only) or
correct (rft), and every checkpoint scored on the validation problems.
"""

from __future__ import annotations

import copy
import gc
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmx_local.adapter import load_peft
from rmx_local.errors import RmxError
from rmx_local.export import check_exportable
from rmx_local.io import atomic_write_json, atomic_write_text, read_json
from rmx_local.models import resolve_model
from rmx_local.recipe import Recipe, check_ranges, apply_overrides, recipe_to_toml
from rmx_local.round import run_round, training_data
from rmx_local.scoring import mean_se
from rmx_local.stages import RunContext
from rmx_local.stages.gate import run_entropies
from rmx_local.stages.rollouts import run_rollouts, split_problems
from rmx_local.stages.select import run_select
from rmx_local.stages.train import TRAIN_KEY_SECTIONS, build_examples, run_train, schedule
from rmx_local.ui import UI

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SWEPT = ("gate.", "train.")  # the sections a variant may change: how the run's one set of rollouts is trained


@dataclass
class Variant:
    name: str
    overrides: list[str]
    recipe: Recipe  # the sweep's recipe with the overrides applied (run_dir unchanged)


def variants(recipe: Recipe) -> list[Variant]:
    """Parse and check `sweep.variants` against `recipe` (one RmxError line per bad entry), before any work."""
    if recipe.rounds > 1:
        raise RmxError("sweep.enabled with rounds > 1: the sweep trains every variant on one set of rollouts",
                       fix="set rounds = 1, or sweep.enabled = false")
    if recipe.task.val_size <= 0:
        raise RmxError("sweep.enabled needs validation problems to choose on, but task.val_size = 0",
                       fix="set task.val_size = 50 (the paper's split; lower task.eval_size if the task has too few problems)")
    if not recipe.sweep.variants:
        raise RmxError("sweep.variants is empty", fix='write e.g. variants = ["paper-tau1.4: gate.mode=tau gate.tau=1.4"]')
    out: list[Variant] = []
    for i, entry in enumerate(recipe.sweep.variants):
        where = f"sweep.variants[{i}] {entry!r}"
        name, sep, rest = entry.partition(":")
        name, overrides = name.strip(), rest.split()
        if not sep or not NAME.match(name):
            raise RmxError(f"{where}: not `NAME: key=value ...` (NAME of letters, digits, . _ -)",
                           fix='write e.g. "paper-tau1.4: gate.mode=tau gate.tau=1.4"')
        if any(v.name == name for v in out):
            raise RmxError(f"{where}: the name {name!r} is used twice", fix="give each variant its own name")
        bad = [o for o in overrides if not o.startswith(SWEPT)]
        if bad:
            raise RmxError(f"{where}: `{bad[0]}` is not a gate.* or train.* field",
                           fix="a variant changes only how the rollouts are trained; set other fields in the recipe")
        v = copy.deepcopy(recipe)
        apply_overrides(v, overrides, where)
        check_ranges(v, where)
        out.append(Variant(name, overrides, v))
    return out


def fit(budget_s: float, shared_s: float, variant_s: list[float]) -> list[int]:
    """Indices of the variants kept within `budget_s`: in list order, each kept if it still fits after the shared
    stages and the variants kept before it (a later, cheaper one can fit where an earlier one did not)."""
    kept, total = [], shared_s
    for i, s in enumerate(variant_s):
        if total + s <= budget_s:
            kept.append(i)
            total += s
    return kept


def estimate(recipe: Recipe, vs: list[Variant]) -> tuple[float, list[float], float]:
    """(shared stages s, s per variant, peak bytes) from plan.py's model of this machine (see the docstring)."""
    from rmx_local.plan import plan

    hf_path = resolve_model(recipe.model).hf_path
    stages, facts = plan(recipe, hf_path)
    by = {s.name: s for s in stages}
    shared = sum(by[n].seconds for n in ("load model", "rollouts", "entropy", "eval base", "eval adapted") if n in by)
    peak, per = max(s.peak_bytes for s in stages), []
    for v in vs:
        r = copy.deepcopy(v.recipe)  # one greedy pass over the validation problems stands for each checkpoint's score
        r.task.eval_size, r.eval.n_samples, r.eval.greedy = r.task.val_size, 0, True
        st = {s.name: s for s in plan(r, hf_path, facts["machine"])[0]}
        t = r.train
        share = 0.5 if t.positive_only or t.objective == "rft" else 1.0
        seqs = share * min(r.select.max_problems, r.task.train_size) * r.rollout.n
        steps = schedule(max(1, int(seqs)), t)[1]
        checkpoints = math.ceil(steps / (t.checkpoint_every or steps))
        per.append(st["load model"].seconds + share * st["train"].seconds + (checkpoints + 1) * st["eval base"].seconds)
        peak = max(peak, st["train"].peak_bytes)
    return shared, per, peak


def budget(recipe: Recipe, vs: list[Variant], ui: UI) -> tuple[list[Variant], list[str]]:
    """The variants to train and the names dropped by `sweep.max_minutes`, frozen in sweep/plan.json."""
    if recipe.sweep.max_minutes <= 0:
        return vs, []
    path = Path(recipe.run_dir) / "sweep" / "plan.json"
    wanted = {"variants": recipe.sweep.variants, "max_minutes": recipe.sweep.max_minutes}
    if path.is_file() and {k: read_json(path).get(k) for k in wanted} == wanted:
        kept_names = read_json(path)["kept"]
    else:
        shared, per, _ = estimate(recipe, vs)
        kept_idx = fit(recipe.sweep.max_minutes * 60, shared, per)
        if not kept_idx:
            raise RmxError(f"sweep.max_minutes = {recipe.sweep.max_minutes:g}: not even one variant fits (estimated "
                           f"{shared / 60:.1f} min shared + {min(per) / 60:.1f} min for the cheapest)",
                           fix=f"raise sweep.max_minutes to at least {math.ceil((shared + min(per)) / 60)}")
        kept_names = [vs[i].name for i in kept_idx]
        atomic_write_json(path, {**wanted, "kept": kept_names, "estimate_s": {"shared": shared, **{
            v.name: s for v, s in zip(vs, per)}}})
    dropped = [v.name for v in vs if v.name not in kept_names]
    if dropped:
        ui.line(f"sweep: sweep.max_minutes = {recipe.sweep.max_minutes:g} fits {len(kept_names)} of {len(vs)} variants; "
                f"dropped {', '.join(dropped)}")
    return [v for v in vs if v.name in kept_names], dropped


def mean_kl(ctx: RunContext, seqs: list[dict]) -> float | None:
    """Mean per-token KL(base || adapted) over the completion tokens of `seqs` (backend's current adapter)."""
    backend = ctx.backend
    if not hasattr(backend, "kl_from_base"):
        return None
    total, count, batch = 0.0, 0, ctx.recipe.gate.batch_size
    for start in range(0, len(seqs), batch):
        pairs = [(s["prompt_ids"] + s["completion_ids"], len(s["prompt_ids"])) for s in seqs[start : start + batch]]
        for kl in backend.kl_from_base(pairs):
            total, count = total + float(kl.sum()), count + kl.size
    return total / max(count, 1)


def train_variant(v: Variant, i: int, n: int, shared: dict, ui: UI) -> dict:
    """Train one variant (or read its finished row) and score its chosen checkpoint: one row of the table."""
    run = Path(v.recipe.run_dir)
    key = v.recipe.section_hash(*TRAIN_KEY_SECTIONS)
    row_path = run / "sweep" / f"{v.name}.json"
    if row_path.is_file() and read_json(row_path)["key"] == key:
        return read_json(row_path)
    ui.line(f"sweep: variant {i}/{n} {v.name}: {' '.join(v.overrides) or '(the recipe as written)'}")
    t0, c0 = time.time(), time.process_time()
    ctx = RunContext(v.recipe, run, ui)
    ctx._source = shared["source"]
    seqs, gates, gate_report = training_data(ctx, shared["splits"]["train"], shared["rollouts"], shared["selected"])
    examples = build_examples(seqs, gates, v.recipe.train.positive_only)
    if not examples:
        raise RmxError(f"sweep variant {v.name}: no training sequences", fix="drop it from sweep.variants")
    report = run_train(ctx, examples, shared["splits"]["val"])
    best, folder = int(report["best_step"]), f"train/{key}/step-{report['best_step']}"
    ctx.backend.set_adapter(load_peft(run / folder / "adapter"))
    ctx.backend.set_adapter_enabled(True)
    kl = mean_kl(ctx, shared["selected"]["sequences"])
    scores = {int(k): s for k, s in report["val_scores"].items()}
    diff = np.asarray(scores[best]) - np.asarray(scores[0])
    row = {"name": v.name, "overrides": " ".join(v.overrides), "key": key, "folder": folder,
           "gated_fraction": gate_report["gated_fraction"], "tau": gate_report["tau"],
           "trained_fraction": gate_report.get("trained_fraction", gate_report["gated_fraction"]),
           "sequences": len(examples), "steps": report["steps"], "best_step": best,
           "val": mean_se(scores[best]), "val_base": mean_se(scores[0]), "val_delta": mean_se(diff.tolist()),
           "val_scores": scores[best], "kl": kl, "cpu_s": time.process_time() - c0, "wall_s": time.time() - t0}
    del ctx
    gc.collect()
    atomic_write_json(row_path, row)
    return row


def choose(rows: list[dict]) -> tuple[int, str]:
    """(index, why): the best validation accuracy, unless an earlier (simpler) variant is within 1 paired SE of it."""
    best = max(range(len(rows)), key=lambda i: (rows[i]["val"][0], -i))
    top = np.asarray(rows[best]["val_scores"])
    for i, row in enumerate(rows[:best]):
        gap = rows[best]["val"][0] - row["val"][0]
        se = mean_se((top - np.asarray(row["val_scores"])).tolist())[1]
        if gap <= se + 1e-9:  # inclusive: a gap of exactly one SE (one problem of n apart) is a tie
            return i, (f"within 1 SE of the best, {rows[best]['name']} ({rows[best]['val'][0]:.3f}; gap {gap:.3f} <= "
                       f"SE {se:.3f}), and earlier in the list")
    return best, "the best validation accuracy" + (" (ties go to the earlier variant)" if best else "")


def table(sweep: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the sweep table (terminal and report page)."""
    heads = ["variant", "gated", "sequences", "steps (kept)", "CPU s", "val accuracy", "val - base", "KL to base", "chosen"]
    rows = []
    for r in sweep["variants"]:
        d = r["val_delta"]
        rows.append([r["name"], f"{r['gated_fraction']:.2f}", str(r["sequences"]), f"{r['steps']} ({r['best_step']})",
                     f"{r['cpu_s']:.0f}", f"{r['val'][0]:.3f} ± {r['val'][1]:.3f}",
                     f"{d[0]:+.3f} ± {d[1]:.3f}", "-" if r["kl"] is None else f"{r['kl']:.4f}",
                     "yes" if r["name"] == sweep["chosen"] else ""])
    return heads, rows


def run_sweep(recipe: Recipe, ui: UI) -> dict:
    """The sweep in `recipe.run_dir` (the caller holds the lock); returns the chosen variant's summary + "sweep"."""
    t_start, cpu_start = time.time(), time.process_time()
    vs = variants(recipe)
    run = Path(recipe.run_dir)
    ctx = RunContext(recipe, run, ui)
    ctx.source  # a missing model fails here, before any work
    if recipe.export.formats:
        check_exportable(recipe.export.formats, ctx.source.hf_path)
    kept, dropped = budget(recipe, vs, ui)
    splits = split_problems(ctx)
    rollouts = run_rollouts(ctx, splits["train"])
    selected = run_select(ctx, splits["train"], rollouts)
    if any(v.recipe.train.objective != "rft" for v in kept):
        run_entropies(ctx, selected["sequences"])  # once, for every variant
    ctx._backend = None  # each variant loads its own model (see the docstring)
    gc.collect()
    shared = {"source": ctx.source, "splits": splits, "rollouts": rollouts, "selected": selected}
    rows = [train_variant(v, i, len(kept), shared, ui) for i, v in enumerate(kept, 1)]
    k, why = choose(rows)
    chosen = kept[k]
    sweep = {"variants": rows, "chosen": chosen.name, "reason": why, "dropped": dropped,
             "val_problems": len(splits["val"])}
    atomic_write_json(run / "sweep.json", sweep)  # the choice is on disk before any held-out problem is scored
    single = copy.deepcopy(chosen.recipe)
    single.sweep.enabled = False
    atomic_write_text(run / "sweep" / "chosen.toml", recipe_to_toml(single))
    heads, body = table(sweep)
    ui.table(f"sweep: {len(rows)} variants on {len(splits['val'])} validation problems (greedy)", heads, body)
    ui.line(f"sweep: chose {chosen.name}: {why}; only it is scored on the held-out problems")
    summary = run_round(chosen.recipe, ui)  # cached up to the held-out evaluation of the chosen adapter
    atomic_write_text(run / "recipe.toml", recipe_to_toml(recipe))
    summary.update(sweep={k: v for k, v in sweep.items() if k != "variants"} | {
        "variants": [{k: v for k, v in r.items() if k != "val_scores"} for r in rows]},
        total_s=time.time() - t_start, total_cpu_s=time.process_time() - cpu_start)
    atomic_write_json(run / "summary.json", summary)
    return summary


def print_sweep_plan(recipe: Recipe, ui: UI) -> None:
    """`--dry-run`: each variant's estimated time, which variants `sweep.max_minutes` keeps, the sweep's total and
    peak memory (variants train one at a time, so the peak is one variant's)."""
    from rmx_local.plan import _duration

    vs = variants(recipe)
    try:
        shared, per, peak = estimate(recipe, vs)
    except (RmxError, OSError, ValueError, KeyError, TypeError) as e:
        ui.line(f"sweep estimate: none ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        return
    limit = recipe.sweep.max_minutes * 60
    kept = fit(limit, shared, per) if limit > 0 else list(range(len(vs)))
    rows = [[v.name, _duration(v_s), "kept" if i in kept else "dropped (over sweep.max_minutes)",
             " ".join(v.overrides)] for i, (v, v_s) in enumerate(zip(vs, per))]
    total = shared + sum(per[i] for i in kept)
    ui.table(f"sweep estimate: {len(kept)} of {len(vs)} variants on {recipe.task.val_size} validation problems",
             ["variant", "time", "", "overrides"], rows)
    single = shared + (per[kept[0]] if kept else 0.0)
    ui.line(f"sweep: ~{_duration(total)} in all (shared stages {_duration(shared)}; a single run ~{_duration(single)}), "
            f"peak ~{peak / 2**30:.2f} GB" + (f"; budget {recipe.sweep.max_minutes:g} min" if limit > 0 else ""))
