"""`rmx-local eval TARGET... --data SPEC...`: score base models and adapters on any math data, in torch or
llama.cpp, with paired statistics.

Interfaces other modules build on:
  Prompt(template, instruction, shots)   what `rmx_local.tasks.build_prompt` needs besides the question
  score_problems(model, problems, prompt, params, *, batch_size=64, ui=None, label="score") -> list[ProblemRecord]
      THE scorer, shared with the run pipeline (`stages/evaluate.score`). `model` is a loaded Backend (its
      `generate`, in its current adapter state) or a rollout engine (`sample`, e.g. a LlamaCppEngine holding a
      LoRA). Completions are graded by `verify.verify_many`; a record holds the question, gold, completions,
      parsed answers, verdicts and completion lengths in tokens of one problem.
  metrics(records), paired(first, other), pass_at_k(n, c, k), majority_correct(record)
  run_eval(target_specs, options, ui) -> summary dict;  print_report(ui, summary)
Targets come from `rmx_local.targets`, problems from `rmx_local.data`.

Statistics (shortcuts stated):
  - One decoding mode per call: greedy (default), or `--n-samples k` (k > 1) sampled at `--temperature`/`--top-p`.
  - accuracy: the mean over problems of each problem's fraction correct (greedy 0/1; sampled c/k = pass@1), ± SE =
    std(ddof=1) / sqrt(N) over problems. pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over
    problems (k = 1, 2, 4, ... and n); maj@k takes the most frequent parsed answer of the k samples
    (unparseable ones skipped, ties to the earliest) and scores its verdict.
  - Every target after the first is compared with the first on the same data and runtime, problem by problem:
    mean ± SE of the per-problem score differences and z = mean / SE (None when SE is 0).
  - Both runtimes in one call: agreement = fraction of problems whose first completion parsed to the same
    answer in torch and in llama.cpp (and the fraction with the same verdict).
  - `--kl` (torch only): the base's greedy completions (reused from a base target scored greedily in torch with
    the same prompt, else decoded with the adapter switched off), teacher-forced through the same model with the
    adapter off and on; the mean over all completion tokens of KL(p_base || p_adapted) in nats.
  - problems/s counts decoding + grading, not model loading; CPU seconds (process time, all threads) beside it.
  - The torch runtime loads the base once per LoRA shape and switches adapters in place; llama.cpp loads the
    base GGUF (for the embedded model the shipped Q4_1 file) once per target, with the target's GGUF adapter.
`--out DIR` writes DIR/problems.jsonl (one line per data set and problem: question, gold and per
"target [runtime]" the completion, parsed answer and verdict, lists when sampled) and DIR/summary.json,
together and atomically after all scoring, so a failed call leaves no partial folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmx_local.backends import SampleParams
from rmx_local.data import load_problems
from rmx_local.errors import RmxError
from rmx_local.io import atomic_dir
from rmx_local.model_check import check_model_source
from rmx_local.recipe import TaskConfig
from rmx_local.tasks import Problem, arith_problems, arith_space_size, cut_at_next_question, encode_prompts
from rmx_local.verify import verify_many

EVAL_RUNTIMES = ("torch", "llama_cpp")
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class Prompt:
    template: str = TaskConfig.template
    instruction: str = TaskConfig.instruction
    shots: tuple[Problem, ...] = ()  # worked examples before each question (training problems only)

    def to_json(self) -> dict:
        return {"template": self.template, "instruction": self.instruction, "shots": [p.id for p in self.shots]}


@dataclass
class ProblemRecord:
    id: str
    question: str
    gold: str
    completions: list[str]
    parsed: list[str | None]
    correct: list[bool]
    tokens: list[int]
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # kept in memory for --kl, never written
    completion_ids: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def score(self) -> float:
        return sum(self.correct) / len(self.correct)

    def to_json(self) -> dict:
        if len(self.completions) == 1:
            return {"completion": self.completions[0], "parsed": self.parsed[0], "correct": self.correct[0]}
        return {"completions": self.completions, "parsed": self.parsed, "correct": self.correct}


class _NoBar:
    def advance(self, items: int = 0, tokens: int = 0) -> None:
        pass


def score_problems(model: Any, problems: list[Problem], prompt: Prompt, params: SampleParams, *, batch_size: int = 64,
                   ui: Any = None, label: str = "score") -> list[ProblemRecord]:
    """Decode `params.n` completions per problem (one when greedy) and grade them; see the module docstring."""
    tokenizer = model.tokenizer
    texts, ids = encode_prompts(tokenizer, [p.question for p in problems], prompt.template, prompt.instruction, prompt.shots)
    n = params.n if params.temperature > 0 else 1
    group = max(1, batch_size // n)
    outs: list[list[list[int]]] = []
    with (ui.stage(label, len(problems), "problems") if ui else contextlib.nullcontext(_NoBar())) as bar:
        for start in range(0, len(problems), group):
            chunk = slice(start, start + group)
            progress = lambda k: bar.advance(0, k)  # noqa: E731
            if hasattr(model, "generate"):  # a Backend
                outs += model.generate(ids[chunk], params, progress=progress)
            else:  # a rollout engine
                outs += model.sample(texts[chunk], ids[chunk], params, progress=progress)
            bar.advance(len(ids[chunk]))
    outs = [o[:n] for o in outs]
    completions = [[tokenizer.decode(c, skip_special_tokens=True) for c in o] for o in outs]
    if prompt.shots:  # graded up to the next "Question:" the examples taught it to write (token counts stay whole)
        completions = [[cut_at_next_question(c) for c in cs] for cs in completions]
    verdicts = iter(verify_many([c for cs in completions for c in cs],
                                [p.answer for p, cs in zip(problems, completions) for _ in cs]))
    records = []
    for p, pids, o, cs in zip(problems, ids, outs, completions):
        vs = [next(verdicts) for _ in cs]
        records.append(ProblemRecord(p.id, p.question, p.answer, cs, [v.parsed for v in vs], [v.correct for v in vs],
                                     [len(c) for c in o], pids, o))
    return records


# ---------------------------------------------------------------- statistics

def mean_se(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return 0.0, 0.0
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var / len(xs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(record: ProblemRecord) -> bool:
    votes = Counter(p for p in record.parsed if p is not None)
    if not votes:
        return False
    top = max(votes.values())
    first = next(i for i, p in enumerate(record.parsed) if p is not None and votes[p] == top)
    return record.correct[first]


def metrics(records: list[ProblemRecord]) -> dict:
    n = len(records[0].correct)
    acc, se = mean_se([r.score for r in records])
    flat_tokens = [t for r in records for t in r.tokens]
    out = {"problems": len(records), "samples": n, "accuracy": acc, "se": se,
           "unparseable": sum(p is None for r in records for p in r.parsed) / max(len(flat_tokens), 1),
           "mean_tokens": sum(flat_tokens) / max(len(flat_tokens), 1)}
    if n > 1:
        ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n} | {n})
        out["pass@k"] = {str(k): sum(pass_at_k(n, sum(r.correct), k) for r in records) / len(records) for k in ks}
        out["maj@k"] = sum(majority_correct(r) for r in records) / len(records)
    return out


def paired(first: list[ProblemRecord], other: list[ProblemRecord]) -> dict:
    diff, se = mean_se([b.score - a.score for a, b in zip(first, other)])
    return {"diff": diff, "se": se, "z": diff / se if se > 0 else None}


def answer_agreement(a: list[ProblemRecord], b: list[ProblemRecord]) -> dict:
    n = max(len(a), 1)
    return {"same_answer": sum(x.parsed[0] == y.parsed[0] for x, y in zip(a, b)) / n,
            "same_verdict": sum(x.correct[0] == y.correct[0] for x, y in zip(a, b)) / n}


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
    from rmx_local.engines import llama_cpp_importable

    names = [v.strip() for item in values for v in item.split(",") if v.strip()] or ["torch"]
    bad = [n for n in names if n not in EVAL_RUNTIMES]
    if bad:
        raise RmxError(f"--runtime {bad[0]!r} is unknown", fix=f"use {' or '.join(EVAL_RUNTIMES)} (repeat or comma-separate for both)")
    if "llama_cpp" in names and not llama_cpp_importable():
        raise RmxError("--runtime llama_cpp needs llama-cpp-python, which is not installed",
                       fix="pip install 'rmx-local[llama]'  (or use --runtime torch)")
    if "torch" in names:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
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
    """Loaded models: torch backends per (base, LoRA shape), switched between adapters; llama.cpp per target."""

    def __init__(self, opts: EvalOptions, ui: Any):
        self.opts, self.ui = opts, ui
        self.backends: dict[str, list[Any]] = {}
        self.tokenizers: dict[str, Any] = {}

    def torch(self, target) -> Any:
        from rmx_local.backends import load_backend
        from rmx_local.models import resolve_model
        from rmx_local.recipe import Recipe

        loaded = self.backends.setdefault(target.base_spec, [])
        a = target.adapter
        fits = lambda b: a is None or b.lora is None or b.lora == {"rank": a.rank, "alpha": a.alpha, "targets": sorted(a.targets)}  # noqa: E731
        backend = next((b for b in loaded if fits(b)), None)
        if backend is None:
            recipe = Recipe(model=target.base_spec, backend="torch", threads=self.opts.threads)
            recipe.rollout.batch_size = self.opts.batch_size
            backend = load_backend(recipe, resolve_model(target.base_spec), self.ui.line)
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

            from rmx_local.models import resolve_model

            self.tokenizers[base_spec] = AutoTokenizer.from_pretrained(resolve_model(base_spec).hf_path)
        return self.tokenizers[base_spec]

    def llama_cpp(self, target) -> Any:
        from rmx_local.engines import LLAMA_CPP_MAX_PARALLEL
        from rmx_local.engines.llama_cpp_engine import LlamaCppEngine
        from rmx_local.models import resolve_model

        gguf = resolve_model(target.base_spec).gguf_path
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


def _kl(backend: Any, target, base_records: list[ProblemRecord] | None, problems: list[Problem], prompt: Prompt,
        max_tokens: int, seed: int, ui: Any) -> float:
    """Mean per-token KL(base || adapted) on the base's greedy completions (see the module docstring)."""
    if base_records is None:
        backend.set_adapter_enabled(False)
        base_records = score_problems(backend, problems, prompt, SampleParams(1, 0.0, 1.0, max_tokens, seed),
                                      batch_size=backend.batch_size, ui=ui, label=f"kl: base completions for {target.label}")
        backend.set_adapter_enabled(True)
    seqs = [(r.prompt_ids + r.completion_ids[0], len(r.prompt_ids)) for r in base_records if r.completion_ids[0]]
    total, count = 0.0, 0
    for start in range(0, len(seqs), 8):
        for kl in backend.kl_from_base(seqs[start : start + 8]):
            total, count = total + float(kl.sum()), count + len(kl)
    return total / max(count, 1)


def run_eval(target_specs: list[str], opts: EvalOptions, ui: Any) -> dict:
    """Score every target on every data set in every runtime; write --out; return the summary."""
    from rmx_local.models import resolve_model
    from rmx_local.targets import resolve_targets

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
    if "llama_cpp" in runtimes:
        for t in targets:
            if not resolve_model(t.base_spec).gguf_path:
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

    models, records, stats = _Models(opts, ui), {}, {}
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
                    stats[spec, runtime, t.label]["kl"] = _kl(model, t, base, problems, prompt, max_tokens, opts.seed, ui)
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
