"""Two ranks (torch.distributed, gloo, 127.0.0.1) against one process, on a tiny model: the entropy pass gives the
same values, training the same adapter, and rank 0 alone writes the run folder; the same with fsdp = true (the base
sharded), stopped mid-training and resumed in one process. The slow tests run the CLI under
`torchrun --nproc_per_node 2` (with and without FSDP) and a kill -9 of one rank mid-training (benchmarks/distributed.py)."""

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


def distributed_bench():
    """benchmarks/distributed.py as a module (its checks are the slow tests)."""
    spec = importlib.util.spec_from_file_location("distributed_bench", ROOT / "benchmarks" / "distributed.py")
    bench = sys.modules["distributed_bench"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_torchrun_pipeline_and_kill_one_rank(tmp_path):
    """The CLI under `torchrun --nproc_per_node 2` equals one process; a rank killed mid-training resumes to it."""
    rows = distributed_bench().run_checks(tmp_path, log=lambda s: None)
    assert {r["check"]: r["verdict"] for r in rows} == {"torchrun 2 ranks": "equal", "kill -9 rank 1, resume 2 ranks": "equal",
                                                       "kill -9 rank 1, resume 1 rank": "equal"}


@pytest.mark.slow
def test_torchrun_fsdp_pipeline_and_kill_one_rank(tmp_path):
    """The CLI under torchrun with fsdp = true equals one process; killed mid-training, one plain process resumes it."""
    rows = distributed_bench().run_fsdp_checks(tmp_path, log=lambda s: None)
    assert {r["check"]: r["verdict"] for r in rows} == {"torchrun 2 ranks, fsdp": "equal", "fsdp, kill -9 rank 1, resume 1 rank": "equal"}
    held, whole = rows[0]["held bytes"]
    assert held <= whole / 2 + 64 and held < whole


def test_planner_prints_time_per_rank(tmp_path, monkeypatch):
    from rmx_local.plan import Stage, per_rank

    stages = [Stage("rollouts", 1, 60.0, "k"), Stage("entropy", 1, 40.0, "k"), Stage("train", 1, 80.0, "k"),
              Stage("eval base", 1, 10.0, "k")]
    assert per_rank(stages, 4) == [60.0, 10.0, 20.0, 10.0]  # rank 0 alone samples and evaluates

    ui = plan_on_two_ranks(tmp_path, monkeypatch, "train.epochs=20")
    assert ui.columns[-1] == "time, 2 ranks" and all(len(r) == 4 for r in ui.rows), ui.rows
    row = {r[0]: r for r in ui.rows}
    assert row["rollouts"][2] == row["rollouts"][3] and row["whole run"][3] != row["whole run"][2], ui.rows


# ---- FSDP: the frozen base sharded across the ranks (recipe fsdp = true) ---------------------------------------------

def completions_server():
    """A stand-in OpenAI `/v1/completions` server: per request `n` completions of 1-4 digits drawn from the prompt and
    seed (the same request, the same answers), so a one-process run and a sharded run sample the same rollouts."""
    import random
    from http.server import BaseHTTPRequestHandler

    from conftest import serve_http

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            rng = random.Random(f"{body['prompt']}|{body.get('seed')}")
            texts = [rng.choice("12") * rng.randint(1, body["max_tokens"]) for _ in range(body.get("n", 1))]
            out = json.dumps({"choices": [{"index": i, "text": t} for i, t in enumerate(texts)]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    return serve_http(Handler)


def fsdp_overrides(url: str) -> list[str]:
    """What a sharded run needs: rollouts from a server, no evaluation or validation on rank 0's lone model."""
    return ["fsdp=true", 'rollout.engine="openai"', f'rollout.base_url="{url}"', "eval.greedy=false", "eval.n_samples=0"]


class Stop(Exception):
    pass


def _fsdp_rank_main(rank: int, world: int, port: int, recipe: str, run_dir: str, cache: str, overrides: list[str],
                    stop_before: int) -> None:
    """One rank of a sharded run; training stops (every rank, as a kill would) before 0-based step `stop_before`.
    Rank 0 writes run_dir/../fsdp-bytes.json: (held, whole) bytes of the decoder layers' parameters."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RMX_LOCAL_CACHE=cache, HF_HUB_OFFLINE="1")
    import torch.distributed as tdist

    import rmx_local.stages.train as train_stage
    from rmx_local import distributed as dist
    from rmx_local.backends.torch_backend import TorchBackend
    from rmx_local.pipeline import run_pipeline
    from rmx_local.recipe import load_recipe
    from rmx_local.ui import SilentUI, UI

    lr_at = train_stage.lr_at

    def stopping_lr_at(step, *args):
        if step == stop_before:
            raise Stop
        return lr_at(step, *args)

    init = TorchBackend.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if rank == 0:
            (Path(run_dir).parent / "fsdp-bytes.json").write_text(json.dumps(dist.param_bytes(self.model.get_decoder().layers)))

    train_stage.lr_at, TorchBackend.__init__ = stopping_lr_at, recording_init
    recipe = load_recipe(recipe, [f"run_dir={json.dumps(run_dir)}", *overrides])
    try:
        run_pipeline(recipe, UI(rich=False) if rank == 0 else SilentUI())
    except Stop:
        pass
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def test_fsdp_two_ranks_equal_one_process_and_resume_in_one(tmp_path, monkeypatch):
    """fsdp = true on 2 gloo ranks: each rank holds half of the decoder layers' weights; the entropies and the first
    4 training steps equal one process's; killed there, the run resumes in one plain process (no FSDP) from the
    checkpoint rank 0 wrote and ends with one process's adapter (tolerance 1e-5: float summation order)."""
    import torch.multiprocessing as mp

    from rmx_local.pipeline import run_pipeline
    from rmx_local.recipe import load_recipe
    from rmx_local.ui import UI

    server = completions_server()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    recipe = tiny_world(tmp_path, "epochs = 2")
    monkeypatch.setenv("RMX_LOCAL_CACHE", str(tmp_path / "cache"))
    load = lambda run: load_recipe(str(recipe), [f"run_dir={json.dumps(str(tmp_path / run))}", *fsdp_overrides(url)])  # noqa: E731
    one = run_pipeline(load("one"), UI(rich=False))
    assert one["train"]["steps"] >= 6
    mp.spawn(_fsdp_rank_main, args=(2, free_port(), str(recipe), str(tmp_path / "two"), str(tmp_path / "cache"),
                                    fsdp_overrides(url), 4), nprocs=2)
    two_dir = tmp_path / "two"
    held, whole = json.loads((tmp_path / "fsdp-bytes.json").read_text())
    print(f"decoder layers: {held} of {whole} bytes on rank 0")
    assert held <= whole / 2 + 64 and held < whole  # half of each layer (dim-0 shards; odd rows round up)

    h1, h2 = entropies(tmp_path / "one"), entropies(two_dir)
    assert h1.keys() == h2.keys()
    h_diff = max(float(np.abs(h1[k] - h2[k]).max()) for k in h1)
    print(f"max |entropy(fsdp, 2 ranks) - entropy(1 process)| = {h_diff:.3g} nats")
    assert h_diff <= 1e-5
    log = lambda run: [json.loads(x) for x in next(run.glob("train/*/log.jsonl")).read_text().splitlines()]  # noqa: E731
    l1, l2 = log(tmp_path / "one"), log(two_dir)
    assert [m["step"] for m in l2] == [1, 2, 3, 4] and (next(two_dir.glob("train/*")) / "step-4").is_dir()
    assert np.allclose([m["loss"] for m in l2], [m["loss"] for m in l1[:4]], rtol=1e-5, atol=1e-7)
    assert not (two_dir / "adapter").exists()  # stopped mid-training

    resumed = run_pipeline(load("two"), UI(rich=False))  # one plain process, from the sharded run's checkpoint
    assert resumed["train"]["steps"] == one["train"]["steps"]
    a1, a2 = adapter_tensors(tmp_path / "one"), adapter_tensors(two_dir)
    diff = max(float(np.abs(a1[k] - a2[k]).max()) for k in a1)
    print(f"max |adapter(fsdp 2 ranks to step 4, then 1 process) - adapter(1 process)| = {diff:.3g}")
    assert diff < 1e-5
    assert any(float(np.abs(a1[k]).max()) > 1e-3 for k in a1 if "lora_B" in k)
    server.shutdown()


@pytest.mark.parametrize("override, says", [
    ('rollout.engine="backend"', "to sample rollouts"),
    ("eval.greedy=true", "to evaluate"),
    ("task.val_size=2", "validation problems"),
])
def test_fsdp_refuses_what_rank_0_would_run_alone(tmp_path, monkeypatch, override, says):
    from rmx_local import distributed as dist
    from rmx_local.errors import RmxError
    from rmx_local.recipe import load_recipe

    recipe = load_recipe(str(tiny_world(tmp_path)), [*fsdp_overrides("http://127.0.0.1:1/v1"), override])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RmxError, match=says) as e:
        dist.check_supported(recipe, "torch")
    assert "fsdp = false" in e.value.fix


def test_planner_prints_peak_per_rank_with_fsdp(tmp_path, monkeypatch):
    from rmx_local.plan import Stage, sharded_peaks

    gb = 2**30
    stages = [Stage("rollouts", 20 * gb, 1.0, "k"), Stage("entropy", 18 * gb, 1.0, "k"), Stage("train", 24 * gb, 1.0, "k")]
    # 28 layers of 0.5 GB on 4 ranks: 10.5 GB fewer per rank; entropy and training gather two layers at a time
    assert sharded_peaks(stages, 4, 28, gb // 2) == [9.5 * gb, 8.5 * gb, 14.5 * gb]

    ui = plan_on_two_ranks(tmp_path, monkeypatch, "fsdp=true")
    assert ui.columns[-1] == "peak GB per rank, fsdp" and all(len(r) == 5 for r in ui.rows), ui.rows


class _Capture:
    """A UI that keeps the last table printed."""

    def table(self, title, columns, rows):
        self.columns, self.rows = columns, rows

    def line(self, text):
        pass


def plan_on_two_ranks(tmp_path, monkeypatch, *overrides: str) -> _Capture:
    """print_plan of a tiny digit model's recipe under WORLD_SIZE=2; the UI holds its table."""
    from conftest import save_digit_model

    from rmx_local.plan import print_plan
    from rmx_local.recipe import load_recipe

    save_digit_model(tmp_path / "model")
    recipe = load_recipe(None, [f"model={json.dumps(str(tmp_path / 'model'))}", "threads=1", *overrides])
    monkeypatch.setenv("WORLD_SIZE", "2")
    ui = _Capture()
    print_plan(recipe, ui)
    return ui
