"""Two ranks (torch.distributed, gloo, 127.0.0.1) against one process, on a tiny model: the entropy pass gives the
same values, training the same adapter, and rank 0 alone writes the run folder. The slow test runs the CLI under
`torchrun --nproc_per_node 2` and a kill -9 of one rank mid-training (benchmarks/distributed.py)."""

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_world

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, recipe: str, run_dir: str, cache: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RMX_LOCAL_CACHE=cache, HF_HUB_OFFLINE="1")
    import torch.distributed as dist

    from rmx_local.pipeline import run_pipeline
    from rmx_local.recipe import load_recipe
    from rmx_local.ui import SilentUI, UI

    try:
        run_pipeline(load_recipe(recipe, [f"run_dir={json.dumps(run_dir)}"]), UI(rich=False) if rank == 0 else SilentUI())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def adapter_tensors(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def entropies(run: Path) -> dict:
    return {(r["id"], r["k"]): np.asarray(r["H"]) for r in map(json.loads, (run / "entropies.jsonl").read_text().splitlines())}


def test_two_ranks_equal_one_process(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    from rmx_local.pipeline import run_pipeline
    from rmx_local.recipe import load_recipe
    from rmx_local.ui import UI

    recipe = tiny_world(tmp_path)
    monkeypatch.setenv("RMX_LOCAL_CACHE", str(tmp_path / "cache"))
    one = run_pipeline(load_recipe(str(recipe), [f"run_dir={json.dumps(str(tmp_path / 'one'))}"]), UI(rich=False))
    two_dir = tmp_path / "two"
    mp.spawn(_rank_main, args=(2, free_port(), str(recipe), str(two_dir), str(tmp_path / "cache")), nprocs=2)
    two = json.loads((two_dir / "summary.json").read_text())

    # the same rollouts (rank 0 sampled them), the same entropies, one record per sequence
    assert (two_dir / "rollouts.jsonl").read_text() == (tmp_path / "one" / "rollouts.jsonl").read_text()
    h1, h2 = entropies(tmp_path / "one"), entropies(two_dir)
    assert h1.keys() == h2.keys() and len((two_dir / "entropies.jsonl").read_text().splitlines()) == len(h1)
    assert len(h1) == one["train_sequences"] >= 9  # >= 3 entropy batches of 4: both ranks scored
    h_diff = max(float(np.abs(h1[k] - h2[k]).max()) for k in h1)
    print(f"max |entropy(2 ranks) - entropy(1 process)| = {h_diff:.3g} nats")
    assert h_diff <= 1e-5
    # the same training: steps, losses and adapter within float summation order
    assert two["train"]["steps"] == one["train"]["steps"] and one["train"]["steps"] >= 4
    log = lambda run: [json.loads(x) for x in next(run.glob("train/*/log.jsonl")).read_text().splitlines()]  # noqa: E731
    l1, l2 = log(tmp_path / "one"), log(two_dir)
    assert [m["step"] for m in l2] == [m["step"] for m in l1]
    assert np.allclose([m["loss"] for m in l2], [m["loss"] for m in l1], rtol=1e-5, atol=1e-7)
    a1, a2 = adapter_tensors(tmp_path / "one"), adapter_tensors(two_dir)
    assert a1.keys() == a2.keys()
    diff = max(float(np.abs(a1[k] - a2[k]).max()) for k in a1)
    print(f"max |adapter(2 ranks) - adapter(1 process)| = {diff:.3g}")
    assert diff < 1e-5
    assert any(float(np.abs(a1[k]).max()) > 1e-3 for k in a1 if "lora_B" in k)  # training did move the LoRA
    assert two["eval"] == json.loads(json.dumps(one["eval"]))
    # rank 0 alone wrote: no lock or temp file left, one journal line per record
    assert not list(two_dir.rglob(".rmx-lock")) and not list(two_dir.rglob(".*.tmp"))


@pytest.mark.slow
def test_torchrun_pipeline_and_kill_one_rank(tmp_path):
    """The CLI under `torchrun --nproc_per_node 2` equals one process; a rank killed mid-training resumes to it."""
    spec = importlib.util.spec_from_file_location("distributed_bench", ROOT / "benchmarks" / "distributed.py")
    bench = sys.modules["distributed_bench"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run_checks(tmp_path, log=lambda s: None)
    assert {r["check"]: r["verdict"] for r in rows} == {"torchrun 2 ranks": "equal", "kill -9 rank 1, resume 2 ranks": "equal",
                                                       "kill -9 rank 1, resume 1 rank": "equal"}


def test_planner_prints_time_per_rank(tmp_path, monkeypatch):
    from conftest import save_digit_model

    from rmx_local.plan import Stage, per_rank, print_plan
    from rmx_local.recipe import load_recipe

    stages = [Stage("rollouts", 1, 60.0, "k"), Stage("entropy", 1, 40.0, "k"), Stage("train", 1, 80.0, "k"),
              Stage("eval base", 1, 10.0, "k")]
    assert per_rank(stages, 4) == [60.0, 10.0, 20.0, 10.0]  # rank 0 alone samples and evaluates

    class Capture:
        def table(self, title, columns, rows):
            self.columns, self.rows = columns, rows

        def line(self, text):
            pass

    save_digit_model(tmp_path / "model")
    recipe = load_recipe(None, [f"model={json.dumps(str(tmp_path / 'model'))}", "threads=1", "train.epochs=20"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    ui = Capture()
    print_plan(recipe, ui)
    assert ui.columns[-1] == "time, 2 ranks" and all(len(r) == 4 for r in ui.rows), ui.rows
    row = {r[0]: r for r in ui.rows}
    assert row["rollouts"][2] == row["rollouts"][3] and row["whole run"][3] != row["whole run"][2], ui.rows
