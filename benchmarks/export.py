"""Export benchmark on the embedded SmolLM2-135M: per format, file size, write time, load time in its runtime,
and how well the runtime's logits delta (adapted - base) agrees with PyTorch + PEFT's.

    python benchmarks/export.py [--rank 8] [--json out.json]

A random LoRA on all 7 projections of all 30 blocks (B ~ N(0, 0.02)) is used, so the delta is visible.
GGUF adapters are measured on an F32 copy of the base (tight check) and on the shipped Q4_1 base, where
llama.cpp's activation quantization adds noise. Ollama itself is not run (it serves the same GGUF adapter).
"load" is the time to load base + adapter in the runtime (for PEFT: wrapping the already loaded base);
"write" is the exporter's time. Timings depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from rmx_local.adapter import save_peft  # noqa: E402
from rmx_local.export import OUTTYPES, write_gguf_adapter, write_mlx_adapter  # noqa: E402
from rmx_local.export.check import logit_agreement, base_setup, peft_logits, random_adapter  # noqa: E402


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def peft_load_seconds(hf_path: str, folder: Path) -> float:
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(model, str(folder))
    return time.perf_counter() - start


def run(rank: int, console: Console) -> list[dict]:
    setup = base_setup()
    adapter = random_adapter(setup["model_config"], setup["architecture"], setup["spec"], rank=rank, alpha=2.0 * rank)
    tokens = setup["tokens"]
    console.print(f"base {setup['spec']} ({setup['architecture']}, {setup['model_config']}), "
                  f"rank {rank}, {len(adapter.weights)} modules, {len(tokens)} probe tokens")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="rmx-export-bench-"))
    with console.status("PyTorch + PEFT reference"):
        base, adapted = peft_logits(setup["hf_path"], adapter, tokens)
        ref = adapted - base
        folder, write_s = timed(save_peft, adapter, tmp / "peft")
        rows.append({"format": "peft", "runtime": "transformers+peft", "bytes": size(folder), "write_s": write_s,
                     "load_s": peft_load_seconds(setup["hf_path"], folder), "corr": 1.0, "max_abs_diff": 0.0,
                     "rms_diff": 0.0, "note": f"reference: Δ logits max {abs(ref).max():.2f}, rms {(ref ** 2).mean() ** 0.5:.3f}"})
    try:
        import llama_cpp  # noqa: F401

        from rmx_local.export.check import llama_cpp_logits
        from rmx_local.export.gguf_base import f32_base_gguf

        with console.status("llama.cpp"):
            bases = {"F32 base": str(f32_base_gguf(setup["gguf_path"])), "Q4_1 base": setup["gguf_path"]}
            base_logits = {k: llama_cpp_logits(p, None, tokens)[0] for k, p in bases.items()}
            for outtype in OUTTYPES:
                path, write_s = timed(write_gguf_adapter, adapter, tmp / f"adapter-{outtype}.gguf", outtype)
                for label, base_path in bases.items():
                    logits, load_s = llama_cpp_logits(base_path, path, tokens)
                    fit = logit_agreement(logits - base_logits[label], ref)
                    rows.append({"format": f"gguf {outtype}", "runtime": f"llama.cpp, {label}", "bytes": size(path),
                                 "write_s": write_s, "load_s": load_s, **fit, "note": ""})
    except ImportError:
        rows.append({"format": "gguf", "runtime": "llama.cpp", "note": "llama-cpp-python not installed"})
    try:
        import mlx_lm  # noqa: F401

        from rmx_local.export.check import mlx_logits

        with console.status("mlx-lm"):
            folder, write_s = timed(write_mlx_adapter, adapter, tmp / "mlx")
            base_mlx, _ = mlx_logits(setup["hf_path"], None, tokens)
            logits, load_s = mlx_logits(setup["hf_path"], folder, tokens)
            rows.append({"format": "mlx", "runtime": "mlx-lm (CPU)", "bytes": size(folder), "write_s": write_s,
                         "load_s": load_s, **logit_agreement(logits - base_mlx, ref), "note": ""})
    except ImportError:
        rows.append({"format": "mlx", "runtime": "mlx-lm", "note": "mlx-lm not installed"})
    from rmx_local.export.ollama import write_ollama

    gguf_path = write_gguf_adapter(adapter, tmp / "adapter.gguf", "f16")
    folder, write_s = timed(write_ollama, gguf_path, setup["gguf_path"], tmp / "ollama")
    rows.append({"format": "ollama", "runtime": "(not run)", "bytes": size(folder), "write_s": write_s,
                 "note": "Modelfile + f16 GGUF adapter; base by path"})
    return rows


def table(rows: list[dict]) -> Table:
    t = Table(title="rmx-local export: size, speed, and logits-delta agreement with PyTorch + PEFT")
    numeric = ("size", "write", "load", "corr", "max |Δ diff|", "rms Δ diff")
    for col in ("format", "runtime", *numeric, "note"):
        t.add_column(col, justify="right" if col in numeric else "left")
    fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
    for r in rows:
        t.add_row(r["format"], r.get("runtime", ""), fmt(r.get("bytes") and r["bytes"] / 1e6, "{:.2f} MB"),
                  fmt(r.get("write_s"), "{:.3f} s"), fmt(r.get("load_s"), "{:.2f} s"), fmt(r.get("corr"), "{:.6f}"),
                  fmt(r.get("max_abs_diff"), "{:.4f}"), fmt(r.get("rms_diff"), "{:.4f}"), r.get("note", ""))
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    console = Console() if sys.stdout.isatty() else Console(width=170)
    rows = run(args.rank, console)
    console.print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
