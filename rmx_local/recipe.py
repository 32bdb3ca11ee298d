"""Recipes: one TOML file (plus `key=value` overrides) -> a typed, validated `Recipe`.

Every knob of the method is a field here, with the paper's value as the default (arXiv 2605.06241).
Unknown keys and wrong types are refused with the closest valid key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from rmx_local.errors import RmxError

PAPER_TAU = 1.4  # Qwen2.5-1.5B; the paper uses 1.2-1.8
PAPER_GATE_FRACTION = 0.05


@dataclass
class TaskConfig:
    name: str = "arith"  # arith | jsonl
    difficulty: str = "single"  # arith only: single | word | two_step
    path: str = ""  # jsonl only: GSM8K-format ({question, answer "#### N"}) or {problem, answer}
    eval_path: str = ""  # jsonl only: held-out file (default: split from `path`)
    template: str = "auto"  # auto (chat if the tokenizer has one) | chat | raw
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."  # after the question
    train_size: int = 55  # candidate problems for rollouts (arith single has 255 problems: 55 + 200 held out)
    val_size: int = 0  # problems held out for checkpoint selection (0 = no selection, keep the last)
    eval_size: int = 200  # held-out problems for the final base-vs-adapted table


@dataclass
class RolloutConfig:
    engine: str = "backend"  # backend | llama_cpp | openai | auto
    n: int = 20  # K rollouts per problem
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 512
    batch_size: int = 64  # sequences decoded together
    base_url: str = ""  # openai engine
    api_model: str = ""  # openai engine: model name on the server
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 120.0
    retries: int = 4


@dataclass
class SelectConfig:
    max_problems: int = 50  # mixed problems kept, closest to 50% correct first
    trim_longest: float = 0.0  # drop this fraction of the longest rollouts
    advantage_clip: float = 2.5  # A = (r - mean) / max(std, 1e-8), clipped to +-this


@dataclass
class GateConfig:
    mode: str = "fraction"  # fraction (tau chosen so `fraction` of completion tokens pass) | tau
    tau: float = PAPER_TAU
    fraction: float = PAPER_GATE_FRACTION
    batch_size: int = 8  # sequences per teacher-forced scoring pass


@dataclass
class TrainConfig:
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    epochs: float = 1.0
    batch_size: int = 1
    grad_accum: int = 8
    group_size: int = 1  # shuffle groups of this many rollouts of one problem (prompt computed once per group); paper: 1
    grad_clip: float = 1.0
    kl_coef: float = 0.2
    negative_ce_cap: float = 0.0  # 0 = unbounded (paper); >0 stops pushing a negative token once its CE exceeds this
    positive_only: bool = False  # control: drop negative-advantage rollouts
    random_gate: bool = False  # control: gate a random set of the same size instead of high-entropy tokens
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0 = only at the end); also the validation cadence
    select_on_train: bool = False  # no val split: pick the checkpoint by greedy accuracy on the train problems
    objective: str = "reasonmaxxer"  # reasonmaxxer (the paper's loss) | rft (baseline: plain CE on all correct rollouts)


@dataclass
class EvalConfig:
    n_samples: int = 4  # sampled completions per problem for pass@1 (mean ± standard error)
    temperature: float = 0.6
    top_p: float = 0.95
    greedy: bool = True
    max_tokens: int = 512


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=list)  # gguf | mlx | peft | ollama | all
    outtype: str = "f16"


@dataclass
class Recipe:
    model: str = "embedded:smollm2-135m-instruct"
    backend: str = "torch"  # torch | mlx | auto
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16
    seed: int = 0
    run_dir: str = "runs/default"
    trust_remote_code: bool = False
    threads: int = 0  # torch CPU threads (0 = all cores)
    rounds: int = 1  # sample -> select -> gate -> train, repeated with the adapted model as the sampler; paper: 1
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Hash of the named top-level fields/sections: a stage's output is valid while these are unchanged."""
        d = self.to_dict()
        blob = json.dumps({n: d[n] for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def hash(self) -> str:
        return self.section_hash(*self.to_dict().keys())


CHOICES = {
    "backend": {"torch", "mlx", "auto"},
    "device": {"auto", "cpu", "cuda", "mps"},
    "dtype": {"auto", "float32", "bfloat16", "float16"},
    "task.name": {"arith", "jsonl"},
    "task.difficulty": {"single", "word", "two_step"},
    "task.template": {"auto", "chat", "raw"},
    "rollout.engine": {"backend", "llama_cpp", "openai", "auto"},
    "gate.mode": {"fraction", "tau"},
    "train.objective": {"reasonmaxxer", "rft"},
    "export.outtype": {"f32", "f16", "bf16", "q8_0"},
}


def _check_value(where: str, key: str, typ: Any, value: Any) -> Any:
    """Coerce/validate one scalar field; raise a one-line error naming file and field."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = (
        (typ is bool and isinstance(value, bool))
        or (typ is int and isinstance(value, int) and not isinstance(value, bool))
        or (typ is float and isinstance(value, float))
        or (typ is str and isinstance(value, str))
        or (getattr(typ, "__origin__", None) is list and isinstance(value, list) and all(isinstance(v, str) for v in value))
    )
    if not ok:
        tname = getattr(typ, "__name__", str(typ))
        raise RmxError(f"{where}: `{key}` must be {tname}, got {value!r}", fix=f"write e.g. {key} = {_example(typ)}")
    if key in CHOICES and value not in CHOICES[key]:
        raise RmxError(f"{where}: `{key}` = {value!r} is not one of {sorted(CHOICES[key])}")
    return value


def _example(typ: Any) -> str:
    return {bool: "true", int: "8", float: "0.5", str: '"text"'}.get(typ, '["a", "b"]')


def _fill(obj: Any, data: dict[str, Any], where: str, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            fix = f"did you mean `{prefix}{close[0]}`?" if close else f"valid keys: {', '.join(prefix + n for n in names)}"
            raise RmxError(f"{where}: unknown key `{full}`", fix=fix)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise RmxError(f"{where}: `{full}` must be a [{full}] table")
            _fill(current, value, where, prefix=f"{full}.")
        else:
            setattr(obj, key, _check_value(where, full, hints[key], value))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise RmxError(f"override `{text}` is not key=value", fix="write e.g. train.lr=1e-3")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    recipe = Recipe()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RmxError(f"recipe not found: {path}", fix="`rmx-local recipes list` shows the bundled recipes")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RmxError(f"{path}: malformed TOML: {e}") from None
        _fill(recipe, data, str(path))
    for text in overrides:
        keys, value = parse_override(text)
        nested: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            nested = {k: nested}
        _fill(recipe, nested, f"override `{text}`")
    _check_ranges(recipe, str(path) if path is not None else "recipe")
    return recipe


def _check_ranges(r: Recipe, where: str) -> None:
    checks = [
        (r.rollout.n >= 2, "rollout.n must be >= 2 (advantages need several rollouts per problem)"),
        (0 < r.rollout.top_p <= 1, "rollout.top_p must be in (0, 1]"),
        (r.rollout.temperature >= 0, "rollout.temperature must be >= 0"),
        (0 < r.gate.fraction < 1, "gate.fraction must be in (0, 1)"),
        (0 <= r.select.trim_longest < 1, "select.trim_longest must be in [0, 1)"),
        (r.train.lora_rank > 0, "train.lora_rank must be > 0"),
        (r.train.grad_accum > 0 and r.train.batch_size > 0, "train.batch_size and train.grad_accum must be > 0"),
        (r.train.group_size >= 1, "train.group_size must be >= 1 (1 = shuffled sequences)"),
        (r.task.train_size > 0, "task.train_size must be > 0"),
        (r.rounds >= 1, "rounds must be >= 1"),
        (r.rounds == 1 or r.rollout.engine == "backend", "rounds > 1 needs rollout.engine = \"backend\" (the other engines sample the base, not the adapted model)"),
        (r.task.name != "jsonl" or r.task.path, "task.path is required when task.name = \"jsonl\""),
        (r.eval.n_samples >= 0, "eval.n_samples must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise RmxError(f"{where}: {msg}")


def recipe_to_toml(recipe: Recipe) -> str:
    """Resolved recipe as TOML (written next to every run so it can be rerun exactly)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    top, tables = [], []
    for key, value in recipe.to_dict().items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]\n" + "\n".join(f"{k} = {fmt(v)}" for k, v in value.items()))
        else:
            top.append(f"{key} = {fmt(value)}")
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"
