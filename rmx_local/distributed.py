"""Data parallelism across processes, one per device, under `torchrun` or `accelerate launch`.

The launcher sets WORLD_SIZE / RANK / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); `init()` then creates the
process group (NCCL on CUDA, gloo otherwise). Without a launcher (WORLD_SIZE unset or 1) every helper here is the
identity of one process, so a single-process run takes no new code path.

What runs where:
  entropy pass   the fixed `gate.batch_size` batches are dealt to the ranks in rounds of `world` batches
                 (`rounds`); each round's results are gathered and rank 0 journals them. Every batch is the same
                 packed forward one process runs, so the values are the same (on GPUs, up to kernel order).
  training       each optimizer step's `grad_accum` micro-batches are dealt to the ranks (micro-batch j to rank
                 j mod world, `deal`); every rank scales its losses by 1 / grad_accum exactly as one process does,
                 and the LoRA gradients are summed across ranks before the step (`sum_tensors`: one flat
                 all-reduce, what DDP does, without its wrapper: only the small LoRA tensors have gradients). The
                 update is then one process's update with the same global batch, up to float summation order, and
                 every rank holds the same LoRA and AdamW state: a checkpoint is one full state, written by rank 0,
                 resumable with any number of ranks.
  the rest       problems, rollouts, selection, evaluation and the final files run on rank 0 first
                 (`main_first`); the other ranks wait, then find every output in the run folder and read it
                 (each stage resumes from the folder), writing nothing. Rank 0 alone holds the folder lock
                 (`run_lock`); the other ranks learn whether it got it.
  fsdp = true    the frozen base's decoder layers are sharded across the ranks with FSDP2 (`fully_shard` per layer,
                 `shard_layers`): each rank keeps 1/world of every layer's weights and all-gathers a layer's shards
                 just before using it, then frees them. The embeddings, final norm and head stay whole on every
                 rank (the chunked vocabulary loop calls the head a data-dependent number of times, which must not
                 be a collective); so do the LoRA tensors, added after sharding and not managed by FSDP: their
                 gradients are summed by `sum_grads` as above, every rank keeps the full LoRA and AdamW state, and a
                 checkpoint is the same full state (resumable with any number of ranks, FSDP on or off). Every
                 forward is now a collective, so every rank runs every pass: a rank short of entropy batches
                 (stages/gate.py) or micro-batches (`deal`) gets empty ones, and the backend runs a zero-weight pass of a
                 dummy sequence for them. Rank 0 cannot run the sharded model alone, so what runs on rank 0 only
                 must not need it: rollouts from `rollout.engine = "openai"` / "llama_cpp", no evaluation and no
                 validation in the run (`check_supported` says so in one line; evaluate the adapter on a server).
Shortcuts: one filesystem shared by all ranks (one host, or a shared mount); `train.lora_dropout` > 0 draws other
masks per rank than one process; the MLX backend and `rounds` > 1 are single-process; a dead rank stops the job
(torchrun's default) and the rerun resumes from rank 0's last checkpoint. FSDP: decoder layers only (found as the
decoder's `layers`), no CPU offload or mixed-precision policy (the weights keep the recipe's dtype), the LoRA
replicated (small next to the base).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterator, TypeVar

from rmx_local.errors import RmxError
from rmx_local.lock import run_lock as folder_lock

T = TypeVar("T")
PARALLEL_STAGES = ("entropy", "train")  # the stages whose work the ranks share (the planner divides their time)
_mesh: Any = None  # FSDP's device mesh over every rank, set by `start_fsdp` (pipeline: recipe fsdp = true, WORLD_SIZE > 1)


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", str(rank())) or 0)


def is_main() -> bool:
    return rank() == 0


def _dist():
    import torch.distributed as dist

    return dist


def init() -> bool:
    """Create the process group when launched with WORLD_SIZE > 1 (idempotent); True when distributed."""
    if world() == 1:
        return False
    try:
        dist = _dist()
    except ImportError:
        raise RmxError(f"WORLD_SIZE = {world()} needs PyTorch's torch.distributed", fix="pip install torch, or run one process") from None
    if not dist.is_initialized():
        if _cuda():
            import torch

            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if _cuda() else "gloo")
    return True


def check_supported(recipe: Any, backend: str) -> None:
    """What cannot run on several ranks, as one line each (`backend`: the backend the recipe resolves to)."""
    if world() == 1:
        return
    if backend != "torch":
        raise RmxError(f"backend {recipe.backend!r} runs in one process only, and WORLD_SIZE = {world()}",
                       fix='set backend = "torch", or launch one process (no torchrun)')
    if recipe.rounds > 1:
        raise RmxError(f"rounds = {recipe.rounds} runs in one process only, and WORLD_SIZE = {world()}",
                       fix="set rounds = 1, or launch one process (no torchrun)")
    if recipe.fsdp:
        _check_fsdp(recipe)


def start_fsdp() -> None:
    """Shard from now on: FSDP's device mesh over every rank (every rank calls this, after `init`)."""
    global _mesh
    from torch.distributed.device_mesh import init_device_mesh

    _mesh = init_device_mesh("cuda" if _cuda() else "cpu", (world(),))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_fsdp(recipe: Any) -> None:
    """With the base sharded, rank 0 cannot run a forward alone: what it runs alone must not need the model."""
    why = "fsdp = true shards the model across the ranks, so rank 0 alone cannot run it"
    if recipe.rollout.engine not in ("openai", "llama_cpp"):
        raise RmxError(f"{why} to sample rollouts (rollout.engine = {recipe.rollout.engine!r})",
                       fix='set rollout.engine = "openai" with rollout.urls (vLLM or llama.cpp servers), or fsdp = false')
    if recipe.eval.greedy or recipe.eval.n_samples:
        raise RmxError(f"{why} to evaluate (eval.greedy = {str(recipe.eval.greedy).lower()}, eval.n_samples = "
                       f"{recipe.eval.n_samples})", fix="set eval.greedy = false and eval.n_samples = 0 and evaluate "
                       "the adapter on a vLLM server with LoRA (docs/multi-gpu.md), or fsdp = false")
    if recipe.task.val_size or recipe.train.select_on_train:
        raise RmxError(f"{why} to score checkpoints on validation problems (task.val_size = {recipe.task.val_size}, "
                       f"train.select_on_train = {str(recipe.train.select_on_train).lower()})",
                       fix="set task.val_size = 0 and train.select_on_train = false (the last checkpoint is kept), or fsdp = false")


def sharded() -> bool:
    """True when this run's frozen base is sharded across the ranks (recipe fsdp = true under torchrun)."""
    return _mesh is not None


def shard_layers(model: Any) -> None:
    """FSDP2 `fully_shard` on each decoder layer of `model` (the frozen base, before any LoRA): each rank keeps
    1/world of each layer's weights; a layer's forward all-gathers them and frees them after (also in backward)."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not layers:
        raise RmxError(f"fsdp: found no decoder layers in this {type(model).__name__} (its decoder has no `layers`)",
                       fix="set fsdp = false (every rank then holds the whole model)")
    for layer in layers:
        fully_shard(layer, mesh=_mesh, reshard_after_forward=True)


def param_bytes(module: Any) -> tuple[int, int]:
    """(bytes of `module`'s parameters held by this rank, bytes of the whole parameters): FSDP shards count locally."""
    held = full = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * local.element_size()
        full += p.numel() * p.element_size()
    return held, full


def most(n: int) -> int:
    """The largest `n` over the ranks."""
    return max(gather(n))


def device(name: str) -> str:
    """This rank's device: "cuda" becomes "cuda:LOCAL_RANK" when distributed."""
    return f"cuda:{local_rank()}" if name == "cuda" and world() > 1 else name


def barrier() -> None:
    if world() > 1:
        _dist().barrier()


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    _dist().all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` computed on rank 0 only, its result handed to every rank."""
    return broadcast(fn() if is_main() else None)


def main_first(fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn` (and writes what it writes); then the others run it, finding rank 0's outputs to read."""
    if world() == 1:
        return fn()
    if is_main():
        out = fn()
        barrier()
        return out
    barrier()
    return fn()


def deal(items: list[T]) -> list[T]:
    """This rank's share of `items`: items rank, rank + world, ... Sharded (FSDP), every rank gets as many: a rank
    short of one gets an empty list (an empty micro-batch, which the backend runs as a zero-weight pass)."""
    mine = items[rank() :: world()]
    return mine + [[]] * (math.ceil(len(items) / world()) - len(mine)) if sharded() else mine  # type: ignore[list-item]


def rounds(items: list[T]) -> list[list[T]]:
    """`items` cut into consecutive rounds of `world` (item r of a round is rank r's; the last round may be short)."""
    n = world()
    return [items[i : i + n] for i in range(0, len(items), n)]


def sum_tensors(tensors: list[Any]) -> None:
    """Sum tensors across ranks in place, as one flat all-reduce (absent gradients count as zeros)."""
    if world() == 1 or not tensors:
        return
    import torch

    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    _dist().all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()


def sum_grads(params: list[Any]) -> None:
    """Sum the gradients of `params` across ranks (a rank that had no micro-batch this step contributes zeros)."""
    if world() == 1:
        return
    import torch

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sum_tensors([p.grad for p in params])


def copy_from_main(tensors: list[Any]) -> None:
    """Overwrite `tensors` on every rank with rank 0's (the LoRA init, so all ranks start from one state)."""
    if world() == 1:
        return
    for t in tensors:
        _dist().broadcast(t.data, src=0)


def sum_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Per-key sums of every rank's metrics (keys missing on a rank count as 0)."""
    if world() == 1:
        return metrics
    out: dict[str, float] = {}
    for m in gather(metrics):
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
    return out


@contextlib.contextmanager
def run_lock(run_dir: Any, note: Callable[[str], None]) -> Iterator[None]:
    """The run folder's lock, held by rank 0 for every rank: if rank 0 cannot take it, every rank stops."""
    if world() == 1:
        with folder_lock(run_dir, note):
            yield
        return
    if not is_main():
        refused = broadcast(None)
        if refused:
            raise RmxError(refused[0], fix=refused[1])
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(run_dir, note))
        except RmxError as e:
            broadcast((e.message, e.fix))
            raise
        broadcast(None)
        yield
