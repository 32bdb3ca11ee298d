"""One row per architecture in rmx_local/archs.py: run (torch), then each export checked in its own runtime.

    python benchmarks/architectures.py            # the whole matrix (~1 min on 2 cores; models cached)
    python benchmarks/architectures.py --no-run   # exports only

Columns: `run` = the pipeline end to end on the tiny random model (torch, 6 problems x 4 rollouts, a 25% gate, the
default q/k/v/o targets; the verifier is replaced by one that marks alternate rollouts right, since a random model
answers nothing right: this checks the machinery, not learning), then `rmx-local export --format all`; `base` =
llama.cpp's logits of the base GGUF made by llama.cpp's own converter vs transformers; `gguf` / `mlx` = the LoRA
delta in llama.cpp / mlx-lm vs PyTorch + PEFT (correlation, max |diff| / the delta's own peak; pass: corr >= 0.999
and < 5%); `ollama` = Modelfile written. Tiny models and GGUFs: rmx_local/archcheck.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from rmx_local import archcheck
from rmx_local.verify import Verdict


def _alternate(texts, golds, timeout_s=5.0):
    return [Verdict(correct=i % 2 == 0, parsed="1") for i in range(len(texts))]


def run_row(model: dict, work: Path) -> str:
    """`rmx-local run` on the tiny model, then export all; 'ok (targets; formats)' or the error line."""
    import rmx_local.stages.select as select_stage
    from rmx_local.errors import RmxError
    from rmx_local.export import export_run
    from rmx_local.pipeline import run_pipeline
    from rmx_local.recipe import load_recipe
    from rmx_local.ui import UI

    run = work / f"run-{model['model_type']}"
    recipe = load_recipe(None, [f"model={json.dumps(str(model['hf']))}", f"run_dir={json.dumps(str(run))}",
                                "task.train_size=6", "task.eval_size=2", "rollout.n=4", "rollout.max_tokens=6",
                                "eval.max_tokens=4", "eval.n_samples=0", "train.grad_accum=4", "train.warmup_steps=1",
                                "gate.fraction=0.25", "threads=1", "report=false"])
    saved, select_stage.verify_many = select_stage.verify_many, _alternate
    try:
        with open(work / f"run-{model['model_type']}.log", "w") as log, contextlib.redirect_stdout(log):
            run_pipeline(recipe, UI(rich=False))
            written = export_run(run, "all", "f16", skipped={})
    except RmxError as e:
        return f"error: {e.line()}"
    finally:
        select_stage.verify_many = saved
    targets = json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"]
    return f"ok ({','.join(t.removesuffix('_proj') for t in targets)}; {','.join(written)})"


def fmt(fit) -> str:
    if not isinstance(fit, dict):
        return str(fit)
    mark = "ok" if archcheck.passes(fit) else "FAIL"
    return f"{mark} {fit['corr']:.6f} / {fit['max_abs_diff'] / fit['ref_max_abs']:.1e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-run", action="store_true", help="skip the pipeline column")
    ap.add_argument("--arch", action="append", help="only these model_types (repeatable)")
    args = ap.parse_args(argv)
    names = args.arch or list(archcheck.TINY)
    t0 = time.time()
    models = [archcheck.tiny_model(n) for n in names]
    ggufs = archcheck.convert(models)
    print(f"# architectures: {time.strftime('%Y-%m-%d')}, {platform.machine()} {platform.system()}, "
          f"converter {archcheck.converter().parent.name}")
    print("| model_type | LoRA targets | run (torch) + export all | base: llama.cpp vs HF | GGUF LoRA in llama.cpp "
          "vs PEFT (corr / max diff) | MLX in mlx-lm vs PEFT | Ollama Modelfile |")
    print("|---|---|---|---|---|---|---|")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            work = Path(tmp)
            row = archcheck.check(model, ggufs[model["model_type"]], work)
            run = "-" if args.no_run else run_row(model, work)
            ok = archcheck.passes(row["gguf"]) and archcheck.passes(row["mlx"]) and row["base"]["corr"] > 0.9999
            failed += not ok or run.startswith("error")
            print(f"| {row['arch']} | {row['targets']} | {run} | {row['base']['corr']:.6f} | {fmt(row['gguf'])} | "
                  f"{fmt(row['mlx'])} | {'written' if row.get('ollama') else '-'} |")
    print(f"\n{len(models) - failed} of {len(models)} rows pass ({time.time() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
