"""The torch decode loop: greedy output equals transformers' generate; sampling is seeded and honours top-p."""

import torch

from rmx_local.backends import SampleParams
from rmx_local.backends import common_prefix
from rmx_local.backends.torch_sampling import decode, next_tokens


def prompts(tok):
    chat = lambda q: tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    return [tok.encode(chat(q)) for q in ("What is 2+3?", "Hi", "What is 12 times 4, roughly?", "Hi")]


def hf_greedy(model, prompt, max_tokens, eos):
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=eos)
    row = out[0, len(prompt):].tolist()
    return row[: row.index(eos)] if eos in row else row


def test_common_prefix_leaves_a_token():
    assert common_prefix([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert common_prefix([[1, 2], [1, 2, 3]]) == 1  # the shortest prompt keeps its last token
    assert common_prefix([[7], [1]]) == 0


def test_greedy_equals_transformers_generate(torch_backend, tokenizer):
    ps = prompts(tokenizer)
    model, eos = torch_backend.model, tokenizer.eos_token_id
    # an EOS that the random model actually emits, so rows finish at different steps and get retired
    ours = decode(model, ps, SampleParams(1, 0.0, 1.0, 24, 0), [eos], eos, batch_size=3, device="cpu")
    assert ours == [hf_greedy(model, p, 24, eos) for p in ps]
    common = max(set(t for row in ours for t in row), key=lambda t: sum(row.count(t) for row in ours))
    stop_early = decode(model, ps, SampleParams(1, 0.0, 1.0, 24, 0), [common], eos, batch_size=4, device="cpu")
    assert stop_early == [hf_greedy(model, p, 24, common) for p in ps]
    assert any(len(r) < 24 for r in stop_early) and any(len(r) > 0 for r in stop_early)


def test_sampling_is_seeded():
    ps = [[1, 5, 6], [1, 5, 7, 8]]
    from tests.conftest import tiny_llama

    model = tiny_llama(40)
    a = decode(model, ps, SampleParams(1, 1.0, 0.95, 12, 3), [2], 2, 8, "cpu")
    assert a == decode(model, ps, SampleParams(1, 1.0, 0.95, 12, 3), [2], 2, 8, "cpu")
    assert a != decode(model, ps, SampleParams(1, 1.0, 0.95, 12, 4), [2], 2, 8, "cpu")
    copies = decode(model, [ps[1]] * 6, SampleParams(1, 1.0, 1.0, 12, 3), [2], 2, 8, "cpu")  # one prefill, 6 rows
    assert len({tuple(c) for c in copies}) == 6  # each row draws its own tokens


def test_top_p_keeps_the_smallest_head_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(next_tokens(logits, SampleParams(1, 1.0, 0.8, 1, 0), gen)) for _ in range(400)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are cut
    seen = {int(next_tokens(logits, SampleParams(1, 1.0, 0.81, 1, 0), gen)) for _ in range(400)}
    assert seen == {0, 1, 2}


def test_top_p_beyond_the_ranked_head_falls_back_to_a_full_sort():
    from rmx_local.backends.torch_sampling import HEAD

    V = 3 * HEAD
    logits = torch.zeros(1, V)  # uniform: top-p 0.9 keeps 0.9 * V tokens, more than the ranked head
    gen = torch.Generator().manual_seed(0)
    seen = {int(next_tokens(logits, SampleParams(1, 1.0, 0.9, 1, 0), gen)) for _ in range(3000)}
    assert HEAD < len(seen) <= int(0.9 * V) + 1


def test_the_common_prefix_is_held_once_and_gives_the_same_samples_as_copying_it(torch_backend, tokenizer, monkeypatch):
    from rmx_local.backends import torch_sampling

    ps = [p for p in prompts(tokenizer) for _ in range(3)]  # 12 rows, 3 distinct prompts, one chat preamble
    model, eos = torch_backend.model, tokenizer.eos_token_id
    params = SampleParams(1, 0.9, 0.95, 16, 5)
    made = []
    shared = torch_sampling._shared_prefix_cache
    monkeypatch.setattr(torch_sampling, "_shared_prefix_cache", lambda c, n: made.append(shared(c, n)) or made[-1])
    held_once = decode(model, ps, params, [eos], eos, batch_size=5, device="cpu")
    layer = made[0].layers[0]
    assert isinstance(layer, torch_sampling.SharedPrefixLayer) and layer.prefix_keys.shape[0] == 1
    assert layer.prefix_keys.shape[-2] == common_prefix(ps) > 5  # the preamble is not in any row
    assert layer.keys.shape[-2] < len(ps[0]) - common_prefix(ps) + 16
    monkeypatch.setattr(torch_sampling, "DynamicLayer", None)  # the fallback, the old way: a copy per distinct prompt
    made.clear()
    assert held_once == decode(model, ps, params, [eos], eos, batch_size=5, device="cpu")
    assert made and not isinstance(made[0].layers[0], torch_sampling.SharedPrefixLayer)
    assert len({tuple(r) for r in held_once}) > 3


def test_the_full_vocabulary_fallback_draws_the_same_tokens_in_row_chunks_as_all_at_once():
    from rmx_local.backends import torch_sampling

    torch.manual_seed(0)
    logits = torch.randn(70, 500) * 0.5  # flat: the top-64 head never holds 0.95, so the full sort runs
    params = SampleParams(1, 1.0, 0.95, 1, 0)
    chunked = next_tokens(logits, params, torch.Generator().manual_seed(7))
    probs = torch.softmax(logits, -1)
    ranked_p, ranked_idx = probs.sort(dim=-1, descending=True)  # the pre-chunking code: every row at once
    keep = ranked_p.masked_fill(ranked_p.cumsum(-1) - ranked_p >= 0.95, 0.0)
    at_once = ranked_idx.gather(-1, torch.multinomial(keep, 1, generator=torch.Generator().manual_seed(7))).squeeze(-1)
    assert torch_sampling.SORT_ROWS < 70 and torch.equal(chunked, at_once)
    assert len(set(chunked.tolist())) > 30
