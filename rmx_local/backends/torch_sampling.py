"""Batched sampling for the torch backend: a plain decode loop over a KV cache.

Why not `model.generate`: a generate batch runs until its longest row ends, while here most completions end after
~10 tokens and a few run to max_tokens; and every prompt repeats the same chat preamble. This loop
  - prefills the prompts' common token prefix once and keeps its KV cache once, shared by every row of every
    batch (`SharedPrefixLayer`: a row stores only its own tokens; the prefix is joined to them per layer as
    attention needs it, so the batch's cache is rows x their own tokens, not rows x the whole prompt),
  - left-pads the rest of each prompt after that prefix (explicit position ids, padding masked out) and prefills
    each distinct prompt once, however many completions it gets,
  - drops finished rows from the batch and the cache after every step, so the cost follows the tokens made,
  - projects only the last position onto the vocabulary.
Sampling: temperature, then top-p on the tempered distribution (a token is kept while the probability mass of the
tokens ranked above it is < top_p), then a draw from a `torch.Generator` seeded once per call: reproducible for the
same prompts, seed and batch size, but not the same random stream as `transformers`' own sampling. Greedy = argmax.
"""

from __future__ import annotations

import copy
import inspect

import torch

from rmx_local.backends.base import Progress, SampleParams, common_prefix

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers < 4.56 keeps per-layer lists: the prefix is copied into every row there
    DynamicLayer = None


HEAD = 64  # candidates ranked by top-k before a full sort is needed
SORT_ROWS = 32  # rows sorted together when the whole vocabulary must be ranked


def next_tokens(logits: torch.Tensor, params: SampleParams, gen: torch.Generator) -> torch.Tensor:
    """(B, V) last-position logits -> (B,) next token ids.

    Top-p ranks only the `HEAD` most likely tokens when they already hold `top_p` of the mass in every row (almost
    always at T <= 1; exact, and ~50x cheaper than sorting a 49k vocabulary per row), else sorts the whole
    vocabulary, `SORT_ROWS` rows at a time: (32, V) temporaries instead of six (B, V) ones (~0.5 GB at 440 rows),
    and the same draws, since the generator is consumed row after row either way (tested)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    head_p, head_idx = probs.topk(min(HEAD, probs.shape[-1]), dim=-1)  # sorted, descending
    if bool((head_p.sum(-1) >= params.top_p).all()):
        return _top_p_draw(head_p, head_idx, params.top_p, gen)
    return torch.cat([_top_p_draw(*rows.sort(dim=-1, descending=True), params.top_p, gen) for rows in probs.split(SORT_ROWS)])


def _top_p_draw(ranked_p: torch.Tensor, ranked_idx: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One draw per row among the ranked tokens whose higher-ranked mass is < top_p."""
    above = ranked_p.cumsum(-1) - ranked_p  # mass ranked above each token
    pick = torch.multinomial(ranked_p.masked_fill(above >= top_p, 0.0), 1, generator=gen)
    return ranked_idx.gather(-1, pick).squeeze(-1)


if DynamicLayer is not None:
    class SharedPrefixLayer(DynamicLayer):
        """One decoder layer's cache: the common prefix's keys/values held once, (1, heads, P, dim), and each row's
        own tokens after it. `update` returns the prefix joined to the rows (one layer's copy, freed as soon as
        that layer's attention has run): the same tensors, so the same numbers, as a cache holding the prefix in
        every row. Selecting or repeating rows touches only the rows' part."""

        def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor):
            super().__init__()
            self.prefix_keys, self.prefix_values = prefix_keys, prefix_values

        def update(self, key_states, value_states, *args, **kwargs):
            super().update(key_states, value_states)
            rows = self.keys.shape[0]
            return (torch.cat([self.prefix_keys.expand(rows, -1, -1, -1), self.keys], dim=-2),
                    torch.cat([self.prefix_values.expand(rows, -1, -1, -1), self.values], dim=-2))

        def get_seq_length(self) -> int:
            return self.prefix_keys.shape[-2] + super().get_seq_length()


def _shared_prefix_cache(prefix_cache, distinct: int):
    """A batch's cache starting from `prefix_cache` (one row): its layers share that row with every row; where the
    model's cache is not made of plain dynamic layers (sliding windows, hybrid or older caches), a copy of the
    prefix for each of the batch's `distinct` prompts instead."""
    layers = getattr(prefix_cache, "layers", None)
    if DynamicLayer is None or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(distinct)
        return cache
    cache = copy.copy(prefix_cache)
    cache.layers = [SharedPrefixLayer(layer.keys, layer.values) for layer in layers]
    return cache


def _cache_io(model):
    """transformers renamed `past_key_values` to `cache` (5.x): the keyword this model takes, and a getter."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    return name, lambda out: getattr(out, name)


@torch.inference_mode()
def decode(model, prompts: list[list[int]], params: SampleParams, eos_ids: list[int], pad_id: int, batch_size: int,
           device: str, progress: Progress | None = None) -> list[list[int]]:
    """One completion per prompt (EOS not included), at most `params.max_tokens` tokens each."""
    if not prompts or params.max_tokens <= 0:
        return [[] for _ in prompts]
    shared = common_prefix(prompts)
    kw, cache_of = _cache_io(model)
    prefix_cache = None
    if shared:
        ids = torch.tensor([prompts[0][:shared]], device=device)
        prefix_cache = cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    gen = torch.Generator(device=device).manual_seed(params.seed)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        cache = _shared_prefix_cache(prefix_cache, len(set(map(tuple, chunk)))) if prefix_cache is not None else None
        out += _decode_batch(model, (kw, cache_of), [p[shared:] for p in chunk], shared, cache, params, set(eos_ids), pad_id,
                             gen, device, progress)
    return out


def _decode_batch(model, cache_io, tails, shared, cache, params, eos, pad_id, gen, device, progress) -> list[list[int]]:
    kw, cache_of = cache_io
    B = len(tails)
    unique = list(dict.fromkeys(map(tuple, tails)))  # rollouts repeat each prompt n times: prefill it once
    expand = torch.tensor([unique.index(tuple(t)) for t in tails], device=device)
    width = max(map(len, unique))
    ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(unique), width), dtype=torch.long)
    mask = torch.zeros((len(unique), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for i, t in enumerate(unique):
        ids[i, width - len(t) :] = torch.tensor(t)
        pos[i, width - len(t) :] = torch.arange(shared, shared + len(t))
        mask[i, shared + width - len(t) :] = 1
    first = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=True,
                  logits_to_keep=1, **{kw: cache})
    cache, logits, mask = cache_of(first), first.logits[:, -1][expand], mask.to(device)[expand]
    if len(unique) < B:
        cache.batch_select_indices(expand)
    rows = torch.arange(B, device=device)  # which output each live batch row writes to
    next_pos = torch.tensor([shared + len(t) for t in tails], device=device)
    results: list[list[int]] = [[] for _ in range(B)]
    while True:
        tok = next_tokens(logits, params, gen)
        keep, made = [], 0
        for j, (r, t) in enumerate(zip(rows.tolist(), tok.tolist())):
            if t in eos:
                continue
            results[r].append(t)
            made += 1
            if len(results[r]) < params.max_tokens:
                keep.append(j)
        if progress:
            progress(made)
        if not keep:
            return results
        if len(keep) < len(rows):  # retire finished rows from the batch and the cache
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            rows, tok, mask, next_pos = rows[idx], tok[idx], mask[idx], next_pos[idx]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        step = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None], use_cache=True,
                     logits_to_keep=1, **{kw: cache})
        cache, logits = cache_of(step), step.logits[:, -1]
        next_pos = next_pos + 1
