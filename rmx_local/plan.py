"""Will it fit, and how long will it take? An estimate of a recipe's peak memory and stage times, before running.

`rmx-local run RECIPE --dry-run` prints it. Inputs: the model's config.json (parameters, vocabulary, layers,
hidden and KV sizes), the recipe's sizes, the prompt length of the task's first problems (tokenized), and a
~0.3 s calibration of this machine (matmul FLOP/s and memory bandwidth on the recipe's device and dtype).

Memory (torch backend; the peak is the largest stage):
  runtime + weights                 RUNTIME_MB + parameters x bytes per parameter (loading adds ~10%)
  sampling (rollouts, evaluation)   KV cache of every decoded row at its own prompt tokens + max_tokens (all rows
                                    can run to the end; the prompts' shared preamble is held once), plus a few
                                    copies of one step's (rows, vocab) logits
  entropy                           one layer's transients over the packed pass (ACT_INFER, measured), its
                                    attention mask, and the chunked full-vocabulary budget
  training                          every layer's activations of one pass (`saved_floats`; the backend cuts a
                                    micro-batch at ACTIVATION_BUDGET_BYTES), the mask, LoRA + Adam, the budget
Time: FLOPs / (calibrated matmul rate x a per-stage efficiency measured on the benchmarked shapes), plus, for
decoding, one read of the weights per step (a step with few rows is bandwidth-bound).

Shortcuts, stated in the printout: completions are assumed to average `ASSUMED_COMPLETION` of max_tokens
(a run folder that already holds rollouts gives the measured mean instead), every training problem is assumed
mixed (an upper bound on entropy and training work), and estimates are for the torch backend. Measured
against real runs in docs/scale.md (within 2x).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rmx_local.archs import Shape
from rmx_local.backends import common_prefix
from rmx_local.backends.torch_backend import ACTIVATION_BUDGET_BYTES, saved_floats
from rmx_local.data import load_problems
from rmx_local.distributed import PARALLEL_STAGES, world
from rmx_local.errors import RmxError
from rmx_local.models import resolve_model
from rmx_local.recipe import Recipe
from rmx_local.tasks import arith_problems, encode_prompts

RUNTIME_MB = 400  # python + torch + transformers + tokenizer, resident before the weights (measured: 370-400)
ACT_INFER = 16  # fp32 bytes per token per (hidden + intermediate) unit alive in a no-grad forward (one layer's)
ASSUMED_COMPLETION = 0.5  # mean completion length / max_tokens when no rollouts exist yet
ASSUMED_PROMPT = 150  # prompt tokens when the task's problems cannot be read (GSM8K-like)
EFFICIENCY = {"sample": 0.5, "entropy": 0.7, "train": 0.35}  # of the calibrated matmul rate: fitted to 35 measured stages (docs/scale.md)
FIT_FRACTION = 0.9  # warn above this share of the machine's memory


@dataclass
class ModelFacts:
    params: int
    vocab: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, cfg) -> "ModelFacts":
        if not isinstance(cfg, dict):
            cfg = cfg.to_dict()
        cfg = cfg.get("text_config") or cfg
        shape = Shape.from_config(cfg)  # the one reading of heads / kv heads / head_dim (rmx_local.archs)
        h, heads, kv, hd = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim
        inter, layers, vocab = shape.intermediate, shape.layers, cfg.get("vocab_size")
        tied = bool(cfg.get("tie_word_embeddings", True))
        per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter + 2 * h
        params = vocab * h * (1 if tied else 2) + layers * per_layer + h
        return cls(params, vocab, layers, h, inter, heads, kv, hd, tied)

    @property
    def embedding_params(self) -> int:
        """The input embeddings and, when untied, the output head."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def layer_params(self) -> int:
        """One decoder layer's parameters (what FSDP shards): the total less the embeddings and the final norm."""
        return (self.params - self.embedding_params - self.hidden) // self.layers

    @property
    def head_flops(self) -> int:
        """FLOPs of one position's logits (the output head)."""
        return 2 * self.vocab * self.hidden

    def flops_per_token(self, context: int, head: bool = True) -> float:
        """Forward FLOPs of one token: every matmul (not the embedding lookup; the output head only where the token's
        logits are computed) + attention."""
        body = self.params - self.embedding_params
        return 2 * body + self.head_flops * head + 4 * self.layers * self.heads * self.head_dim * context

    def kv_bytes_per_token(self, bytes_per: int) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * bytes_per


@dataclass
class Machine:
    flops: float  # matmul FLOP/s at the recipe's dtype
    bandwidth: float  # bytes/s, a large copy
    memory: int  # bytes of RAM (CPU) or VRAM (GPU)
    device: str


def calibrate(device: str, dtype) -> Machine:
    """~0.3 s of work: a square matmul and a large copy on the device."""
    import torch

    n = 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.15:
        a @ b
        sync()
        reps += 1
    flops = 2 * n**3 * reps / (time.perf_counter() - t0)
    big = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    out = torch.empty_like(big)
    out.copy_(big)
    sync()
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.1:
        out.copy_(big)
        sync()
        reps += 1
    bandwidth = 2 * big.numel() * reps / (time.perf_counter() - t0)
    if device == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Machine(flops, bandwidth, memory, device)


@dataclass
class Stage:
    name: str
    peak_bytes: float
    seconds: float
    knob: str  # what to turn down when this stage does not fit
    note: str = ""


def estimate(r: Recipe, m: ModelFacts, machine: Machine, prompt_tokens: int, completion_tokens: float,
             bytes_per: int, chunk_budget: int, shared_tokens: int = 0) -> list[Stage]:
    """Peak memory and time of each stage (see the module docstring for the model); `shared_tokens` of every
    prompt are a common preamble, which the sampler holds once."""
    weights = m.params * bytes_per
    base = RUNTIME_MB * 2**20 + weights
    P, C_max, C = prompt_tokens, r.rollout.max_tokens, completion_tokens
    fraction = C / max(C_max, 1)
    problems = min(r.select.max_problems, r.task.train_size)  # upper bound: every problem mixed
    seqs = problems * r.rollout.n

    def decode(name: str, prompts: int, n: int, max_tokens: int, batch: int, knob: str) -> Stage:
        """`prompts` x `n` rows decoded `batch` at a time."""
        rows_total = prompts * n
        rows = min(batch, rows_total)
        kv = (shared_tokens + rows * (P - shared_tokens + max_tokens)) * m.kv_bytes_per_token(bytes_per)
        logits = 3 * rows * m.vocab * 4  # one step's logits, probabilities and top-p work, fp32
        made = rows_total * max_tokens * fraction
        decode_flops = made * m.flops_per_token(P + max_tokens * fraction / 2)
        # the shared preamble once, then each distinct prompt's own tokens once, logits at its last token only
        prefill_flops = ((shared_tokens + prompts * (P - shared_tokens)) * m.flops_per_token(P / 2, head=False)
                         + prompts * m.head_flops)
        steps = -(-rows_total // rows) * max_tokens  # the longest row of each batch sets its steps
        seconds = (decode_flops / (machine.flops * EFFICIENCY["sample"]) + prefill_flops / (machine.flops * EFFICIENCY["entropy"])
                   + steps * weights / machine.bandwidth)
        return Stage(name, base + kv + logits, seconds, f"{knob}.batch_size (now {batch}) or {knob}.max_tokens")

    def teacher_forced(name: str, per_pass: int, knob: str) -> Stage:
        """One packed pass of `per_pass` sequences; rollouts of one problem share a row when the recipe packs them."""
        grad = name == "train"
        group = min(per_pass, r.rollout.n) if not grad or r.train.group_size > 1 else 1
        rows = -(-per_pass // group)
        length = P + group * C_max  # worst case: every completion at max_tokens
        tokens = rows * length
        if grad:  # every layer's activations of one pass (the backend cuts a micro-batch into passes), LoRA + Adam
            per_token = m.layers * saved_floats(m.hidden, m.intermediate) * bytes_per
            acts = per_token * min(tokens, max(ACTIVATION_BUDGET_BYTES // per_token, P + C_max))
            acts += 4 * r.train.lora_rank * 4 * m.hidden * m.layers * 4
        else:  # one layer's transients at a time
            acts = tokens * (m.hidden + m.intermediate) * ACT_INFER * bytes_per / 4
        mask = rows * length * length * bytes_per  # the packed 4D attention mask
        work = (problems * P + seqs * C) if group > 1 else seqs * (P + C)
        # logits (the head) only at completion positions: the chunked passes skip the prompt
        flops = (work * m.flops_per_token(P + C, head=False) + seqs * C * m.head_flops) \
            * (3 if grad else 1) * (r.train.epochs if grad else 1.0)
        return Stage(name, base + acts + mask + chunk_budget, flops / (machine.flops * EFFICIENCY[name]), knob)

    out = [Stage("load model", base + weights / 10, 2.0 + 4 * weights / machine.bandwidth, "dtype = \"bfloat16\" or a smaller model"),
           decode("rollouts", r.task.train_size, r.rollout.n, C_max, r.rollout.batch_size, "rollout"),
           teacher_forced("entropy", r.gate.batch_size, f"gate.batch_size (now {r.gate.batch_size})"),
           teacher_forced("train", r.train.batch_size,
                          f"rollout.max_tokens (now {C_max}; a training pass holds at least one whole sequence)")]
    e = r.eval
    for label in ("eval base", "eval adapted"):
        parts = [decode(label, r.task.eval_size, n, e.max_tokens, e.batch_size or r.rollout.batch_size, "eval")
                 for n in [1] * e.greedy + [e.n_samples] * bool(e.n_samples)]
        if parts:
            out.append(Stage(label, max(s.peak_bytes for s in parts), sum(s.seconds for s in parts), parts[0].knob))
    return out


def prompt_lengths(r: Recipe, tokenizer) -> tuple[int, int] | None:
    """Mean token length of the task's first prompts, as the pipeline builds them, and the length of their common
    preamble; None when they cannot be read."""
    t = r.task
    try:
        if t.name == "arith":
            problems = arith_problems(t.difficulty, 8, r.seed)
        else:
            problems = load_problems(t.path)[:32]
        _, ids = encode_prompts(tokenizer, [p.question for p in problems], t.template, t.instruction)
    except Exception:  # a data set that is not there yet must not stop a dry run: the caller assumes a length
        return None
    return (round(sum(map(len, ids)) / len(ids)), common_prefix(ids)) if ids else None


def measured_completion(run_dir: str) -> float | None:
    """Mean completion length of the rollouts already in a run folder, if any."""
    path = Path(run_dir) / "rollouts.jsonl"
    if not path.is_file():
        return None
    lengths = [len(c) for line in path.read_text().splitlines() if line.strip() for c in json.loads(line)["completions"]]
    return sum(lengths) / len(lengths) if lengths else None


def plan(r: Recipe, hf_path: str, machine: Machine | None = None) -> tuple[list[Stage], dict]:
    """Stages and the assumptions they rest on, for the model folder (or hub id) `hf_path`."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from rmx_local.backends.torch_backend import pick_device, pick_dtype
    from rmx_local.backends.torch_vocab import LOGITS_BUDGET_BYTES

    facts = ModelFacts.from_config(AutoConfig.from_pretrained(hf_path, trust_remote_code=r.trust_remote_code))
    device = pick_device(r.device)
    dtype = pick_dtype(r.dtype, device)
    if r.threads:
        torch.set_num_threads(r.threads)
    machine = machine or calibrate(device if device in ("cpu", "cuda") else "cpu", dtype)
    tokenizer = AutoTokenizer.from_pretrained(hf_path, trust_remote_code=r.trust_remote_code)
    P, shared = prompt_lengths(r, tokenizer) or (ASSUMED_PROMPT, 0)
    measured = measured_completion(r.run_dir)
    C = measured if measured is not None else ASSUMED_COMPLETION * r.rollout.max_tokens
    stages = estimate(r, facts, machine, P, C, torch.finfo(dtype).bits // 8, LOGITS_BUDGET_BYTES, shared)
    facts_out = {"params": facts.params, "device": device, "dtype": str(dtype).removeprefix("torch."), "prompt_tokens": P,
                 "completion_tokens": C, "completion_measured": measured is not None, "machine": machine,
                 "layers": facts.layers, "layer_bytes": facts.layer_params * (torch.finfo(dtype).bits // 8)}
    return stages, facts_out


def verdict(stages: list[Stage], memory: int) -> str | None:
    """A warning naming the knob of the stage that does not fit, or None."""
    worst = max(stages, key=lambda s: s.peak_bytes)
    if worst.peak_bytes <= FIT_FRACTION * memory:
        return None
    return (f"will not fit: {worst.name} needs ~{worst.peak_bytes / 2**30:.1f} GB of {memory / 2**30:.0f} GB; "
            f"lower {worst.knob}")


def per_rank(stages: list[Stage], ranks: int) -> list[float]:
    """Each stage's seconds under torchrun with `ranks` processes, one device each: the data-parallel stages'
    work split evenly (`distributed.PARALLEL_STAGES`), the rest on rank 0 while the others wait. Memory per rank
    is the one-process peak (every rank holds the whole model), or `sharded_peaks` with fsdp = true. Shortcut:
    communication is not counted (one all-reduce of the LoRA gradients per step, one gather of entropies per batch
    round)."""
    return [s.seconds / ranks if s.name in PARALLEL_STAGES else s.seconds for s in stages]


def sharded_peaks(stages: list[Stage], ranks: int, layers: int, layer_bytes: int) -> list[float]:
    """Each stage's peak bytes per rank with `fsdp = true`: the decoder layers' weights held 1/ranks each, plus, in
    the stages that run the model (`PARALLEL_STAGES`), two layers gathered whole at a time (FSDP frees a layer after
    its forward and gathers it again for backward; the next one may be in flight). Embeddings, head, LoRA and Adam
    stay whole on every rank. Rollouts then come from servers: their row is the servers' cost, not a rank's."""
    saved = layers * layer_bytes * (1 - 1 / ranks)
    return [s.peak_bytes - saved + (2 * layer_bytes if s.name in PARALLEL_STAGES else 0) for s in stages]


def print_plan(r: Recipe, ui) -> None:
    """The estimate table, or one line saying why there is none (the dry run itself still succeeds)."""
    try:
        stages, f = plan(r, resolve_model(r.model).hf_path)
    except (RmxError, OSError, ValueError, KeyError, TypeError) as e:
        ui.line(f"estimate: none ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        return
    m: Machine = f["machine"]
    where = "VRAM" if m.device == "cuda" else "RAM"
    basis = "measured from the run folder" if f["completion_measured"] else f"assumed {ASSUMED_COMPLETION:.0%} of max_tokens"
    rows = [[s.name, f"{s.peak_bytes / 2**30:.2f}", _duration(s.seconds)] for s in stages]
    rows.append(["whole run", f"{max(s.peak_bytes for s in stages) / 2**30:.2f}", _duration(sum(s.seconds for s in stages))])
    columns = ["stage", "peak GB", "time"]
    ranks = world()
    if ranks > 1:  # `WORLD_SIZE=N rmx-local run R --dry-run`, or the dry run under torchrun
        times = per_rank(stages, ranks)
        for row, t in zip(rows, times + [sum(times)]):
            row.append(_duration(t))
        columns.append(f"time, {ranks} ranks")
        if r.fsdp:
            peaks = sharded_peaks(stages, ranks, f["layers"], f["layer_bytes"])
            for row, peak in zip(rows, peaks + [max(peaks)]):
                row.append(f"{peak / 2**30:.2f}")
            columns.append("peak GB per rank, fsdp")
            stages = [Stage(s.name, peak, s.seconds, s.knob) for s, peak in zip(stages, peaks)]  # what must fit
    ui.table(f"estimate: {f['params'] / 1e6:,.0f}M parameters, {f['device']} {f['dtype']}, {m.memory / 2**30:.0f} GB {where}",
             columns, rows)
    ui.line(f"basis: this machine {m.flops / 1e9:,.0f} GFLOP/s (matmul), {m.bandwidth / 1e9:,.1f} GB/s; prompts ~{f['prompt_tokens']} "
            f"tokens; completions ~{f['completion_tokens']:.0f} tokens ({basis}); every training problem assumed mixed")
    warning = verdict(stages, m.memory)
    ui.line(f"warning: {warning}" if warning else f"fits: peak ~{max(s.peak_bytes for s in stages) / 2**30:.1f} GB of "
            f"{m.memory / 2**30:.0f} GB {where}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
