"""`rmx-local export` (run.py) and the adapter formats: the canonical LoRA adapter to GGUF (llama.cpp, Ollama), MLX
(mlx-lm) and PEFT, and each read back.

Every writer is a pure function of a `rmx_local.adapter.LoraAdapter`; every reader returns one.
"""

from rmx_local.export.common import check_fits, complete_from_base
from rmx_local.export.gguf_adapter import OUTTYPES, gguf_adapter_base, read_gguf_adapter, write_gguf_adapter
from rmx_local.export.mlx_adapter import read_mlx_adapter, write_mlx_adapter
from rmx_local.export.run import FORMATS, GGUF_NAME, check_exportable, export_run, exported_adapter

__all__ = ["FORMATS", "GGUF_NAME", "OUTTYPES", "check_exportable", "check_fits", "complete_from_base", "export_run",
           "exported_adapter", "gguf_adapter_base", "read_gguf_adapter", "read_mlx_adapter", "write_gguf_adapter",
           "write_mlx_adapter"]
