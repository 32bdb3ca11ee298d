"""Stage 3: teacher-forced base entropies and the decision-point gate.

H_t is the full-vocabulary entropy (nats, fp32) of the base model's distribution for completion token t,
scored with the adapter off. Entropies are journaled per sequence in `entropies.jsonl` (resumable).
The gate D = {t : H_t > tau}; with `gate.mode = "fraction"` tau is the (1 - fraction) quantile of all
completion-token entropies of the training set, and the implied tau is reported. Small models are far less
certain than the paper's (SmolLM2-135M: the paper's tau = 1.4 gates ~50% of tokens), hence the default.
`train.random_gate` replaces D by a uniformly random set of the same size (a control).
"""

from __future__ import annotations

import numpy as np

from rmx_local.io import Journal
from rmx_local.recipe import PAPER_TAU
from rmx_local.stages import RunContext


def run_entropies(ctx: RunContext, seqs: list[dict]) -> list[np.ndarray]:
    ctx.check_stage_key("entropies", ctx.recipe.section_hash("model", "task", "rollout", "select", "seed"), ["entropies.jsonl"])
    journal = Journal(ctx.path("entropies.jsonl"))
    done = {(r["id"], r["k"]): np.asarray(r["H"], dtype=np.float32) for r in journal.read()}
    todo = [s for s in seqs if (s["id"], s["k"]) not in done]
    if todo:
        batch = ctx.recipe.gate.batch_size
        with ctx.timed("entropy"), ctx.ui.stage("entropy", len(seqs), "sequences") as bar:
            bar.advance(len(seqs) - len(todo))
            for start in range(0, len(todo), batch):
                chunk = todo[start : start + batch]
                pairs = [(s["prompt_ids"] + s["completion_ids"], len(s["prompt_ids"])) for s in chunk]
                for s, h in zip(chunk, ctx.backend.entropies(pairs)):
                    journal.append({"id": s["id"], "k": s["k"], "H": [round(float(x), 5) for x in h]})
                    done[(s["id"], s["k"])] = np.round(h, 5)
                bar.advance(len(chunk), sum(len(t) for t, _ in pairs))
            ctx.rates["entropy tok/s"] = bar.tokens_per_s
    return [done[(s["id"], s["k"])] for s in seqs]


def compute_gate(entropies: list[np.ndarray], mode: str, tau: float, fraction: float,
                 random_gate: bool = False, seed: int = 0) -> tuple[list[np.ndarray], dict]:
    """Per-sequence boolean gates plus a report {tau, gated_fraction, paper_tau_fraction, ...}."""
    flat = np.concatenate(entropies) if entropies else np.zeros(0, np.float32)
    if mode == "fraction":
        tau = float(np.quantile(flat, 1.0 - fraction)) if flat.size else 0.0
    gates = [h > tau for h in entropies]
    n_gated = int(sum(g.sum() for g in gates))
    if random_gate:
        rng = np.random.default_rng(seed)
        chosen = np.zeros(flat.size, dtype=bool)
        chosen[rng.choice(flat.size, size=n_gated, replace=False)] = True
        bounds = np.cumsum([0] + [h.size for h in entropies])
        gates = [chosen[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    report = {
        "mode": mode, "tau": tau, "tokens": int(flat.size), "gated": n_gated,
        "gated_fraction": n_gated / max(flat.size, 1), "random_gate": random_gate,
        "paper_tau": PAPER_TAU, "paper_tau_fraction": float((flat > PAPER_TAU).mean()) if flat.size else 0.0,
        "mean_entropy": float(flat.mean()) if flat.size else 0.0,
    }
    return gates, report
