"""Rollouts with llama.cpp in-process (llama-cpp-python's low-level C API) on the model's GGUF.

How it samples (shortcuts stated):
  - Prompt text is tokenized by llama.cpp with special tokens parsed (`<|im_start|>` is one token); a BOS is put
    first only where the GGUF asks for one (`tokenizer.ggml.add_bos_token`, e.g. Gemma) and the text does not
    already start with it, as transformers does for the raw template (a chat template's text carries its own).
  - Continuous batching: up to `parallel` sequences decode together in one `llama_decode` per step (one token
    each); a finished sequence's slot immediately takes the next pending completion. Each prompt is decoded once
    (minus its last token) into a prefix sequence whose KV cells are copied (`llama_memory_seq_cp`) into every
    slot that samples it; the slot then decodes the prompt's last token itself, which yields its first logits.
    The tokens all prompts share (a chat template's system preamble: ~28 of the quickstart's ~49) are decoded
    once per call into a preamble sequence that every prefix starts from.
  - A step's sequence ids must be consecutive: llama.cpp splits a batch over separate KV streams wherever the
    ids skip one, one `llama_decode` pass per piece (measured: 16 sequences with gaps 203 ms a step, without
    98 ms). So slots are batched in id order, and once nothing is pending the live sequences are moved down
    (a stream copy) into the lowest slots as others finish.
  - KV layout: one stream per sequence (`kv_unified = False`): each sequence attends only to its own cells, so
    its logits do not depend on its batch-mates, and the copy of a prefix into a slot is a buffer copy. A unified
    KV (prompt cells shared) was measured: no faster here (2 cores, Q4_1 SmolLM2), and a sequence's logits then
    change with the other sequences in the batch (up to 0.5 per logit), so seeded results depend on `parallel`.
  - Batching gains on a CPU are modest (2 cores, Q4_1 SmolLM2, quickstart-shaped 55 prompts x 8: 88 tok/s at 16
    sequences, 84 at 32, single-sequence decode 72; Q4_1 has no batched GEMM kernel on x86); `make_engine` caps
    `parallel` at 32 to bound KV memory.
  - Sampling per completion: a llama.cpp sampler chain temperature -> top-p -> dist(seed), i.e. the same order
    as transformers (top-p on the tempered distribution), no top-k / min-p / penalties; greedy at temperature 0
    (one completion, repeated n times). Seeds come from `derive_seed(params.seed, prompt, sample)`, so results
    do not depend on `parallel` or on scheduling.
  - Stop: at any end-of-generation token of the GGUF vocab (not included) or at max_tokens.
  - Ids: when the GGUF's vocabulary equals the training tokenizer's (every token's text, checked once at load;
    true for a GGUF of the same model) the sampled ids are returned as they are. Re-tokenizing the text is not
    exact: the model may sample "\n" "\n" where the tokenizer writes "\n\n". Otherwise the completion is
    detokenized (special tokens rendered; invalid UTF-8, e.g. a cut multi-byte character, dropped) and
    re-tokenized with the training tokenizer.
  - LoRA (`lora_path`, for `rmx-local eval --runtime llama_cpp`): a GGUF adapter is loaded with the model and
    attached to every context at scale 1, exactly as llama-cpp-python's `Llama(lora_path=...)` does; a file
    llama.cpp refuses (another architecture or shapes) is one RmxError.
  - Flash attention is off by default: with it, greedy SmolLM2 completions drift from transformers' within a few
    tokens (numerics), without it they match.
The model and context are loaded on first use and kept; the context is rebuilt only when a call needs more room.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rmx_local.backends import Progress, SampleParams, common_prefix
from rmx_local.engines.base import derive_seed, retokenize
from rmx_local.errors import RmxError


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _Seq:
    prompt: int
    sample: int
    sampler: Any
    next_token: int
    pos: int
    tokens: list[int] = field(default_factory=list)


class LlamaCppEngine:
    name = "llama_cpp"

    def __init__(self, gguf_path: str, tokenizer: Any, threads: int = 0, parallel: int = 8, flash_attn: bool = False,
                 lora_path: str | None = None):
        self.gguf_path, self.tokenizer, self.lora_path = gguf_path, tokenizer, lora_path
        self.lora = None
        self.threads = threads or cpu_count()
        self.parallel, self.flash_attn = max(1, parallel), flash_attn
        self.same_vocab = False  # set at load: return llama.cpp's ids unchanged
        self.model = self.vocab = self.ctx = self.batch = None
        self.ctx_cells = 0  # cells per sequence of the current context

    # ---- loading ----------------------------------------------------------------------------------
    def _load(self):
        import llama_cpp  # also installs llama-cpp-python's log callback, routed to this logger

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.ll = llama_cpp
        if self.model is None:
            llama_cpp.llama_backend_init()
            self.model = llama_cpp.llama_model_load_from_file(self.gguf_path.encode(), llama_cpp.llama_model_default_params())
            if not self.model:
                raise RmxError(f"llama.cpp cannot load {self.gguf_path}",
                               fix='check that the file is a complete GGUF, or set rollout.engine = "backend"')
            if self.lora_path:
                self.lora = llama_cpp.llama_adapter_lora_init(self.model, str(self.lora_path).encode())
                if not self.lora:
                    raise RmxError(f"llama.cpp refused the LoRA adapter {self.lora_path} for {self.gguf_path}",
                                   fix="use the adapter exported for this base model (architecture and shapes must match)")
            self.vocab = llama_cpp.llama_model_get_vocab(self.model)
            self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
            self.same_vocab = self._vocab_matches()

    def _vocab_matches(self) -> bool:
        n = self.ll.llama_vocab_n_tokens(self.vocab)
        if n > len(self.tokenizer):
            return False
        ours = self.tokenizer.convert_ids_to_tokens(list(range(n)))
        return all(self.ll.llama_vocab_get_text(self.vocab, i).decode("utf-8", "replace") == t for i, t in enumerate(ours))

    def _ensure_context(self, positions: int) -> None:
        """A context whose every sequence holds `positions` cells (prompt + completion), rebuilt only to grow."""
        ll = self.ll
        if positions > self.n_ctx_train:
            raise RmxError(f"llama.cpp: prompt + rollout.max_tokens = {positions} tokens, more than the model's "
                           f"trained context ({self.n_ctx_train})", fix="lower rollout.max_tokens")
        cells = -(-positions // 256) * 256
        if self.ctx is not None and cells <= self.ctx_cells:
            return
        self._free_context()
        n_seq = self.parallel + 3  # sampling slots + two prompt prefixes (current and next prompt) + the preamble
        p = ll.llama_context_default_params()
        p.n_seq_max, p.kv_unified = n_seq, False
        p.n_ctx = cells * n_seq  # one KV stream of `cells` per sequence
        p.n_batch = p.n_ubatch = max(512, self.parallel)
        p.n_threads = p.n_threads_batch = self.threads
        p.no_perf = True
        p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = ll.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RmxError(f"llama.cpp could not create a context of {p.n_ctx} tokens", fix="lower rollout.batch_size or rollout.max_tokens")
        if self.lora:
            adapters, scales = (ll.llama_adapter_lora_p_ctypes * 1)(self.lora), (ctypes.c_float * 1)(1.0)
            if ll.llama_set_adapters_lora(self.ctx, adapters, 1, scales):
                raise RmxError(f"llama.cpp could not attach the LoRA adapter {self.lora_path}", fix="re-export the adapter")
        self.batch = ll.llama_batch_init(p.n_batch, 0, 1)
        self.n_batch, self.ctx_cells = p.n_batch, cells
        self.mem = ll.llama_get_memory(self.ctx)

    def _free_context(self) -> None:
        if self.ctx is not None:
            self.ll.llama_batch_free(self.batch)
            self.ll.llama_free(self.ctx)
            self.ctx = self.batch = None

    def close(self) -> None:
        self._free_context()
        if self.lora:
            self.ll.llama_adapter_lora_free(self.lora)
            self.lora = None
        if self.model is not None:
            self.ll.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- tokens <-> text --------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        self._load()
        data = text.encode("utf-8")
        buf = (self.ll.llama_token * (len(data) + 8))()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        if n < 0:
            raise RmxError("llama.cpp failed to tokenize a prompt")
        ids, bos = list(buf[:n]), self.ll.llama_vocab_bos(self.vocab)
        if self.ll.llama_vocab_get_add_bos(self.vocab) and bos >= 0 and ids[:1] != [bos]:
            ids.insert(0, bos)  # Gemma without its BOS answers nonsense; the torch path adds it the same way
        return ids

    def detokenize(self, tokens: list[int]) -> str:
        out, buf = bytearray(), ctypes.create_string_buffer(256)
        for t in tokens:
            n = self.ll.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, True)
            out += buf.raw[:n]
        return out.decode("utf-8", "ignore")

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self, prompts: list[str], prompt_ids: list[list[int]], params: SampleParams,
               progress: Progress | None = None) -> list[list[list[int]]]:
        raw = self.sample_tokens(prompts, params, progress)
        if self.same_vocab:
            return raw
        return [[retokenize(self.tokenizer, self.detokenize(t)) for t in row] for row in raw]

    def sample_tokens(self, prompts: list[str], params: SampleParams, progress: Progress | None = None) -> list[list[list[int]]]:
        """For each prompt, params.n completions as llama.cpp token ids (end-of-generation token excluded)."""
        greedy = params.temperature == 0
        n = 1 if greedy else params.n
        if params.max_tokens <= 0 or not prompts:
            return [[[] for _ in range(params.n)] for _ in prompts]
        toks = [self.tokenize(p) or [self.ll.llama_vocab_bos(self.vocab)] for p in prompts]
        self._ensure_context(max(map(len, toks)) + params.max_tokens + 1)
        ll, mem = self.ll, self.mem
        ll.llama_memory_clear(mem, True)
        shared = self._decode_preamble(toks)
        pending = deque((i, j) for i in range(len(prompts)) for j in range(n))
        prefix: dict[int, int] = {}  # prompt -> prefix sequence id
        free = list(range(self.parallel - 1, -1, -1))  # sampling slots = sequence ids 0..parallel-1
        live: dict[int, _Seq] = {}
        out: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompts]
        try:
            while pending or live:
                free.sort(reverse=True)  # pop() gives the lowest free slot
                while free and pending:  # start completions in free slots
                    i, j = pending.popleft()
                    if i not in prefix:
                        prefix[i] = self._prefill(toks[i][:-1], prefix, shared)
                    slot = free.pop()
                    ll.llama_memory_seq_cp(mem, prefix[i], slot, -1, -1)
                    sampler = self._sampler(params, derive_seed(params.seed, i, j))
                    live[slot] = _Seq(i, j, sampler, toks[i][-1], len(toks[i]) - 1)
                    if not pending or pending[0][0] != i:  # last sample of prompt i started: drop its prefix
                        # (safe before the copy runs: llama_decode applies pending copies before anything else,
                        # and seq_rm only frees cells, it does not overwrite them)
                        ll.llama_memory_seq_rm(mem, prefix.pop(i), -1, -1)
                if not pending:
                    self._compact(live, free)
                made = self._step(live, free, out, params.max_tokens)
                if progress and made:
                    progress(made)
        finally:
            for s in live.values():
                ll.llama_sampler_free(s.sampler)
        return [[list(row[0]) for _ in range(params.n)] for row in out] if greedy and params.n > 1 else out

    def _step(self, live: dict[int, _Seq], free: list[int], out: list, max_tokens: int) -> int:
        """Decode one token for every live sequence, sample the next ones, retire finished sequences."""
        ll, b = self.ll, self.batch
        order = sorted(live)
        for k, slot in enumerate(order):
            s = live[slot]
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = s.next_token, s.pos, 1, 1
            b.seq_id[k][0] = slot
        b.n_tokens = len(order)
        self._decode()
        made = 0
        for k, slot in enumerate(order):
            s = live[slot]
            t = ll.llama_sampler_sample(s.sampler, self.ctx, k)
            done = ll.llama_vocab_is_eog(self.vocab, t)
            if not done:
                s.tokens.append(t)
                s.next_token, s.pos, made = t, s.pos + 1, made + 1
            if done or len(s.tokens) >= max_tokens:
                out[s.prompt][s.sample] = s.tokens
                ll.llama_sampler_free(s.sampler)
                ll.llama_memory_seq_rm(self.mem, slot, -1, -1)
                del live[slot]
                free.append(slot)
        return made

    def _compact(self, live: dict[int, _Seq], free: list[int]) -> None:
        """Move live sequences from the highest slots into the lowest free ones, so a step's ids are 0..len(live)-1."""
        n = len(live)
        holes = [s for s in range(n) if s not in live]
        movers = sorted((s for s in live if s >= n), reverse=True)
        for slot, to in zip(movers, holes):
            self.ll.llama_memory_seq_cp(self.mem, slot, to, -1, -1)  # applied at the next decode, before it runs
            self.ll.llama_memory_seq_rm(self.mem, slot, -1, -1)
            live[to] = live.pop(slot)
        free[:] = [s for s in range(self.parallel) if s not in live]

    def _decode_preamble(self, toks: list[list[int]]) -> int:
        """Decode the tokens every prompt starts with into the preamble sequence; return their count (0: none)."""
        if len(toks) < 2:  # one prompt: its own prefix sequence is the whole sharing
            return 0
        shared = common_prefix(toks)  # stops before any prompt's last token: its slots decode that one
        if shared:
            self._decode_into(self.parallel + 2, toks[0][:shared], 0)
        return shared

    def _prefill(self, tokens: list[int], prefix: dict[int, int], shared: int) -> int:
        """Decode a prompt (without logits) into a free prefix sequence, from the preamble on; return its id."""
        seq = next(s for s in (self.parallel, self.parallel + 1) if s not in prefix.values())
        self.ll.llama_memory_seq_rm(self.mem, seq, -1, -1)
        if shared:
            self.ll.llama_memory_seq_cp(self.mem, self.parallel + 2, seq, -1, -1)
        self._decode_into(seq, tokens[shared:], shared)
        return seq

    def _decode_into(self, seq: int, tokens: list[int], pos0: int) -> None:
        """Decode tokens at positions pos0.. into one sequence, without logits."""
        b = self.batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            for k, t in enumerate(chunk):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = t, pos0 + start + k, 1, 0
                b.seq_id[k][0] = seq
            b.n_tokens = len(chunk)
            self._decode()

    def _decode(self) -> None:
        rc = self.ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RmxError(f"llama.cpp: llama_decode failed (code {rc})", fix="lower rollout.batch_size or rollout.max_tokens")

    def _sampler(self, params: SampleParams, seed: int):
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.temperature == 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
        if params.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain
