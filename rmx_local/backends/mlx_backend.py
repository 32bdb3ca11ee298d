"""MLX backend: mlx-lm for the model and batched sampling, mlx-lm's `LoRALinear` for the correction.

Same semantics as `torch_backend` (the reference):
  - generate: continuous batching through `mlx_lm.generate.BatchGenerator`, EOS stripped, greedy when
    temperature == 0 (one decode per prompt, repeated n times), `mx.random.seed(seed)` once per call.
    The sampler divides the log-probs by the temperature *before* the top-p cut, as transformers does
    (mlx-lm's `make_sampler` cuts on the untempered distribution), then draws with `mx.random.categorical`.
    Same seed and same inputs give the same tokens; the draws differ from torch's (different RNGs).
  - entropies: teacher-forced on the base model (LoRA scale 0), fp32 nats. Sequences are right-padded into
    batches: with causal attention a position never sees the padding after it, so no mask is needed.
  - LoRA: `linear_to_lora_layers` with the targets as per-block keys (so mlx-lm's own `load(adapter_path=)`
    reads the folder `export/mlx_adapter.py` writes). Switching the adapter off sets every LoRALinear's `scale` to 0; the KL
    anchor's base logits come from that same model, evaluated and stop-gradiented (no second copy).
  - accumulate: per-sequence loss (`mlx_loss`, a mirror of `rmx_local.loss`), averaged over the batch, times
    `scale`, gradients summed until `step`; step: torch-style global-norm clip, then AdamW with bias
    correction (betas 0.9/0.999, eps 1e-8, decoupled weight decay) = torch.optim.AdamW.

Shortcuts: the model stays in the dtype it was saved in unless the recipe names one ("auto" = as saved;
fp32 for the embedded model); `recipe.threads` is ignored (MLX has no CPU thread knob); LoRA A is drawn by
mlx-lm's initialiser (uniform +-1/sqrt(in), the same law as PEFT's, but not the same numbers for a seed);
the optimizer state file is MLX's own (safetensors bytes), so a checkpoint resumes only on this backend.
Numerics: MLX's fp32 CPU kernels are a few times noisier than torch's (on the embedded model, entropies sit
within 2.2e-4 nats of an fp64 reference vs 4e-6 for torch); on the tiny test model everything is <= 1e-5.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import apply_top_p
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from rmx_local.adapter import LoraAdapter, model_facts
from rmx_local.archs import lora_targets
from rmx_local.backends.base import Progress, SampleParams, TrainExample, group_completions, strip_eos
from rmx_local.backends.mlx_loss import sequence_loss, token_entropy
from rmx_local.errors import RmxError
from rmx_local.io import atomic_write_bytes
from rmx_local.models import legacy_rope_keys

ENTROPY_TOKENS_PER_PASS = 2048  # caps batch x length of one scoring pass (the logits are B x T x V fp32)


def make_sampler(temperature: float, top_p: float):
    """Temperature first, then nucleus, then a categorical draw (transformers' order); argmax at T = 0."""
    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)

    def sample(logprobs: mx.array) -> mx.array:
        x = logprobs * (1.0 / temperature)
        if 0 < top_p < 1:
            x = apply_top_p(x, top_p)  # normalises by the total mass itself
        return mx.random.categorical(x)

    return sample


def gpu_available() -> bool:
    try:
        return mx.is_available(mx.gpu)
    except AttributeError:  # mlx < 0.29
        return mx.metal.is_available()


def pick_mlx_device(name: str):
    if name == "cpu":
        return mx.cpu
    if name == "auto":
        return mx.default_device()
    if not gpu_available():
        raise RmxError(f'device = "{name}" but MLX sees no GPU', fix='set device = "auto" or "cpu"')
    return mx.gpu


def _model_config_overrides(folder: Path) -> dict:
    """transformers 5 writes rope settings under `rope_parameters`; mlx-lm reads the top-level keys."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return legacy_rope_keys(config)


class MlxBackend:
    name = "mlx"

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 64, model_name: str = "",
                 eos_ids: list[int] | None = None, entropy_batch_size: int = 8):
        self.model = model
        self.model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.entropy_batch_size = entropy_batch_size
        self.model_name = model_name
        eos = list(eos_ids or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        self.lora: dict | None = None
        self.optimizer: optim.AdamW | None = None
        self._grads: dict | None = None
        self._enabled = True

    @classmethod
    def load(cls, source, recipe, note=lambda s: None) -> "MlxBackend":
        import mlx_lm
        from transformers import AutoTokenizer

        mx.set_default_device(pick_mlx_device(recipe.device))
        note(f"loading {source.hf_path} with MLX on {mx.default_device()}")
        overrides = _model_config_overrides(Path(source.hf_path)) if not source.is_hub_id else {}
        try:
            model, wrapper = mlx_lm.load(source.hf_path, model_config=overrides,
                                         trust_remote_code=recipe.trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(source.hf_path, trust_remote_code=recipe.trust_remote_code)
        except Exception as e:  # mlx-lm raises FileNotFoundError / ValueError / hub errors
            hint = (f"download it first (`hf download {source.spec}`) or point model at a local folder"
                    if source.is_hub_id else "check that the folder holds a complete transformers model mlx-lm supports")
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise RmxError(f"model: MLX cannot load {source.spec!r}: {first}", fix=hint) from None
        if recipe.dtype != "auto":
            model.set_dtype(getattr(mx, recipe.dtype))
        return cls(model, tokenizer, recipe.rollout.batch_size, source.spec,
                   eos_ids=sorted(wrapper.eos_token_ids), entropy_batch_size=recipe.gate.batch_size)

    # ---- sampling -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SampleParams, progress: Progress | None = None) -> list[list[list[int]]]:
        greedy = params.temperature == 0
        n = 1 if greedy else params.n
        flat = [p for p in prompts for _ in range(n)]
        if params.max_tokens <= 0 or not flat:
            return [[[] for _ in range(params.n)] for _ in prompts]
        mx.random.seed(params.seed)
        gen = BatchGenerator(self.model, max_tokens=params.max_tokens, stop_tokens=[[e] for e in self.eos_ids],
                             sampler=make_sampler(params.temperature, params.top_p),
                             completion_batch_size=self.batch_size, prefill_batch_size=min(8, self.batch_size))
        try:
            uids = gen.insert(flat)
            out: dict[int, list[int]] = {u: [] for u in uids}
            while responses := gen.next_generated():
                for r in responses:
                    if r.finish_reason != "stop":  # the stop (EOS) token itself is dropped
                        out[r.uid].append(r.token)
                if progress:
                    progress(len(responses))
        finally:
            gen.close()
        outputs = [strip_eos(out[u], self.eos_ids) for u in uids]
        return group_completions(outputs, len(prompts), params)

    # ---- entropy scoring ------------------------------------------------------------------------
    def entropies(self, sequences: list[tuple[list[int], int]]) -> list[np.ndarray]:
        result: list[np.ndarray | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
        with self._adapter_off():
            while order:  # shortest first; each pass holds at most ENTROPY_TOKENS_PER_PASS padded tokens
                take = 1
                while (take < min(len(order), self.entropy_batch_size)
                       and (take + 1) * len(sequences[order[take]][0]) <= ENTROPY_TOKENS_PER_PASS):
                    take += 1
                chunk, order = order[:take], order[take:]
                width = max(len(sequences[i][0]) for i in chunk)
                x = np.full((len(chunk), width), self.pad_id, dtype=np.int32)
                for row, i in enumerate(chunk):
                    x[row, : len(sequences[i][0])] = sequences[i][0]
                ent = token_entropy(self.model(mx.array(x)))  # (B, width)
                mx.eval(ent)
                ent = np.array(ent, dtype=np.float32)
                for row, i in enumerate(chunk):
                    tokens, prompt_len = sequences[i]
                    result[i] = ent[row, prompt_len - 1 : len(tokens) - 1].copy()
        return result

    # ---- LoRA and training ------------------------------------------------------------------------
    def _lora_layers(self) -> dict[str, LoRALinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoRALinear)}

    def init_lora(self, rank: int, alpha: float, dropout: float, targets: list[str], seed: int) -> None:
        targets = lora_targets(self.model.args.model_type, targets)  # phi3: q/k/v -> qkv_proj
        linear = (nn.Linear, nn.QuantizedLinear)
        names = {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, linear)}
        missing = [t for t in targets if t not in names]
        if missing:
            raise RmxError(f"train.targets: {missing} are not linear layers of this model", fix=f"choose from {sorted(names)}")
        # Keys relative to a block ("self_attn.q_proj"), plus any target outside the blocks (e.g. "lm_head").
        keys = {k for layer in self.model.layers for k, m in layer.named_modules()
                if isinstance(m, linear) and k.rsplit(".", 1)[-1] in targets}
        keys |= {k for k, m in self.model.named_modules()
                 if isinstance(m, linear) and k.rsplit(".", 1)[-1] in targets and ".layers." not in f".{k}"}
        self.lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets), "keys": sorted(keys)}
        mx.random.seed(seed)
        self.model.freeze()
        linear_to_lora_layers(self.model, len(self.model.layers),
                              {"rank": rank, "scale": alpha / rank, "dropout": dropout, "keys": sorted(keys)})
        mx.eval(self.model.trainable_parameters())
        self.optimizer = optim.AdamW(learning_rate=0.0, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0,
                                     bias_correction=True)
        self._grads = None
        self._set_scale(self._enabled)

    def _set_scale(self, on: bool) -> None:
        if self.lora is not None:
            scale = self.lora["alpha"] / self.lora["rank"] if on else 0.0
            for layer in self._lora_layers().values():
                layer.scale = scale

    def set_adapter_enabled(self, enabled: bool) -> None:
        self._enabled = enabled
        self._set_scale(enabled)

    @contextlib.contextmanager
    def _adapter_off(self):
        self._set_scale(False)
        try:
            yield
        finally:
            self._set_scale(self._enabled)

    def _base_logits(self, x: mx.array) -> mx.array:
        with self._adapter_off():
            logits = self.model(x)[0, :-1]
            mx.eval(logits)  # the LoRA scale is read while the graph is built; evaluate before restoring it
        return mx.stop_gradient(logits)

    def accumulate(self, batch: list[TrainExample], kl_coef: float, negative_ce_cap: float, scale: float) -> dict[str, float]:
        if self.lora is None:
            raise RmxError("training: init_lora was not called")
        self.model.train()
        totals: dict[str, float] = {}
        try:
            for ex in batch:
                x = mx.array([ex.tokens], dtype=mx.int32)
                base = self._base_logits(x)

                def loss_fn():
                    logits = self.model(x)[0, :-1]
                    loss, metrics = sequence_loss(logits, base, ex.tokens, ex.prompt_len, ex.gate, ex.advantage,
                                                  kl_coef, negative_ce_cap)
                    return loss * (scale / len(batch)), metrics

                (_, metrics), grads = nn.value_and_grad(self.model, loss_fn)()
                self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
                mx.eval(self._grads, metrics)
                values = {k: float(v) for k, v in metrics.items()}
                if not np.isfinite(values["loss"]):
                    raise RmxError("training: loss is NaN/inf", fix="lower train.lr, set train.negative_ce_cap, or use dtype = \"float32\"")
                for k, v in values.items():
                    totals[k] = totals.get(k, 0.0) + v / len(batch)
        finally:
            self.model.eval()
        return totals

    def step(self, lr: float, weight_decay: float, grad_clip: float) -> float:
        if self._grads is None:
            return 0.0
        grads, norm = optim.clip_grad_norm(self._grads, grad_clip if grad_clip > 0 else float("inf"))
        self.optimizer.learning_rate = lr
        self.optimizer.weight_decay = weight_decay
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self._grads = None
        return float(norm)

    # ---- adapter <-> canonical (PEFT orientation: A = lora_a.T (r, in), B = lora_b.T (out, r)) -----
    def get_adapter(self) -> LoraAdapter:
        layers = self._lora_layers()
        weights = {name: (np.array(m.lora_a.astype(mx.float32)).T.copy(), np.array(m.lora_b.astype(mx.float32)).T.copy())
                   for name, m in sorted(layers.items())}
        args = self.model.args
        return LoraAdapter(
            rank=self.lora["rank"], alpha=self.lora["alpha"], targets=sorted(self.lora["targets"]),
            base_model=self.model_name, architecture=args.model_type,
            model_config=model_facts(args),
            weights=weights,
        )

    def set_adapter(self, adapter: LoraAdapter) -> None:
        if self.lora is None:
            self.init_lora(adapter.rank, adapter.alpha, 0.0, adapter.targets, seed=0)
        layers = self._lora_layers()
        if set(layers) != set(adapter.weights):
            raise RmxError("adapter: its modules do not match this model's LoRA layers",
                           fix="use the adapter with the base model it was trained on")
        for name, (a, b) in adapter.weights.items():
            layer = layers[name]
            if a.T.shape != layer.lora_a.shape or b.T.shape != layer.lora_b.shape:
                raise RmxError(f"adapter: {name} has A{a.shape} B{b.shape}, this model's LoRA layer needs "
                               f"A{layer.lora_a.shape[::-1]} B{layer.lora_b.shape[::-1]}",
                               fix="use the adapter with the base model and rank it was trained with")
            layer.lora_a = mx.array(np.ascontiguousarray(a.T, dtype=np.float32))
            layer.lora_b = mx.array(np.ascontiguousarray(b.T, dtype=np.float32))
        mx.eval(self.model.trainable_parameters())

    # ---- optimizer state ------------------------------------------------------------------------
    def save_optimizer(self, path: str) -> None:
        from safetensors.numpy import save

        state = {k: np.array(v) for k, v in tree_flatten(self.optimizer.state)}
        atomic_write_bytes(path, save(state, metadata={"format": "mlx-adamw"}))

    def load_optimizer(self, path: str) -> None:
        from safetensors.numpy import load

        try:
            flat = load(Path(path).read_bytes())
        except Exception as e:
            raise RmxError(f"{path}: not an MLX optimizer state ({e})",
                           fix="resume with the backend that wrote it, or delete the checkpoint to restart training") from None
        self.optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in flat.items()])
        mx.eval(self.optimizer.state)
