"""Stage 4: train the LoRA correction with the ReasonMaxxer loss.

The loop is the whole algorithm: AdamW (no weight decay by default), `warmup_steps` of linear warmup then
linear decay to 0, global-norm clipping, `grad_accum` micro-batches of `batch_size` sequences per step
(shuffled sequences as in the paper, or shuffled groups of `group_size` rollouts of one problem).
Checkpoints (adapter + optimizer + step) go to `train/<key>/step-N/` every `checkpoint_every` steps and at
the end; a killed run resumes from the newest one with the same data order. When the recipe holds out
validation problems (`task.val_size`; or, with `select_on_train`, the training problems themselves), each
checkpoint is scored greedily on them and the best one is kept (ties go to the earlier step), as the paper
does; otherwise the last checkpoint is kept.
`<key>` hashes every setting training depends on, so an `lr` sweep in one run folder reuses the rollouts.
Under torchrun each step's micro-batches are dealt to the ranks and their gradients summed before the step, so the
update is one process's; rank 0 writes the log and checkpoints (rmx_local/distributed.py).
"""

from __future__ import annotations

import math
import shutil

import numpy as np

from rmx_local import distributed as dist
from rmx_local.adapter import load_peft, save_peft
from rmx_local.backends import SampleParams, TrainExample
from rmx_local.errors import RmxError
from rmx_local.io import Journal, atomic_write_json, read_json
from rmx_local.stages import RunContext
from rmx_local.stages.evaluate import score

TRAIN_KEY_SECTIONS = ("model", "task", "rollout", "select", "gate", "train", "seed")  # what train/<key>/ hashes


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then linear decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def build_examples(seqs: list[dict], gates: list[np.ndarray], positive_only: bool) -> list[TrainExample]:
    examples = [TrainExample(s["prompt_ids"] + s["completion_ids"], len(s["prompt_ids"]), g, s["advantage"])
                for s, g in zip(seqs, gates)]
    return [e for e in examples if e.advantage > 0] if positive_only else examples


def schedule(n_examples: int, t) -> tuple[int, int]:
    """(micro-batches, optimizer steps) for `t.epochs` passes."""
    micro = max(1, math.ceil(t.epochs * n_examples / t.batch_size))
    return micro, math.ceil(micro / t.grad_accum)


def micro_batches(examples: list[TrainExample], n_micro: int, batch_size: int, seed: int,
                  group_size: int = 1) -> list[list[TrainExample]]:
    """Deterministic data order: a fresh seeded permutation per epoch, cut into micro-batches.

    `group_size` > 1 permutes groups of that many rollouts of one problem instead of single sequences (each
    problem's rollouts shuffled, then cut into groups), so a micro-batch holds few prompts and the torch backend
    computes each of them once. 1 = the paper's shuffled sequences."""
    rng = np.random.default_rng(seed)
    problems: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(examples):
        problems.setdefault(tuple(e.tokens[: e.prompt_len]) if group_size > 1 else (i,), []).append(i)
    order: list[int] = []
    while len(order) < n_micro * batch_size:
        groups = []
        for members in problems.values():
            members = [members[j] for j in rng.permutation(len(members))] if group_size > 1 else members
            groups += [members[k : k + group_size] for k in range(0, len(members), group_size)]
        order += [i for g in rng.permutation(len(groups)).tolist() for i in groups[g]]
    return [[examples[i] for i in order[m * batch_size : (m + 1) * batch_size]] for m in range(n_micro)]


def run_train(ctx: RunContext, examples: list[TrainExample], val_problems: list) -> dict:
    t, r = ctx.recipe.train, ctx.recipe
    key = r.section_hash(*TRAIN_KEY_SECTIONS)
    folder = ctx.path("train", key)
    final = folder / "final.json"
    if final.exists():
        report = read_json(final)
        if dist.is_main():
            _keep_only(folder, report["best_step"])  # a run killed right after final.json left the others
        return report
    n_micro, n_steps = schedule(len(examples), t)
    batches = micro_batches(examples, n_micro, t.batch_size, r.seed, t.group_size)
    backend = ctx.backend
    if ctx.start_adapter is None:
        backend.init_lora(t.lora_rank, t.lora_alpha, t.lora_dropout, t.targets, r.seed)
        if backend.lora["targets"] != list(t.targets):
            ctx.ui.line(f"LoRA: train.targets {','.join(t.targets)} are {','.join(backend.lora['targets'])} in this "
                        "architecture (fused projections)")
    else:  # a later round continues the previous round's LoRA (a fresh optimizer; see rmx_local/rounds.py)
        backend.set_adapter(ctx.start_adapter)
    trainable = [p for g in backend.optimizer.param_groups for p in g["params"]] if dist.world() > 1 else []
    dist.copy_from_main(trainable)  # every rank starts from rank 0's LoRA
    every = t.checkpoint_every or n_steps
    ckpt_steps = sorted({min(s, n_steps) for s in range(every, n_steps + every, every)})
    log = Journal(folder / "log.jsonl")
    val_params = SampleParams(1, 0.0, 1.0, r.eval.max_tokens, r.seed)
    val: dict[int, float] = {}
    val_scores: dict[int, list[float]] = {}  # per-problem scores behind `val`: the sweep's paired comparisons
    kl_coef = 0.0 if t.objective == "rft" else t.kl_coef  # rft: advantage 1 on every token, no anchor = plain CE

    start = 0
    done = sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "state.json").exists())
    if done:
        start = done[-1]
        ckpt = folder / f"step-{start}"
        _check_checkpoint(ckpt)
        backend.set_adapter(load_peft(ckpt / "adapter"))
        backend.load_optimizer(str(ckpt / "optimizer.pt"))
        state = read_json(ckpt / "state.json")
        val = {int(k): v for k, v in state["val"].items()}
        val_scores = {int(k): v for k, v in state.get("val_scores", {}).items()}
        ctx.ui.line(f"train: resuming from step {start}/{n_steps}")
    # steps after the checkpoint were logged by a killed run and are redone now: log each step once
    if dist.is_main():
        log.rewrite([m for m in log.read() if m["step"] <= start])
    if val_problems and 0 not in val:
        backend.set_adapter_enabled(False)
        val_scores[0] = dist.from_main(lambda: score(ctx, val_problems, val_params, "val base")["per_problem"])
        val[0] = float(np.mean(val_scores[0]))
        backend.set_adapter_enabled(True)

    with ctx.timed("train"), ctx.ui.stage("train", n_steps, "steps") as bar:
        bar.advance(start)
        for step in range(start, n_steps):
            lr = lr_at(step, n_steps, t.warmup_steps, t.lr)
            metrics: dict[str, float] = {}
            group = batches[step * t.grad_accum : (step + 1) * t.grad_accum]
            for mb in dist.deal(group):  # one process: every micro-batch; torchrun: this rank's share
                m = backend.accumulate(mb, kl_coef, t.negative_ce_cap, 1.0 / len(group))
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v / len(group)
            metrics = dist.sum_metrics(metrics)
            dist.sum_grads(trainable)  # the global batch's gradient on every rank
            metrics["grad_norm"] = backend.step(lr, t.weight_decay, t.grad_clip)
            metrics.update(step=step + 1, lr=lr)
            if dist.is_main():
                log.append(metrics)
            bar.advance(1, sum(len(e.tokens) for mb in group for e in mb))
            if step + 1 in ckpt_steps:
                if val_problems:
                    val_scores[step + 1] = dist.from_main(
                        lambda: score(ctx, val_problems, val_params, f"val step {step + 1}")["per_problem"])
                    val[step + 1] = float(np.mean(val_scores[step + 1]))
                    ctx.ui.line(f"train: step {step + 1} loss {metrics['loss']:.4f} kl {metrics['kl']:.4f} val {val[step + 1]:.3f} (base {val[0]:.3f})")
                if dist.is_main():
                    _save_checkpoint(ctx, folder / f"step-{step + 1}", val, val_scores)
                dist.barrier()
        ctx.rates["train tok/s"] = bar.tokens_per_s

    trained = {s: v for s, v in val.items() if s > 0}
    best = max(trained, key=lambda s: (trained[s], -s)) if trained else n_steps
    report = {"key": key, "steps": n_steps, "examples": len(examples), "best_step": best, "val": val,
              "val_scores": {s: val_scores[s] for s in (0, best) if s in val_scores},
              "history": Journal(folder / "log.jsonl").read()}
    backend.set_adapter(load_peft(folder / f"step-{best}" / "adapter"))
    if dist.is_main():
        atomic_write_json(final, report)
        _keep_only(folder, best)
    dist.barrier()
    return report


def _keep_only(folder, best: int) -> None:
    """Keep the chosen checkpoint only; the others served their purpose."""
    for p in folder.glob("step-*"):
        if p.name != f"step-{best}":
            shutil.rmtree(p, ignore_errors=True)


CHECKPOINT_FILES = ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.pt", "state.json")


def _check_checkpoint(path) -> None:
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise RmxError(f"{path}: checkpoint is missing {', '.join(missing)}",
                       fix=f"delete {path} to resume from the checkpoint before it (or from the start)")


def _save_checkpoint(ctx: RunContext, path, val: dict[int, float], val_scores: dict[int, list[float]]) -> None:
    save_peft(ctx.backend.get_adapter(), path / "adapter")
    ctx.backend.save_optimizer(str(path / "optimizer.pt"))
    atomic_write_json(path / "state.json", {"val": {str(k): v for k, v in val.items()},
                                            "val_scores": {str(k): v for k, v in val_scores.items()}})
