"""Why a random gate can train as well as the entropy gate: where a run's training signal sits.

    python benchmarks/gate_gradient.py RUN [RUN ...] [--threads 1] [--json OUT.json]

For every completion token of a finished run's selected rollouts: the base model's entropy H_t (the run's
entropies.jsonl) and the norm of the cross-entropy gradient at the logits, g_t = |softmax(z_t) - onehot(y_t)|
(one teacher-forced pass of the base, batches of 8 sequences). The policy term A * mean_D CE moves the model
along a sum of these per-token gradients, so a gate holds the signal of the tokens it keeps: a token the base
already predicts with certainty has g ~ 0 and contributes nothing, whichever gate keeps it.

Printed per run, for three gates of the same size (the run's recipe: its entropy gate, a random gate drawn with
the run's seed, the lowest-entropy tokens): mean H, mean g, the share of all tokens' g mass the gate holds, and the
share of the random gate's g mass on tokens the entropy gate also holds ("overlap").
Shortcut: norms at the logits, not at the LoRA weights; Adam and the gradient clip then rescale the step, so
what the gates change is mostly the direction, which this only approximates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def logit_gradient_norms(backend, seqs: list[dict], batch: int = 8) -> list[np.ndarray]:
    """Per sequence: |softmax - onehot(target)| at each completion-predicting position, adapter off."""
    import torch

    from rmx_local.backends.torch_packing import pack, packed_logits

    out = []
    for start in range(0, len(seqs), batch):
        chunk = seqs[start : start + batch]
        pairs = [(s["prompt_ids"] + s["completion_ids"], len(s["prompt_ids"])) for s in chunk]
        packed = pack(pairs, backend.pad_id, backend.model.dtype, backend.device)
        with torch.inference_mode():
            logits = packed_logits(backend.model, packed).float()
        for i, (_, p) in enumerate(pairs):
            z = logits[packed.row[i], packed.index[i][p - 1 :]]  # (C, V): predicts the completion tokens
            prob = torch.softmax(z, dim=-1)
            y = packed.targets[i][p - 1 :]
            p_y = prob.gather(1, y[:, None])[:, 0]
            sq = (prob * prob).sum(-1) - 2 * p_y + 1  # |p - e_y|^2
            out.append(sq.clamp(min=0).sqrt().numpy().astype(np.float32))
    return out


def gate_shares(entropies: list[np.ndarray], norms: list[np.ndarray], gate_cfg, seed: int) -> dict:
    from rmx_local.stages.gate import compute_gate

    H, g = np.concatenate(entropies), np.concatenate(norms)
    gates = {
        "entropy": compute_gate(entropies, gate_cfg.mode, gate_cfg.tau, gate_cfg.fraction, False, seed)[0],
        "random": compute_gate(entropies, gate_cfg.mode, gate_cfg.tau, gate_cfg.fraction, True, seed)[0],
        "low": compute_gate(entropies, gate_cfg.mode, gate_cfg.tau, gate_cfg.fraction, False, seed, "low")[0],
    }
    flat = {name: np.concatenate(gs) for name, gs in gates.items()}
    rows = {name: {"tokens": int(m.sum()), "mean_H": float(H[m].mean()), "mean_g": float(g[m].mean()),
                   "g_share": float(g[m].sum() / g.sum())} for name, m in flat.items()}
    rand, ent = flat["random"], flat["entropy"]
    rows["random"]["overlap"] = float(g[rand & ent].sum() / g[rand].sum())
    rows["random"]["overlap_tokens"] = float((rand & ent).sum() / rand.sum())
    return {"tokens": int(H.size), "mean_g": float(g.mean()), "corr_H_g": float(np.corrcoef(H, g)[0, 1]), "gates": rows}


def analyse(run: Path) -> dict:
    from rmx_local.recipe import load_recipe
    from rmx_local.report import training_sequences
    from rmx_local.stages import RunContext
    from rmx_local.ui import UI

    recipe = load_recipe(run / "recipe.toml")
    seqs = training_sequences(run)  # selected.json with each sequence's entropies H
    entropies = [s["H"] for s in seqs]
    backend = RunContext(recipe, run, UI(rich=False)).backend
    norms = logit_gradient_norms(backend, seqs)
    bad = [i for i, (h, n) in enumerate(zip(entropies, norms)) if h.size != n.size]
    if bad:
        raise SystemExit(f"{run}: sequence {bad[0]} has {entropies[bad[0]].size} entropies but {norms[bad[0]].size} positions")
    return {"run": str(run), **gate_shares(entropies, norms, recipe.gate, recipe.seed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = [analyse(run) for run in args.runs]
    print("| run | gate | tokens | mean H | mean g | share of g | random: share on entropy-gate tokens |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in results:
        for name, row in r["gates"].items():
            extra = f"{row['overlap']:.2f} of g ({row['overlap_tokens']:.2f} of tokens)" if "overlap" in row else ""
            print(f"| {r['run']} | {name} | {row['tokens']} | {row['mean_H']:.2f} | {row['mean_g']:.3f} | "
                  f"{row['g_share']:.2f} | {extra} |")
        print(f"| {r['run']} | all | {r['tokens']} | | {r['mean_g']:.3f} | 1.00 | corr(H, g) {r['corr_H_g']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
