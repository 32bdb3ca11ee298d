"""Run-folder locks, file permissions, the verifier on pathological answers, and no unsafe loading in the code.

(The CLI-level rows for the same faults, e.g. a second run on a folder in use, are in test_bad_inputs.py.)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rmx_local.errors import RmxError
from rmx_local.io import atomic_dir, atomic_write_bytes
from rmx_local.lock import LOCK_NAME, run_lock
from rmx_local.verify import verify

ROOT = Path(__file__).resolve().parent.parent


def start_holder(run: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rmx_local.lock import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)", str(run)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_lock_of_a_killed_run_is_taken_over_and_its_temp_files_cleared(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    with pytest.raises(RmxError, match=f"in use by another rmx-local run \\(pid {holder.pid} on "):
        with run_lock(run):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # what a kill -9 in the middle of atomic writes leaves behind
    (run / ".summary.json.k2j3.tmp").write_text("{half")
    (run / "train" / ".step-4.x9.tmp").mkdir(parents=True)
    (run / ".adapter.old").mkdir()
    (run / "summary.json").write_text("{}")
    notes: list[str] = []
    with run_lock(run, notes.append):
        assert (run / LOCK_NAME).is_file()
        with run_lock(run):  # re-entrant: a run that exports at its end keeps its own lock
            pass
        assert (run / LOCK_NAME).is_file()
    assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "not running" in notes[0] and "cleared 3" in notes[0]
    assert sorted(p.name for p in run.rglob("*")) == ["summary.json", "train"]  # the lock is gone too


def test_a_live_holder_is_refused_even_without_flock(tmp_path):
    """Where flock does nothing (some network mounts), the recorded pid and process start time still count."""
    import json

    import psutil

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        info = {"pid": sleeper.pid, "host": socket.gethostname(), "started": time.time(),
                "proc_start": psutil.Process(sleeper.pid).create_time()}
        (run / LOCK_NAME).write_text(json.dumps(info))
        with pytest.raises(RmxError, match=f"pid {sleeper.pid}"):
            with run_lock(run):
                pass
        info["proc_start"] -= 1000  # the same pid, but another process: a recycled pid is stale
        (run / LOCK_NAME).write_text(json.dumps(info))
        with run_lock(run):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_the_umask_not_mkstemp(tmp_path, umask):
    from rmx_local.export import write_gguf_adapter
    from rmx_local.export.check import random_adapter

    atomic_write_bytes(tmp_path / "summary.json", b"{}")
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"x")
    cfg = {"num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 16, "num_hidden_layers": 1,
           "intermediate_size": 32}
    gguf = write_gguf_adapter(random_adapter(cfg, "llama", rank=2), tmp_path / "export" / "adapter.gguf")
    assert [mode(p) for p in (tmp_path / "summary.json", tmp_path / "adapter" / "adapter_model.safetensors", gguf)] == [0o644] * 3
    assert mode(tmp_path / "adapter") == 0o755
    umask(0o077)  # a private umask is honoured too
    atomic_write_bytes(tmp_path / "private.json", b"{}")
    assert mode(tmp_path / "private.json") == 0o600


PATHOLOGICAL = {
    "power tower": "So the answer is $10^10^10^10$.",  # against "5" an unevaluated expression, graded at once
    "power tower (symbolic gold)": "So the answer is $10^10^10^10$.",  # math-verify's worker meets it
    "LaTeX nested 2000 deep": "\\boxed{" + "\\frac{1}{" * 2000 + "2" + "}" * 2001,
    "1 MB of unclosed boxes": "\\boxed{" * 150_000,
    "1 MB number": "The answer is " + "9" * 1_000_000,
    "unbalanced braces": "\\boxed{\\frac{5}{" + "{" * 500 + "} answer: }}}{{",
    "Python in the answer": "The answer is \\boxed{__import__('os').system('touch {marker}')}",
    "Python in math mode": "The answer is $__import__('os').system('touch {marker}')$ and eval('1')",
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_verifier_grades_pathological_answers_wrong_within_its_time_limit(name, tmp_path):
    text = PATHOLOGICAL[name].replace("{marker}", str(tmp_path / "PWNED"))
    result: list = []
    started = time.monotonic()
    gold = "x + 1" if name.endswith("(symbolic gold)") else "5"
    worker = threading.Thread(target=lambda: result.append(verify(text, gold, timeout_s=1.0)), daemon=True)
    worker.start()
    worker.join(60)  # 1 s of math-verify, plus restarting its worker process on a busy machine
    assert not worker.is_alive(), f"verify still running after {time.monotonic() - started:.0f} s"
    assert result[0].correct is False
    assert not (tmp_path / "PWNED").exists()


def test_no_pickle_no_eval_and_remote_code_only_from_the_recipe():
    sources = {p: p.read_text() for p in [*(ROOT / "rmx_local").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]}
    problems = []
    for path, text in sources.items():
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                problems.append(f"{path.name}: torch.load without weights_only=True")
        if re.search(r"pickle\.loads?\(|(?<![\w.])(eval|exec)\(", text):
            problems.append(f"{path.name}: unpickles or evaluates text")
        for m in re.finditer(r"trust_remote_code=([\w.]+)", text):
            if not m.group(1).endswith(".trust_remote_code"):  # recipe.trust_remote_code, r.trust_remote_code
                problems.append(f"{path.name}: trust_remote_code={m.group(1)}")
    assert problems == []
