"""When things go wrong: one table of bad inputs and faults, each driven through the real CLI.

Every row sets up one bad input or fault (recipe, data, model, run folder, engine, export, safety) and checks
what the user sees: exit code 2, exactly one `error: ...` line that names the file or field and carries a
`(fix: ...)`, no traceback, and no file that was in the run folder before the command changed. Rows marked
SUB run `python -m rmx_local` in a subprocess; the others run the same click command in this process
(CliRunner), which saves importing torch per row. docs/faults.md shows the same rows with what to do.
A tiny random llama over the digit tokenizer (tests/conftest.py) makes whole runs take seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from conftest import save_digit_model, serve_http, tiny_recipe
from rmx_local.cli import main
from rmx_local.recipe import numeric_fields

ROOT = Path(__file__).resolve().parent.parent
SUB, INPROC = "sub", "inproc"
QUESTIONS = [{"question": f"Question number {i}?", "answer": str(1 + i % 2)} for i in range(8)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class World:
    """A tiny model, a problems file and one finished run folder, built once for the module."""

    def __init__(self, root: Path):
        self.root = root
        self.model = save_digit_model(root / "model")
        (root / "data").mkdir()
        self.data = write_jsonl(root / "data" / "problems.jsonl", QUESTIONS)
        self.template = root / "template-run"
        code, out, err = invoke(["run", str(self.recipe(root, self.template)), "--plain"], INPROC)
        assert code == 0, out + err

    def recipe(self, folder: Path, run: Path, data: Path | None = None, model: Path | None = None) -> Path:
        path = folder / "tiny.toml"
        path.write_text(f'run_dir = "{run}"\n' + tiny_recipe(model or self.model, data or self.data))
        return path

    def finished(self, tmp: Path) -> Path:
        """A copy of the finished run at tmp/run, and the recipe that made it at tmp/tiny.toml."""
        shutil.copytree(self.template, tmp / "run")
        self.recipe(tmp, tmp / "run")
        return tmp / "run"

    def run_args(self, tmp: Path, *overrides: str, data: Path | None = None, model: Path | None = None) -> list[str]:
        return ["run", str(self.recipe(tmp, tmp / "run", data, model)), "--plain", *overrides]

    def train_key(self, run: Path) -> str:
        return next(p.name for p in (run / "train").iterdir())


def invoke(args: list[str], mode: str, user: int | None = None) -> tuple[int, str, str]:
    if user is not None:
        return invoke_as(user, args)
    if mode == SUB:
        p = subprocess.run([sys.executable, "-m", "rmx_local", *args], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
        return p.returncode, p.stdout, p.stderr
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        return 1, result.stdout, "Traceback\n" + "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.stdout, result.stderr


def invoke_as(user: int, args: list[str]) -> tuple[int, str, str]:
    """The in-process CLI in a forked child that dropped to `user` (root may write anywhere)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
            os.write(write, json.dumps(invoke(args, INPROC)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return tuple(json.loads(data)) if data else (1, "", "Traceback: the child died")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RMX_LOCAL_CACHE", str(tmp_path_factory.mktemp("cache")))
        return World(tmp_path_factory.mktemp("world"))


@dataclass
class Row:
    args: list[str]
    names: str  # the file or field the error line must name
    run: Path | None = None  # the run folder whose files must not change (default tmp/run)
    user: int | None = None  # run the CLI as this uid (read-only folders when the tests run as root)
    absent: list[Path] = field(default_factory=list)  # files the command must not create (code not run)


def digest(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- row set-ups: (world, tmp, monkeypatch, cleanup) -> Row

def bad_recipe(text: str):
    def setup(w, tmp, mp, cleanup):
        run = w.finished(tmp)
        (tmp / "bad.toml").write_text(f'run_dir = "{run}"\n' + text)
        return Row(["run", str(tmp / "bad.toml"), "--plain"], "bad.toml")
    return setup


def override(*items: str, names: str):
    def setup(w, tmp, mp, cleanup):
        w.finished(tmp)
        return Row(w.run_args(tmp, *items), names)
    return setup


def bad_data(content: bytes | Callable[[], bytes]):
    def setup(w, tmp, mp, cleanup):
        path = tmp / "bad.jsonl"
        path.write_bytes(content() if callable(content) else content)
        return Row(w.run_args(tmp, data=path), "bad.jsonl")
    return setup


def lines(*bad) -> bytes:
    """The good problems, then the bad rows."""
    return "".join(json.dumps(r) + "\n" for r in [*QUESTIONS, *bad]).encode()


def bad_model(make: Callable[[Path], Path], *extra: str, names: str = "", absent: str = ""):
    def setup(w, tmp, mp, cleanup):
        model = make(tmp)
        return Row(w.run_args(tmp, *extra, model=model), names or model.name, absent=[tmp / absent] if absent else [])
    return setup


def model_eval(make: Callable[[Path], Path], verb: str = "eval"):
    def setup(w, tmp, mp, cleanup):
        model = make(tmp)
        if verb == "analyze":
            return Row(["analyze", str(model), str(model), "--data", "arith:single", "--limit", "2"], model.name)
        return Row(["eval", str(model), "--data", "arith:single", "--limit", "2", "--plain"], model.name)
    return setup


def not_gguf(tmp: Path) -> Path:
    (tmp / "model.gguf").write_text("this is a text file, not a model\n")
    return tmp / "model.gguf"


def small_gguf(path: Path, arch: str = "llama") -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncated_gguf(tmp: Path) -> Path:
    path = small_gguf(tmp / "cut.gguf")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def unknown_arch_gguf(tmp: Path) -> Path:
    return small_gguf(tmp / "rwkv.gguf", "rwkv7")


def config_only(tmp: Path) -> Path:
    (tmp / "config-only").mkdir()
    shutil.copy(save_digit_model(tmp / "full") / "config.json", tmp / "config-only")
    return tmp / "config-only"


def no_tokenizer(tmp: Path) -> Path:
    folder = save_digit_model(tmp / "no-tokenizer")
    for p in folder.iterdir():
        if p.name.startswith("tokenizer") or p.suffix == ".jinja":
            p.unlink()
    return folder


def something_else(tmp: Path) -> Path:
    """A folder of another library's model: a config.json without model_type, weights beside it."""
    (tmp / "unet").mkdir()
    (tmp / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 64}))
    (tmp / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"{}")
    return tmp / "unet"


def missing_shard(tmp: Path) -> Path:
    folder = save_digit_model(tmp / "sharded")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return folder


# every kind of unusable model source: (make, what the error says); run and eval both refuse each before any stage
MODEL_KINDS = {
    "config only": (config_only, "has no weights"),
    "no tokenizer": (no_tokenizer, "has no tokenizer"),
    "a folder of something else": (something_else, "names no model_type"),
    "a shard missing": (missing_shard, "misses 1 of the 2 weight shards"),
    "truncated GGUF": (truncated_gguf, "is cut short"),
    "GGUF of an unknown architecture": (unknown_arch_gguf, "architecture 'rwkv7' is not one transformers can read"),
    "text file named .gguf": (not_gguf, "is not a GGUF file"),
}


def no_chat_template(tmp: Path) -> Path:
    folder = save_digit_model(tmp / "base-model")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def stablelm(tmp: Path) -> Path:
    """An architecture transformers trains but rmx_local/archs.py has no GGUF / MLX record for."""
    import torch
    from transformers import StableLmConfig, StableLmForCausalLM

    from conftest import digit_tokenizer

    torch.manual_seed(0)
    tok = digit_tokenizer()
    StableLmForCausalLM(StableLmConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp / "stablelm")
    tok.save_pretrained(tmp / "stablelm")
    return tmp / "stablelm"


def custom_code(tmp: Path) -> Path:
    """A model folder whose config points transformers at its own Python file, which would write PWNED."""
    folder = save_digit_model(tmp / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(tmp / 'PWNED')!r}).write_text('ran')\n")
    return folder


def finished_then(change: Callable[[World, Path], None], *overrides: str, names: str, args=None):
    def setup(w, tmp, mp, cleanup):
        run = w.finished(tmp)
        change(w, run)
        return Row(args(run) if args else w.run_args(tmp, *overrides), names)
    return setup


def corrupt_line_2(w, run):
    rows = (run / "rollouts.jsonl").read_text().splitlines()
    rows[1] = rows[1][: len(rows[1]) // 2]
    (run / "rollouts.jsonl").write_text("\n".join(rows) + "\n")


def truncate_selected(w, run):
    text = (run / "selected.json").read_text()
    (run / "selected.json").write_text(text[: len(text) // 2])


def checkpoint(w, run) -> Path:
    """The kept checkpoint of the finished run, made resumable again by removing final.json."""
    key = w.train_key(run)
    (run / "train" / key / "final.json").unlink()
    return next((run / "train" / key).glob("step-*"))


def drop_optimizer(w, run):
    (checkpoint(w, run) / "optimizer.pt").unlink()


class Payload:
    """Unpickling this runs `touch PWNED`: what a malicious checkpoint would do with a plain `torch.load`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled_code(w, run):
    path = checkpoint(w, run) / "optimizer.pt"
    path.write_bytes(pickle.dumps(Payload(run.parent / "PWNED")))


def foreign_architecture(w, run):
    extra = json.loads((run / "adapter" / "rmx_local.json").read_text())
    (run / "adapter" / "rmx_local.json").write_text(json.dumps({**extra, "architecture": "mistral"}))


def other_base(w, run):
    other = save_digit_model(run.parent / "wider-model", hidden_size=32, intermediate_size=64)
    text = (run / "recipe.toml").read_text().replace(str(w.model), str(other))
    (run / "recipe.toml").write_text(text)


def disk_full(w, tmp, mp, cleanup):
    """Free space runs out while training writes: every fsync under train/ fails with ENOSPC."""
    w.finished(tmp)
    real = os.fsync

    def fsync(fd):
        if "/train/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    mp.setattr(os, "fsync", fsync)
    return Row(w.run_args(tmp, "train.lr=2e-2"), "log.jsonl")


def read_only(w, tmp, mp, cleanup):
    """A finished run folder the user may not write; as root (who may write anything) the CLI runs as nobody."""
    shared = Path(tempfile.mkdtemp(prefix="rmx-ro-"))
    cleanup.append(lambda: shutil.rmtree(shared, ignore_errors=True))
    shared.chmod(0o755)
    run = w.finished(shared)
    for p in [run, *run.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    cleanup.append(lambda: [p.chmod(0o755) for p in [run, *run.rglob("*")] if p.is_dir()])
    (shared / "tiny.toml").chmod(0o644)
    return Row(["run", str(shared / "tiny.toml"), "--plain"], str(run), run=run, user=65534 if os.geteuid() == 0 else None)


def held_by_another(command: Callable[[World, Path], list[str]]):
    def setup(w, tmp, mp, cleanup):
        run = w.finished(tmp)
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rmx_local.lock import run_lock\n"
                                   "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)", str(run)],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        cleanup.append(lambda: (holder.kill(), holder.wait()))
        assert holder.stdout.readline().strip() == "held"
        return Row(command(w, tmp), f"pid {holder.pid}")
    return setup


def server(mode: str):
    """A local OpenAI-style endpoint that is down, answers garbage, or hangs past rollout.timeout_s."""
    def setup(w, tmp, mp, cleanup):
        if mode == "down":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        else:
            class Handler(BaseHTTPRequestHandler):
                def log_message(self, *a):
                    pass

                def do_POST(self):
                    self.rfile.read(int(self.headers["Content-Length"]))
                    if mode == "hang":
                        time.sleep(3)
                        return
                    body = b"<html>502 proxy error</html>"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            httpd = serve_http(Handler)
            cleanup.append(lambda: (httpd.shutdown(), httpd.server_close()))
            port = httpd.server_address[1]
        url = f"http://127.0.0.1:{port}/v1"
        return Row(w.run_args(tmp, "rollout.engine=openai", f"rollout.base_url={url}", "rollout.retries=0",
                              "rollout.timeout_s=0.5", "rollout.concurrency=1"), url)
    return setup


def export_args(*opts: str):
    return lambda run: ["export", str(run), *opts]


CASES = [
    # recipe
    ("recipe: unknown key", SUB, bad_recipe("[train]\nlrr = 1e-4\n"), "unknown key `train.lrr` (fix: did you mean `train.lr`?)"),
    ("recipe: wrong type", SUB, bad_recipe('[train]\nlr = "fast"\n'), "`train.lr` must be float"),
    ("recipe: out of range", SUB, bad_recipe("[rollout]\nn = 1\n"), "rollout.n must be >= 2"),
    ("recipe: not one of the choices", SUB, bad_recipe('[gate]\nmode = "top"\n'), "`gate.mode` = 'top' is not one of"),
    ("recipe: unknown export format", SUB, bad_recipe('[export]\nformats = ["zip"]\n'), "export.formats must be among"),
    ("recipe: TOML syntax error", SUB, bad_recipe("[train\nlr = 1\n"), "malformed TOML"),
    ("recipe: missing file", SUB, lambda w, tmp, mp, c: Row(["run", str(tmp / "nope.toml")], "nope.toml"), "recipe not found"),
    ("recipe: unknown recipe name", SUB, lambda w, tmp, mp, c: Row(["run", "quikstart"], "quikstart"), "recipe not found"),
    ("override: not key=value", SUB, override("train.lr", names="train.lr"), "is not key=value"),
    ("override: unknown key", SUB, override("train.lrate=1e-3", names="train.lrate"), "did you mean `train.lr`"),
    ("override: bad value", SUB, override("train.lr=fast", names="train.lr"), "must be float, got 'fast'"),
    # data (task.name = "jsonl")
    ("data: empty file", INPROC, bad_data(b""), "no rows (the file is empty)"),
    ("data: rows without answers", INPROC, bad_data(lines({"question": "What is 1 + 1?"})),
     "no usable gold answer (first: row 8"),
    ("data: gold answer that does not parse", INPROC,
     bad_data(lines({"question": "q?", "answer": "First add them.\nThen there are 12 in all."})), "no usable gold answer"),
    ("data: gold answer of the wrong type", INPROC, bad_data(lines({"question": "q?", "answer": {"value": 3}})),
     "no usable gold answer"),
    ("data: binary file", INPROC, bad_data(bytes(range(256)) * 64), "cannot read"),
    ("data: a 10 MB line", INPROC,
     bad_data(lambda: lines({"question": "x" * 10_000_000, "answer": "1"})), "row 8: the question is 10.0 MB long"),
    ("data: duplicate questions", INPROC, bad_data(lines(QUESTIONS[3])), "the same question"),
    ("data: no gold the verifier can grade (words)", INPROC,
     bad_data(b"".join(json.dumps({"question": q["question"], "answer": w}).encode() + b"\n"
                       for q, w in zip(QUESTIONS, ["one", "two"] * 4))), "8 of 8 gold answers are words"),
    # model
    ("model: missing path", INPROC, bad_model(lambda tmp: tmp / "no-such-model"), "is not an embedded model, a folder"),
    *[(f"model: {kind}", INPROC, bad_model(make), needle) for kind, (make, needle) in MODEL_KINDS.items()],
    *[(f"model: {kind} (eval)", INPROC, model_eval(make), needle) for kind, (make, needle) in MODEL_KINDS.items()],
    ("model: config only (analyze)", INPROC, model_eval(config_only, "analyze"), "has no weights"),
    ("model: config only (run --dry-run)", INPROC, bad_model(config_only, "--dry-run"), "has no weights"),
    ("model: chat template missing", INPROC, bad_model(no_chat_template, "task.template=chat", names="task.template"),
     "this tokenizer has no chat template"),
    ("model: architecture the GGUF exporter lacks", INPROC,
     bad_model(stablelm, 'export.formats=["gguf"]', names="export.formats"),
     "cannot write gguf: model_type 'stablelm' is not in rmx_local/archs.py"),
    ("safety: model with its own code, trust_remote_code off", INPROC, bad_model(custom_code, absent="PWNED"),
     "trust_remote_code = true"),
    # run folder
    ("run folder: read-only", INPROC, read_only, "cannot write"),
    ("run folder: made by another recipe", INPROC,
     finished_then(lambda w, r: None, "rollout.temperature=0.9", names="/run: "), "made with different recipe settings"),
    ("run folder: disk full during a write", INPROC, disk_full, "no space left on device"),
    ("run folder: corrupted journal line", INPROC, finished_then(corrupt_line_2, names="rollouts.jsonl:2"), "corrupt JSON line"),
    ("run folder: truncated JSON file", INPROC, finished_then(truncate_selected, names="selected.json"), "corrupt JSON"),
    ("run folder: missing checkpoint file", INPROC, finished_then(drop_optimizer, names="step-"), "missing optimizer.pt"),
    ("safety: checkpoint carrying pickled code", INPROC, finished_then(pickled_code, names="optimizer.pt"),
     "not a plain optimizer state"),
    ("run folder: in use by another run", INPROC, held_by_another(lambda w, tmp: w.run_args(tmp)), "in use by another rmx-local run"),
    # engines and exports
    ("engine: server down", INPROC, server("down"), "failed after 1 attempts"),
    ("engine: server answers garbage", INPROC, server("garbage"), "not JSON"),
    ("engine: server hangs past the timeout", INPROC, server("hang"), "timed out"),
    ("export: unknown format", INPROC, finished_then(lambda w, r: None, names="zip", args=export_args("--format", "zip")),
     "unknown format zip"),
    ("export: adapter for another base", INPROC,
     finished_then(other_base, names="wider-model", args=export_args("--format", "gguf")), "adapter made for another base"),
    ("export: architecture GGUF cannot express", INPROC,
     finished_then(foreign_architecture, names="mistral", args=export_args("--format", "gguf")), "adapter made for a mistral model"),
    ("export: run folder in use", INPROC, held_by_another(lambda w, tmp: ["export", str(tmp / "run"), "--format", "peft"]),
     "in use by another rmx-local run"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_keeps_the_run_folder(case, world, tmp_path, monkeypatch):
    _, mode, setup, needle = case
    monkeypatch.setenv("RMX_LOCAL_CACHE", str(tmp_path / "cache"))
    cleanup: list[Callable] = []
    try:
        row = setup(world, tmp_path, monkeypatch, cleanup)
        run = row.run or tmp_path / "run"
        before = digest(run)
        code, out, err = invoke(row.args, mode, row.user)
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert "Traceback" not in out + err, err[-3000:]
        assert code == 2, (code, err[-2000:])
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-2000:]
        assert needle in errors[0] and row.names in errors[0] and "(fix: " in errors[0], errors[0]
        after = digest(run)
        assert {k: after.get(k) for k in before} == before, "an existing file in the run folder changed"
        assert not any(p.exists() for p in row.absent), "untrusted code ran"
    finally:
        for undo in reversed(cleanup):
            undo()


ODD_BUT_VALID = {
    "BOM": lambda raw: b"\xef\xbb\xbf" + raw,
    "CRLF": lambda raw: raw.replace(b"\n", b"\r\n"),
    "duplicate ids (ids from row numbers instead)": lambda raw: b"".join(
        json.dumps({"id": "p1", **json.loads(line)}).encode() + b"\n" for line in raw.splitlines()),
}


@pytest.mark.parametrize("variant", ODD_BUT_VALID)
def test_odd_but_valid_data_loads_like_the_plain_file(variant, world, tmp_path):
    data = tmp_path / "data" / "problems.jsonl"
    data.parent.mkdir()
    data.write_bytes(ODD_BUT_VALID[variant](world.data.read_bytes()))
    code, out, err = invoke(world.run_args(tmp_path, data=data), INPROC)
    assert code == 0, err[-2000:]
    plain = json.loads((world.template / "problems.json").read_text())
    assert json.loads((tmp_path / "run" / "problems.json").read_text()) == plain


@pytest.mark.parametrize("key,typ,rng", numeric_fields(), ids=[k for k, _, _ in numeric_fields()])
def test_every_numeric_field_beyond_its_range_is_one_cli_line(key, typ, rng, tmp_path):
    """Through `rmx-local run`, before any work: each field's first out-of-range value (the schema is iterated, so
    a new field is tried too)."""
    value = rng.beyond(typ)[0]
    code, out, err = invoke(["run", "quickstart", f"run_dir={tmp_path / 'run'}", f"{key}={value!r}", "--plain"], INPROC)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert f"{key} must be " in errors[0] and f"got {value!r}" in errors[0] and "(fix: write e.g." in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,field", [("--top-p", "1.5", "eval.top_p"), ("--limit", "0", "task.eval_size"),
                                              ("--temperature", "-1", "eval.temperature"), ("--max-tokens", "0", "eval.max_tokens")])
def test_cli_flags_that_set_a_field_take_its_range(flag, value, field):
    code, out, err = invoke(["eval", "base", "--data", "arith:single", flag, value], INPROC)
    assert code == 2 and err.strip().startswith(f"error: {flag} ") and f"(the range of {field})" in err, err
    code, out, err = invoke(["export", ".", "--outtype", "q4"], INPROC)
    assert code == 2 and "'q4' is not one of ['bf16', 'f16', 'f32', 'q8_0']" in err, err


def test_some_golds_in_words_warn_naming_them(tmp_path):
    from rmx_local.data import load_problems

    rows = [{"id": f"p{i}", "question": f"Question {i}?", "answer": "twelve" if i in (2, 5) else str(i)} for i in range(6)]
    lines_seen: list[str] = []
    problems = load_problems(str(write_jsonl(tmp_path / "d.jsonl", rows)), warn=lines_seen.append)
    assert len(problems) == 6 and len(lines_seen) == 1, lines_seen
    assert "2 of 6 gold answers are words" in lines_seen[0] and "p2='twelve', p5='twelve'" in lines_seen[0]
