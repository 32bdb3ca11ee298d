"""The one scorer and its statistics, shared by `rmx-local eval` (eval.py), the run's evaluation stage
(stages/evaluate.py), analyze and the benchmarks.

  Prompt(template, instruction, shots)   what `rmx_local.tasks.build_prompt` needs besides the question
  score_problems(model, problems, prompt, params, *, batch_size=64, ui=None, label="score") -> list[ProblemRecord]
      `model` is a loaded Backend (its `generate`, in its current adapter state) or a rollout engine (`sample`,
      e.g. a LlamaCppEngine holding a LoRA). Completions are graded by `verify.verify_many`; a record holds the
      question, gold, completions, parsed answers, verdicts and completion lengths in tokens of one problem.
  metrics(records), paired(first, other), answer_agreement(a, b), pass_at_k(n, c, k), majority_correct(record),
  mean_se(xs), kl_on_base_completions(backend, ...)

Statistics (shortcuts stated):
  - accuracy: the mean over problems of each problem's fraction correct (greedy 0/1; sampled c/k = pass@1), ± SE =
    std(ddof=1) / sqrt(N) over problems. pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over
    problems (k = 1, 2, 4, ... and n); maj@k takes the most frequent parsed answer of the k samples
    (unparseable ones skipped, ties to the earliest) and scores its verdict.
  - paired: mean ± SE of the per-problem score differences on the same problems, z = mean / SE (None when SE is 0).
  - answer_agreement: the fraction of problems whose first completion parsed to the same answer in two runtimes
    (and the fraction with the same verdict).
  - KL: the base's greedy completions teacher-forced through one model with the adapter off and on; the mean over
    all completion tokens of KL(p_base || p_adapted) in nats.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rmx_local.backends import SampleParams
from rmx_local.recipe import TaskConfig
from rmx_local.tasks import Problem, cut_at_next_question, encode_prompts
from rmx_local.verify import verify_many

DEFAULT_MAX_TOKENS = 512  # a completion's budget where no run target names its eval.max_tokens


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


def kl_on_base_completions(backend: Any, label: str, base_records: list[ProblemRecord] | None, problems: list[Problem], prompt: Prompt,
        max_tokens: int, seed: int, ui: Any) -> float:
    """Mean per-token KL(base || adapted) on the base's greedy completions (see the module docstring)."""
    if base_records is None:
        backend.set_adapter_enabled(False)
        base_records = score_problems(backend, problems, prompt, SampleParams(1, 0.0, 1.0, max_tokens, seed),
                                      batch_size=backend.batch_size, ui=ui, label=f"kl: base completions for {label}")
        backend.set_adapter_enabled(True)
    seqs = [(r.prompt_ids + r.completion_ids[0], len(r.prompt_ids)) for r in base_records if r.completion_ids[0]]
    total, count = 0.0, 0
    for start in range(0, len(seqs), 8):
        for kl in backend.kl_from_base(seqs[start : start + 8]):
            total, count = total + float(kl.sum()), count + len(kl)
    return total / max(count, 1)
