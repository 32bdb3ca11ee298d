"""A short model card (README.md) for an exported correction, from the adapter and the run's summary.json.

Shortcut: the summary is free-form; known keys (recipe_hash, gated_fraction, tau, train_problems,
eval {base, adapted}) are shown, missing ones are left out, and scores are shown as given (a fraction
in [0, 1] as a percentage).
"""

from __future__ import annotations

from rmx_local.adapter import LoraAdapter

USAGE = {
    "gguf": "llama-cli -m BASE.gguf --lora adapter.gguf -p '...'   # or Llama(model_path=BASE, lora_path='adapter.gguf')",
    "mlx": "mlx_lm.generate --model BASE_HF_FOLDER --adapter-path . --prompt '...'",
    "peft": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), '.')",
    "ollama": "ollama create rmx-correction -f Modelfile && ollama run rmx-correction",
}


def _score(value) -> str:
    if isinstance(value, dict):
        for key in ("accuracy", "acc", "score"):
            if key in value:
                return _score(value[key])
        return ", ".join(f"{k}={_score(v)}" for k, v in value.items())
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return f"{100 * value:.1f}%"
    return str(value)


def model_card(adapter: LoraAdapter, summary: dict | None = None, fmt: str = "") -> str:
    summary = summary or {}
    lines = [f"# rmx-local correction for {adapter.base_model or 'its base model'}", "",
             "A small LoRA correction of the base model's math reasoning, trained with the ReasonMaxxer method "
             "(entropy-gated advantage re-ranking) by rmx-local.", "",
             f"- Base model: `{adapter.base_model or 'unknown'}` ({adapter.architecture or 'unknown architecture'})",
             f"- LoRA: rank {adapter.rank}, alpha {adapter.alpha:g}, targets {', '.join(adapter.targets)}, "
             f"{len(adapter.weights)} modules"]
    facts = [("recipe_hash", "Recipe hash", "`{}`"), ("gated_fraction", "Gated token fraction", "{:.3g}"),
             ("tau", "Entropy threshold tau", "{:.3g}"), ("train_problems", "Training problems", "{}")]
    for key, label, form in facts:
        if summary.get(key) is not None:
            try:
                lines.append(f"- {label}: {form.format(summary[key])}")
            except (TypeError, ValueError):
                lines.append(f"- {label}: {summary[key]}")
    scores = summary.get("eval") or {}
    if "base" in scores or "adapted" in scores:
        lines += ["", "| | score |", "|---|---|"]
        lines += [f"| {name} | {_score(scores[name])} |" for name in ("base", "adapted") if name in scores]
    if fmt in USAGE:
        lines += ["", "## Use", "", "```", USAGE[fmt], "```"]
    return "\n".join(lines) + "\n"
