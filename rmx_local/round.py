"""One round of the method in `recipe.run_dir`: rollouts -> verify/select/advantage -> entropy/gate -> train ->
eval -> save (-> export). `run` (pipeline.py), the rounds loop (rounds.py) and the sweep (sweep.py) each call it.

Each stage resumes from what the run folder already holds. The folder ends with:
  adapter/            PEFT LoRA (adapter_model.safetensors + adapter_config.json) of the chosen checkpoint
  recipe.toml         the resolved recipe;  manifest.json  versions, seed, recipe hash, data hash
  summary.json        selection stats, gate report, training report, base vs adapted table, timings
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from rmx_local import __version__, distributed as dist
from rmx_local.adapter import load_peft, save_peft
from rmx_local.archs import ARCHS
from rmx_local.export import check_exportable, export_run
from rmx_local.io import atomic_write_json, atomic_write_text, read_json
from rmx_local.recipe import Recipe, recipe_to_toml
from rmx_local.stages import RunContext
from rmx_local.stages.evaluate import cached_eval, summarize
from rmx_local.stages.gate import compute_gate, run_entropies, shared_context, widen_positives
from rmx_local.stages.rollouts import run_rollouts, split_problems
from rmx_local.stages.select import rft_sequences, run_select
from rmx_local.stages.train import build_examples, run_train
from rmx_local.ui import UI


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def versions() -> dict[str, str]:
    out = {"rmx-local": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "mlx", "mlx_lm", "llama_cpp", "gguf", "math_verify"):
        mod = sys.modules.get("mlx.core" if name == "mlx" else name)  # mlx keeps its version in mlx.core
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def run_round(recipe: Recipe, ui: UI, start_adapter=None, round_no: int = 1) -> dict:
    """One pass in `recipe.run_dir` (the caller holds the lock); with `start_adapter`, that LoRA samples the rollouts
    and training continues it."""
    run_dir = Path(recipe.run_dir)
    ctx = RunContext(recipe, run_dir, ui, start_adapter=start_adapter, round_no=round_no)
    t_start, cpu_start = time.time(), time.process_time()

    dist.main_first(lambda: ctx.source)  # a missing or unknown model fails here, before any work (a GGUF: converted once)
    config = Path(ctx.source.hf_path) / "config.json"
    model_type = read_json(config).get("model_type", "") if config.is_file() else ""
    if model_type and model_type not in ARCHS:
        ui.line(f"model: {model_type} is not in rmx_local/archs.py: this run trains and exports PEFT; the gguf, mlx "
                "and ollama exports need an entry there")
    if recipe.export.formats:
        for fmt, (why, fix) in check_exportable(recipe.export.formats, ctx.source.hf_path, ctx.source.gguf_path).items():
            ui.line(f"export: {fmt} will be skipped: {why} (fix: {fix})")  # explicit formats are refused here
    # under torchrun, stages that are not data-parallel run on rank 0; the other ranks then read its outputs
    splits = dist.main_first(lambda: split_problems(ctx))
    rollouts = dist.main_first(lambda: run_rollouts(ctx, splits["train"]))
    selected = dist.main_first(lambda: run_select(ctx, splits["train"], rollouts))
    s = selected["stats"]
    ui.line(f"select: accuracy {s['accuracy']:.3f} over {s['rollouts']} rollouts, unparseable {s['unparseable']:.3f}; "
            f"{s['mixed']} mixed problems ({s['all_right']} all right, {s['all_wrong']} all wrong); "
            f"kept {s['selected_problems']} problems, {s['sequences']} sequences")

    seqs, gates, gate_report = training_data(ctx, splits["train"], rollouts, selected)
    examples = build_examples(seqs, gates, recipe.train.positive_only)
    eval_key = recipe.section_hash("model", "task", "eval", "seed")
    base_eval = None
    if splits["eval"]:
        base_eval = dist.main_first(lambda: cached_eval(ctx, splits["eval"], "base", eval_key))
    selection = splits["val"] or (splits["train"] if recipe.train.select_on_train else [])
    report = run_train(ctx, examples, selection)
    adapter = load_peft(ctx.path("train", report["key"], f"step-{report['best_step']}", "adapter"))
    adapter.base_model = recipe.model

    adapted_eval = None
    if splits["eval"]:
        def adapted() -> dict:
            if not ctx.path("eval", f"adapted-{report['key']}-{eval_key}.json").exists():
                ctx.backend.set_adapter(adapter)
                ctx.backend.set_adapter_enabled(True)
            return cached_eval(ctx, splits["eval"], "adapted", f"{report['key']}-{eval_key}")

        adapted_eval = dist.main_first(adapted)

    table = summarize(base_eval, adapted_eval) if base_eval else {}
    data_hash = hashlib.sha256(json.dumps([(x["id"], x["k"], x["completion_ids"]) for x in seqs]).encode()).hexdigest()[:16]
    manifest = {"versions": versions(), "seed": recipe.seed, "recipe_hash": recipe.hash(), "data_hash": data_hash,
                "model": recipe.model, "backend": getattr(ctx._backend, "name", recipe.backend),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # the run's own results are replaced together, at the end: a failed or killed rerun leaves the last ones
    summary = {
        "recipe_hash": manifest["recipe_hash"], "model": recipe.model, "selection": s, "gate": gate_report,
        "gated_fraction": gate_report["gated_fraction"], "tau": gate_report["tau"],
        "train_problems": len({x["id"] for x in seqs}), "train_sequences": len(examples),
        "train": {k: v for k, v in report.items() if k != "history"}, "eval": table,
        "eval_problems": len(splits["eval"]), "timings_s": ctx.timings, "rates": ctx.rates,
        "total_s": time.time() - t_start, "cpu_timings_s": ctx.cpu_timings, "total_cpu_s": time.process_time() - cpu_start,
        "peak_rss_mb": peak_rss_mb(),
    }
    if not dist.is_main():  # under torchrun rank 0 alone writes the run folder
        return summary
    ui.line(f"save: adapter (step {report['best_step']}), recipe.toml, gate.json, manifest.json, summary.json")
    save_peft(adapter, run_dir / "adapter")
    atomic_write_text(run_dir / "recipe.toml", recipe_to_toml(recipe))
    atomic_write_json(run_dir / "gate.json", gate_report)
    atomic_write_json(run_dir / "manifest.json", manifest)
    atomic_write_json(run_dir / "summary.json", summary)
    if recipe.export.formats:
        with ctx.timed("export"):
            skipped: dict = {}
            written = export_run(run_dir, recipe.export.formats, recipe.export.outtype, skipped=skipped)
            summary["exports"] = {k: str(v) for k, v in written.items()}
            summary["exports_skipped"] = {k: why for k, (why, _) in skipped.items()}
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def training_data(ctx: RunContext, train_problems: list, rollouts: list[dict], selected: dict) -> tuple[list, list, dict]:
    """The sequences to train on, their per-token gates and the gate report, for `ctx.recipe`'s gate/train settings."""
    recipe = ctx.recipe
    seqs = selected["sequences"]
    if recipe.train.objective == "rft":  # baseline: plain CE on every completion token of the correct rollouts
        seqs = rft_sequences(ctx, train_problems, rollouts)
        gates = [np.ones(len(x["completion_ids"]), dtype=bool) for x in seqs]
        gate_report = {"mode": "rft", "tau": 0.0, "tokens": int(sum(g.size for g in gates)), "gated_fraction": 1.0}
        ctx.ui.line(f"rft: {len(seqs)} correct rollouts of {len({x['id'] for x in seqs})} problems, every completion token trained")
    else:
        entropies = run_entropies(ctx, seqs)
        g = recipe.gate
        gates, gate_report = compute_gate(entropies, g.mode, g.tau, g.fraction, recipe.train.random_gate, recipe.seed,
                                          g.select, shared_context(seqs) if g.exclude_shared else None)
        if g.positives == "all":
            gates, gate_report = widen_positives(seqs, gates, gate_report)
        ctx.ui.line(f"gate: tau {gate_report['tau']:.3f} gates {gate_report['gated_fraction']:.1%} of {gate_report['tokens']} "
                    f"completion tokens (the paper's tau {gate_report['paper_tau']} would gate {gate_report['paper_tau_fraction']:.1%})")
    return seqs, gates, gate_report
