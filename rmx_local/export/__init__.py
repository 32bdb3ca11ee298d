"""Export the canonical LoRA adapter to GGUF (llama.cpp, Ollama), MLX (mlx-lm) and PEFT, and read each back.

Every writer is a pure function of a `rmx_local.adapter.LoraAdapter`; every reader returns one.
"""

from rmx_local.export.gguf_adapter import OUTTYPES, read_gguf_adapter, write_gguf_adapter
from rmx_local.export.mlx_adapter import read_mlx_adapter, write_mlx_adapter
from rmx_local.export.run import FORMATS, GGUF_NAME, check_exportable, export_run, load_run_adapter, run_base_spec

__all__ = ["FORMATS", "GGUF_NAME", "OUTTYPES", "check_exportable", "export_run", "load_run_adapter", "read_gguf_adapter",
           "read_mlx_adapter", "run_base_spec", "write_gguf_adapter", "write_mlx_adapter"]
