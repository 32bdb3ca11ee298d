"""Torch vs MLX backend on one small workload: rollouts, entropy scoring and LoRA training, side by side.

    python benchmarks/backends.py             # default size: ~5 min on 2 busy Linux CPU cores
    python benchmarks/backends.py --quick     # about half that: 8-token completions, 1-example batches

On Apple Silicon (runs unchanged): `pip install -e ".[mlx]"` (mlx, mlx-lm), then the same command. Torch
takes device "auto" (MPS there) and MLX its default device (the Metal GPU); `--device cpu` compares both on
CPU. A bigger, more telling run there: `--prompts 16 --n 4 --max-tokens 128 --steps 20 --batch-size 64`.

Workload (defaults): the embedded SmolLM2-135M-Instruct, `--prompts` two-number additions as chat prompts,
`--n` sampled completions each (T 0.6, top-p 0.95, `--max-tokens`), teacher-forced entropies of those
sequences, then `--steps` optimizer steps of `--train-batch` synthetic TrainExamples: the first backend's
rollouts, gated at their top 20% entropy, advantage +1 if the completion contains the right sum else -1.
Every backend trains on that same data, in the same order, from the same initial LoRA adapter (the first
backend's init, set into the others), so the loss curves must track each other (fp32 noise only).

Each backend runs in its own subprocess, so "peak RSS" is that backend's own high-water mark (model, caches,
training). Throughput: rollout = completion tokens generated per second (prefill included); entropy =
sequence tokens (prompt + completion) scored per second; training = sequence tokens per second through
base forward + adapted forward + backward + AdamW. A warm-up generate is excluded from the timings;
model loading is reported separately. On a shared machine the numbers are noisy: compare orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if platform.system() == "Darwin" else kib / 2**10  # bytes on macOS, KiB on Linux


def arithmetic_prompts(tokenizer, count: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    prompts, answers = [], []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(10, 90, size=2))
        messages = [{"role": "user", "content": f"What is {a} + {b}? Answer with the number."}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
        answers.append(a + b)
    return prompts, answers


def build_train_set(backend, prompts, answers, rollouts, entropies) -> list[dict]:
    examples, k = [], 0
    for prompt, answer, completions in zip(prompts, answers, rollouts):
        for completion in completions:
            ent = entropies[k]
            k += 1
            if len(completion) < 2:
                continue
            numbers = re.findall(r"-?\d+", backend.tokenizer.decode(completion))
            gate = ent >= np.quantile(ent, 0.8)
            examples.append({"tokens": prompt + completion, "prompt_len": len(prompt), "gate": gate.tolist(),
                             "advantage": 1.0 if str(answer) in numbers else -1.0})
    return examples


def worker(args) -> dict:
    from rmx_local.adapter import load_peft, save_peft
    from rmx_local.backends import SampleParams, TrainExample, load_backend
    from rmx_local.models import resolve_model
    from rmx_local.recipe import Recipe

    work = Path(args.workdir)
    recipe = Recipe(backend=args.worker, device=args.device, seed=args.seed)
    recipe.rollout.batch_size = args.batch_size
    t0 = time.perf_counter()
    backend = load_backend(recipe, resolve_model(args.model))
    out = {"backend": args.worker, "load_s": time.perf_counter() - t0, "device": describe_device(backend)}

    prompts, answers = arithmetic_prompts(backend.tokenizer, args.prompts, args.seed)
    backend.generate(prompts[:1], SampleParams(1, 0.0, 1.0, 2, args.seed))  # warm-up (compile, allocator)
    params = SampleParams(args.n, 0.6, 0.95, args.max_tokens, args.seed)
    t0 = time.perf_counter()
    rollouts = backend.generate(prompts, params)
    dt = time.perf_counter() - t0
    generated = sum(len(c) for cs in rollouts for c in cs)
    out.update(rollout_tokens=generated, rollout_tok_s=generated / dt)

    sequences = [(p + c, len(p)) for p, cs in zip(prompts, rollouts) for c in cs]
    t0 = time.perf_counter()
    entropies = backend.entropies(sequences)
    dt = time.perf_counter() - t0
    scored = sum(len(s) for s, _ in sequences)
    out.update(entropy_tokens=scored, entropy_tok_s=scored / dt,
               mean_entropy=float(np.mean(np.concatenate([e for e in entropies if e.size]))))

    data_file, adapter_dir = work / "train_set.json", work / "init_adapter"
    backend.init_lora(args.rank, 2.0 * args.rank, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"], args.seed)
    if data_file.exists():
        data = json.loads(data_file.read_text())
        backend.set_adapter(load_peft(adapter_dir))
        out["train_data"] = f"from {data['source']}"
    else:
        data = {"source": args.worker, "examples": build_train_set(backend, prompts, answers, rollouts, entropies)}
        data_file.write_text(json.dumps(data))
        save_peft(backend.get_adapter(), adapter_dir)
        out["train_data"] = "own rollouts"
    examples = [TrainExample(e["tokens"], e["prompt_len"], np.array(e["gate"], dtype=bool), e["advantage"])
                for e in data["examples"]]
    if not examples:
        raise SystemExit("no rollout had >= 2 completion tokens; raise --max-tokens")

    losses, norms, tokens = [], [], 0
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = [examples[(step * args.train_batch + i) % len(examples)] for i in range(args.train_batch)]
        metrics = backend.accumulate(batch, kl_coef=0.2, negative_ce_cap=0.0, scale=1.0)
        norms.append(backend.step(lr=args.lr, weight_decay=0.0, grad_clip=1.0))
        losses.append(metrics["loss"])
        tokens += sum(len(e.tokens) for e in batch)
    dt = time.perf_counter() - t0
    out.update(train_tokens=tokens, train_tok_s=tokens / dt, losses=losses, grad_norms=norms,
               examples=len(examples), peak_rss_mib=peak_rss_mib(), accel_peak_mib=accel_peak_mib(args.worker))
    return out


def describe_device(backend) -> str:
    if backend.name == "mlx":
        import mlx.core as mx

        return str(mx.default_device())
    return backend.device


def accel_peak_mib(name: str) -> float | None:
    """Peak accelerator memory where the framework reports it (MLX allocator; CUDA). RSS may not include it."""
    if name == "mlx":
        import mlx.core as mx

        return mx.get_peak_memory() / 2**20
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def report(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="backends on the same workload", title_justify="left")
    table.add_column("metric")
    for r in results:
        table.add_column(f"{r['backend']} ({r.get('device', '?')})", justify="right")

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    rows = [("load (s)", "load_s", ".1f"), ("rollout tok/s", "rollout_tok_s", ".1f"),
            ("  tokens generated", "rollout_tokens", "d"), ("entropy tok/s", "entropy_tok_s", ".1f"),
            ("  tokens scored", "entropy_tokens", "d"), ("  mean entropy (nats)", "mean_entropy", ".3f"),
            ("training tok/s", "train_tok_s", ".1f"), ("  tokens trained", "train_tokens", "d"),
            ("peak RSS (MiB)", "peak_rss_mib", ".0f"), ("accelerator peak (MiB)", "accel_peak_mib", ".0f")]
    for label, key, spec in rows:
        table.add_row(label, *[r.get("error", "") if "error" in r else fmt(r.get(key), spec) for r in results])
    console.print(table)

    ok = [r for r in results if "losses" in r]
    if not ok:
        return
    source = next((r["backend"] for r in ok if r["train_data"] == "own rollouts"), "?")
    curves = Table(title=f"loss per step (same init adapter, same data order; data and init from {source})",
                   title_justify="left")
    curves.add_column("step", justify="right")
    for r in ok:
        curves.add_column(f"{r['backend']} loss", justify="right")
    if len(ok) == 2:
        curves.add_column("|diff|", justify="right")
    for i in range(len(ok[0]["losses"])):
        values = [r["losses"][i] for r in ok]
        extra = [f"{abs(values[0] - values[1]):.2e}"] if len(ok) == 2 else []
        curves.add_row(str(i + 1), *[f"{v:.6f}" for v in values], *extra)
    console.print(curves)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,mlx")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="8-token completions, 2 steps of 1 example")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.max_tokens, args.steps, args.train_batch = 8, 2, 1

    if args.worker:
        print(json.dumps(worker(args)))
        return

    forwarded = sys.argv[1:]  # the worker parses the same flags (--quick included)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.backends.split(","):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, *forwarded, "--worker", name, "--workdir", work]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines:
                results.append(json.loads(lines[-1]))
            else:
                err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                print(f"{name}: {err}", file=sys.stderr)
                results.append({"backend": name, "error": err[:40]})
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
