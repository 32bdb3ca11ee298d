"""The architecture matrix: one tiny random model per `rmx_local.archs` entry, each export proven in its runtime.

For every architecture: a transformers config of that family at toy size (head_dim != hidden / heads where the
family has a head_dim), random weights, saved as a model folder; its base GGUF is made by llama.cpp's own converter
(`convert_hf_to_gguf.py` from the llama-cpp-python source distribution that `scripts/setup.sh dev` unpacks;
`converter()` finds it), never by our code, so the check is not circular. Then, on one probe of token ids:
  base    llama.cpp's logits of the converted F32 base against transformers' (the converter and the model agree)
  gguf    logits(adapter on) - logits(off) in llama.cpp with our GGUF LoRA, against the same delta in PyTorch + PEFT
  mlx     the same delta in mlx-lm with our MLX adapter folder
  ollama  a Modelfile written against the converted base
Shortcuts: the converter needs a vocabulary it recognises, so the folders carry a tiny sentencepiece model
(`tokenizer.model`, trained here in a second) for the converter and a character-level tokenizer for transformers
and mlx-lm (the probe is token ids, so the two never have to agree); olmo2's converter only takes a known BPE
tokenizer, so its folder uses the embedded SmolLM2 tokenizer (49,152 tokens). Gemma ties its embeddings in
llama.cpp, so every tiny model ties them (as the real small models do) but olmo2, whose llama.cpp graph wants
its own output matrix; gemma3 has 6 layers, one sliding-window period in mlx-lm.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from rmx_local.errors import RmxError
from rmx_local.export import read_gguf_adapter, write_gguf_adapter, write_mlx_adapter
from rmx_local.export.check import llama_cpp_logits, logit_agreement, mlx_logits, peft_logits, random_adapter
from rmx_local.export.ollama import write_ollama
from rmx_local.models import add_rope_theta, cache_root, embedded_gguf
from rmx_local.tiny import char_tokenizer

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
# per architecture: config overrides (head_dim 32 on a 64-wide model where the family reads head_dim)
TINY: dict[str, dict] = {
    "llama": dict(head_dim=32),
    "mistral": dict(head_dim=32),
    "qwen2": dict(),
    "qwen3": dict(head_dim=32),
    "gemma2": dict(head_dim=32, query_pre_attn_scalar=32),
    "gemma3_text": dict(head_dim=32, query_pre_attn_scalar=32, num_hidden_layers=6),  # mlx-lm: 5 sliding + 1 global
    "phi3": dict(),
    "olmo2": dict(tie_word_embeddings=False),  # llama.cpp's olmo2 needs its own output.weight
    "granite": dict(),
    "smollm3": dict(),
}
BPE_VOCAB = {"olmo2"}  # the converter's gpt2 path needs a tokenizer whose pre-tokenizer hash it knows
PROBE = [1, 17, 42, 99, 5, 200, 7, 64, 123, 250, 31, 8]  # token ids < 260, inside every tiny vocabulary
SP_VOCAB = 320


def converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py as `scripts/setup.sh dev` unpacks it (or $RMX_LLAMA_CPP_CONVERT)."""
    env = os.environ.get("RMX_LLAMA_CPP_CONVERT")
    candidates = [Path(env)] if env else sorted((Path(sys.prefix) / "share" / "rmx-local").glob("llama.cpp-*"))
    for folder in reversed(candidates):
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder / "convert_hf_to_gguf.py"
    return None


def _sentencepiece_model(folder: Path) -> Path:
    """A 320-piece BPE sentencepiece model (byte fallback; <unk> <s> </s> <pad> <|endoftext|>: what llama.cpp's
    phi3 vocabulary loader looks up), trained on generated text."""
    import random

    import sentencepiece as spm

    out = folder / "tokenizer.model"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = "the cat sat on a mat what is plus minus times answer question apples has buys more how many".split()
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) + f" {rng.randint(0, 999)}"
                                for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=SP_VOCAB,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=3, user_defined_symbols=["<|endoftext|>"], minloglevel=2)
    return out


def tiny_model(model_type: str, root: Path | None = None) -> dict:
    """Build (once, cached by its config) the tiny `model_type` model: {hf: folder, convert_src: folder the
    converter reads, model_type}."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = root or cache_root() / "archcheck"
    if model_type in BPE_VOCAB:
        gguf = embedded_gguf("smollm2-135m-instruct")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        vocab = len(tokenizer)
    else:
        tokenizer, vocab = char_tokenizer(), SP_VOCAB
    cfg_args = {**BASE, **TINY[model_type], "vocab_size": vocab}
    key = hashlib.sha256(json.dumps([model_type, cfg_args], sort_keys=True).encode()).hexdigest()[:10]
    hf, src = root / f"{model_type}-{key}", root / f"{model_type}-{key}-convert"
    if not (hf / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg_args))
        with torch.no_grad():  # random norms, so that a norm the converter mishandles shows in the base check
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.normal_(0.0, 0.1)
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        add_rope_theta(hf / "config.json")  # mlx-lm reads the top-level key
    if not (src / "config.json").is_file():
        src.mkdir(parents=True, exist_ok=True)
        for f in hf.iterdir():  # the converter sees the weights and, for sentencepiece, only tokenizer.model
            if f.suffix in (".json", ".safetensors") and (model_type in BPE_VOCAB or not f.name.startswith("tokenizer")):
                (src / f.name).write_bytes(f.read_bytes())
        if model_type not in BPE_VOCAB:
            sp = _sentencepiece_model(root / "sentencepiece")
            (src / "tokenizer.model").write_bytes(sp.read_bytes())
            (src / "tokenizer_config.json").unlink(missing_ok=True)
            (src / "special_tokens_map.json").unlink(missing_ok=True)
    return {"model_type": model_type, "hf": hf, "convert_src": src}


def convert(models: list[dict]) -> dict[str, Path]:
    """Base GGUFs (F32) of the tiny models by llama.cpp's converter, all in one subprocess; cached beside them."""
    script = converter()
    if script is None:
        raise RmxError("llama.cpp's convert_hf_to_gguf.py is not unpacked in this environment",
                       fix="run `scripts/setup.sh dev` (it unpacks the converter from the llama-cpp-python sdist), "
                           "or set RMX_LLAMA_CPP_CONVERT to a llama.cpp checkout")
    out = {m["model_type"]: m["convert_src"].with_suffix(".gguf") for m in models}
    jobs = [(str(m["convert_src"]), str(out[m["model_type"]])) for m in models if not out[m["model_type"]].is_file()]
    if jobs:
        code = ("import sys, logging; sys.path.insert(0, sys.argv[1]); import convert_hf_to_gguf as c\n"
                "logging.disable(logging.WARNING)\n"
                "for src, dst in zip(sys.argv[2::2], sys.argv[3::2]):\n"
                "    sys.argv = ['convert', src, '--outfile', dst + '.part', '--outtype', 'f32']; c.main()\n")
        args = [a for job in jobs for a in job]
        done = subprocess.run([sys.executable, "-c", code, str(script.parent), *args], capture_output=True, text=True)
        if done.returncode:
            raise RmxError(f"llama.cpp's converter failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}",
                           fix="see `python convert_hf_to_gguf.py` on the tiny model folder for the whole message")
        for _, dst in jobs:
            os.replace(dst + ".part", dst)
    return out


ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check(model: dict, base_gguf: Path, work: Path, runtimes=("gguf", "mlx", "ollama"), targets=ALL_LINEARS,
          b_std: float = 0.2) -> dict:
    """One row of the matrix: agreement figures per runtime (or the runtime's own refusal, as text)."""
    config = json.loads((model["hf"] / "config.json").read_text())
    adapter = random_adapter(config, model["model_type"], str(model["hf"]), rank=4, alpha=8.0, b_std=b_std,
                             targets=targets)
    base, adapted = peft_logits(str(model["hf"]), adapter, PROBE)
    ref = adapted - base
    row: dict = {"arch": model["model_type"], "targets": ",".join(adapter.targets), "ref_max_abs": float(np.abs(ref).max())}
    if "gguf" in runtimes:
        cpp_base, _ = llama_cpp_logits(base_gguf, None, PROBE)
        row["base"] = logit_agreement(cpp_base, base)
        path = write_gguf_adapter(adapter, work / f"{model['model_type']}.gguf", "f32")
        back = read_gguf_adapter(path, config)
        row["gguf_read_back_max_diff"] = max(float(np.abs(back.delta(m) - adapter.delta(m)).max()) for m in adapter.weights)
        cpp_adapted, _ = llama_cpp_logits(base_gguf, path, PROBE)
        row["gguf"] = logit_agreement(cpp_adapted - cpp_base, ref)
    if "mlx" in runtimes:
        try:
            folder = write_mlx_adapter(adapter, work / f"{model['model_type']}-mlx")
            mlx_base, _ = mlx_logits(str(model["hf"]), None, PROBE)
            mlx_adapted, _ = mlx_logits(str(model["hf"]), folder, PROBE)
            row["mlx"] = logit_agreement(mlx_adapted - mlx_base, ref)
        except ImportError as e:
            row["mlx"] = f"not installed ({e.name})"
    if "ollama" in runtimes:
        folder = write_ollama(work / f"{model['model_type']}.gguf", base_gguf, work / f"{model['model_type']}-ollama")
        row["ollama"] = (folder / "Modelfile").read_text().splitlines()[:2]
    return row


def passes(fit: dict) -> bool:
    """The bar every runtime row must meet: the delta correlates >= 0.999 and differs by < 5% of its own peak."""
    return isinstance(fit, dict) and fit["corr"] >= 0.999 and fit["max_abs_diff"] < 0.05 * fit["ref_max_abs"]
