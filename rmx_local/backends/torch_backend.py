"""PyTorch backend: transformers for the model, PEFT for the LoRA correction, our own decode loop for sampling
(torch_sampling) and prompt-sharing packed forwards for entropies and training (torch_packing).

CPU runs in fp32; CUDA in bf16 (LoRA weights stay fp32, PEFT's default). Base logits for the KL anchor and
for entropy scoring come from the same model with the LoRA layers switched off. Full-vocabulary work (entropy,
KL, CE) runs a chunk of positions at a time from the decoder's hidden states (torch_vocab), so its memory is
bounded by `logits_budget` bytes (default `torch_vocab.LOGITS_BUDGET_BYTES`) instead of batch x length x vocab.
A training micro-batch whose activations would pass `activation_budget` bytes (estimated: `saved_floats` per token
per layer kept for backward) runs as several packed forward/backward passes; the gradients add up to the same sum.
FSDP (recipe fsdp = true under torchrun, rmx_local/distributed.py): the decoder layers are sharded right after loading,
before the model moves to its device; every forward is then a collective, so an empty entropy batch or micro-batch
still runs one zero-weight pass of a dummy sequence, every rank runs as many training passes as the busiest, and the
no-grad passes use `torch.no_grad` (FSDP's gathered weights first made under `inference_mode` could not be written
by a later training pass). Nothing at load or LoRA set-up runs a forward then (the head split is checked before
sharding), so rank 0 can load the model and copy an adapter into it alone.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from rmx_local import distributed as dist
from rmx_local.adapter import PEFT_PREFIX, LoraAdapter, model_facts
from rmx_local.archs import lora_targets
from rmx_local.backends.base import Progress, SampleParams, TrainExample, group_completions
from rmx_local.backends.torch_packing import pack, packed_logits, split_passes
from rmx_local.backends.torch_sampling import decode
from rmx_local.backends.torch_vocab import (LOGITS_BUDGET_BYTES, chunk_rows, chunked_entropy, chunked_kl, flat_positions,
                                            lse_and_kl, packed_hidden, split_head, target_logits)
from rmx_local.errors import RmxError
from rmx_local.io import atomic_write_bytes
from rmx_local.loss import combine_terms, position_terms, prediction_gate, token_entropy

ACTIVATION_BUDGET_BYTES = 320 * 2**20  # activations of one training pass (it holds one sequence at least)


def saved_floats(hidden: int, intermediate: int) -> int:
    """Floats one decoder layer holds per token through a training pass with LoRA on attention: the tensors saved
    for backward (norm inputs and outputs, q, attention output, LoRA inputs; MLP gate, activation, up, product) and
    the backward's transients. Fitted to two measurements, fp32: SmolLM2-135M 1.9 MB a token (30 layers), the
    Qwen2.5-1.5B shape 6.2 MB a token (28 layers, one 1,064-token sequence)."""
    return 20 * hidden + 3 * intermediate


def pick_device(name: str) -> str:
    if name != "auto":
        if name == "cuda" and not torch.cuda.is_available():
            raise RmxError("device = \"cuda\" but PyTorch sees no CUDA GPU", fix='set device = "auto" or "cpu"')
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


class TorchBackend:
    name = "torch"

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu", batch_size: int = 64, model_name: str = ""):
        if dist.sharded():  # FSDP: this rank keeps its shard of each decoder layer; the head split is checked first
            self.split = split_head(model)  # (a forward of the sharded model is a collective)
            dist.shard_layers(model)
        self.model = model.to(device)
        self.model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.model_name = model_name or getattr(model.config, "_name_or_path", "")
        self.optimizer: torch.optim.Optimizer | None = None
        self.lora: dict | None = None
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        if not dist.sharded():
            self.split = split_head(self.model)  # (decoder, head) for chunked full-vocabulary passes; None = full logits
        self.logits_budget = LOGITS_BUDGET_BYTES
        self.activation_budget = ACTIVATION_BUDGET_BYTES

    @classmethod
    def load(cls, source, recipe, note=lambda s: None) -> "TorchBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bars and line logs are enough
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        device = dist.device(pick_device(recipe.device))  # under torchrun: this rank's GPU
        dtype = pick_dtype(recipe.dtype, device)
        note(f"loading {source.hf_path} on {device} ({str(dtype).removeprefix('torch.')})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.hf_path, trust_remote_code=recipe.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(source.hf_path, dtype=dtype, trust_remote_code=recipe.trust_remote_code)
        except OSError as e:
            hint = (f"download it first (`hf download {source.spec}`) or set HF_HUB_OFFLINE=0; or point model at a local folder"
                    if source.is_hub_id else "check that the folder holds a complete transformers model")
            raise RmxError(f"model: cannot load {source.spec!r}: {str(e).splitlines()[0]}", fix=hint) from None
        except ValueError as e:
            if "trust_remote_code" not in str(e):
                raise
            raise RmxError(f"model: {source.spec!r} needs its own Python code to load (config.json auto_map), "
                           "which is not run unless the recipe sets trust_remote_code = true",
                           fix="set trust_remote_code = true only if you trust that code, or use a model transformers "
                               "supports natively") from None
        backend = cls(model, tokenizer, device, recipe.rollout.batch_size, source.spec)
        if dist.sharded():
            held, whole = dist.param_bytes(backend.model.get_decoder().layers)
            note(f"fsdp: rank {dist.rank()} holds {held:,} of {whole:,} bytes of decoder-layer weights "
                 f"({dist.world()} ranks; embeddings and head whole on every rank)")
        return backend

    # ---- sampling -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SampleParams, progress: Progress | None = None) -> list[list[list[int]]]:
        n = 1 if params.temperature == 0 else params.n
        flat = [p for p in prompts for _ in range(n)]
        out = decode(self.model, flat, params, self.eos_ids, self.pad_id, self.batch_size, self.device, progress)
        return group_completions(out, len(prompts), params)

    # ---- entropy scoring ------------------------------------------------------------------------
    def _rows(self) -> int:
        return chunk_rows(self.model.config.vocab_size, self.logits_budget)

    def _no_grad(self):
        return torch.no_grad() if dist.sharded() else torch.inference_mode()

    def _dummy(self) -> TrainExample:
        """A two-token sequence: the pass an FSDP rank with no work runs so that the others' collectives match."""
        return TrainExample([self.pad_id, self.pad_id], 1, np.zeros(1, dtype=bool), 0.0)

    def entropies(self, sequences: list[tuple[list[int], int]]) -> list[np.ndarray]:
        """One packed forward per call: rollouts that share a prompt share its forward (see torch_packing). Sharded,
        an empty call runs the forward of a dummy sequence (every rank must run every layer's all-gather)."""
        if not sequences:
            if dist.sharded():
                with self._no_grad():
                    self._entropies([(self._dummy().tokens, 1)])
            return []
        with self._no_grad():
            return self._entropies(sequences)

    def _entropies(self, sequences: list[tuple[list[int], int]]) -> list[np.ndarray]:
        packed = pack(sequences, self.pad_id, self.model.dtype, self.device)
        with self._adapter_off():
            if self.split is None:
                entropy = token_entropy(packed_logits(self.model, packed))  # (R, L)
                return [entropy[packed.row[i], packed.index[i][p - 1 :]].cpu().numpy().astype(np.float32)
                        for i, (_, p) in enumerate(sequences)]
            decoder, head = self.split
            unique, where = flat_positions(packed, [p - 1 for _, p in sequences])  # completion-predicting positions
            entropy = chunked_entropy(packed_hidden(decoder, packed)[unique], head, self._rows())
        return [entropy[w].cpu().numpy().astype(np.float32) for w in where]

    @torch.inference_mode()
    def kl_from_base(self, sequences: list[tuple[list[int], int]]) -> list[np.ndarray]:
        """KL(base || adapted) (nats) of the distributions predicting each completion token (`rmx-local eval --kl`).
        Chunked like `entropies`: two packed forwards to hidden states (adapter off, then on), the head applied only
        at completion-predicting positions, `_rows()` at a time; full (R, L, V) logits only when the head does not
        split off (`self.split` is None)."""
        packed = pack(sequences, self.pad_id, self.model.dtype, self.device)
        if self.split is None:
            with self._adapter_off():
                base_logits = packed_logits(self.model, packed)
            _, kl = position_terms(packed_logits(self.model, packed), base_logits)
            return [kl[packed.row[i], packed.index[i][p - 1 :]].float().cpu().numpy() for i, (_, p) in enumerate(sequences)]
        decoder, head = self.split
        unique, where = flat_positions(packed, [p - 1 for _, p in sequences])
        with self._adapter_off():
            base_hidden = packed_hidden(decoder, packed)[unique]
        kl = chunked_kl(packed_hidden(decoder, packed)[unique], base_hidden, head, self._rows())
        return [kl[w].cpu().numpy() for w in where]

    # ---- LoRA and training ------------------------------------------------------------------------
    def init_lora(self, rank: int, alpha: float, dropout: float, targets: list[str], seed: int) -> None:
        import warnings

        from peft import LoraConfig, get_peft_model

        targets = lora_targets(self.model.config.model_type, targets)  # phi3: q/k/v -> qkv_proj
        names = {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = [t for t in targets if t not in names]
        if missing:
            raise RmxError(f"train.targets: {missing} are not linear layers of this model",
                           fix=f"choose from {sorted(names)}")
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
        with warnings.catch_warnings():  # peft calls a transformers property deprecated in 5.x
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(self.model, config)
        if not dist.sharded():
            self.split = split_head(self.model)  # a LoRA on the output head disables the chunked path
        elif self.split is not None and self.model.get_base_model().get_output_embeddings() is not self.split[1]:
            self.split = None  # sharded: no check forward (rank 0 may be alone here); the head got a LoRA
        self.lora = {"rank": rank, "alpha": alpha, "targets": list(targets)}
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)

    def set_adapter_enabled(self, enabled: bool) -> None:
        if self.lora is not None:
            (self.model.enable_adapter_layers if enabled else self.model.disable_adapter_layers)()

    @contextlib.contextmanager
    def _adapter_off(self):
        if self.lora is None:
            yield
            return
        with self.model.disable_adapter():
            yield

    def accumulate(self, batch: list[TrainExample], kl_coef: float, negative_ce_cap: float, scale: float) -> dict[str, float]:
        """Packed forwards (adapter off, then on) and backward; the loss is the mean of sequence losses. A batch over
        `activation_budget` is cut into passes (`split_passes`) whose gradients add up."""
        cfg = self.model.config
        inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        per_token = cfg.num_hidden_layers * saved_floats(cfg.hidden_size, inter) * self.model.dtype.itemsize
        pieces = split_passes([(ex.tokens, ex.prompt_len) for ex in batch], max(1, self.activation_budget // per_token)) if batch else []
        if dist.sharded():  # every rank runs as many passes as the busiest; the extra ones weigh 0
            pieces += [[]] * (dist.most(len(pieces)) - len(pieces))
        totals: dict[str, float] = {}
        self.model.train()
        for piece in pieces:
            part = [batch[i] for i in piece] or [self._dummy()]
            packed = pack([(ex.tokens, ex.prompt_len) for ex in part], self.pad_id, self.model.dtype, self.device)
            terms = (self._chunked_terms if self.split is not None else self._full_terms)(packed, bool(kl_coef))
            if not piece:
                (sum(ce.sum() + kl.sum() for ce, kl in terms) * 0.0).backward()
                continue
            total = 0.0
            for ex, (ce, kl) in zip(part, terms):
                g = prediction_gate(torch.as_tensor(ex.gate, dtype=torch.bool, device=self.device), ex.prompt_len, len(ex.tokens))
                loss, metrics = combine_terms(ce, kl, g, ex.advantage, kl_coef, negative_ce_cap)
                total = total + loss / len(batch)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v / len(batch)
            if not torch.isfinite(total):
                self.model.eval()
                raise RmxError("training: loss is NaN/inf", fix="lower train.lr, set train.negative_ce_cap, or use dtype = \"float32\"")
            (total * scale).backward()
        self.model.eval()
        return totals

    def _full_terms(self, packed, with_kl: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence (CE, KL) over its T-1 positions, from full (R, L, V) logits. Without the anchor (kl_coef 0,
        e.g. train.objective = "rft") the base forward is skipped and KL is 0."""
        if with_kl:
            with torch.no_grad(), self._adapter_off():
                base_logits = packed_logits(self.model, packed)
            logp, kl = position_terms(packed_logits(self.model, packed), base_logits)
        else:
            logp = torch.log_softmax(packed_logits(self.model, packed).float(), dim=-1)
            kl = logp.new_zeros(logp.shape[:-1])
        return [(-logp[row, idx, t], kl[row, idx]) for row, idx, t in zip(packed.row, packed.index, packed.targets)]

    def _chunked_terms(self, packed, with_kl: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same terms from hidden states, the vocabulary a chunk of positions at a time (torch_vocab). Without the
        anchor the base forward is skipped, as in `_full_terms`: the adapted states stand in for the base's, so KL is 0."""
        decoder, head = self.split
        unique, where = flat_positions(packed, [0] * len(packed.row))
        base_hidden = None
        if with_kl:
            with torch.no_grad(), self._adapter_off():
                base_hidden = packed_hidden(decoder, packed)[unique]
        hidden = packed_hidden(decoder, packed)[unique]
        if base_hidden is None:
            base_hidden = hidden.detach()
        lse, kl = lse_and_kl(hidden, base_hidden, head, self._rows())
        where_all = torch.cat(where)
        ce = lse[where_all] - target_logits(hidden[where_all], head, torch.cat(packed.targets))
        sizes = [w.numel() for w in where]
        return list(zip(torch.split(ce, sizes), [kl[w] for w in where]))

    def step(self, lr: float, weight_decay: float, grad_clip: float) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr, weight_decay
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _lora_params(self) -> dict[str, torch.nn.Parameter]:
        out = {}
        for name, p in self.model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                module, ab = name.removeprefix(PEFT_PREFIX).replace(".default", "").rsplit(".lora_", 1)
                out[f"{module}.{ab[0]}"] = p
        return out

    def get_adapter(self) -> LoraAdapter:
        params = self._lora_params()
        modules = sorted({k[:-2] for k in params})
        weights = {m: (params[f"{m}.A"].detach().float().cpu().numpy().copy(),
                       params[f"{m}.B"].detach().float().cpu().numpy().copy()) for m in modules}
        cfg = self.model.config
        return LoraAdapter(
            rank=self.lora["rank"], alpha=self.lora["alpha"], targets=sorted(self.lora["targets"]),
            base_model=self.model_name, architecture=cfg.model_type,
            model_config=model_facts(cfg),
            weights=weights,
        )

    def set_adapter(self, adapter: LoraAdapter) -> None:
        if self.lora is None:
            self.init_lora(adapter.rank, adapter.alpha, 0.0, adapter.targets, seed=0)
        params = self._lora_params()
        if set(params) != {f"{m}.{x}" for m in adapter.weights for x in "AB"}:
            raise RmxError("adapter: its modules do not match this model's LoRA layers",
                           fix="use the adapter with the base model it was trained on")
        with torch.no_grad():
            for m, (a, b) in adapter.weights.items():
                params[f"{m}.A"].copy_(torch.from_numpy(a))
                params[f"{m}.B"].copy_(torch.from_numpy(b))

    def save_optimizer(self, path: str) -> None:
        import io as _io

        buf = _io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        atomic_write_bytes(path, buf.getvalue())

    def load_optimizer(self, path: str) -> None:
        """Tensors and plain containers only (`weights_only=True`): a file carrying pickled code is refused. Read to
        the CPU: `load_state_dict` moves each moment beside its parameter and keeps `step` a CPU tensor, as a fresh
        AdamW has it (read straight to CUDA, `step` stayed there: a GPU sync per parameter per step)."""
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            what = "holds pickled objects beyond tensors, refused" if isinstance(e, pickle.UnpicklingError) else \
                f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            raise RmxError(f"{path}: not a plain optimizer state ({what})",
                           fix="delete that checkpoint folder to redo its steps") from None
        self.optimizer.load_state_dict(state)
