"""Prompt sharing for teacher-forced forwards: the K rollouts of a problem are one packed row, not K rows.

Sequences (tokens, prompt_len) with the same prompt are laid out as one row

    [prompt p_0 .. p_{P-1}] [completion 1] [completion 2] ... [padding]

with position ids P, P+1, ... restarting for each completion, and a 4D attention mask under which a completion
token sees the prompt and the earlier tokens of its own completion only (padding sees itself). Every token then
has exactly the hidden states it would have in its own unpacked sequence, so the logits are the same up to
floating-point summation order, and the prompt is computed once per group instead of once per rollout.
Sequences with different prompts get their own rows (right-padded), so an unsorted batch costs what an unpacked
one does; the saving needs batches that hold several rollouts of one problem.

`Packed.index[i]` lists, for sequence i, the packed positions whose logits predict its tokens[1:] (the prompt's
positions are shared by the whole group), so per-sequence terms are gathered from per-position ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    ids: torch.Tensor  # (R, L) token ids
    positions: torch.Tensor  # (R, L) position ids
    mask: torch.Tensor  # (R, 1, L, L) additive attention mask: 0 = attend, dtype min = blocked
    row: list[int]  # per sequence: its packed row
    index: list[torch.Tensor]  # per sequence: (T-1,) packed positions predicting tokens[1:]
    targets: list[torch.Tensor]  # per sequence: (T-1,) tokens[1:]


def pack(sequences: list[tuple[list[int], int]], pad_id: int, dtype: torch.dtype, device: str | torch.device = "cpu") -> Packed:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (tokens, p) in enumerate(sequences):
        groups.setdefault(tuple(tokens[:p]), []).append(i)

    rows: list[tuple[list[int], list[int], list[int]]] = []  # (ids, positions, segment) per packed row
    row_of, index = [0] * len(sequences), [torch.zeros(0, dtype=torch.long)] * len(sequences)
    for r, (prompt, members) in enumerate(groups.items()):
        P = len(prompt)
        ids, pos, seg = list(prompt), list(range(P)), [0] * P
        for b, i in enumerate(members, start=1):
            tokens = sequences[i][0]
            completion = tokens[P:]
            start = len(ids)
            ids += completion
            pos += range(P, P + len(completion))
            seg += [b] * len(completion)
            # target tokens[k+1] is predicted at position k while k is in the prompt, else at the completion's slot
            idx = list(range(min(P, len(tokens) - 1))) + [start + k - P for k in range(P, len(tokens) - 1)]
            row_of[i], index[i] = r, torch.tensor(idx, dtype=torch.long)
        rows.append((ids, pos, seg))

    L = max(len(ids) for ids, _, _ in rows)
    R = len(rows)
    ids_t = torch.full((R, L), pad_id, dtype=torch.long)
    pos_t = torch.zeros((R, L), dtype=torch.long)
    seg_t = torch.full((R, L), -1, dtype=torch.long)  # -1 = padding
    for r, (ids, pos, seg) in enumerate(rows):
        ids_t[r, : len(ids)] = torch.tensor(ids)
        pos_t[r, : len(pos)] = torch.tensor(pos)
        seg_t[r, : len(seg)] = torch.tensor(seg)
    q, k = seg_t[:, :, None], seg_t[:, None, :]  # (R, L, 1), (R, 1, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal & (((k == 0) & (q >= 0)) | ((k == q) & (q > 0)))
    allowed |= torch.eye(L, dtype=torch.bool)  # padding attends to itself: no all-blocked row (NaN in softmax)
    mask = torch.zeros((R, 1, L, L), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    targets = [torch.tensor(tokens[1:], dtype=torch.long) for tokens, _ in sequences]
    return Packed(ids_t.to(device), pos_t.to(device), mask.to(device), row_of,
                  [x.to(device) for x in index], [t.to(device) for t in targets])


def packed_logits(model, packed: Packed) -> torch.Tensor:
    """(R, L, V) logits of a packed batch."""
    return model(input_ids=packed.ids, position_ids=packed.positions, attention_mask=packed.mask).logits


def split_passes(sequences: list[tuple[list[int], int]], max_tokens: int) -> list[list[int]]:
    """Cut a batch, in order, into pieces whose packed length (each distinct prompt once, plus every completion)
    stays within `max_tokens`; a piece holds at least one sequence. Gradients of the pieces add up to the batch's."""
    pieces: list[list[int]] = []
    size, prompts = 0, set()
    for i, (tokens, p) in enumerate(sequences):
        prompt = tuple(tokens[:p])
        cost = len(tokens) - p + (0 if prompt in prompts else p)
        if pieces and size + cost > max_tokens:
            pieces.append([])
            size, prompts = 0, set()
            cost = len(tokens)
        if not pieces:
            pieces.append([])
        pieces[-1].append(i)
        size += cost
        prompts.add(prompt)
    return pieces
