"""The paper's Section-3 analysis of a base / tuned ("teacher") pair, as pure functions over logits and token ids.

Greedy throughout. At every decoding position both models' next-token logits are known; from them:
  - classification: unshifted (same argmax) / reranked (argmaxes differ, the teacher's token within the base's
    top 5) / shifted (outside it); the base rank of the teacher's token (1 = the base's own argmax) and the base
    entropy (nats) at the position;
  - policies, each one greedy decode that continues from whatever it chose: `base`, `teacher`, `oracle` (the
    teacher's argmax at reranked positions, the base's elsewhere), `random` (at reranked positions a random
    token of the base top 20 other than the base's argmax, seeded per problem: the control), `entropy`
    (the teacher's argmax wherever base entropy > tau).
The classification statistics are those of the `base` policy's rows: the base's own greedy completions.
A `PairStepper` supplies the logits (a constructed table in tests, two forward passes of one model with its
adapter off and on in `analyze_torch`). Shortcuts: ties in logits rank in the base's favour (a token counts as
above only when strictly greater); "tokens touched" counts positions where a policy substituted, including the
entropy gate's substitutions that happen to equal the base's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from rmx_local.data import load_problems
from rmx_local.io import read_json
from rmx_local.model_check import check_model_source
from rmx_local.scoring import DEFAULT_MAX_TOKENS, Prompt
from rmx_local.targets import check_target_fits, resolve_target
from rmx_local.tasks import encode_prompts
from rmx_local.ui import UI
from rmx_local.verify import verify_many

TOP_K = 5  # reranked: the teacher's token is within the base's top 5
CONTROL_TOP = 20  # the random control draws from the base's top 20
UNSHIFTED, RERANKED, SHIFTED = 0, 1, 2
RANK_BUCKETS = ("2", "3", "4", "5", "6-10", "11-20", ">20")


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str  # base | teacher | oracle | random | entropy
    tau: float = 0.0


def default_policies(taus: list[float]) -> list[Policy]:
    fixed = [Policy("base", "base"), Policy("teacher", "teacher"), Policy("oracle (reranked positions)", "oracle"),
             Policy("random top-20 (same positions)", "random")]
    return fixed + [Policy(f"entropy gate tau {t:g}", "entropy", t) for t in taus]


@dataclass
class Trace:
    """One decoded row: its tokens, and per position the classification facts and whether the policy substituted."""
    tokens: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    touched: list[bool] = field(default_factory=list)


class PairStepper(Protocol):
    def start(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Prefill the prompts; (base, teacher) next-token logits, each (B, V)."""

    def advance(self, keep: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep only rows `keep` (indices into the live rows), append `tokens` (one per kept row); the next logits."""


def position_facts(base: np.ndarray, teacher: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of (B, V) logits: base argmax, teacher argmax, base rank of the teacher's argmax, base entropy, kind."""
    base = base.astype(np.float64)
    b_arg, t_arg = base.argmax(-1), teacher.argmax(-1)
    t_logit = base[np.arange(len(base)), t_arg]
    rank = 1 + (base > t_logit[:, None]).sum(-1)
    z = base - base.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    entropy = -(np.exp(logp) * logp).sum(-1)
    kind = np.where(b_arg == t_arg, UNSHIFTED, np.where(rank <= TOP_K, RERANKED, SHIFTED))
    return {"base": b_arg, "teacher": t_arg, "rank": np.where(b_arg == t_arg, 1, rank), "entropy": entropy, "kind": kind}


def choose(policy: Policy, facts: dict[str, np.ndarray], i: int, base_row: np.ndarray, rng: np.random.Generator) -> tuple[int, bool]:
    """The token policy `policy` picks for row i, and whether it substituted the base's argmax."""
    b, t, kind = int(facts["base"][i]), int(facts["teacher"][i]), int(facts["kind"][i])
    if policy.kind == "teacher":
        return t, t != b
    if policy.kind == "oracle" and kind == RERANKED:
        return t, True
    if policy.kind == "random" and kind == RERANKED:
        top = np.argsort(-base_row, kind="stable")[:CONTROL_TOP]
        return int(rng.choice(top[top != b])), True
    if policy.kind == "entropy" and facts["entropy"][i] > policy.tau:
        return t, True
    return b, False


def guided_decode(stepper: PairStepper, prompts: list[list[int]], policies: list[Policy], max_tokens: int,
                  eos_ids: list[int], seed: int = 0, batch_size: int = 64,
                  progress: Callable[[int], None] | None = None) -> list[list[Trace]]:
    """traces[p][j]: prompt p decoded greedily under policy j (EOS ends a row and is not kept)."""
    rows = [(p, j) for p in range(len(prompts)) for j in range(len(policies))]
    traces = [[Trace() for _ in policies] for _ in prompts]
    eos = set(eos_ids)
    for start in range(0, len(rows), batch_size):
        live = rows[start : start + batch_size]
        rngs = {r: np.random.default_rng([seed, r[0]]) for r in live}  # same draws whatever the batching
        base, teacher = stepper.start([prompts[p] for p, _ in live])
        for step in range(max_tokens):
            facts = position_facts(base, teacher)
            keep, picked = [], []
            for i, (p, j) in enumerate(live):
                token, touched = choose(policies[j], facts, i, base[i], rngs[(p, j)])
                tr = traces[p][j]
                tr.kinds.append(int(facts["kind"][i]))
                tr.ranks.append(int(facts["rank"][i]))
                tr.entropies.append(float(facts["entropy"][i]))
                tr.touched.append(touched)
                if token in eos:
                    continue
                tr.tokens.append(token)
                keep.append(i)
                picked.append(token)
            live = [live[i] for i in keep]
            if not live or step + 1 == max_tokens:
                break
            base, teacher = stepper.advance(np.asarray(keep), np.asarray(picked))
        if progress:
            progress(min(batch_size, len(rows) - start))
    return traces


def classification(traces: list[Trace]) -> dict:
    """Section 3.1 over the base's own greedy completions: shares, ranks, entropy at changed vs unchanged positions."""
    kinds = np.array([k for t in traces for k in t.kinds], dtype=int)
    ranks = np.array([r for t in traces for r in t.ranks], dtype=int)
    ent = np.array([h for t in traces for h in t.entropies], dtype=float)
    n = max(kinds.size, 1)
    changed = kinds != UNSHIFTED
    edges = [(2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 20), (21, 1 << 30)]
    hist = {name: int(((ranks >= lo) & (ranks <= hi) & changed).sum()) for name, (lo, hi) in zip(RANK_BUCKETS, edges)}
    h_changed = float(ent[changed].mean()) if changed.any() else float("nan")
    h_same = float(ent[~changed].mean()) if (~changed).any() else float("nan")
    return {"positions": int(kinds.size), "reranked": float((kinds == RERANKED).sum() / n),
            "shifted": float((kinds == SHIFTED).sum() / n), "changed": int(changed.sum()),
            "mean_base_rank": float(ranks[changed].mean()) if changed.any() else float("nan"), "rank_histogram": hist,
            "entropy_changed": h_changed, "entropy_unchanged": h_same,
            "entropy_ratio": h_changed / h_same if changed.any() and h_same > 0 else float("nan")}


def mean_se(xs) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        return float("nan"), 0.0
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else 0.0


def policy_rows(traces: list[list[Trace]], policies: list[Policy], correct: np.ndarray) -> list[dict]:
    """Per policy: accuracy ± SE, paired difference vs base, share of tokens touched (substituted).

    `correct[p, j]`: whether prompt p's completion under policy j is right."""
    scores = np.asarray(correct, dtype=np.float64).reshape(len(traces), len(policies))
    base_j = next((j for j, pol in enumerate(policies) if pol.kind == "base"), 0)
    rows = []
    for j, pol in enumerate(policies):
        touched = sum(sum(traces[p][j].touched) for p in range(len(traces)))
        positions = sum(len(traces[p][j].touched) for p in range(len(traces)))
        rows.append({"policy": pol.name, "kind": pol.kind, "tau": pol.tau if pol.kind == "entropy" else None,
                     "accuracy": mean_se(scores[:, j]), "vs_base": mean_se(scores[:, j] - scores[:, base_j]),
                     "touched": touched / max(positions, 1), "tokens": positions, "per_problem": scores[:, j].tolist()})
    return rows


# ---------------------------------------------------------------- the command: load, decode, table / JSON

DEFAULT_TAUS = (0.8, 1.2, 2.0, 3.0)  # around the paper's 1.2; the run's own tau is added when TEACHER is a run


def run_tau(target) -> float | None:
    """The gate tau of the run that trained TEACHER (a run folder), else None."""
    from pathlib import Path

    gate = Path(target.spec) / "gate.json"
    return float(read_json(gate)["tau"]) if target.kind == "run" and gate.is_file() else None


def analyze(base: str, teacher: str, data: str, limit: int | None = None, taus: list[float] | None = None,
            max_tokens: int | None = None, device: str = "auto", batch_size: int = 64, seed: int = 0, ui=None,
            template: str | None = None, instruction: str | None = None) -> dict:
    """Everything `rmx-local analyze` prints, as one JSON-able dict.

    TEACHER is anything `rmx-local eval` takes as a target (`rmx_local.targets`), BASE a model spec or `base` (the
    teacher's own base model); problems come from `rmx_local.data.load_problems`, prompts follow eval's rule (the
    teacher run's template and instruction unless overridden), and completions are graded by `verify_many`, the
    grader of eval's scorer (its decode loop is not used: here every token is chosen by a policy)."""
    from rmx_local.analyze_torch import load_pair

    ui = ui or UI()
    problems = load_problems(data, limit=limit, seed=seed, warn=ui.line)
    target = resolve_target(teacher, base=None if base == "base" else base)
    base = target.base_spec if base == "base" else base
    if target.adapter is not None:
        target.base_spec = base
        check_target_fits(target)
    for spec in dict.fromkeys((base, target.base_spec)):  # before either model loads
        check_model_source(spec)
    prompt = Prompt(template or target.template or Prompt.template,
                    instruction if instruction is not None else target.instruction or Prompt.instruction)
    stepper, tokenizer, eos_ids, what = load_pair(base, target, device, ui.line)
    _, prompts = encode_prompts(tokenizer, [p.question for p in problems], prompt.template, prompt.instruction)
    tau = run_tau(target)
    sweep = sorted(set(taus or DEFAULT_TAUS) | ({round(tau, 3)} if tau else set()))
    policies = default_policies(sweep)
    max_tokens = max_tokens or target.max_tokens or DEFAULT_MAX_TOKENS
    ui.line(f"analyze: {what}; {len(problems)} problems from {data}, {len(policies)} greedy decodes each, <= {max_tokens} tokens")
    with ui.stage("analyze", len(problems) * len(policies), "decodes") as bar:
        traces = guided_decode(stepper, prompts, policies, max_tokens, eos_ids, seed, batch_size, progress=bar.advance)
    texts = [[tokenizer.decode(traces[p][j].tokens, skip_special_tokens=True) for j in range(len(policies))]
             for p in range(len(problems))]
    verdicts = verify_many([t for row in texts for t in row], [p.answer for p in problems for _ in policies])
    right = np.array([v.correct for v in verdicts]).reshape(len(problems), len(policies))
    return {"base": base, "teacher": teacher, "pair": what, "data": data, "problems": len(problems),
            "prompt": {"template": prompt.template, "instruction": prompt.instruction},
            "max_tokens": max_tokens, "run_tau": tau, "seed": seed,
            "classification": classification([traces[p][0] for p in range(len(problems))]),
            "policies": policy_rows(traces, policies, right)}


PAPER = {"reranked": "1.0-4.1%", "shifted": "0", "rank": "2.14-2.39", "ratio": "5-12x", "base": "", "teacher": "",
         "oracle": "= teacher's pass@1", "random": "far below oracle", "entropy": "tau 1.2: touches 1.2-8.3%"}


def table_rows(result: dict) -> list[list[str]]:
    """The paper's layout: where the pair differs, then accuracy under each intervention (one row each)."""
    c = result["classification"]
    hist = " ".join(f"{k}:{v}" for k, v in c["rank_histogram"].items())
    rows = [["reranked positions (teacher's token in base top 5)", f"{c['reranked']:.2%}", "", "", PAPER["reranked"]],
            ["shifted positions (outside base top 5)", f"{c['shifted']:.2%}", "", "", PAPER["shifted"]],
            ["mean base rank of the teacher's token (changed)", f"{c['mean_base_rank']:.2f}", "", "", PAPER["rank"]],
            ["  base-rank histogram", hist, "", "", ""],
            ["base entropy changed / unchanged", f"{c['entropy_changed']:.2f} / {c['entropy_unchanged']:.2f} nats "
             f"({c['entropy_ratio']:.1f}x)", "", "", PAPER["ratio"]],
            [f"greedy positions on the base's completions", f"{c['positions']:,}", "", "", ""]]
    for r in result["policies"]:
        acc, d = r["accuracy"], r["vs_base"]
        vs = "" if r["kind"] == "base" else f"{d[0]:+.3f} ± {d[1]:.3f}" + (f" ({d[0] / d[1]:+.1f} SE)" if d[1] > 0 else "")
        touched = "" if r["kind"] == "base" else f"{r['touched']:.2%}"
        tau = r["tau"]
        name = r["policy"] + (" (the run's gate)" if tau is not None and result["run_tau"] and abs(tau - result["run_tau"]) < 1e-3 else "")
        paper = PAPER["entropy"] if tau is not None and abs(tau - 1.2) < 1e-9 else "" if tau is not None else PAPER[r["kind"]]
        rows.append([f"accuracy: {name}", f"{acc[0]:.3f} ± {acc[1]:.3f}", vs, touched, paper])
    return rows


def print_analysis(result: dict, ui) -> None:
    ui.table(f"{result['pair']}: {result['problems']} problems from {result['data']}, greedy",
             ["measure", "value", "vs base (paired)", "tokens touched", "paper (Qwen2.5, RL-tuned)"], table_rows(result))
