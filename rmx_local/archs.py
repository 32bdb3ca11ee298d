"""What differs per model architecture, written once: one `Arch` record per transformers `model_type`.

Every exporter (GGUF, MLX, Ollama), the adapter-fits-base check, the default LoRA targets and the planner read
this table; adding an architecture is one entry in `ARCHS` plus its row in `rmx_local.archcheck.TINY` (the test
and benchmark matrix). The facts come from the reference implementations, read, not copied:
  gguf        llama.cpp's `general.architecture` for the model (convert_hf_to_gguf.py's `model_arch`; Mistral
              converts to `llama`)
  permute_qk  llama.cpp's converter reorders the q/k output rows of this architecture for its rope layout
              (`LlamaModel.permute`: llama, mistral, granite, smollm3); a LoRA's q/k `lora_b` must follow
  attention,  the block's LoRA-able linears under `self_attn.` / `mlp.`, as transformers names them; phi3 fuses
  mlp         q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (llama.cpp: `attn_qkv`, `ffn_up`)
  mlx         the mlx-lm module that loads it (`mlx_lm.models.<mlx>`, after mlx-lm's MODEL_REMAPPING)

`Shape` is the one reading of a config's sizes (heads, kv heads, head_dim, intermediate size, layers): head_dim
is the config's own where it has one (qwen3, gemma: 16 heads x 128 on a 1024-wide Qwen3-0.6B), hidden / heads
only where it has none. It is stored whole with every adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rmx_local.errors import RmxError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NEVER = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")  # embeddings / head: never trained or exported


@dataclass(frozen=True)
class Arch:
    model_type: str
    gguf: str
    permute_qk: bool = False
    attention: tuple[str, ...] = ATTENTION
    mlp: tuple[str, ...] = MLP
    mlx: str | None = None  # None: same name as model_type
    fused: tuple[tuple[str, str], ...] = ()  # (what a recipe may name, the fused linear that holds it)

    @property
    def linears(self) -> tuple[str, ...]:
        """Block-relative module keys, in llama.cpp's tensor order: 'self_attn.q_proj', ..., 'mlp.down_proj'."""
        return tuple(f"self_attn.{n}" for n in self.attention) + tuple(f"mlp.{n}" for n in self.mlp)

    @property
    def mlx_module(self) -> str:
        return self.mlx or self.model_type

    def lora_targets(self, requested: list[str]) -> list[str]:
        """The recipe's `train.targets` as this architecture's linears: q/k/v become qkv_proj where fused."""
        names = {key.rsplit(".", 1)[1] for key in self.linears}
        mapping = dict(self.fused)
        out: list[str] = []
        for t in requested:
            t = t if t in names else mapping.get(t, t)
            if t not in out:
                out.append(t)
        return out


_PHI3_FUSED = (("q_proj", "qkv_proj"), ("k_proj", "qkv_proj"), ("v_proj", "qkv_proj"),
               ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"))

ARCHS: dict[str, Arch] = {a.model_type: a for a in (
    Arch("llama", "llama", permute_qk=True),
    Arch("mistral", "llama", permute_qk=True, mlx="llama"),
    Arch("qwen2", "qwen2"),
    Arch("qwen3", "qwen3"),
    Arch("gemma2", "gemma2"),
    Arch("gemma3_text", "gemma3"),
    Arch("phi3", "phi3", attention=("qkv_proj", "o_proj"), mlp=("gate_up_proj", "down_proj"), fused=_PHI3_FUSED),
    Arch("olmo2", "olmo2"),
    Arch("granite", "granite", permute_qk=True),
    Arch("smollm3", "smollm3", permute_qk=True),
)}


def lookup(model_type: str, what: str = "export") -> Arch:
    """The record of `model_type`, or a one-line refusal naming the architecture and what would work."""
    if model_type in ARCHS:
        return ARCHS[model_type]
    got = repr(model_type) if model_type else "no architecture recorded"
    raise RmxError(f"{what}: model architecture {got} is not in rmx-local's table (rmx_local/archs.py)",
                   fix=f"the GGUF / MLX / Ollama exports support {', '.join(ARCHS)}; --format peft works for any "
                       "model transformers loads")


def lora_targets(model_type: str, requested: list[str]) -> list[str]:
    """`train.targets` as the linears of this model (fused where the architecture fuses); unchanged if unknown."""
    return ARCHS[model_type].lora_targets(list(requested)) if model_type in ARCHS else list(requested)


def by_gguf(gguf_arch: str) -> Arch | None:
    """The first record that llama.cpp calls `gguf_arch` (Mistral reads back as llama: the same tensors)."""
    return next((a for a in ARCHS.values() if a.gguf == gguf_arch), None)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int | None

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        """From a config.json dict (or an adapter's stored model_config); a multimodal config's text_config wins."""
        cfg = cfg.get("text_config") or cfg
        missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads") if not cfg.get(k)]
        if missing:
            raise RmxError(f"model config lacks {', '.join(missing)}",
                           fix="point `model` at a complete transformers config.json (or re-save the adapter from its run)")
        heads = int(cfg["num_attention_heads"])
        return cls(layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                   intermediate=cfg.get("intermediate_size"))

    def as_config(self) -> dict:
        """The transformers config keys of this shape (what an adapter stores as its model_config)."""
        return {"num_hidden_layers": self.layers, "hidden_size": self.hidden, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                **({"intermediate_size": self.intermediate} if self.intermediate else {})}

    def linear(self, key: str) -> tuple[int, int | None]:
        """(out, in) of the block linear `key` ('self_attn.q_proj', 'mlp.gate_up_proj', ...)."""
        q, kv, inter = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "self_attn.q_proj": (q, self.hidden), "self_attn.k_proj": (kv, self.hidden),
            "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, q),
            "self_attn.qkv_proj": (q + 2 * kv, self.hidden),
            "mlp.gate_proj": (inter, self.hidden), "mlp.up_proj": (inter, self.hidden),
            "mlp.down_proj": (self.hidden, inter), "mlp.gate_up_proj": (2 * inter if inter else None, self.hidden),
        }[key]

    def to_dict(self) -> dict:
        return asdict(self)
