"""Is a model source usable? One check, before any stage starts, for `run`, `eval`, `analyze`, `generate`/`chat`
and `export`; each failure is one `RmxError` naming what is missing and the fix.

    check_model_source(spec_or_source, *, weights=True) -> None
    check_gguf(path) -> dict          (the header's key/values; raises when the file is not a usable GGUF)
    known_gguf_architecture(arch) -> bool

Kinds:
  folder    config.json readable, its model_type one transformers loads as a causal LM (a config with `auto_map`
            brings its own code: whether to run it is the loader's `trust_remote_code` question), at least one
            weights file (*.safetensors, pytorch_model*.bin; with a sharded index, every shard it lists), and a
            tokenizer (tokenizer.json, tokenizer.model, vocab.json, vocab.txt, a sentencepiece or tiktoken file).
            `weights=False` (export: it reads only config.json and the base GGUF) skips weights and tokenizer.
  .gguf     magic, a header that parses, a file at least as long as the tensor data the header declares (a cut
            download), and a general.architecture transformers can dequantize (checked again in `dequantized_folder`).
  embedded  the GGUF shipped in its package, checked when it is dequantized; a hub id is not checked (no network).
Shortcuts: the GGUF header is read here with `struct` (gguf.GGUFReader maps the whole file and fails on a cut one
with a numpy reshape error); weights are checked for presence, not content; the architecture list is the installed
transformers' GGUF table (`known_gguf_architecture` is the one place to swap in another table).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

from rmx_local.errors import RmxError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
GGUF_FIX = "download the .gguf again (it is cut short or damaged), or point `model` at a transformers folder"
# GGUF value types -> struct format (8 = string, 9 = array are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def check_model_source(source: Any, *, weights: bool = True) -> None:
    """SOURCE: a recipe's `model` string or a `ModelSource`; refuses a local folder or .gguf that cannot load."""
    spec = getattr(source, "spec", source)
    if spec.startswith("embedded:"):
        return
    path = Path(spec).expanduser()
    try:
        if path.suffix == ".gguf" and path.is_file():
            check_gguf(path)
        elif path.is_dir():
            check_folder(path, weights=weights)
    except OSError as e:
        raise RmxError(f"model: cannot read {path} ({e.strerror or e})", fix="check the path and its permissions") from None


def known_gguf_architecture(arch: str) -> bool:
    """Whether transformers can dequantize a GGUF of this general.architecture (its own name mapping included)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    return arch in names or arch.replace("moe", "_moe") in names or arch.replace("-", "_") in names or "t5" in arch


# ---------------------------------------------------------------- transformers folders

def check_folder(path: Path, *, weights: bool = True) -> None:
    config_path = path / "config.json"
    if not config_path.is_file():
        adapter = (path / "adapter_config.json").is_file()
        raise RmxError(f"model: {path} has no config.json" + (" (it is a LoRA adapter, not a model)" if adapter else ""),
                       fix="pass it to `rmx-local eval` as a TARGET, and set model to its base" if adapter
                       else "point `model` at a transformers model folder (config.json, weights, tokenizer) or a .gguf")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RmxError(f"model: {config_path} is not readable JSON ({e})", fix="download the model again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise RmxError(f"model: {config_path} names no model_type (not a transformers model config)",
                       fix="point `model` at a transformers model folder, a .gguf file or an embedded model")
    if "auto_map" not in config:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            import transformers

            raise RmxError(f"model: {path}: model_type {model_type!r} is not a language model transformers "
                           f"{transformers.__version__} can load (AutoModelForCausalLM)",
                           fix="upgrade transformers if the architecture is newer, or point `model` at a causal LM")
    if not weights:
        return
    _check_weights(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise RmxError(f"model: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
                       fix="copy the tokenizer files of the same model into the folder (e.g. `hf download ORG/NAME "
                           "tokenizer.json tokenizer_config.json --local-dir FOLDER`)")


def _check_weights(path: Path) -> None:
    for index_name in WEIGHT_INDEXES:
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise RmxError(f"model: {index} is not a weights index ({type(e).__name__}: {e})",
                               fix="download the model again") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise RmxError(f"model: {path} misses {len(missing)} of the {len(shards)} weight shards {index_name} "
                               f"lists (first: {missing[0]})", fix="download the missing shards (the download stopped)")
            return
    if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
        return
    ggufs = sorted(path.glob("*.gguf"))
    raise RmxError(f"model: {path} has no weights (no *.safetensors or pytorch_model*.bin file)",
                   fix=f"point `model` at {ggufs[0]}" if ggufs else
                   "download the whole model folder (e.g. `hf download ORG/NAME --local-dir FOLDER`), or use a .gguf")


# ---------------------------------------------------------------- GGUF files

class _Cut(Exception):
    """The header ends before what it declares."""


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) < size:
        raise _Cut
    return struct.unpack("<" + fmt, data)[0]


def _string(f: BinaryIO, limit: int) -> str:
    n = _read(f, "Q")
    if n > limit:
        raise ValueError(f"a string of {n} bytes in a {limit}-byte file")
    data = f.read(n)
    if len(data) < n:
        raise _Cut
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, limit: int) -> Any:
    if vtype == 8:
        return _string(f, limit)
    if vtype == 9:
        item, count = _read(f, "I"), _read(f, "Q")
        if item in _SCALARS:  # skip numeric arrays (token scores, types)
            f.seek(count * struct.calcsize(_SCALARS[item]), 1)
            return None
        if count > limit:
            raise ValueError(f"an array of {count} items in a {limit}-byte file")
        for _ in range(count):
            _value(f, item, limit)
        return None
    if vtype not in _SCALARS:
        raise ValueError(f"unknown value type {vtype}")
    return _read(f, _SCALARS[vtype])


def _header(f: BinaryIO, size: int) -> tuple[dict, int]:
    """(key/values, bytes the file must hold: the tensor data's end as the header declares it)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    version = _read(f, "I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (this reader knows 2 and 3)")
    n_tensors, n_kv = _read(f, "Q"), _read(f, "Q")
    if n_tensors > size or n_kv > size:
        raise ValueError(f"{n_tensors} tensors and {n_kv} keys in a {size}-byte file")
    kv = {}
    for _ in range(n_kv):
        key = _string(f, size)
        kv[key] = _value(f, _read(f, "I"), size)
    end = 0
    for _ in range(n_tensors):
        _string(f, size)
        dims = [_read(f, "Q") for _ in range(_read(f, "I"))]
        ttype, offset = _read(f, "I"), _read(f, "Q")
        try:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise ValueError(f"unknown tensor type {ttype}") from None
        count = 1
        for d in dims:
            count *= d
        end = max(end, offset + count // block * nbytes)
    align = kv.get("general.alignment") or 32
    start = -(-f.tell() // align) * align
    return kv, start + end


def check_gguf(path: Path) -> dict:
    """The header's key/values of a complete GGUF of a known architecture; else one RmxError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise RmxError(f"model: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                           fix="point `model` at a real .gguf file (or a transformers folder)")
        try:
            kv, needed = _header(f, size)
        except _Cut:
            raise RmxError(f"model: {path} is cut short inside its header ({size:,} bytes)", fix=GGUF_FIX) from None
        except (ValueError, struct.error) as e:
            raise RmxError(f"model: {path}: the GGUF header does not parse ({e})", fix=GGUF_FIX) from None
    if size < needed:
        raise RmxError(f"model: {path} is cut short: its header declares {needed:,} bytes of tensor data and header, "
                       f"the file has {size:,}", fix=GGUF_FIX)
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise RmxError(f"model: {path} names no general.architecture", fix=GGUF_FIX)
    if not known_gguf_architecture(arch):
        raise RmxError(f"model: {path}: architecture {arch!r} is not one transformers can read from a GGUF",
                       fix="use a GGUF of a supported architecture (llama, qwen2, qwen3, mistral, gemma2, phi3, ...) or "
                           "a transformers folder of this model")
    return kv
