"""What `rmx-local eval` scores: a TARGET string -> the base model, an optional adapter, and the prompt to use.

    resolve_target(spec, *, base=None, gguf=False) -> Target
    resolve_targets(specs, *, base=None, gguf=False) -> list[Target]   (resolves `base` against the others)

TARGET forms:
  a run folder (holds adapter/)  its chosen adapter; base = recipe.toml's `model`; prompt = its task.template and
                                 task.instruction; max_tokens = its eval.max_tokens
  a PEFT adapter folder          adapter_config.json + adapter_model.safetensors; base = its base_model_name_or_path
  a GGUF adapter file (.gguf with general.type = adapter)   base = the base it names
  a model spec                   embedded:..., a transformers folder, a model .gguf, a hub id: scored as it is
  base                           the base model shared by the other targets (or --base)
A PEFT folder or GGUF file inside a run folder (run/adapter, run/export/gguf/adapter.gguf) takes that run's
prompt. `base` (the argument) replaces every adapter's own base model name. With `gguf=True` (llama.cpp
runtime) each adapter also gets a GGUF file: a run's export/gguf/adapter.gguf (exported when missing or
older than adapter/, as `rmx-local chat` does), a GGUF target itself, or for a PEFT folder a copy written
once under $RMX_LOCAL_CACHE/eval-gguf/. `check_target_fits` (export.common.check_fits on the base's config) refuses an adapter made for another base (architecture,
layer count or a projection's shape differ) before any model runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from rmx_local.adapter import LoraAdapter, load_peft
from rmx_local.errors import RmxError
from rmx_local.export import (check_fits, complete_from_base, exported_adapter, gguf_adapter_base, read_gguf_adapter,
                              write_gguf_adapter)
from rmx_local.io import read_json
from rmx_local.model_check import check_gguf
from rmx_local.models import cache_root, resolve_model
from rmx_local.runfolder import is_run, load_run_adapter, owning_run, run_base_spec, run_prompt


@dataclass
class Target:
    spec: str  # what the user wrote
    kind: str  # run | peft | gguf_adapter | model | base
    base_spec: str  # the base model, as `rmx_local.models.resolve_model` takes it ("" until `base` is resolved)
    adapter: LoraAdapter | None = None  # canonical adapter (torch scores it; GGUF targets are read back into one)
    gguf_adapter: Path | None = None  # the adapter as llama.cpp loads it (only when asked for: gguf=True)
    template: str | None = None  # the training run's prompt; None = the target brings none
    instruction: str | None = None
    max_tokens: int | None = None  # the training run's eval.max_tokens

    @property
    def label(self) -> str:
        return "base" if self.kind == "base" else self.spec


def _with_run_prompt(target: Target, run_dir: Path | None) -> Target:
    if run_dir is not None:
        prompt = run_prompt(run_dir)
        target.template, target.instruction, target.max_tokens = prompt.template, prompt.instruction, prompt.max_tokens
    return target


def _is_gguf_adapter(path: Path) -> bool:
    """A complete GGUF (rmx_local.model_check: header, length, architecture) whose general.type is adapter."""
    return check_gguf(path).get("general.type") == "adapter"


def _peft_gguf(adapter: LoraAdapter, folder: Path) -> Path:
    """A GGUF copy of a PEFT folder's adapter, written once into the cache (keyed by the weights file)."""
    st = (folder / "adapter_model.safetensors").stat()
    key = hashlib.sha256(f"{folder.resolve()}:{st.st_size}:{st.st_mtime_ns}:{adapter.base_model}".encode()).hexdigest()[:12]
    out = cache_root() / "eval-gguf" / f"{folder.name}-{key}.gguf"
    if not out.is_file():
        write_gguf_adapter(complete_from_base(adapter, resolve_model(adapter.base_model).hf_path), out, "f16")
    return out


def resolve_target(spec: str, *, base: str | None = None, gguf: bool = False) -> Target:
    """One TARGET (not `base`: see resolve_targets)."""
    path = Path(spec).expanduser()
    if is_run(path):
        adapter = load_run_adapter(path)
        adapter.base_model = base or run_base_spec(path, adapter)
        target = Target(spec, "run", adapter.base_model, adapter)
        if gguf:
            target.gguf_adapter = exported_adapter(path, "gguf")
        return _with_run_prompt(target, path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        adapter = load_peft(path)
        adapter.base_model = base or adapter.base_model
        if not adapter.base_model:
            raise RmxError(f"{path}: the adapter does not name its base model", fix="pass --base MODEL")
        target = Target(spec, "peft", adapter.base_model, adapter, _peft_gguf(adapter, path) if gguf else None)
        return _with_run_prompt(target, owning_run(path))
    if path.is_file() and path.suffix == ".gguf" and _is_gguf_adapter(path):
        base_spec = base or gguf_adapter_base(path)
        if not base_spec:
            raise RmxError(f"{path}: the adapter does not name its base model", fix="pass --base MODEL")
        adapter = read_gguf_adapter(path, model_config=_base_config(base_spec))
        adapter.base_model = base_spec
        return _with_run_prompt(Target(spec, "gguf_adapter", base_spec, adapter, path), owning_run(path))
    if spec == "base":
        raise RmxError("target `base` needs another target (or --base) to name the base model",
                       fix="e.g. rmx-local eval base runs/quickstart --data arith:single")
    resolve_model(spec)  # refuses what is neither a model file/folder, an embedded name nor a hub id
    return Target(spec, "model", spec)


def resolve_targets(specs: list[str], *, base: str | None = None, gguf: bool = False) -> list[Target]:
    """All TARGETs; `base` becomes the one base model of the others (which must agree) or `base`."""
    if not specs:
        raise RmxError("eval: no TARGET given", fix="e.g. rmx-local eval base runs/quickstart --data arith:single")
    targets = [None if s == "base" else resolve_target(s, base=base, gguf=gguf) for s in specs]
    if any(t is None for t in targets):
        bases = sorted({t.base_spec for t in targets if t is not None and t.adapter is not None})
        if base:
            bases = [base]
        if len(bases) != 1:
            raise RmxError(f"target `base`: {'no adapter target names a base model' if not bases else 'the adapters have different bases: ' + ', '.join(bases)}",
                           fix="pass --base MODEL (the model spec to score as `base`)")
        targets = [t or Target("base", "base", bases[0]) for t in targets]
    for t in targets:
        check_target_fits(t)
    return targets


def _base_config(base_spec: str) -> dict | None:
    config = Path(resolve_model(base_spec).hf_path) / "config.json"
    return read_json(config) if config.is_file() else None  # a hub id not yet downloaded: no check


def check_target_fits(target: Target) -> None:
    """Refuse an adapter whose architecture, layers or projection shapes do not match its base model."""
    if target.adapter is None:
        return
    cfg = _base_config(target.base_spec)
    if cfg is not None:
        check_fits(target.adapter, target.spec, cfg, target.base_spec)
