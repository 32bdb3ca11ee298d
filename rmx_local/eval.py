"""`rmx-local eval TARGET... --data SPEC...`: score base models and adapters on any math data, in torch or
llama.cpp, with paired statistics.

  run_eval(target_specs, options, ui) -> summary dict;  print_report(ui, summary)
Targets come from `rmx_local.targets`, problems from `rmx_local.data`, the scorer and its statistics from
`rmx_local.scoring` (accuracy ± SE, pass@k, maj@k, paired differences, KL: defined there).

Statistics (shortcuts stated):
  - One decoding mode per call: greedy (default), or `--n-samples k` (k > 1) sampled at `--temperature`/`--top-p`.
  - Every target after the first is compared with the first on the same data and runtime, problem by problem
    (`scoring.paired`).
  - Both runtimes in one call: agreement = fraction of problems whose first completion parsed to the same
    answer in torch and in llama.cpp (and the fraction with the same verdict).
  - `--kl` (torch only): on the base's greedy completions, reused from a base target scored greedily in torch with
    the same prompt, else decoded with the adapter switched off (`scoring.kl_on_base_completions`).
  - problems/s counts decoding + grading, not model loading; CPU seconds (process time, all threads) beside it.
  - Each base model spec is resolved once per call. The torch runtime loads the base once per LoRA shape and
    switches adapters in place; llama.cpp loads the base GGUF (for the embedded model the shipped Q4_1 file) once
    per target, with the target's GGUF adapter.
`--out DIR` writes DIR/problems.jsonl (one line per data set and problem: question, gold and per
"target [runtime]" the completion, parsed answer and verdict, lists when sampled) and DIR/summary.json,
together and atomically after all scoring, so a failed call leaves no partial folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmx_local.backends import SampleParams, load_backend
from rmx_local.data import load_problems
from rmx_local.engines import LLAMA_CPP_MAX_PARALLEL, LlamaCppEngine, llama_cpp_importable
from rmx_local.errors import RmxError
from rmx_local.io import atomic_dir
from rmx_local.model_check import check_model_source
from rmx_local.models import ModelSource, resolve_model
from rmx_local.recipe import Recipe
from rmx_local.scoring import (DEFAULT_MAX_TOKENS, ProblemRecord, Prompt, answer_agreement, kl_on_base_completions,
                               metrics, paired, score_problems)
from rmx_local.targets import Target, resolve_targets
from rmx_local.tasks import Problem, arith_problems, arith_space_size

EVAL_RUNTIMES = ("torch", "llama_cpp")


# ---------------------------------------------------------------- the `eval` verb

@dataclass
class EvalOptions:
    data: list[str]
    limit: int | None = None
    seed: int = 0
    question_field: str | None = None
    answer_field: str | None = None
    runtimes: list[str] = field(default_factory=lambda: ["torch"])
    n_samples: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int | None = None  # default: the first run target's eval.max_tokens, else 512
    template: str | None = None  # default: each run target's own, then the first run target's, then "auto"
    instruction: str | None = None
    kl: bool = False
    base: str | None = None
    threads: int = 0
    batch_size: int = 64
    out: str | None = None
    shots: int = 0  # worked examples before each question (`few_shot_examples`)


def parse_runtimes(values: list[str] | tuple[str, ...]) -> list[str]:
    names = [v.strip() for item in values for v in item.split(",") if v.strip()] or ["torch"]
    bad = [n for n in names if n not in EVAL_RUNTIMES]
    if bad:
        raise RmxError(f"--runtime {bad[0]!r} is unknown", fix=f"use {' or '.join(EVAL_RUNTIMES)} (repeat or comma-separate for both)")
    if "llama_cpp" in names and not llama_cpp_importable():
        raise RmxError("--runtime llama_cpp needs llama-cpp-python, which is not installed",
                       fix="pip install 'rmx-local[llama]'  (or use --runtime torch)")
    if "torch" in names and importlib.util.find_spec("torch") is None:
        raise RmxError("--runtime torch needs PyTorch, which is not installed", fix="pip install torch transformers peft")
    return list(dict.fromkeys(names))


def _check_out(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "summary.json").is_file())):
        raise RmxError(f"--out {out}: exists and is not an earlier eval output", fix="choose a new or empty folder")
    return path


class _Models:
    """Loaded models: torch backends per (base, LoRA shape), switched between adapters; llama.cpp per target. Each
    base spec is resolved once (`source`)."""

    def __init__(self, opts: EvalOptions, ui: Any):
        self.opts, self.ui = opts, ui
        self.sources: dict[str, ModelSource] = {}
        self.backends: dict[str, list[Any]] = {}
        self.tokenizers: dict[str, Any] = {}

    def source(self, base_spec: str) -> ModelSource:
        if base_spec not in self.sources:
            self.sources[base_spec] = resolve_model(base_spec)
        return self.sources[base_spec]

    def torch(self, target: Target) -> Any:
        loaded = self.backends.setdefault(target.base_spec, [])
        a = target.adapter
        fits = lambda b: a is None or b.lora is None or b.lora == {"rank": a.rank, "alpha": a.alpha, "targets": sorted(a.targets)}  # noqa: E731
        backend = next((b for b in loaded if fits(b)), None)
        if backend is None:
            recipe = Recipe(model=target.base_spec, backend="torch", threads=self.opts.threads)
            recipe.rollout.batch_size = self.opts.batch_size
            backend = load_backend(recipe, self.source(target.base_spec), self.ui.line)
            loaded.append(backend)
        if a is not None:
            backend.set_adapter(a)
        backend.set_adapter_enabled(a is not None)
        return backend

    def tokenizer(self, base_spec: str) -> Any:
        if base_spec in self.backends:
            return self.backends[base_spec][0].tokenizer
        if base_spec not in self.tokenizers:
            from transformers import AutoTokenizer

            self.tokenizers[base_spec] = AutoTokenizer.from_pretrained(self.source(base_spec).hf_path)
        return self.tokenizers[base_spec]

    def llama_cpp(self, target: Target) -> Any:
        gguf = self.source(target.base_spec).gguf_path
        lora = str(target.gguf_adapter) if target.adapter is not None else None
        return LlamaCppEngine(gguf, self.tokenizer(target.base_spec), threads=self.opts.threads,
                              parallel=min(self.opts.batch_size, LLAMA_CPP_MAX_PARALLEL), lora_path=lora)


def _prompts(targets, opts: EvalOptions) -> dict[str, Prompt]:
    reference = next((t for t in targets if t.template is not None), None)
    out = {}
    for t in targets:
        own = t if t.template is not None else reference
        out[t.label] = Prompt(opts.template or (own.template if own else Prompt.template),
                              opts.instruction if opts.instruction is not None else (own.instruction if own else Prompt.instruction))
    return out


def few_shot_examples(spec: str, problems: list[Problem], shots: int, seed: int) -> tuple[Problem, ...]:
    """`--shots N` for a data set: arith data scores the LAST n problems of the seeded sequence, so the examples are
    its FIRST N, the end every run trains on; other data has no training end here and is refused."""
    if shots <= 0:
        return ()
    if not spec.startswith("arith:"):
        raise RmxError(f"--shots {shots} with --data {spec}: few-shot examples come from the arith generator's training "
                       "end only", fix="use arith data, or drop --shots")
    difficulty = spec.split(":", 1)[1]
    if shots + len(problems) > arith_space_size(difficulty):
        raise RmxError(f"--shots {shots} + {len(problems)} problems exceed the {arith_space_size(difficulty)} distinct "
                       f"{spec} problems: an example would be a scored problem", fix="lower --shots or --limit")
    return tuple(arith_problems(difficulty, shots, seed))


def run_eval(target_specs: list[str], opts: EvalOptions, ui: Any) -> dict:
    """Score every target on every data set in every runtime; write --out; return the summary."""
    runtimes = parse_runtimes(opts.runtimes)
    if opts.n_samples < 1 or (opts.n_samples > 1 and opts.temperature <= 0):
        raise RmxError(f"--n-samples {opts.n_samples} --temperature {opts.temperature}: sampling needs n >= 2 and T > 0",
                       fix="drop --n-samples for greedy, or use e.g. --n-samples 8 --temperature 0.6")
    if opts.kl and "torch" not in runtimes:
        raise RmxError("--kl needs the torch runtime (it switches the adapter off and on in one model)", fix="add --runtime torch")
    if len(set(target_specs)) != len(target_specs):
        raise RmxError("eval: the same TARGET is given twice", fix="name each target once")
    out_dir = _check_out(opts.out)
    data = [(spec, load_problems(spec, limit=opts.limit, seed=opts.seed, question_field=opts.question_field,
                                 answer_field=opts.answer_field, warn=ui.line)) for spec in opts.data]
    targets = resolve_targets(list(target_specs), base=opts.base, gguf="llama_cpp" in runtimes)
    for base_spec in dict.fromkeys(t.base_spec for t in targets):  # before any model loads
        check_model_source(base_spec)
    models = _Models(opts, ui)
    if "llama_cpp" in runtimes:
        for t in targets:
            if not models.source(t.base_spec).gguf_path:
                raise RmxError(f"--runtime llama_cpp: base model {t.base_spec!r} of {t.label} has no GGUF file",
                               fix="use --runtime torch, or a base that is a .gguf / embedded model / folder holding one")
    prompts = _prompts(targets, opts)
    reference = next((t for t in targets if t.max_tokens), None)
    max_tokens = opts.max_tokens or (reference.max_tokens if reference else DEFAULT_MAX_TOKENS)
    sampled = opts.n_samples > 1
    params = SampleParams(opts.n_samples if sampled else 1, opts.temperature if sampled else 0.0,
                          opts.top_p if sampled else 1.0, max_tokens, opts.seed)
    shots = {spec: few_shot_examples(spec, problems, opts.shots, opts.seed) for spec, problems in data}
    for t in targets:
        p = prompts[t.label]
        ui.line(f"prompt for {t.label}: template {p.template!r}, instruction {p.instruction!r}, {opts.shots} shots"
                f"{' (its run)' if t.template is not None and not opts.template and opts.instruction is None else ''}")

    records: dict[tuple, list[ProblemRecord]] = {}
    stats: dict[tuple, dict] = {}
    for runtime in runtimes:
        for t in targets:
            model = models.torch(t) if runtime == "torch" else models.llama_cpp(t)
            for spec, problems in data:
                wall, cpu = time.time(), time.process_time()
                prompt = dataclasses.replace(prompts[t.label], shots=shots[spec])
                recs = score_problems(model, problems, prompt, params, batch_size=opts.batch_size, ui=ui,
                                      label=f"{t.label} [{runtime}] on {spec}")
                wall, cpu = time.time() - wall, time.process_time() - cpu
                records[spec, runtime, t.label] = recs
                stats[spec, runtime, t.label] = {**metrics(recs), "seconds": wall, "cpu_seconds": cpu,
                                                 "problems_per_s": len(problems) / max(wall, 1e-9)}
                if opts.kl and runtime == "torch" and t.adapter is not None:
                    same_base = [b.label for b in targets if b.adapter is None and b.base_spec == t.base_spec
                                 and prompts[b.label] == prompts[t.label] and (spec, "torch", b.label) in records]
                    base = records[spec, "torch", same_base[0]] if same_base and not sampled else None
                    stats[spec, runtime, t.label]["kl"] = kl_on_base_completions(model, t.label, base, problems, prompt, max_tokens, opts.seed, ui)
            if runtime == "llama_cpp":
                model.close()

    summary = {
        "targets": [{"label": t.label, "kind": t.kind, "base": t.base_spec, "adapter": t.adapter is not None,
                     "gguf_adapter": str(t.gguf_adapter) if t.gguf_adapter else None,
                     "prompt": prompts[t.label].to_json()} for t in targets],
        "shots": {spec: [p.id for p in s] for spec, s in shots.items()},
        "runtimes": runtimes,
        "decoding": {"n_samples": params.n, "temperature": params.temperature, "top_p": params.top_p,
                     "max_tokens": max_tokens, "seed": opts.seed, "limit": opts.limit},
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": [],
    }
    first = targets[0].label
    for spec, problems in data:
        entry = {"spec": spec, "problems": len(problems), "results": {}, "agreement": {}}
        for runtime in runtimes:
            entry["results"][runtime] = {}
            for t in targets:
                row = stats[spec, runtime, t.label]
                if t.label != first:
                    row["vs_first"] = paired(records[spec, runtime, first], records[spec, runtime, t.label])
                entry["results"][runtime][t.label] = row
        if len(runtimes) == 2:
            entry["agreement"] = {t.label: answer_agreement(records[spec, "torch", t.label], records[spec, "llama_cpp", t.label])
                                  for t in targets}
        summary["data"].append(entry)
    if out_dir is not None:
        _write_out(out_dir, summary, data, runtimes, targets, records)
        ui.line(f"wrote {out_dir / 'problems.jsonl'} and {out_dir / 'summary.json'}")
    return summary


def _write_out(out_dir: Path, summary: dict, data, runtimes, targets, records) -> None:
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "problems.jsonl", "w") as f:
            for spec, problems in data:
                for i, p in enumerate(problems):
                    line = {"data": spec, "id": p.id, "question": p.question, "gold": p.answer,
                            "results": {f"{t.label} [{rt}]": records[spec, rt, t.label][i].to_json()
                                        for rt in runtimes for t in targets}}
                    f.write(json.dumps(line) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def print_report(ui: Any, summary: dict) -> None:
    d = summary["decoding"]
    sampled = d["n_samples"] > 1
    mode = f"{d['n_samples']} samples at T={d['temperature']}" if sampled else "greedy"
    for entry in summary["data"]:
        columns = ["target", "runtime", "pass@1" if sampled else "accuracy"]
        columns += [f"pass@{d['n_samples']}", f"maj@{d['n_samples']}"] if sampled else []
        columns += ["unparseable", "tokens", "vs first (z)", "KL", "problems/s"]
        rows = []
        for runtime, results in entry["results"].items():
            for label, r in results.items():
                vs = r.get("vs_first")
                row = [label, runtime, f"{r['accuracy']:.3f} ± {r['se']:.3f}"]
                if sampled:
                    row += [f"{r['pass@k'][str(d['n_samples'])]:.3f}", f"{r['maj@k']:.3f}"]
                z = "" if not vs or vs["z"] is None else f" ({vs['z']:+.1f})"
                row += [f"{r['unparseable']:.3f}", f"{r['mean_tokens']:.1f}",
                        f"{vs['diff']:+.3f} ± {vs['se']:.3f}{z}" if vs else "-",
                        f"{r['kl']:.4f}" if "kl" in r else "-", f"{r['problems_per_s']:.2f}"]
                rows.append(row)
        ui.table(f"{entry['spec']}: {entry['problems']} problems, {mode}, max {d['max_tokens']} tokens", columns, rows)
        for label, a in entry["agreement"].items():
            ui.line(f"{label}: torch and llama.cpp agree on {a['same_answer']:.1%} of answers, {a['same_verdict']:.1%} of verdicts")
