"""Data parallelism on CPU processes: `torchrun --nproc_per_node 2` (gloo, 127.0.0.1) against one process.

    python benchmarks/distributed.py [--epochs 30]

In a temp folder: the tiny random llama of tests/conftest.py (`tiny_world`: 6 problems x 4 rollouts, entropy
batches of 4, grad_accum 3, a checkpoint every 2 steps), run by the real CLI (`python -m rmx_local run`).
Checks, each against a one-process run of the same recipe:
  torchrun 2 ranks                  the whole pipeline under torchrun;
  kill -9 rank 1, resume 2 ranks    training made long (`train.epochs`), rank 1 SIGKILLed once a few steps are
                                    logged (torchrun then stops rank 0), the same torchrun command rerun;
  kill -9 rank 1, resume 1 rank     the same kill, resumed by one plain process (checkpoints hold the full state).
Printed per check: max |entropy difference| (nats), max |adapter tensor difference|, the training steps logged when
killed, and the verdict: "equal" when both are <= TOLERANCE and the evaluation is identical. Shortcut: one thread
per rank; the ranks share this machine's cores, so the seconds printed say nothing about speed-up.

FSDP (`fsdp=true`, the frozen base's decoder layers sharded across the ranks), against one process of the same
recipe; rollouts come from a stand-in OpenAI server (tests/test_distributed.py `completions_server`, the same
answers for the same request) and evaluation is off, as a sharded run requires:
  torchrun 2 ranks, fsdp                 the whole pipeline;
  fsdp, kill -9 rank 1, resume 1 rank    rank 1 SIGKILLed mid-training, resumed by one plain process (no FSDP).
Also printed: the decoder-layer bytes rank 0 holds and the whole (the CLI's "fsdp: rank 0 holds" line).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
TOLERANCE = 1e-5  # float summation order across ranks (measured: ~4e-9 on the adapter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(recipe: Path, run_dir: Path, ranks: int, *overrides: str) -> list[str]:
    cli = ["-m", "rmx_local", "run", str(recipe), f"run_dir={json.dumps(str(run_dir))}", *overrides, "--plain"]
    if ranks == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *cli]


def run(cmd: list[str], env: dict) -> str:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def kill_rank_mid_training(cmd: list[str], run_dir: Path, env: dict, after_steps: int = 4) -> int:
    """Start `cmd` (torchrun), SIGKILL its RANK=1 worker once `after_steps` steps are logged; the steps logged then."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            logs = list(run_dir.glob("train/*/log.jsonl"))
            steps = len(logs[0].read_text().splitlines()) if logs else 0
            if steps >= after_steps and not list(run_dir.glob("train/*/final.json")):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    if child.environ().get("RANK") == "1":
                        os.kill(child.pid, signal.SIGKILL)
                        proc.wait(60)
                        return steps
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise SystemExit("the run finished before rank 1 could be killed: raise --epochs")


def compare(ref: Path, other: Path) -> dict:
    from safetensors.numpy import load_file

    def entropies(run: Path) -> dict:
        return {(r["id"], r["k"]): np.asarray(r["H"]) for r in map(json.loads, (run / "entropies.jsonl").read_text().splitlines())}

    h1, h2 = entropies(ref), entropies(other)
    a1, a2 = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (ref, other))
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (ref, other))
    dh = max(float(np.abs(h1[k] - h2[k]).max()) for k in h1) if h1.keys() == h2.keys() else float("inf")
    da = max(float(np.abs(a1[k] - a2[k]).max()) for k in a1) if a1.keys() == a2.keys() else float("inf")
    same_eval = s1["eval"] == s2["eval"] and s1["train"]["steps"] == s2["train"]["steps"]
    return {"entropy": dh, "adapter": da, "steps": s1["train"]["steps"],
            "verdict": "equal" if dh <= TOLERANCE and da <= TOLERANCE and same_eval else "DIFFERENT"}


def run_checks(work: Path, epochs: float = 30, log=print) -> list[dict]:
    from conftest import tiny_world

    recipe = tiny_world(work)
    env = dict(os.environ, PYTHONPATH=str(ROOT), RMX_LOCAL_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    rows = []
    t0 = time.monotonic()
    run(command(recipe, work / "one", 1), env)
    run(command(recipe, work / "two", 2), env)
    rows.append({"check": "torchrun 2 ranks", "killed at step": None, **compare(work / "one", work / "two")})
    long = (f"train.epochs={epochs}",)
    run(command(recipe, work / "one-long", 1, *long), env)
    for ranks in (2, 1):
        folder = work / f"killed-{ranks}"
        steps = kill_rank_mid_training(command(recipe, folder, 2, *long), folder, env)
        run(command(recipe, folder, ranks, *long), env)
        rows.append({"check": f"kill -9 rank 1, resume {ranks} rank{'s' if ranks > 1 else ''}", "killed at step": steps,
                     **compare(work / "one-long", folder)})
    log(f"tiny llama, 2 CPU ranks (gloo, 127.0.0.1) vs 1 process, tolerance {TOLERANCE:g}; {time.monotonic() - t0:.0f} s in all")
    log("| check | killed at step | steps | max abs entropy diff (nats) | max abs adapter diff | verdict |")
    log("|---|---:|---:|---:|---:|---|")
    for r in rows:
        log(f"| {r['check']} | {r['killed at step'] or '-'} | {r['steps']} | {r['entropy']:.2g} | {r['adapter']:.2g} | {r['verdict']} |")
    return rows


def run_fsdp_checks(work: Path, epochs: float = 30, log=print) -> list[dict]:
    """The FSDP rows: a sharded torchrun run and a killed one resumed in one process, each against one process."""
    import re

    from conftest import tiny_world
    from test_distributed import completions_server, fsdp_overrides

    server = completions_server()
    sharded = fsdp_overrides(f"http://127.0.0.1:{server.server_port}/v1")
    recipe = tiny_world(work)
    env = dict(os.environ, PYTHONPATH=str(ROOT), RMX_LOCAL_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    rows = []
    t0 = time.monotonic()
    try:
        run(command(recipe, work / "one", 1, *sharded), env)
        out = run(command(recipe, work / "fsdp", 2, *sharded), env)
        held = re.search(r"fsdp: rank 0 holds ([\d,]+) of ([\d,]+) bytes", out)
        rows.append({"check": "torchrun 2 ranks, fsdp", "killed at step": None, **compare(work / "one", work / "fsdp")})
        long = (*sharded, f"train.epochs={epochs}")
        run(command(recipe, work / "one-long", 1, *long), env)
        folder = work / "fsdp-killed"
        steps = kill_rank_mid_training(command(recipe, folder, 2, *long), folder, env)
        run(command(recipe, folder, 1, *long), env)
        rows.append({"check": "fsdp, kill -9 rank 1, resume 1 rank", "killed at step": steps, **compare(work / "one-long", folder)})
    finally:
        server.shutdown()
    held_bytes = [int(x.replace(",", "")) for x in held.groups()] if held else None
    mine = f"{held_bytes[0]:,} of {held_bytes[1]:,} bytes" if held_bytes else "? (no fsdp line)"
    log(f"FSDP: tiny llama, 2 CPU ranks (gloo) vs 1 process, tolerance {TOLERANCE:g}; rank 0 holds {mine} of the "
        f"decoder-layer weights; {time.monotonic() - t0:.0f} s in all")
    log("| check | killed at step | steps | max abs entropy diff (nats) | max abs adapter diff | verdict |")
    log("|---|---:|---:|---:|---:|---|")
    for r in rows:
        log(f"| {r['check']} | {r['killed at step'] or '-'} | {r['steps']} | {r['entropy']:.2g} | {r['adapter']:.2g} | {r['verdict']} |")
    return [{**r, "held bytes": held_bytes} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=30, help="training length of the kill checks")
    ap.add_argument("--fsdp-only", action="store_true", help="only the FSDP rows")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not a.fsdp_only:
            run_checks(Path(tmp) / "ddp", a.epochs)
        run_fsdp_checks(Path(tmp) / "fsdp", a.epochs)


if __name__ == "__main__":
    main()
