"""Tiny random models built offline, for the tests and for checks that must run with no model file
(benchmarks/gpu_check.py): nothing is downloaded, a model is a few thousand random weights.

`digit_tokenizer` knows only "1", "2" and " " (anything else is <unk>), with a chat template. A random model over
it answers "1", "12", "2 1", ...: graded by the real verifier against golds such as "1" or "2", some rollouts are
right and some wrong, so whole runs (CLI, kill loop, CPU-vs-GPU check) need no fake verifier.
"""

from __future__ import annotations


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A randomly initialised 2-layer llama (hidden 32) over `vocab_size` tokens; `overrides` change its config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def char_tokenizer():
    """A real `PreTrainedTokenizerFast` over printable ASCII with ChatML-style specials (ids 0-2) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for c in map(chr, range(32, 127)):
        vocab[c] = len(vocab)
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def digit_tokenizer():
    """A `PreTrainedTokenizerFast` over <unk>, <|im_start|>, <|im_end|> (ids 0-2), "1", "2" and " "."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "1", "2", " "])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<|im_end|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}<|im_start|>"
    return fast


def save_digit_model(folder, **overrides):
    """A tiny random llama (1 layer, hidden 16) + `digit_tokenizer` saved as a transformers folder (what a recipe's
    `model` names); returns the folder."""
    tok = digit_tokenizer()
    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    tiny_llama(len(tok), **{**cfg, **overrides}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
