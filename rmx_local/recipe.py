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
    name: str = "arith"  # arith | data (`jsonl` is its old name)
    difficulty: str = "single"  # arith only: single | word | two_step
    path: str = ""  # data only: a file, save_to_disk folder or hub id, any layout `rmx_local.data` detects
    eval_path: str = ""  # data only: held-out problems, same forms (default: split from `path`)
    template: str = "auto"  # auto (chat if the tokenizer has one) | chat | raw
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."  # after the question
    train_size: int = 55  # candidate problems for rollouts (arith single has 255 problems: 55 + 200 held out)
    val_size: int = 0  # problems held out for checkpoint selection (0 = no selection, keep the last)
    eval_size: int = 200  # held-out problems for the final base-vs-adapted table


@dataclass
class RolloutConfig:
    """Stage 1: K sampled completions per training problem from the frozen base; `engine` picks who samples."""

    engine: str = "backend"  # backend | llama_cpp | openai | auto
    n: int = 20  # K rollouts per problem
    temperature: float = 0.6  # sampling temperature (0 = greedy)
    top_p: float = 0.95  # nucleus cut on the tempered distribution
    max_tokens: int = 512  # completion token limit per rollout
    batch_size: int = 64  # sequences decoded together
    base_url: str = ""  # openai engine
    # openai engine: several servers (e.g. vLLM replicas, llama.cpp servers); problems shared out, a failed one skipped
    urls: list[str] = field(default_factory=list)
    api_model: str = ""  # openai engine: model name on the server
    api_key_env: str = "OPENAI_API_KEY"  # openai engine: variable holding the bearer key (unset is fine locally)
    concurrency: int = 8  # openai engine: requests in flight per server
    timeout_s: float = 120.0  # openai engine: seconds per socket operation of one request
    # openai engine: retries of connection errors, timeouts, 429 and 5xx, with exponential backoff
    retries: int = 4


@dataclass
class SelectConfig:
    """Stage 2: grade every rollout, keep the mixed problems, compute advantages."""

    max_problems: int = 50  # mixed problems kept, closest to 50% correct first
    trim_longest: float = 0.0  # drop this fraction of the longest rollouts
    advantage_clip: float = 2.5  # A = (r - mean) / max(std, 1e-8), clipped to +-this


@dataclass
class GateConfig:
    """Stage 3: teacher-forced base entropies and the decision-point gate D = {t : H_t > tau}."""

    mode: str = "fraction"  # fraction (tau chosen so `fraction` of completion tokens pass) | tau
    # mode tau: decision points are the completion tokens whose base entropy H_t exceeds tau (nats)
    tau: float = PAPER_TAU
    fraction: float = PAPER_GATE_FRACTION  # 1.0 = every completion token (a control)
    select: str = "high"  # high (the paper) | low: the same number of lowest-entropy tokens (a control)
    exclude_shared: bool = False  # never gate positions whose context all of a problem's rollouts share
    # gate (the paper) | all: positive-advantage rollouts train on every completion token, negative ones on the gate
    positives: str = "gate"
    batch_size: int = 8  # sequences per teacher-forced scoring pass


@dataclass
class TrainConfig:
    """Stage 4: the LoRA correction and its optimizer (AdamW, linear warmup then linear decay)."""

    lora_rank: int = 32  # LoRA rank r
    lora_alpha: float = 64.0  # LoRA scale alpha (the update is alpha / r * B @ A)
    lora_dropout: float = 0.0  # dropout on the LoRA branch input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # layers with LoRA
    lr: float = 1e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 50  # linear warmup steps, then linear decay to 0
    epochs: float = 1.0  # passes over the selected rollouts (fractions allowed)
    batch_size: int = 1  # sequences per micro-batch (one forward)
    grad_accum: int = 8  # micro-batches per optimizer step
    group_size: int = 1  # shuffle groups of this many rollouts of one problem (prompt computed once per group); paper: 1
    grad_clip: float = 1.0  # global gradient-norm clip
    kl_coef: float = 0.2  # weight of the KL(p_base || p_theta) anchor on the tokens outside the gate
    negative_ce_cap: float = 0.0  # 0 = unbounded (paper); >0 stops pushing a negative token once its CE exceeds this
    positive_only: bool = False  # control: drop negative-advantage rollouts
    random_gate: bool = False  # control: gate a random set of the same size instead of high-entropy tokens
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0 = only at the end); also the validation cadence
    select_on_train: bool = False  # no val split: pick the checkpoint by greedy accuracy on the train problems
    objective: str = "reasonmaxxer"  # reasonmaxxer (the paper's loss) | rft (baseline: plain CE on all correct rollouts)


@dataclass
class EvalConfig:
    """Stage 5: base vs adapted on the held-out problems."""

    n_samples: int = 4  # sampled completions per problem for pass@1 (mean ± standard error)
    temperature: float = 0.6  # sampling temperature for pass@1
    top_p: float = 0.95  # nucleus cut for pass@1
    greedy: bool = True  # score greedy accuracy (one greedy completion per problem)
    # completion token limit in evaluation (and in checkpoint validation)
    max_tokens: int = 512
    batch_size: int = 0  # sequences decoded together (0 = rollout.batch_size); the KV cache grows with it


@dataclass
class ExportConfig:
    """Adapter formats written at the end of a run (`rmx-local export` writes them later too)."""

    formats: list[str] = field(default_factory=list)  # written at the end of a run: gguf | mlx | peft | ollama | all
    # GGUF adapter tensor type (q8_0 falls back to f16 for tensors whose rows are not a multiple of 32)
    outtype: str = "f16"


@dataclass
class Recipe:
    model: str = "embedded:smollm2-135m-instruct"  # embedded:NAME | a transformers folder | a .gguf file | a hub id
    backend: str = "torch"  # torch | mlx | auto
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16
    seed: int = 0  # problem split, rollout sampling, data order and LoRA init
    run_dir: str = "runs/default"  # the run folder: every output, and what a rerun resumes from
    trust_remote_code: bool = False  # let transformers run a hub model's own code
    threads: int = 0  # torch CPU threads (0 = all cores)
    report: bool = True  # write RUN/report/index.html at the end of `rmx-local run` (skipped when matplotlib is missing)
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
        """Hash of the named top-level fields/sections: a stage's output is valid while these are unchanged.

        The `[rollout]` fields that say where requests go and how they travel (`TRANSPORT_FIELDS`) are hashed at their
        defaults (`urls` left out), so rollouts resume whichever and however many servers sample them, and hashes
        equal earlier versions' for recipes that kept those defaults."""
        d = self.to_dict()
        if "rollout" in d:
            defaults = dataclasses.asdict(RolloutConfig())
            d["rollout"].update({k: defaults[k] for k in TRANSPORT_FIELDS})
            d["rollout"].pop("urls")
        blob = json.dumps({n: d[n] for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def hash(self) -> str:
        return self.section_hash(*self.to_dict().keys())


TRANSPORT_FIELDS = ("urls", "base_url", "concurrency", "timeout_s", "retries", "api_key_env")  # not what is sampled

CHOICES = {
    "backend": {"torch", "mlx", "auto"},
    "device": {"auto", "cpu", "cuda", "mps"},
    "dtype": {"auto", "float32", "bfloat16", "float16"},
    "task.name": {"arith", "data", "jsonl"},
    "task.difficulty": {"single", "word", "two_step"},
    "task.template": {"auto", "chat", "raw"},
    "rollout.engine": {"backend", "llama_cpp", "openai", "auto"},
    "gate.mode": {"fraction", "tau"},
    "gate.select": {"high", "low"},
    "gate.positives": {"gate", "all"},
    "train.objective": {"reasonmaxxer", "rft"},
    "export.outtype": {"f32", "f16", "bf16", "q8_0"},
}
EXPORT_FORMATS = ("gguf", "mlx", "peft", "ollama")  # and "all"; a comma list also works


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
        raise RmxError(f"{where}: `{key}` = {value!r} is not one of {sorted(CHOICES[key])}",
                       fix=f'write e.g. {key} = "{sorted(CHOICES[key])[0]}"')
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
                raise RmxError(f"{where}: `{full}` must be a [{full}] table", fix=f"write its keys under a [{full}] line")
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
            raise RmxError(f"{path}: malformed TOML: {e}", fix="compare with `rmx-local recipes show quickstart`") from None
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
    formats_ok = all(f.strip() in (*EXPORT_FORMATS, "all") for item in r.export.formats for f in item.split(","))
    checks = [  # (ok, field, value, rule, a valid example)
        (r.rollout.n >= 2, "rollout.n", r.rollout.n, "must be >= 2 (advantages need several rollouts per problem)", "8"),
        (0 < r.rollout.top_p <= 1, "rollout.top_p", r.rollout.top_p, "must be in (0, 1]", "0.95"),
        (r.rollout.temperature >= 0, "rollout.temperature", r.rollout.temperature, "must be >= 0", "0.6"),
        (0 < r.gate.fraction <= 1, "gate.fraction", r.gate.fraction, "must be in (0, 1] (1 = every completion token)", "0.05"),
        (0 <= r.select.trim_longest < 1, "select.trim_longest", r.select.trim_longest, "must be in [0, 1)", "0.0"),
        (r.train.lora_rank > 0, "train.lora_rank", r.train.lora_rank, "must be > 0", "32"),
        (r.train.batch_size > 0, "train.batch_size", r.train.batch_size, "must be > 0", "1"),
        (r.train.grad_accum > 0, "train.grad_accum", r.train.grad_accum, "must be > 0", "8"),
        (r.train.group_size >= 1, "train.group_size", r.train.group_size, "must be >= 1 (1 = shuffled sequences)", "1"),
        (r.task.train_size > 0, "task.train_size", r.task.train_size, "must be > 0", "55"),
        (r.task.name == "arith" or r.task.path, "task.path", r.task.path, f'is required when task.name = "{r.task.name}"',
         '"data/train.jsonl"'),
        (r.eval.n_samples >= 0, "eval.n_samples", r.eval.n_samples, "must be >= 0", "4"),
        (r.eval.batch_size >= 0, "eval.batch_size", r.eval.batch_size, "must be >= 0 (0 = rollout.batch_size)", "0"),
        (formats_ok, "export.formats", r.export.formats, f"must be among {', '.join(EXPORT_FORMATS)}, all", '["gguf", "peft"]'),
        (r.rounds >= 1, "rounds", r.rounds, "must be >= 1", "1"),
        (r.rounds == 1 or r.rollout.engine == "backend", "rounds", r.rounds, "> 1 needs rollout.engine = \"backend\" "
         "(the other engines sample the base, not the adapted model)", "1"),
    ]
    for ok, name, value, rule, example in checks:
        if not ok:
            raise RmxError(f"{where}: {name} {rule}, got {value!r}", fix=f"write e.g. {name} = {example}")


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
