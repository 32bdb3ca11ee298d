"""An unquantized (F32) copy of a quantized base GGUF, for tight llama.cpp-vs-PyTorch adapter checks.

Every tensor is dequantized with `gguf.quants.dequantize` and written as F32; every metadata key is copied
(general.file_type becomes 0 = all F32). The result is cached under $RMX_LOCAL_CACHE/gguf-f32/, keyed by the
source file's path, size and mtime, and written streaming (one tensor in memory at a time), then renamed.
Shortcut: F32 only (a 135M model is ~0.5 GB); no F16 variant.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from rmx_local.errors import RmxError
from rmx_local.io import temp_path
from rmx_local.models import cache_root


def f32_base_gguf(source: str | Path) -> Path:
    """Return the path of a cached F32 copy of the GGUF `source` (created on first call)."""
    source = Path(source)
    if not source.is_file():
        raise RmxError(f"{source}: base GGUF not found", fix="check the recipe's `model`")
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf-f32" / f"{source.stem}-F32-{key}.gguf"
    if out.is_file():
        return out
    tmp = temp_path(out)  # umask permissions: llama.cpp may run as another user
    try:
        _write_f32_copy(source, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _write_f32_copy(source: Path, dest: Path) -> None:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dest), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        if main == gguf.GGUFValueType.STRING:
            value = bytes(field.parts[field.data[0]])  # raw bytes: no UTF-8 round trip
        elif sub == gguf.GGUFValueType.STRING:
            value = [bytes(field.parts[i]) for i in field.data]
        else:
            value = field.contents()
        writer.add_key_value(name, value, main, sub_type=sub)
    shapes = []
    for t in reader.tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        shapes.append(shape)
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, shape in zip(reader.tensors, shapes):
        writer.write_tensor_data(np.ascontiguousarray(dequantize(t.data, t.tensor_type).reshape(shape), dtype=np.float32))
    writer.close()
