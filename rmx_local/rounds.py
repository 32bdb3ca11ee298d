"""`rounds = R`: sample -> select -> gate -> train, R times, each round sampling from the previous round's model.

Layout: round 1 is the plain run in RUN/ (exactly what `rounds = 1` writes); round r >= 2 is a complete run folder
RUN/round-r/ (its own rollouts, selection, entropies, gate, train/ and eval/) whose rollouts are sampled with the
LoRA of round r-1 switched on. At the end RUN/adapter holds the last round's LoRA and RUN/rounds.json one row
per round (the sampler's accuracy on the training problems, mixed problems, gate, steps, held-out accuracy).

Reference (a choice; the argument is in docs/baselines.md): the entropies and the KL anchor stay with the original
base model (adapter off) in every round, and each round continues training the same LoRA from the previous
round's weights (a fresh optimizer). So the correction is one LoRA of the recipe's rank whatever R (exports are
unchanged) and the anchor bounds the total drift from the base, not only each round's step.

Selection: with a validation split (`task.val_size`, or `train.select_on_train`) every round already keeps its best
checkpoint by validation accuracy; across rounds the round with the best validation accuracy is kept (ties to the
earlier round), so extra rounds cannot silently make the result worse. Without one, the last round is kept.

Resume: every round is an ordinary run folder, so a rerun finds finished rounds cached (no model load for them)
and continues the first unfinished one. Shortcuts: rollouts need `rollout.engine = "backend"` (llama.cpp and
servers would sample the base); a later round's LoRA is rebuilt with lora_dropout 0; its held-out "base" is the
original base (round 1's cached evaluation, copied in); its samples use seeds offset by the round number.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from rmx_local.adapter import load_peft, save_peft
from rmx_local.io import atomic_write_json
from rmx_local.recipe import Recipe
from rmx_local.round import run_round
from rmx_local.ui import UI


def val_accuracy(summary: dict) -> float | None:
    """Validation accuracy of the round's chosen checkpoint, or None without a validation split."""
    t = summary["train"]
    val = {int(k): v for k, v in (t.get("val") or {}).items()}
    return val.get(int(t["best_step"]))


def round_row(r: int, summary: dict) -> dict:
    greedy = summary["eval"].get("greedy", {})
    return {"round": r, "val": val_accuracy(summary), "sampler_train_accuracy": summary["selection"]["accuracy"], "mixed": summary["selection"]["mixed"],
            "sequences": summary["train_sequences"], "tau": summary["tau"], "gated_fraction": summary["gated_fraction"],
            "steps": summary["train"]["steps"], "held_out": greedy.get("adapted"), "base": greedy.get("base"),
            "total_s": summary["total_s"], "total_cpu_s": summary.get("total_cpu_s")}


def run_rounds(recipe: Recipe, ui: UI) -> dict:
    run = Path(recipe.run_dir)
    summary = run_round(recipe, ui)
    start = load_peft(run / "train" / summary["train"]["key"] / f"step-{summary['train']['best_step']}" / "adapter")
    rows, adapters, summaries = [round_row(1, summary)], [start], [summary]
    for r in range(2, recipe.rounds + 1):
        sub = dataclasses.replace(recipe, run_dir=str(run / f"round-{r}"), rounds=1)
        (run / f"round-{r}" / "eval").mkdir(parents=True, exist_ok=True)
        for f in (run / "eval").glob("base-*.json"):  # the held-out "base" stays the original base model
            if not (run / f"round-{r}" / "eval" / f.name).exists():
                shutil.copy(f, run / f"round-{r}" / "eval" / f.name)
        ui.line(f"round {r}/{recipe.rounds}: sampling from round {r - 1}'s adapted model")
        summary = run_round(sub, ui, start_adapter=start, round_no=r)
        start = load_peft(run / f"round-{r}" / "adapter")
        rows.append(round_row(r, summary))
        adapters.append(start)
        summaries.append(summary)
    validated = [i for i, row in enumerate(rows) if row["val"] is not None]
    best = max(validated, key=lambda i: (rows[i]["val"], -i)) if validated else len(rows) - 1
    save_peft(adapters[best], run / "adapter")
    atomic_write_json(run / "rounds.json", rows)
    ui.line(f"rounds: kept round {best + 1} of {len(rows)}" + (" (best validation accuracy)" if validated else " (the last)"))
    summary = dict(summaries[best], rounds=rows, chosen_round=best + 1, total_s=sum(x["total_s"] for x in rows))
    atomic_write_json(run / "summary.json", summary)
    return summary
