"""Recipes: one TOML file (plus `key=value` overrides) -> a typed, validated `Recipe`.

Every knob of the method is a field here, with the paper's value as the default (arXiv 2605.06241).
Unknown keys and wrong types are refused with the closest valid key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from rmx_local.errors import RmxError
from rmx_local.ranges import Range, ranged

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
    # candidate problems for rollouts (arith single has 255 problems: 55 + 200 held out)
    train_size: int = ranged(55, "[1, inf)")
    # problems held out for checkpoint selection (0 = no selection, keep the last)
    val_size: int = ranged(0, "[0, inf)")
    eval_size: int = ranged(200, "[1, inf)")  # held-out problems for the final base-vs-adapted table


@dataclass
class RolloutConfig:
    """Stage 1: K sampled completions per training problem from the frozen base; `engine` picks who samples."""

    engine: str = "backend"  # backend | llama_cpp | openai | auto
    n: int = ranged(20, "[2, inf)", "advantages need several rollouts per problem")  # K rollouts per problem
    temperature: float = ranged(0.6, "[0, inf)")  # sampling temperature (0 = greedy)
    top_p: float = ranged(0.95, "(0, 1]")  # nucleus cut on the tempered distribution
    max_tokens: int = ranged(512, "[1, inf)")  # completion token limit per rollout
    batch_size: int = ranged(64, "[1, inf)")  # sequences decoded together
    base_url: str = ""  # openai engine
    # openai engine: several servers (e.g. vLLM replicas, llama.cpp servers); problems shared out, a failed one skipped
    urls: list[str] = field(default_factory=list)
    api_model: str = ""  # openai engine: model name on the server
    api_key_env: str = "OPENAI_API_KEY"  # openai engine: variable holding the bearer key (unset is fine locally)
    concurrency: int = ranged(8, "[1, inf)")  # openai engine: requests in flight per server
    timeout_s: float = ranged(120.0, "(0, inf)")  # openai engine: seconds per socket operation of one request
    # openai engine: retries of connection errors, timeouts, 429 and 5xx, with exponential backoff
    retries: int = ranged(4, "[0, inf)")


@dataclass
class SelectConfig:
    """Stage 2: grade every rollout, keep the mixed problems, compute advantages."""

    max_problems: int = ranged(50, "[1, inf)")  # mixed problems kept, closest to 50% correct first
    trim_longest: float = ranged(0.0, "[0, 1)")  # drop this fraction of the longest rollouts
    advantage_clip: float = ranged(2.5, "(0, inf)")  # A = (r - mean) / max(std, 1e-8), clipped to +-this


@dataclass
class GateConfig:
    """Stage 3: teacher-forced base entropies and the decision-point gate D = {t : H_t > tau}."""

    mode: str = "fraction"  # fraction (tau chosen so `fraction` of completion tokens pass) | tau
    # mode tau: decision points are the completion tokens whose base entropy H_t exceeds tau (nats)
    tau: float = ranged(PAPER_TAU, "[0, inf)", "an entropy in nats")
    fraction: float = ranged(PAPER_GATE_FRACTION, "(0, 1]")  # 1.0 = every completion token (a control)
    select: str = "high"  # high (the paper) | low: the same number of lowest-entropy tokens (a control)
    exclude_shared: bool = False  # never gate positions whose context all of a problem's rollouts share
    # gate (the paper) | all: positive-advantage rollouts train on every completion token, negative ones on the gate
    positives: str = "gate"
    batch_size: int = ranged(8, "[1, inf)")  # sequences per teacher-forced scoring pass


@dataclass
class TrainConfig:
    """Stage 4: the LoRA correction and its optimizer (AdamW, linear warmup then linear decay)."""

    lora_rank: int = ranged(32, "[1, inf)")  # LoRA rank r
    lora_alpha: float = ranged(64.0, "(0, inf)")  # LoRA scale alpha (the update is alpha / r * B @ A)
    lora_dropout: float = ranged(0.0, "[0, 1)")  # dropout on the LoRA branch input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # layers with LoRA
    lr: float = ranged(1e-4, "(0, inf)")  # AdamW peak learning rate
    weight_decay: float = ranged(0.0, "[0, inf)")  # AdamW decoupled weight decay
    warmup_steps: int = ranged(50, "[0, inf)")  # linear warmup steps, then linear decay to 0
    epochs: float = ranged(1.0, "(0, inf)")  # passes over the selected rollouts (fractions allowed)
    batch_size: int = ranged(1, "[1, inf)")  # sequences per micro-batch (one forward)
    grad_accum: int = ranged(8, "[1, inf)")  # micro-batches per optimizer step
    # shuffle groups of this many rollouts of one problem (prompt computed once per group); paper: 1
    group_size: int = ranged(1, "[1, inf)")
    grad_clip: float = ranged(1.0, "[0, inf)")  # global gradient-norm clip
    # weight of the KL(p_base || p_theta) anchor on the tokens outside the gate
    kl_coef: float = ranged(0.2, "[0, inf)")
    # 0 = unbounded (paper); >0 stops pushing a negative token once its CE exceeds this
    negative_ce_cap: float = ranged(0.0, "[0, inf)")
    positive_only: bool = False  # control: drop negative-advantage rollouts
    random_gate: bool = False  # control: gate a random set of the same size instead of high-entropy tokens
    # optimizer steps between checkpoints (0 = only at the end); also the validation cadence
    checkpoint_every: int = ranged(0, "[0, inf)")
    select_on_train: bool = False  # no val split: pick the checkpoint by greedy accuracy on the train problems
    objective: str = "reasonmaxxer"  # reasonmaxxer (the paper's loss) | rft (baseline: plain CE on all correct rollouts)


@dataclass
class EvalConfig:
    """Stage 5: base vs adapted on the held-out problems."""

    n_samples: int = ranged(4, "[0, inf)")  # sampled completions per problem for pass@1 (mean ± standard error)
    temperature: float = ranged(0.6, "[0, inf)")  # sampling temperature for pass@1
    top_p: float = ranged(0.95, "(0, 1]")  # nucleus cut for pass@1
    greedy: bool = True  # score greedy accuracy (one greedy completion per problem)
    # completion token limit in evaluation (and in checkpoint validation)
    max_tokens: int = ranged(512, "[1, inf)")
    # sequences decoded together (0 = rollout.batch_size); the KV cache grows with it
    batch_size: int = ranged(0, "[0, inf)")


@dataclass
class ExportConfig:
    """Adapter formats written at the end of a run (`rmx-local export` writes them later too)."""

    formats: list[str] = field(default_factory=list)  # written at the end of a run: gguf | mlx | peft | ollama | all
    # GGUF adapter tensor type (q8_0 falls back to f16 for tensors whose rows are not a multiple of 32)
    outtype: str = "f16"


# The default [sweep] list, simplest first (a tie within 1 SE on validation goes to the earlier entry): the paper's
# loss at its tau grid, the fraction gate, every token of the positive rollouts for 1 and 2 epochs, plain RFT.
_PAPER_LOSS = "gate.positives=gate train.objective=reasonmaxxer train.positive_only=false train.epochs=1"
DEFAULT_VARIANTS = [
    *(f"paper-tau{t}: gate.mode=tau gate.tau={t} {_PAPER_LOSS}" for t in ("1.2", "1.4", "1.6", "1.8")),
    f"fraction-0.2: gate.mode=fraction gate.fraction=0.2 {_PAPER_LOSS}",
    "positive-1ep: gate.mode=fraction gate.fraction=1.0 gate.positives=gate train.objective=reasonmaxxer "
    "train.positive_only=true train.epochs=1",
    "positive-2ep: gate.mode=fraction gate.fraction=1.0 gate.positives=gate train.objective=reasonmaxxer "
    "train.positive_only=true train.epochs=2",
    "rft: train.objective=rft train.positive_only=false train.epochs=1",
]


@dataclass
class SweepConfig:
    """Train several gate/train variants on the run's one set of rollouts; keep the best on validation (sweep.py)."""

    enabled: bool = False  # true: `run` trains every variant and keeps the best on the task.val_size problems
    # "NAME: key=value ..." per variant, overrides of gate.* / train.* fields; ties within 1 SE go to the earlier one
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    # estimated time budget of the whole sweep (0 = no limit); variants that do not fit are dropped
    max_minutes: float = ranged(0.0, "[0, inf)")


@dataclass
class Recipe:
    model: str = "embedded:smollm2-135m-instruct"  # embedded:NAME | a transformers folder | a .gguf file | a hub id
    backend: str = "torch"  # torch | mlx | auto
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16
    # problem split, rollout sampling, data order and LoRA init
    seed: int = ranged(0, "[0, 4294967295]", "the seeds derived from it must fit 64 bits")
    run_dir: str = "runs/default"  # the run folder: every output, and what a rerun resumes from
    trust_remote_code: bool = False  # let transformers run a hub model's own code
    threads: int = ranged(0, "[0, inf)")  # torch CPU threads (0 = all cores)
    # under torchrun: shard the frozen base's decoder layers across the ranks (FSDP2), for a model that does not fit
    # one device; rollouts and evaluation then come from servers (docs/multi-gpu.md). One process: no effect
    fsdp: bool = False
    report: bool = True  # write RUN/report/index.html at the end of `rmx-local run` (skipped when matplotlib is missing)
    # sample -> select -> gate -> train, repeated with the adapted model as the sampler; paper: 1
    rounds: int = ranged(1, "[1, inf)")
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

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

GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # GGUF adapter tensor types, widest first
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
    "export.outtype": set(GGUF_OUTTYPES),
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


def field_info(key: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field of a dotted key (`train.lr`) and its default."""
    cls, default = Recipe, Recipe()
    *sections, name = key.split(".")
    for section in sections:
        default = getattr(default, section)
        cls = type(default)
    return next(f for f in dataclasses.fields(cls) if f.name == name), getattr(default, name)


def numeric_fields() -> list[tuple[str, type, Range | None]]:
    """(dotted key, int or float, its Range or None) for every numeric field of the schema."""
    out = []

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            elif hints[f.name] in (int, float):
                out.append((prefix + f.name, hints[f.name], f.metadata.get("range")))

    walk(Recipe, "")
    return out


def check_range(where: str, key: str, value: Any, flag: str | None = None) -> Any:
    """Refuse a value outside its field's range (and a value not among CHOICES[key]), naming field, value and an
    example; `flag` (e.g. "--top-p") words the fix for a CLI option that sets the field. Returns the value."""
    f, default = field_info(key)
    rng = f.metadata.get("range")
    example = f"{flag} {default}" if flag else f"{key} = {default!r}"
    if rng is not None and value not in rng:
        finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
        subject = f"must be {finite}{rng.rule()}" + (f" (the range of {key})" if flag else "")
        raise RmxError(f"{where}: {'' if flag else key + ' '}{subject}, got {value!r}", fix=f"write e.g. {example}")
    if flag and key in CHOICES and value not in CHOICES[key]:
        raise RmxError(f"{where}: {value!r} is not one of {sorted(CHOICES[key])}", fix=f"write e.g. {flag} {default}")
    return value


def flag_check(key: str):
    """A click callback: the option mirrors recipe field KEY and takes the same range/choices (None = unset)."""
    def callback(ctx, param, value):
        if value is None or value == ():
            return value
        flag = max(param.opts, key=len)
        for v in value if isinstance(value, tuple) else (value,):
            check_range(f"{flag} {v}", key, v, flag)
        return value
    return callback


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
            setattr(obj, key, check_range(where, full, _check_value(where, full, hints[key], value)))


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
    apply_overrides(recipe, overrides)
    check_ranges(recipe, str(path) if path is not None else "recipe")
    return recipe


def apply_overrides(recipe: Recipe, overrides: list[str], where: str = "") -> None:
    """Set each `key=value` on `recipe` in place; errors name `where` (default: the override itself)."""
    for text in overrides:
        keys, value = parse_override(text)
        nested: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            nested = {k: nested}
        _fill(recipe, nested, where or f"override `{text}`")


def check_ranges(r: Recipe, where: str) -> None:
    formats_ok = all(f.strip() in (*EXPORT_FORMATS, "all") for item in r.export.formats for f in item.split(","))
    checks = [  # (ok, field, value, rule, a valid example)
        (r.task.name == "arith" or r.task.path, "task.path", r.task.path, f'is required when task.name = "{r.task.name}"',
         '"data/train.jsonl"'),
        (formats_ok, "export.formats", r.export.formats, f"must be among {', '.join(EXPORT_FORMATS)}, all", '["gguf", "peft"]'),
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
