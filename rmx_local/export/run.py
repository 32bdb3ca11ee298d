"""`export_run`: one run folder's canonical adapter -> RUN_DIR/export/{gguf,mlx,peft,ollama}/.

Reads RUN_DIR/adapter/ (PEFT), and optionally RUN_DIR/summary.json (model card facts) and RUN_DIR/recipe.toml
(its top-level `model` names the base; Ollama needs the base's GGUF). Each format folder is written
atomically and carries a README.md model card.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

from rmx_local.adapter import LoraAdapter, save_peft
from rmx_local.archs import ARCHS
from rmx_local.errors import RmxError
from rmx_local.export.card import model_card
from rmx_local.export.common import check_same_base, complete_from_base
from rmx_local.export.gguf_adapter import OUTTYPES, write_gguf_adapter
from rmx_local.export.mlx_adapter import write_mlx_adapter
from rmx_local.export.ollama import write_ollama
from rmx_local.io import atomic_dir, atomic_write_text, read_json
from rmx_local.lock import run_lock
from rmx_local.model_check import check_model_source
from rmx_local.models import model_summary, resolve_model
from rmx_local.recipe import EXPORT_FORMATS
from rmx_local.runfolder import load_run_adapter, run_base_spec, variant_adapter

FORMATS = EXPORT_FORMATS
GGUF_NAME = "adapter.gguf"


def _format_names(formats: list[str] | str) -> list[str]:
    """'gguf, MLX' or ["gguf", "mlx,peft"] -> the lower-case names as written."""
    items = [formats] if isinstance(formats, str) else list(formats)
    return [f.strip().lower() for item in items for f in item.split(",") if f.strip()]


def parse_formats(formats: list[str] | str) -> list[str]:
    names = _format_names(formats)
    if "all" in names:
        return list(FORMATS)
    bad = [f for f in names if f not in FORMATS]
    if bad or not names:
        raise RmxError(f"export: unknown format {', '.join(bad) or '(none)'}", fix=f"use {'|'.join(FORMATS)}|all")
    return [f for f in FORMATS if f in names]


def wants_all(formats: list[str] | str) -> bool:
    return "all" in _format_names(formats)


def unexportable(formats: list[str], model_type: str, base_gguf: str | None) -> dict[str, tuple[str, str]]:
    """{format: (why it cannot be written for this base, the fix)} for the formats among `formats` that cannot."""
    skipped = {}
    if model_type not in ARCHS:
        why = f"model_type {model_type!r} is not in rmx_local/archs.py"
        fix = f"these formats support {', '.join(ARCHS)}; --format peft works for any model"
        skipped.update({f: (why, fix) for f in formats if f in ("gguf", "mlx", "ollama")})
    if "ollama" in formats and "ollama" not in skipped and not base_gguf:
        skipped["ollama"] = ("Ollama needs the base as a GGUF file and this base has none",
                             "use a .gguf or embedded model in the recipe, or convert the base with llama.cpp's "
                             "convert_hf_to_gguf.py and put the .gguf in its folder")
    return skipped


def check_exportable(formats: list[str] | str, hf_path: str, base_gguf: str | None = None) -> dict[str, tuple[str, str]]:
    """Before any work: refuse a format named explicitly that cannot express the base; with `all`, return what
    will be skipped ({format: (why, fix)}) instead."""
    config = Path(hf_path) / "config.json"
    if not config.is_file():
        return {}
    skipped = unexportable(parse_formats(formats), read_json(config).get("model_type", ""), base_gguf)
    if skipped and not wants_all(formats):
        fmt, (why, fix) = next(iter(skipped.items()))
        raise RmxError(f"export.formats = {formats}: cannot write {fmt}: {why} ({config})", fix=fix)
    return skipped


def export_run(run_dir: str | Path, formats: list[str] | str, outtype: str = "f16",
               out_dir: str | Path | None = None, skipped: dict | None = None,
               variant: str | None = None) -> dict[str, Path]:
    """Export a run's adapter (or, with `variant`, that sweep variant's, to RUN_DIR/export/variant-NAME by default);
    return {format: folder written}. With "all", every format this base allows is written and each one it does not
    is put in `skipped` ({format: (why, fix)}); a format named explicitly that cannot be written is refused before
    anything is written."""
    run_dir = Path(run_dir)
    chosen = parse_formats(formats)
    if outtype not in OUTTYPES:
        raise RmxError(f"export: unknown --outtype {outtype!r}", fix=f"use one of {', '.join(OUTTYPES)}")
    adapter = load_run_adapter(run_dir) if variant is None else variant_adapter(run_dir, variant)
    if variant is not None and out_dir is None:
        out_dir = run_dir / "export" / f"variant-{variant}"
    # a run still writing this folder's adapter must finish first; a read-only finished run exports with --out
    read_only = out_dir is not None and not os.access(run_dir, os.W_OK)
    with contextlib.nullcontext() if read_only else run_lock(run_dir):
        return _export(run_dir, adapter, chosen, outtype, out_dir, wants_all(formats),
                       skipped if skipped is not None else {}, variant is None)


def _export(run_dir: Path, adapter: LoraAdapter, chosen: list[str], outtype: str, out_dir: str | Path | None,
            every: bool, skipped: dict, run_adapter: bool = True) -> dict[str, Path]:
    has_summary = run_adapter and (run_dir / "summary.json").is_file()  # summary.json describes the run's adapter only
    summary = read_json(run_dir / "summary.json") if has_summary else {}
    spec = run_base_spec(run_dir, adapter)
    check_model_source(spec, weights=False)  # export reads the base's config.json and its GGUF, not its weights
    adapter.base_model = adapter.base_model or spec
    base = functools.cache(lambda: resolve_model(spec))  # resolved once, and only when a step below needs it
    base_gguf = base().gguf_path if "ollama" in chosen else None
    cannot = unexportable(chosen, adapter.architecture or model_summary(base().hf_path)["model_type"], base_gguf)
    if cannot and not every:
        fmt, (why, fix) = next(iter(cannot.items()))
        raise RmxError(f"export {fmt}: {why}", fix=fix)
    skipped.update(cannot)
    chosen = [f for f in chosen if f not in cannot]
    if any(f != "peft" for f in chosen):
        check_same_base(adapter, base().hf_path, repr(spec))
        adapter = complete_from_base(adapter, base().hf_path)
    out = Path(out_dir) if out_dir else run_dir / "export"
    written: dict[str, Path] = {}
    if "peft" in chosen:
        written["peft"] = save_peft(adapter, out / "peft")
        atomic_write_text(out / "peft" / "README.md", model_card(adapter, summary, "peft"))
    if "mlx" in chosen:
        written["mlx"] = write_mlx_adapter(adapter, out / "mlx")
        atomic_write_text(out / "mlx" / "README.md", model_card(adapter, summary, "mlx"))
    if "gguf" in chosen:
        with atomic_dir(out / "gguf") as tmp:
            write_gguf_adapter(adapter, tmp / GGUF_NAME, outtype)
            (tmp / "README.md").write_text(model_card(adapter, summary, "gguf"))
        written["gguf"] = out / "gguf"
    if "ollama" in chosen:
        card = model_card(adapter, summary, "ollama")
        if "gguf" in written:
            written["ollama"] = write_ollama(written["gguf"] / GGUF_NAME, base_gguf, out / "ollama", card)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                write_gguf_adapter(adapter, Path(tmp) / GGUF_NAME, outtype)
                written["ollama"] = write_ollama(Path(tmp) / GGUF_NAME, base_gguf, out / "ollama", card)
    return written


def exported_adapter(run_dir: Path, fmt: str) -> Path:
    """The run's adapter as `fmt` (gguf: the file, mlx: the folder) under RUN_DIR/export/, written on first use and
    again whenever adapter/ is newer."""
    artifact = run_dir / "export" / "gguf" / GGUF_NAME if fmt == "gguf" else run_dir / "export" / fmt
    adapter_mtime = max(f.stat().st_mtime for f in (run_dir / "adapter").iterdir())
    if not artifact.exists() or artifact.stat().st_mtime < adapter_mtime:
        export_run(run_dir, [fmt])
    return artifact
