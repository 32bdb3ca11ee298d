"""Stage 3: teacher-forced base entropies and the decision-point gate.

H_t is the full-vocabulary entropy (nats, fp32) of the base model's distribution for completion token t,
scored with the adapter off. Entropies are journaled per sequence in `entropies.jsonl` (resumable), scored in
fixed batches of `gate.batch_size` consecutive sequences: a batch a killed run cut short is scored whole again
(only its missing sequences journaled), so every entropy comes from the same packed forward as in an
uninterrupted run. Under torchrun the batches are dealt to the ranks, rank 0 journals (rmx_local/distributed.py).
The gate D = {t : H_t > tau}; with `gate.mode = "fraction"` tau is the (1 - fraction) quantile of all
completion-token entropies of the training set, and the implied tau is reported. Small models are far less
certain than the paper's (SmolLM2-135M: the paper's tau = 1.4 gates ~50% of tokens), hence the default.
`train.random_gate` replaces D by a uniformly random set of the same size (a control).

Controls and variants (the paper's gate is the default):
- `gate.select = "low"`: the same number of tokens as the high-entropy gate, but the lowest-entropy ones
  (ties broken at random with the seed): an entropy-min control.
- `gate.fraction = 1.0`: every completion token is gated (no KL term left).
- `gate.exclude_shared = true`: positions whose context (prompt + earlier completion tokens) all of a problem's
  rollouts share are never gated. Their base entropy is the same in every rollout (always the first completion
  token), so a small gate is otherwise filled with K copies of each problem's first-token entropy. In fraction
  mode tau is then chosen among the remaining positions so that the gate still holds `fraction` of all tokens.
- `gate.positives = "all"`: a positive-advantage rollout trains on every completion token (imitating the whole
  correct answer, as RFT does), a negative one only at its decision points. tau and `gated_fraction` are the
  gate's; `trained_fraction` counts the widened positives too. Measured on the word-problem recipe's dev seeds
  (docs/word-problems.md): worse than the paper's gate, the negative term then breaks the answers' format (79%
  unparseable on one seed); kept as a measured variant.
"""

from __future__ import annotations

import numpy as np

from rmx_local import distributed as dist
from rmx_local.io import Journal
from rmx_local.recipe import PAPER_TAU
from rmx_local.stages import RunContext


def run_entropies(ctx: RunContext, seqs: list[dict]) -> list[np.ndarray]:
    ctx.check_stage_key("entropies", ctx.recipe.section_hash("model", "task", "rollout", "select", "seed"), ["entropies.jsonl"])
    journal = Journal(ctx.path("entropies.jsonl"))
    done = {(r["id"], r["k"]): np.asarray(r["H"], dtype=np.float32) for r in dist.from_main(journal.read)}
    batch = ctx.recipe.gate.batch_size
    starts = [i for i in range(0, len(seqs), batch) if any((s["id"], s["k"]) not in done for s in seqs[i : i + batch])]
    if starts:
        todo = sum((s["id"], s["k"]) not in done for s in seqs)
        with ctx.timed("entropy"), ctx.ui.stage("entropy", len(seqs), "sequences") as bar:
            bar.advance(len(seqs) - todo)
            for round_starts in dist.rounds(starts):  # one batch per rank at a time (one process: one batch)
                mine = round_starts[dist.rank()] if dist.rank() < len(round_starts) else None
                # sharded (FSDP), every forward is a collective: a rank with no batch left in the round scores none
                work = seqs[mine : mine + batch] if mine is not None else ([] if dist.sharded() else None)
                scored = dist.gather(None if work is None else _score(ctx, work))
                for start, hs in zip(round_starts, scored):
                    chunk = seqs[start : start + batch]
                    for s, h in zip(chunk, hs):
                        if (s["id"], s["k"]) not in done:
                            rec = {"id": s["id"], "k": s["k"], "H": h}
                            if dist.is_main():
                                journal.append(rec)
                            done[(s["id"], s["k"])] = np.asarray(rec["H"], dtype=np.float32)  # as a resumed run reads it
                    bar.advance(len(chunk), sum(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in chunk))
            ctx.rates["entropy tok/s"] = bar.tokens_per_s
    return [done[(s["id"], s["k"])] for s in seqs]


def _score(ctx: RunContext, chunk: list[dict]) -> list[list[float]]:
    """Entropies of one batch in one packed forward, rounded as the journal stores them."""
    pairs = [(s["prompt_ids"] + s["completion_ids"], len(s["prompt_ids"])) for s in chunk]
    return [[round(float(x), 5) for x in h] for h in ctx.backend.entropies(pairs)]


def shared_context(seqs: list[dict]) -> list[np.ndarray]:
    """Per sequence: True at completion positions whose context every rollout of the same problem shares.

    Position t's context is the prompt plus completion tokens [0, t); it is shared while t <= the length of the
    common prefix of all the problem's completions (so position 0 always is)."""
    by_problem: dict[str, list[list[int]]] = {}
    for s in seqs:
        by_problem.setdefault(s["id"], []).append(s["completion_ids"])
    common = {}
    for pid, comps in by_problem.items():
        n, shortest = 0, min(len(c) for c in comps)
        while n < shortest and all(c[n] == comps[0][n] for c in comps):
            n += 1
        common[pid] = n
    return [np.arange(len(s["completion_ids"])) <= common[s["id"]] for s in seqs]


def widen_positives(seqs: list[dict], gates: list[np.ndarray], report: dict) -> tuple[list[np.ndarray], dict]:
    """`gate.positives = "all"`: every completion token of a positive-advantage rollout is trained."""
    gates = [np.ones_like(g) if s["advantage"] > 0 else g for s, g in zip(seqs, gates)]
    trained = sum(int(g.sum()) for g in gates)
    return gates, {**report, "positives": "all", "trained_fraction": trained / max(report["tokens"], 1)}


def compute_gate(entropies: list[np.ndarray], mode: str, tau: float, fraction: float,
                 random_gate: bool = False, seed: int = 0, select: str = "high",
                 shared: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], dict]:
    """Per-sequence boolean gates plus a report {tau, gated_fraction, paper_tau_fraction, ...}.

    `shared` (from `shared_context`) marks positions never to gate; `select = "low"` swaps the high-entropy gate
    for the same number of lowest-entropy tokens."""
    flat = np.concatenate(entropies) if entropies else np.zeros(0, np.float32)
    bounds = np.cumsum([0] + [h.size for h in entropies])
    eligible = ~np.concatenate(shared) if shared is not None and flat.size else np.ones(flat.size, dtype=bool)
    if mode == "fraction":
        if fraction >= 1.0:
            tau = -1.0  # entropies are >= 0: every token passes
        elif eligible.any():
            q = 1.0 - min(1.0, fraction * flat.size / eligible.sum())
            tau = float(np.quantile(flat[eligible], q))
        else:
            tau = 0.0
    chosen = (flat > tau) & eligible
    n_gated = int(chosen.sum())
    rng = np.random.default_rng(seed)
    if select == "low":
        pool = np.flatnonzero(eligible)
        order = pool[np.lexsort((rng.random(pool.size), flat[pool]))]  # ascending entropy, random among ties
        chosen = np.zeros(flat.size, dtype=bool)
        chosen[order[:n_gated]] = True
    if random_gate:
        chosen = np.zeros(flat.size, dtype=bool)
        chosen[rng.choice(flat.size, size=n_gated, replace=False)] = True
    gates = [chosen[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    report = {
        "mode": mode, "tau": tau, "tokens": int(flat.size), "gated": n_gated,
        "gated_fraction": n_gated / max(flat.size, 1), "random_gate": random_gate, "select": select,
        "excluded_shared": int((~eligible).sum()),
        "gated_entropy": float(flat[chosen].mean()) if n_gated else 0.0,
        "paper_tau": PAPER_TAU, "paper_tau_fraction": float((flat > PAPER_TAU).mean()) if flat.size else 0.0,
        "mean_entropy": float(flat.mean()) if flat.size else 0.0,
    }
    return gates, report
