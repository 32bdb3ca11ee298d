"""`rmx-local doctor`: what this machine can run, one row per component, each with a fix when something is off.

`doctor()` returns the rows (no printing, no network, nothing written); `print_doctor(rows)` renders them as a
Rich table. Versions come from package metadata where an import is not needed; torch and mlx are imported
(that is the only way to see their devices), and any failure there becomes a row rather than an exception.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rmx_local.backends import pick_backend_name
from rmx_local.errors import RmxError
from rmx_local.models import EMBEDDED, cache_root, embedded_gguf

OK, MISSING, ERROR, INFO = "ok", "missing", "error", "info"


@dataclass
class Check:
    name: str
    status: str  # ok | missing | error | info
    detail: str
    fix: str = ""
    required: bool = False  # a missing/broken required component means rmx-local cannot run here


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _torch() -> Check:
    try:
        import torch
    except Exception as e:  # ImportError, or OSError from a broken wheel
        return Check("torch", MISSING if isinstance(e, ImportError) else ERROR, _first_line(e),
                     fix="pip install torch", required=True)
    devices = ["cpu"]
    try:
        if torch.cuda.is_available():
            names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
            devices.insert(0, f"cuda x{torch.cuda.device_count()} ({', '.join(names)})")
        if torch.backends.mps.is_available():
            devices.insert(0, "mps")
    except Exception as e:
        devices.append(f"device probe failed: {_first_line(e)}")
    return Check("torch", OK, f"{torch.__version__}; devices: {', '.join(devices)}", required=True)


def _mlx_fix() -> str:
    on_mac = platform.system() == "Darwin" and platform.machine() == "arm64"
    return "pip install mlx mlx-lm" if on_mac else 'pip install "mlx[cpu]" mlx-lm  (Linux CPU: tests only, slow)'


def _mlx() -> list[Check]:
    try:
        import mlx.core as mx
    except Exception as e:
        return [Check("mlx", MISSING if isinstance(e, ImportError) else ERROR, _first_line(e), fix=_mlx_fix()),
                Check("mlx-lm", MISSING, "needs mlx", fix=_mlx_fix())]
    try:
        has_gpu = mx.is_available(mx.gpu)
    except AttributeError:  # mlx < 0.29
        has_gpu = mx.metal.is_available()
    gpu = "gpu available" if has_gpu else "no gpu"
    rows = [Check("mlx", OK, f"{mx.__version__}; default device {mx.default_device()} ({gpu})")]
    version = _version("mlx-lm")
    if version and importlib.util.find_spec("mlx_lm") is not None:
        rows.append(Check("mlx-lm", OK, version))
    else:
        rows.append(Check("mlx-lm", MISSING, "backend = \"mlx\" needs it", fix="pip install mlx-lm"))
    return rows


def _package(dist: str, required: bool, fix: str, why: str = "") -> Check:
    version = _version(dist)
    if version is None:
        return Check(dist, MISSING, why or "not installed", fix=fix, required=required)
    return Check(dist, OK, version, required=required)


def _ollama() -> Check:
    path = shutil.which("ollama")
    if path is None:
        return Check("ollama", MISSING, "no `ollama` on PATH (only the ollama export, export.formats = [\"ollama\"], needs it)",
                     fix="install from https://ollama.com, or skip the ollama export")
    return Check("ollama", OK, path)


def _embedded() -> list[Check]:
    """One row per embedded model; the first (the default) is required, the others optional extras. Nothing is
    assembled here: a chunked model not yet assembled says so."""
    rows = []
    for i, name in enumerate(EMBEDDED):
        label = "embedded model" if i == 0 else f"embedded:{name}"
        try:
            path = embedded_gguf(name, assemble=False)
        except RmxError as e:
            rows.append(Check(label, MISSING, e.message, fix=e.fix or ""))
            continue
        detail = (f"embedded:{name} -> {path} ({path.stat().st_size / 2**20:.0f} MiB)" if path.is_file()
                  else f"embedded:{name}: installed; assembled into {path} on first use")
        rows.append(Check(label, OK, detail))
    return rows


def _cache() -> Check:
    root = cache_root()
    if not root.exists():
        return Check("cache", INFO, f"{root} (not created yet; the first run dequantizes the model there)")
    models = [p for p in (root / "models").glob("*") if p.is_dir() and not p.name.startswith(".")] if (root / "models").is_dir() else []
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return Check("cache", OK, f"{root}: {len(models)} dequantized model(s), {size / 2**20:.0f} MiB")


def doctor() -> list[Check]:
    """Every check, in display order. Never raises for a missing or broken component."""
    rows = [Check("python", INFO, f"{platform.python_version()} on {platform.system()} {platform.machine()}"),
            Check("rmx-local", INFO, f"{_version('rmx-local') or 'not installed (running from source)'} at "
                                     f"{Path(__file__).resolve().parent}"),
            _torch(), *_mlx(),
            Check("backend auto", INFO, f"-> {pick_backend_name('auto')}")]
    for dist in ("transformers", "peft", "safetensors", "gguf"):
        rows.append(_package(dist, required=True, fix=f"pip install {dist}"))
    rows.append(_package("llama-cpp-python", required=False, fix='pip install "rmx-local[llama]"',
                         why="optional: rollout.engine = \"llama_cpp\" and the llama.cpp round-trip check need it"))
    for check in (_ollama, _embedded, _cache):
        try:
            got = check()
            rows.extend(got if isinstance(got, list) else [got])
        except Exception as e:  # a doctor must not crash on the thing it diagnoses
            rows.append(Check(check.__name__.strip("_"), ERROR, _first_line(e)))
    return rows


def healthy(rows: list[Check]) -> bool:
    """True when every required component is present and working."""
    return all(r.status in (OK, INFO) for r in rows if r.required)


def print_doctor(rows: list[Check], console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    marks = {OK: "[green]ok[/]", INFO: "[blue]info[/]", MISSING: "[yellow]missing[/]", ERROR: "[red]error[/]"}
    table = Table(title="rmx-local doctor", title_justify="left")
    table.add_column("component", style="bold")
    table.add_column("status")
    table.add_column("details", overflow="fold")
    table.add_column("fix", overflow="fold")
    for r in rows:
        status = marks.get(r.status, r.status)
        if r.required and r.status in (MISSING, ERROR):
            status = f"[red]{r.status} (required)[/]"
        table.add_row(escape(r.name), status, escape(r.detail), escape(r.fix))
    console.print(table)
    if not healthy(rows):
        console.print("[red]Some required components are missing; see the fix column.[/]")
