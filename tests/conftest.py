"""Shared fixtures: tiny random-initialised models and a character-level tokenizer, built offline."""

import threading
from http.server import ThreadingHTTPServer

import pytest

from rmx_local.tiny import char_tokenizer, digit_tokenizer, save_digit_model, tiny_llama  # noqa: F401 (re-exported)


def serve_http(handler) -> ThreadingHTTPServer:
    """`handler` (a BaseHTTPRequestHandler class) on a free local port, served from a daemon thread; the caller
    shuts it down (or lets the test process end)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads, server.block_on_close = True, False
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def save_tiny_model(folder):
    """A tiny random llama and the character tokenizer saved as a transformers model folder; returns the folder."""
    tok = char_tokenizer()
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def torch_backend(tokenizer):
    from rmx_local.backends.torch_backend import TorchBackend

    return TorchBackend(tiny_llama(len(tokenizer)), tokenizer, "cpu", batch_size=8, model_name="tiny")


def tiny_recipe(model, data, *, train_size=6, eval_size=2, group=4, max_tokens=4, gate_batch=8, threads=0) -> str:
    """A recipe for `save_digit_model` and a JSONL task: `group` problems x 4 rollouts per sampling call, a 25% gate,
    a rank-4 LoRA on q/v with a checkpoint every 2 steps, greedy evaluation only. Runs take seconds."""
    return f"""model = "{model}"
threads = {threads}
[task]
name = "jsonl"
path = "{data}"
train_size = {train_size}
eval_size = {eval_size}
[rollout]
n = 4
max_tokens = {max_tokens}
batch_size = {4 * group}
[gate]
fraction = 0.25
batch_size = {gate_batch}
[train]
grad_accum = 2
warmup_steps = 1
lora_rank = 4
lora_alpha = 8.0
targets = ["q_proj", "v_proj"]
checkpoint_every = 2
[eval]
max_tokens = 4
n_samples = 0
"""


def tiny_world(root, *recipe_lines: str):
    """`save_digit_model` at root/model, 10 JSONL problems and root/tiny.toml (`tiny_recipe`, 6 training problems,
    entropy batches of 4, grad_accum 3, lr 0.01, one thread; `recipe_lines` are added under [train]); returns the
    recipe's path. For the data-parallel checks (tests/test_distributed.py, benchmarks/distributed.py)."""
    import json
    from pathlib import Path

    root = Path(root)
    save_digit_model(root / "model")
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": f"Question number {i}?", "answer": str(1 + i % 2)}) + "\n"
                            for i in range(10)))
    recipe = root / "tiny.toml"
    train = "\n".join(["grad_accum = 3", "lr = 0.01", *recipe_lines])  # odd: one of two ranks takes two micro-batches
    recipe.write_text(tiny_recipe(root / "model", data, gate_batch=4, threads=1).replace("grad_accum = 2", train))
    return recipe


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished pipeline run on a tiny random model (3 problems x 2 rollouts; alternate rollouts graded right)."""
    from test_pipeline import alternate, recipe

    import rmx_local.stages.select as select_stage
    from rmx_local.pipeline import run_pipeline
    from rmx_local.ui import UI

    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    run = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select_stage, "verify_many", alternate)
        run_pipeline(recipe(model_dir, run, "task.train_size=3", "rollout.n=2"), UI(rich=False))
    return run
