"""Pipeline stages share one `RunContext`: the recipe, the run folder, the UI, and lazily loaded model pieces.

Every stage writes into the run folder atomically (or as an fsynced journal) and records the hash of the
recipe sections it depends on in `meta/<stage>.json`; a rerun skips finished work and refuses to mix
outputs of a different recipe into the same folder.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmx_local import distributed as dist
from rmx_local.backends import load_backend
from rmx_local.errors import RmxError
from rmx_local.io import atomic_write_json, read_json
from rmx_local.models import ModelSource, resolve_model
from rmx_local.recipe import Recipe
from rmx_local.ui import UI


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    ui: UI
    timings: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)  # process CPU seconds (all threads) per stage
    start_adapter: Any = None  # rounds >= 2: the previous round's LoRA, loaded (and on) with the model
    round_no: int = 1
    said: set[str] = field(default_factory=set)  # one-time notes already printed (e.g. which prompt template)
    _source: ModelSource | None = None
    _backend: Any = None
    _tokenizer: Any = None

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            self.ui.line(f"model: resolving {self.recipe.model}")
            self._source = resolve_model(self.recipe.model)
        return self._source

    @property
    def backend(self):
        if self._backend is None:
            with self.timed("load model"):
                self._backend = load_backend(self.recipe, self.source, self.ui.line)
                if self.start_adapter is not None:
                    self._backend.set_adapter(self.start_adapter)
                    self._backend.set_adapter_enabled(True)
        return self._backend

    @property
    def tokenizer(self):
        if self._backend is not None:
            return self._backend.tokenizer
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.source.hf_path, trust_remote_code=self.recipe.trust_remote_code)
        return self._tokenizer

    def check_stage_key(self, stage: str, key: str, outputs: list[str]) -> None:
        """Refuse to resume a stage whose existing outputs came from different recipe settings."""
        meta = self.path("meta", f"{stage}.json")
        if meta.exists():
            old = read_json(meta)["key"]
            if old != key and any(self.path(o).exists() for o in outputs):
                raise RmxError(f"{self.run_dir}: existing {stage} outputs were made with different recipe settings",
                               fix=f"use a new run_dir, or delete {', '.join(outputs)} in it to redo {stage}")
        if dist.is_main():  # under torchrun the other ranks only read the folder
            atomic_write_json(meta, {"key": key})

    @contextlib.contextmanager
    def timed(self, stage: str):
        t0, c0 = time.time(), time.process_time()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.time() - t0
            self.cpu_timings[stage] = self.cpu_timings.get(stage, 0.0) + time.process_time() - c0

