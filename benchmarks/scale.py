"""How big a model can I use? Sampling, entropy scoring and training speed and peak memory at real model shapes.

    python benchmarks/scale.py [--models qwen2.5-0.5b,qwen2.5-1.5b] [--dtypes float32,bfloat16] [--quick]
    python benchmarks/scale.py --long-train qwen2.5-1.5b --completion 1000      # one paper-length training step
    python benchmarks/scale.py --device cuda --dtypes bfloat16 --models qwen2.5-0.5b,qwen2.5-1.5b --gpu-peak h100
    python benchmarks/scale.py --models gemma-3-270m --dtypes float32 --threads 1 --batches 64 --cpu-peak auto

Models are built in code from the configurations of real checkpoints (the shapes and vocabulary sizes below;
nothing is downloaded) with random weights, so the numbers are speed and memory, never quality. Random
weights almost never emit EOS, so every sampled row runs to `--new-tokens`: the tokens counted are the
tokens made. Each measurement runs in its own subprocess, so its peak resident set (VmHWM; on CUDA also
torch's peak allocation) belongs to that stage alone, weights and runtime included.

Stages, all through `TorchBackend` (what `rmx-local run` uses):
  sample   generate `--new-tokens` tokens for B rows of a 64-token prompt (8 rows per distinct prompt), tok/s of
           tokens made, for each batch size in `--batches`
  entropy  teacher-forced entropies of 8 rollouts of one 64-token prompt (packed), tok/s of sequence tokens
  train    one LoRA r32 q/k/v/o micro-batch of the same 8 rollouts (forward with the adapter off and on, backward,
           AdamW step), tok/s of sequence tokens; `--long-train` runs one sequence of `--completion` tokens
With `--gpu-peak` (a name from GPU_BF16_TFLOPS or a number in TFLOP/s) each rate is also shown against the GPU's
bound: 2 x parameters FLOPs per token (6 x for training) at that peak. `--cpu-peak auto` does the same against this
CPU's bound on `--threads` threads: the best of five 2048 x 2048 matmuls in each dtype (`cpu_peak_tflops`), printed;
the ratio is then of tokens per process CPU second per thread (a shared machine's wall clock includes waiting).
FLOPs per token (`flops_per_token`, printed): 2 x the decoder's matmul parameters for every token, plus 2 x the
output head's where the head is applied (every sampled token; in entropy and training only the completion
positions: the prompt never reaches the vocabulary), 3 x that for a training step. Shortcuts of the bound: the
embedding lookup is free (a tied embedding counts once, as the head); attention's score FLOPs, the softmax and
entropy over the vocabulary and the optimizer are not counted, and a LoRA step (adapter-off forward, adapter-on
forward, input-gradient backward) is charged the dense 3 x forward. The sample stage's rate also pays for work its
bound leaves out: the prefill of each distinct prompt (`PROMPT` tokens of decoder FLOPs; Gemma 3 270M, 8 rows a
prompt, 16 new tokens: 19% more FLOPs than counted) and the draw, which on random weights is a multinomial over
the whole vocabulary (top_p = 1) where a trained model's top-p ranks only the top 64 (torch_sampling.HEAD); so
its ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The configurations of the real checkpoints (config.json of each), reduced to what fixes cost and memory.
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0),
    "gemma-3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                         tie_word_embeddings=True, sliding_window=512, query_pre_attn_scalar=256),
}
GPU_BF16_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "l40s": 362.0, "l4": 121.0, "a10g": 125.0,
                   "rtx4090": 165.0, "rtx3090": 71.0, "t4": 65.0}  # dense bf16 (fp16 for t4) tensor-core peaks
PROMPT = 64
GROUP = 8  # rollouts per prompt in the entropy and training stages


def build_model(shape: str, dtype: str, device: str):
    """A random-weight causal LM of the named shape, built without a download."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=2, **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model


class Tokenizer:
    """The two ids TorchBackend reads from a tokenizer; the benchmark feeds token ids directly."""

    eos_token_id = 2
    pad_token_id = 2


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_guard(limit_gb: float) -> None:
    """Exit this process (code 3) as soon as its resident set passes `limit_gb`: a shared machine stays up."""
    import threading

    def watch():
        while True:
            rss = status_mb("VmRSS") / 1024
            if rss > limit_gb:
                print(f"rss guard: {rss:.1f} GB > {limit_gb} GB, stopping", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def measure_one(shape: str, stage: str, dtype: str, device: str, batch: int, new_tokens: int, completion: int,
                threads: int) -> dict:
    """One stage in this (fresh) process; returns rates and memory."""
    import numpy as np
    import torch

    from rmx_local.backends import SampleParams, TrainExample
    from rmx_local.backends.torch_backend import TorchBackend

    if threads:
        torch.set_num_threads(threads)
    model = build_model(shape, dtype, device)
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    body = params - head.numel() - (0 if head is embed else embed.numel())  # the decoder's matmul parameters
    backend = TorchBackend(model, Tokenizer(), device, batch_size=max(batch, 1), model_name=shape)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompts = [rng.integers(3, vocab, PROMPT).tolist() for _ in range(max(1, batch // GROUP))]
    loaded_mb = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the stage, not the random initialisation
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        return out, time.perf_counter() - t0, time.process_time() - c0

    if stage == "sample":
        # top_p = 1: random weights give near-uniform distributions, where top-p sorts the whole vocabulary every
        # step; a trained model's top-64 tokens hold the mass and take the cheap path (torch_sampling.HEAD)
        sp = SampleParams(n=batch // len(prompts), temperature=0.6, top_p=1.0, max_tokens=new_tokens, seed=0)
        backend.generate(prompts[:1], SampleParams(1, 0.6, 1.0, 2, 0))  # warm-up (first-call allocations), not timed
        out, wall, cpu = timed(lambda: backend.generate(prompts, sp))
        tokens = sum(len(c) for o in out for c in o)
        flops = 2 * (body + head.numel()) * tokens
    else:
        seqs = [(prompts[0] + rng.integers(3, vocab, completion).tolist(), PROMPT) for _ in range(batch)]
        tokens = sum(len(t) for t, _ in seqs)
        flops = (6 if stage == "train" else 2) * (body * tokens + head.numel() * completion * batch)
        if stage == "entropy":
            backend.entropies(seqs[:1])  # warm-up (first-call allocations), not timed
            _, wall, cpu = timed(lambda: backend.entropies(seqs))
        else:
            backend.init_lora(32, 64.0, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=0)
            examples = [TrainExample(t, p, rng.random(len(t) - p) < 0.2, float(rng.normal())) for t, p in seqs]

            def step(batch=examples):
                backend.accumulate(batch, 0.2, 0.0, 1.0)
                return backend.step(1e-4, 0.0, 1.0)

            step(examples[:1])  # warm-up (first-call allocations, the optimizer's state), not timed
            _, wall, cpu = timed(step)
    row = {"shape": shape, "stage": stage, "dtype": dtype, "device": device, "batch": batch, "params_m": params / 1e6,
           "tokens": tokens, "flops_per_token": flops / tokens, "tok_s": tokens / wall, "wall_s": wall, "cpu_s": cpu, "loaded_mb": loaded_mb,
           "peak_mb": status_mb("VmHWM"), "threads": threads}
    if device == "cuda":
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def run_child(args, shape: str, stage: str, dtype: str, batch: int, completion: int) -> dict:
    cmd = [sys.executable, __file__, "--child", shape, stage, dtype, str(batch), str(completion),
           "--device", args.device, "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
           "--max-rss-gb", str(args.max_rss_gb)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"shape": shape, "stage": stage, "dtype": dtype, "batch": batch, "error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_peak_tflops(spec: str) -> float:
    """`auto` (the CUDA device's name matched against GPU_BF16_TFLOPS), a name from it, or a number of TFLOP/s."""
    if spec == "auto":
        import torch

        spec = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
        name = spec.lower().replace(" ", "").replace("-", "")
        match = next((k for k in GPU_BF16_TFLOPS if k in name), None)
        if match is None:
            sys.exit(f"--gpu-peak auto: no peak known for {spec or 'this machine (no CUDA device)'}; pass TFLOP/s")
        return GPU_BF16_TFLOPS[match]
    if spec.lower() in GPU_BF16_TFLOPS:
        return GPU_BF16_TFLOPS[spec.lower()]
    try:
        return float(spec)
    except ValueError:
        sys.exit(f"--gpu-peak {spec}: not one of {', '.join(GPU_BF16_TFLOPS)}, `auto`, or a number")


def cpu_peak_tflops(dtype: str, threads: int) -> float:
    """This CPU's matmul peak in `dtype` on `threads` threads: the best of five 2048 x 2048 products, TFLOP/s."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048, dtype=getattr(torch, dtype)), torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    a @ b  # warm-up
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e12


def bound_tok_s(row: dict, peak_tflops: float) -> float:
    """Tokens/s at the device's peak: the row's FLOPs per token (rows written before it: 2 x params, 6 x to train)."""
    flops = row.get("flops_per_token") or (6 if row["stage"] == "train" else 2) * row["params_m"] * 1e6
    return peak_tflops * 1e12 / flops


def peak_tflops_of(row: dict, peak_tflops: float | dict) -> float:
    return peak_tflops[row["dtype"]] if isinstance(peak_tflops, dict) else peak_tflops


def print_table(rows: list[dict], peak_tflops: float | dict | None) -> None:
    """`peak_tflops`: one GPU peak, or a CPU peak per dtype (`cpu_peak_tflops`)."""
    head = f"{'model':<14}{'params':>8} {'dtype':<9}{'stage':<14}{'tok/s':>9}{'cpu s':>8}{'loaded MB':>11}{'peak MB':>9}"
    gpu = any(r.get("device") == "cuda" for r in rows)
    if peak_tflops:
        head += (f"{'GPU MB':>9}" if gpu else f"{'tok/CPU s':>10}") + f"{'GFLOP/tok':>10}{'bound tok/s':>13}{'of bound':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        stage = f"{r['stage']} b{r['batch']}" if r["stage"] == "sample" else f"{r['stage']} {r['batch']}x{r.get('tokens', 0) // max(r['batch'], 1)}"
        if "error" in r:
            print(f"{r['shape']:<14}{'':>8} {r['dtype']:<9}{stage:<14} failed: {r['error'][:80]}")
            continue
        line = (f"{r['shape']:<14}{r['params_m']:>7.0f}M {r['dtype']:<9}{stage:<14}{r['tok_s']:>9.1f}{r['cpu_s']:>8.1f}"
                f"{r['loaded_mb']:>11,.0f}{r['peak_mb']:>9,.0f}")
        if peak_tflops:
            bound = bound_tok_s(r, peak_tflops_of(r, peak_tflops))
            # on a CPU the rate per process CPU second (per thread), the fair clock on a shared machine
            rate = r["tok_s"] if gpu else r["tokens"] / r["cpu_s"] / (r.get("threads") or 1)
            line += (f"{r.get('cuda_peak_mb', float('nan')):>9,.0f}" if gpu else f"{rate:>10.1f}") + \
                f"{peak_tflops_of(r, peak_tflops) * 1e3 / bound:>10.2f}{bound:>13,.0f}{rate / bound:>10.1%}"
        print(line)


def plan_check(rows: list[dict], device: str, threads: int = 0) -> None:
    """The dry-run planner's estimate of each measured stage (same shape, same work) next to the measurement;
    the planner calibrates on as many threads as the measurements ran on."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from rmx_local.backends.torch_vocab import LOGITS_BUDGET_BYTES
    from rmx_local.plan import ModelFacts, calibrate, estimate
    from rmx_local.recipe import load_recipe

    print(f"\n{'model':<14}{'dtype':<10}{'stage':<14}{'est. MB':>9}{'meas. MB':>10}{'est. s':>9}{'meas. s':>9}")
    machines = {}
    for r in rows:
        if "error" in r:
            continue
        facts = ModelFacts.from_config(SHAPES[r["shape"]])
        dtype = getattr(torch, r["dtype"])
        machine = machines.setdefault(r["dtype"], calibrate(device, dtype))
        tokens = r["tokens"] // r["batch"] - PROMPT if r["stage"] != "sample" else r["tokens"] // r["batch"]
        groups = max(1, r["batch"] // GROUP)
        recipe = load_recipe(None, [f"rollout.n={r['batch'] // groups}", f"task.train_size={groups}", f"rollout.max_tokens={tokens}",
                                    f"rollout.batch_size={r['batch']}", f"gate.batch_size={r['batch']}", f"train.batch_size={r['batch']}",
                                    f"train.group_size={r['batch']}", f"select.max_problems={groups}"])
        stage = {"sample": "rollouts"}.get(r["stage"], r["stage"])
        est = {s.name: s for s in estimate(recipe, facts, machine, PROMPT, tokens, dtype.itemsize, LOGITS_BUDGET_BYTES)}[stage]
        label = f"{r['stage']} b{r['batch']}" if r["stage"] == "sample" else r["stage"]
        print(f"{r['shape']:<14}{r['dtype']:<10}{label:<14}{est.peak_bytes / 2**20:>9,.0f}{r['peak_mb']:>10,.0f}"
              f"{est.seconds:>9.1f}{r['wall_s']:>9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, from: {', '.join(SHAPES)}")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", default="1,16,64", help="sampling batch sizes")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens sampled per row")
    ap.add_argument("--completion", type=int, default=64, help="completion tokens per rollout (entropy, training)")
    ap.add_argument("--stages", default="sample,entropy,train")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="smallest workload: batch 8, 4 new tokens, 16-token completions")
    ap.add_argument("--long-train", metavar="MODEL", help="only one training step of MODEL at --completion tokens")
    ap.add_argument("--gpu-peak", help="GPU bf16 peak for the bound column: auto, a name from GPU_BF16_TFLOPS, or TFLOP/s")
    ap.add_argument("--cpu-peak", choices=["auto"], help="bound column against this CPU's measured matmul peak")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--max-rss-gb", type=float, default=0, help="stop a measurement whose RSS passes this (0 = no limit)")
    ap.add_argument("--plan-check", action="store_true", help="print the dry-run planner's estimate beside each measurement")
    ap.add_argument("--from-json", help="reuse the rows of an earlier --json run instead of measuring")
    ap.add_argument("--dry", action="store_true", help="print the measurements that would run, run nothing")
    ap.add_argument("--child", nargs=5, metavar=("MODEL", "STAGE", "DTYPE", "BATCH", "COMPLETION"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        if args.max_rss_gb:
            rss_guard(args.max_rss_gb)
        shape, stage, dtype, batch, completion = args.child
        print(json.dumps(measure_one(shape, stage, dtype, args.device, int(batch), args.new_tokens, int(completion),
                                     args.threads)))
        return
    if args.quick:
        args.batches, args.new_tokens, args.completion = "8", 4, 16
    models = [args.long_train] if args.long_train else args.models.split(",")
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        sys.exit(f"unknown model shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    plan = []
    for shape in models:
        for dtype in args.dtypes.split(","):
            if args.long_train:
                plan.append((shape, "train", dtype, 1, args.completion))  # the paper's micro-batch: one sequence
                continue
            for stage in args.stages.split(","):
                batches = [int(b) for b in args.batches.split(",")] if stage == "sample" else [GROUP]
                plan += [(shape, stage, dtype, b, args.completion) for b in batches]
    if args.dry:
        for p in plan:
            print(" ".join(map(str, p)))
        return
    peak = gpu_peak_tflops(args.gpu_peak) if args.gpu_peak else None
    if args.cpu_peak and not args.threads:
        sys.exit("--cpu-peak needs --threads N (the bound is per thread count)")
    if args.cpu_peak:
        peak = {d: cpu_peak_tflops(d, args.threads) for d in args.dtypes.split(",")}
        print("# CPU bound assumed: " + ", ".join(f"{d} {t * 1e3:.1f} GFLOP/s (best 2048^3 matmul, {args.threads or 'default'} "
                                                   f"threads)" for d, t in peak.items()) + "; FLOPs per token: see the GFLOP/tok column "
              "(the docstring says what it counts)")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.uname().nodename} device={args.device} threads={args.threads or 'default'}"
          f" prompt={PROMPT} new_tokens={args.new_tokens} completion={args.completion} x {GROUP} rollouts", flush=True)
    rows = json.loads(Path(args.from_json).read_text()) if args.from_json else []
    for p in plan if not args.from_json else []:
        rows.append(run_child(args, *p))
        r = rows[-1]
        print(f"  {p[0]} {p[2]} {p[1]} b{p[3]}: " + (r["error"] if "error" in r else f"{r['tok_s']:.1f} tok/s, peak {r['peak_mb']:,.0f} MB"),
              flush=True)
    print()
    print_table(rows, peak)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plan_check:
        plan_check(rows, args.device, args.threads)


if __name__ == "__main__":
    main()
