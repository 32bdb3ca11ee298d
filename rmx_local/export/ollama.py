"""Ollama Modelfile: FROM the base GGUF, ADAPTER the GGUF LoRA, the base's chat template, stop tokens.

Ollama templates are Go templates, not the Jinja in the GGUF. Shortcut: ChatML (`<|im_start|>`, SmolLM2,
Qwen2) and Llama-3 style templates are translated to their Go form, with the Jinja's default system prompt
kept as SYSTEM; for any other template no TEMPLATE line is written and Ollama falls back to the template it
detects from the base GGUF.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from rmx_local.errors import RmxError
from rmx_local.io import atomic_dir

CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
          '<|im_start|>assistant\n')
LLAMA3 = ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
          '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
          '<|start_header_id|>assistant<|end_header_id|>\n\n')


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_kv(path: str | Path, keys: set[str]) -> dict:
    """Only the requested metadata keys of a GGUF, parsed from its header (gguf.GGUFReader parses every
    vocab entry of a 100 MB model in seconds; this skips them)."""
    import struct

    found: dict = {}
    with open(path, "rb") as f:
        def unpack(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(unpack("<Q")).decode("utf-8", errors="replace")

        def value(vtype, keep):
            if vtype == 8:
                if keep:
                    return string()
                f.seek(unpack("<Q"), 1)
                return None
            if vtype == 9:
                item_type, count = unpack("<I"), unpack("<Q")
                if item_type in _SCALARS and not keep:
                    f.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
                    return None
                return [value(item_type, keep) for _ in range(count)]
            return unpack(_SCALARS[vtype])

        if f.read(4) != b"GGUF":
            raise RmxError(f"{path}: not a GGUF file", fix="point the recipe's `model` at a .gguf file")
        unpack("<I")
        unpack("<Q")
        for _ in range(unpack("<Q")):
            key = string()
            found[key] = value(unpack("<I"), key in keys)
            if all(k in found for k in keys):
                break
    return {k: found[k] for k in keys if found.get(k) is not None}


def base_chat_info(base_gguf: str | Path) -> dict:
    """The base GGUF's Jinja chat template and EOS token text."""
    kv = read_gguf_kv(base_gguf, {"tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.tokens"})
    tokens, eos_id = kv.get("tokenizer.ggml.tokens"), kv.get("tokenizer.ggml.eos_token_id")
    eos = tokens[eos_id] if tokens is not None and eos_id is not None and eos_id < len(tokens) else None
    return {"template": kv.get("tokenizer.chat_template", ""), "eos": eos}


def translate_template(jinja: str) -> tuple[str | None, str | None, list[str]]:
    """(Go template or None, default system prompt or None, stop strings) for a Jinja chat template."""
    system = None
    if "<|im_start|>" in jinja:
        m = re.search(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>", jinja) or \
            re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", jinja)
        if m and "{{" not in m.group(1) and "message" not in m.group(1):
            system = m.group(1).replace("\\n", "\n")
        return CHATML, system, ["<|im_end|>", "<|im_start|>"]
    if "<|start_header_id|>" in jinja:
        return LLAMA3, None, ["<|eot_id|>", "<|start_header_id|>"]
    return None, None, []


def modelfile_text(base_gguf: Path, adapter_name: str, info: dict) -> str:
    template, system, stops = translate_template(info.get("template", ""))
    if info.get("eos") and info["eos"] not in stops:
        stops.append(info["eos"])
    lines = [f"FROM {base_gguf.resolve()}", f"ADAPTER ./{adapter_name}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template it detects in the base GGUF")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def write_ollama(adapter_gguf: str | Path, base_gguf: str | Path | None, out_dir: str | Path, card: str = "") -> Path:
    """Write out_dir/{Modelfile, adapter.gguf (a copy), README.md}; return out_dir."""
    adapter_gguf = Path(adapter_gguf)
    if not base_gguf or not Path(base_gguf).is_file():
        raise RmxError(f"export ollama: the base model has no GGUF file ({base_gguf or 'none found'})",
                       fix='Ollama needs a GGUF base: use model = "embedded:..." or a .gguf path in recipe.toml, '
                           "or convert the base with llama.cpp's convert_hf_to_gguf.py")
    base_gguf = Path(base_gguf)
    text = modelfile_text(base_gguf, adapter_gguf.name, base_chat_info(base_gguf))
    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(adapter_gguf, tmp / adapter_gguf.name)
        (tmp / "Modelfile").write_text(text)
        if card:
            (tmp / "README.md").write_text(card)
    return Path(out_dir)
