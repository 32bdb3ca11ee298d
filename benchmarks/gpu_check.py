"""The pipeline on a GPU against the CPU: agreement of every stage, and a kill -9 mid-training resumed on the device.

    python benchmarks/gpu_check.py              # CUDA machine: cpu fp32 (the reference) vs cuda fp32 and cuda bf16
    python benchmarks/gpu_check.py --dry        # no GPU: the same steps, cpu fp32 vs cpu fp32 again and cpu bf16

`benchmarks/gpu_check.sh` runs this, then the speed half (`benchmarks/gpu_scale.sh`). In a temp folder: the tiny
random digit llama of `rmx_local.tiny` (its weights drawn wider than transformers' default, so that its
distributions are peaked like a trained model's rather than uniform), 40 JSONL problems "Question number i?"
whose gold is 1 or 2, and a recipe: 16 training problems x 8 rollouts of up to 8 tokens, a 25% gate, a rank-4
LoRA on q/k/v/o at lr 3e-3 for 2 epochs (a checkpoint every 4 steps), 16 held-out problems scored greedily.

1. Agreement. The reference runs the whole pipeline on cpu fp32. Every other configuration runs it in its own
   folder seeded with the reference's problems.json and rollouts.jsonl: sampled rollouts cannot be compared across
   devices (each device's generator draws its own stream), so from there on (selection, entropies, gate, training,
   evaluation) both see the same data. Per configuration:
     greedy    the base model's greedy (deterministic) completions, 16 tokens, of 48 random prompts that share a
               4-token preamble (the sampler's shared-prefix cache, left padding, 16 rows a batch): the share
               token-identical to the reference's, and the share of reference tokens before the first divergence
     entropy   max |H - H_ref| over every scored completion token (nats; entropies.jsonl keeps 5 decimals)
     gate      share of completion tokens the gate treats alike (the gate recomputed from each run's entropies)
     loss      max |loss - loss_ref| over the logged training steps
     adapter   ||dW - dW_ref|| / ||dW_ref|| over all LoRA deltas together (Frobenius, dW = alpha / r * B A)
     eval      greedy accuracy on the held-out problems, base -> adapted
     chunked   whether the chunked-vocabulary path was taken (a silent fall-back to full logits costs memory)
     LoRA      the dtype of the trained LoRA weights (fp32 is expected under a bf16 base)
2. Resume, in the last configuration: `rmx-local run` in a subprocess, SIGKILLed as soon as its first training
   checkpoint is on disk (before training ends), then rerun to the end. Its adapter and training log against the
   same configuration's uninterrupted run (0 = bit-identical; more than `RESUME_TOL` fails). In process, on that
   device: an optimizer state saved and loaded again (the backend's `save_optimizer` / `load_optimizer`) holds
   every tensor on the device and in the dtype it had before.

Shortcuts: one CPU thread; a random model's eval accuracy says nothing of quality, it is compared, not judged.
Exit code 1 when a run fails, the resumed run differs from the uninterrupted one, or the optimizer state moved.
The agreement figures are printed, not judged: bf16 differs from fp32 by rounding, and how much is the finding.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rmx_local.adapter import load_peft  # noqa: E402
from rmx_local.io import Journal  # noqa: E402

TRAIN, EVAL, PROBLEMS = 16, 16, 40
GREEDY_PROMPTS = 48
RESUME_TOL = 1e-6  # resumed vs uninterrupted adapter, max |difference| (CPU: exactly 0; CUDA kernels may reorder sums)
RECIPE = """model = "{model}"
threads = 1
report = false
[task]
name = "data"
path = "{data}"
train_size = {train}
eval_size = {eval}
[rollout]
n = 8
max_tokens = 8
batch_size = 32
[gate]
fraction = 0.25
batch_size = 16
[train]
lr = 3e-3
warmup_steps = 2
epochs = 2.0
batch_size = 4
grad_accum = 1
group_size = 4
lora_rank = 4
lora_alpha = 8.0
checkpoint_every = 4
[eval]
max_tokens = 8
n_samples = 0
"""
SEEDED = ["problems.json", "rollouts.jsonl", "meta/problems.json", "meta/rollouts.json"]  # the reference's, reused
INIT_RANGE = 0.3  # weight std of the digit model (transformers' default 0.02 gives near-uniform distributions)


def setup(work: Path) -> Path:
    """The model folder, the problems and the recipe; returns the recipe's path."""
    from rmx_local.tiny import save_digit_model

    save_digit_model(work / "model", initializer_range=INIT_RANGE)
    data = work / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": f"Question number {i}?", "answer": str(1 + i % 2)}) + "\n"
                            for i in range(PROBLEMS)))
    recipe = work / "check.toml"
    recipe.write_text(RECIPE.format(model=work / "model", data=data, train=TRAIN, eval=EVAL))
    return recipe


def label(config: tuple[str, str]) -> str:
    return f"{config[0]} {config[1]}"


def run_in_process(recipe: Path, run_dir: Path, config: tuple[str, str], log: Path) -> dict:
    """The whole pipeline (`run_pipeline`) in `run_dir` on `config`; its progress lines go to `log`."""
    from rmx_local.pipeline import run_pipeline
    from rmx_local.recipe import load_recipe
    from rmx_local.ui import UI

    r = load_recipe(recipe, [f"run_dir={json.dumps(str(run_dir))}", f'device="{config[0]}"', f'dtype="{config[1]}"'])
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        return run_pipeline(r, UI(rich=False))


def seed_from(reference: Path, run_dir: Path) -> None:
    """Give `run_dir` the reference's problems and rollouts, so the pipeline resumes after sampling."""
    for name in SEEDED:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reference / name, run_dir / name)


def backend_on(model_dir: Path, config: tuple[str, str]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmx_local.backends.torch_backend import TorchBackend

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, config[1]))
    return TorchBackend(model, tok, config[0], batch_size=64)


def greedy(model_dir: Path, config: tuple[str, str], max_tokens: int = 16) -> tuple[list, bool]:
    """Greedy completions of `GREEDY_PROMPTS` random prompts (a 4-token preamble they share, so the sampler's
    shared-prefix cache and left padding are in play, 16 rows a batch; 4-15 random tokens; end of turn, start of
    turn), and whether the chunked path is in place."""
    from rmx_local.backends import SampleParams

    backend = backend_on(model_dir, config)
    backend.batch_size = 16
    rng = np.random.default_rng(0)
    prompts = [[1, 3, 5, 4] + rng.integers(0, 6, int(rng.integers(4, 16))).tolist() + [2, 1] for _ in range(GREEDY_PROMPTS)]
    out = backend.generate(prompts, SampleParams(1, 0.0, 1.0, max_tokens, 0))
    return [o[0] for o in out], backend.split is not None


def greedy_agreement(test: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    """(share of completions token-identical, share of reference tokens before the first divergence)."""
    same = sum(a == b for a, b in zip(test, ref)) / len(ref)
    before = 0
    for a, b in zip(test, ref):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        before += n
    return same, before / max(sum(map(len, ref)), 1)


def entropies(run: Path) -> dict[tuple[str, int], np.ndarray]:
    return {(r["id"], r["k"]): np.asarray(r["H"], dtype=np.float64) for r in Journal(run / "entropies.jsonl").read()}


def gate_agreement(test: dict, ref: dict, fraction: float) -> float:
    """Share of completion tokens on which the fraction gate computed from each run's entropies agrees."""
    from rmx_local.stages.gate import compute_gate

    keys = sorted(ref)
    gt, _ = compute_gate([test[k] for k in keys], "fraction", 0.0, fraction)
    gr, _ = compute_gate([ref[k] for k in keys], "fraction", 0.0, fraction)
    a, b = np.concatenate(gt), np.concatenate(gr)
    return float((a == b).mean()) if a.size else float("nan")


def adapter_rel_diff(test: Path, ref: Path) -> float:
    """||dW_test - dW_ref|| / ||dW_ref|| over every LoRA module together (Frobenius norms)."""
    a, b = load_peft(test), load_peft(ref)
    if set(a.weights) != set(b.weights):
        return float("inf")
    num = sum(float(np.sum((a.delta(m) - b.delta(m)) ** 2)) for m in b.weights)
    den = sum(float(np.sum(b.delta(m) ** 2)) for m in b.weights)
    return (num / den) ** 0.5 if den else float("nan")


def adapter_max_abs(test: Path, ref: Path) -> float:
    from safetensors.numpy import load_file

    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (test, ref))
    if a.keys() != b.keys():
        return float("inf")
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def train_log(run: Path) -> list[dict]:
    return Journal(next((run / "train").glob("*/log.jsonl"))).read()


def lora_dtype(run_config: tuple[str, str], model_dir: Path) -> str:
    backend = backend_on(model_dir, run_config)
    backend.init_lora(4, 8.0, 0.0, ["q_proj", "v_proj"], 0)
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for n, p in backend.model.named_parameters() if "lora_" in n}))


def optimizer_kept(model_dir: Path, config: tuple[str, str], work: Path) -> tuple[bool, str]:
    """One training step, then the optimizer state saved and loaded: every tensor keeps its device and dtype."""
    from rmx_local.backends import TrainExample

    backend = backend_on(model_dir, config)
    backend.init_lora(4, 8.0, 0.0, ["q_proj", "v_proj"], 0)
    tokens = [1, 3, 4, 5, 3, 2, 1, 4, 4, 3]
    backend.accumulate([TrainExample(tokens, 4, np.ones(6, bool), 1.0)], 0.2, 0.0, 1.0)
    backend.step(1e-3, 0.0, 1.0)

    def layout(opt):
        return {(i, k): (str(v.device), str(v.dtype)) for i, s in opt.state_dict()["state"].items() for k, v in s.items()}

    before = layout(backend.optimizer)
    backend.save_optimizer(str(work / "optimizer.pt"))
    backend.load_optimizer(str(work / "optimizer.pt"))
    after = layout(backend.optimizer)
    seen = sorted({f"{k[1]} {d} {t.removeprefix('torch.')}" for k, (d, t) in after.items()})
    return before == after, "; ".join(seen)


def kill_and_resume(recipe: Path, run_dir: Path, config: tuple[str, str], log: Path) -> dict:
    """`rmx-local run` SIGKILLed once its first training checkpoint exists, then rerun to the end."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "rmx_local", "run", str(recipe), f"run_dir={json.dumps(str(run_dir))}",
           f'device="{config[0]}"', f'dtype="{config[1]}"', "--plain"]
    with open(log, "a") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        ckpt = None
        while child.poll() is None and ckpt is None:
            ckpt = next(iter(run_dir.glob("train/*/step-*/state.json")), None)
            time.sleep(0.002)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        code = child.wait()
        killed = code == -signal.SIGKILL
        held = sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("train/*/step-*/state.json"))
        finished = any(run_dir.glob("train/*/final.json"))
        rerun = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    text = log.read_text()
    resumed = text[text.rfind("train: resuming from step"):].split("\n", 1)[0] if "train: resuming" in text else ""
    return {"killed": killed and not finished, "checkpoints_at_kill": held, "rerun_code": rerun,
            "resumed": resumed.removeprefix("train: ")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="no GPU: cpu fp32 again and cpu bf16 stand in for the CUDA runs")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--keep", help="work in this folder (kept) instead of a temp folder")
    args = ap.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch (run with --dry to check the script on the CPU)")
    reference = ("cpu", "float32")
    configs = [("cpu", "float32"), ("cpu", "bfloat16")] if args.dry else [("cuda", "float32"), ("cuda", "bfloat16")]
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU only (DRY: no CUDA row is a GPU figure)"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.uname().nodename}: {where}; torch {torch.__version__}", flush=True)
    failures: list[str] = []
    t0 = time.time()
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="rmx-gpu-check-")) as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        recipe = setup(work)
        log = work / "runs.log"
        ref_run = work / "ref"
        ref_summary = run_in_process(recipe, ref_run, reference, log)
        ref_greedy, ref_chunked = greedy(work / "model", reference)
        ref_h = entropies(ref_run)
        ref_loss = [m["loss"] for m in train_log(ref_run)]
        rows = [{"config": label(reference) + " (reference)", "eval": ref_summary["eval"]["greedy"],
                 "chunked": ref_chunked, "lora": lora_dtype(reference, work / "model"), "steps": len(ref_loss),
                 "sequences": ref_summary["train_sequences"]}]
        print(f"reference {label(reference)}: {len(ref_h)} sequences scored, {len(ref_loss)} training steps "
              f"({time.time() - t0:.0f} s)", flush=True)
        for i, config in enumerate(configs):
            run = work / f"run-{i}"
            row = {"config": label(config)}
            try:
                seed_from(ref_run, run)
                summary = run_in_process(recipe, run, config, log)
                test_greedy, chunked = greedy(work / "model", config)
                h = entropies(run)
                loss = [m["loss"] for m in train_log(run)]
                row.update(
                    greedy_same=greedy_agreement(test_greedy, ref_greedy)[0],
                    greedy_tokens=greedy_agreement(test_greedy, ref_greedy)[1],
                    entropy_max_abs=max(float(np.max(np.abs(h[k] - ref_h[k]))) for k in ref_h) if ref_h else float("nan"),
                    gate_agree=gate_agreement(h, ref_h, 0.25),
                    loss_max_abs=max(abs(a - b) for a, b in zip(loss, ref_loss)) if len(loss) == len(ref_loss) else float("inf"),
                    adapter_rel=adapter_rel_diff(run / "adapter", ref_run / "adapter"),
                    eval=summary["eval"]["greedy"], chunked=chunked, lora=lora_dtype(config, work / "model"),
                    steps=len(loss), sequences=summary["train_sequences"])
            except Exception as e:  # a failure on the device is the finding: report it and go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                failures.append(f"{label(config)}: {row['error']}")
            rows.append(row)
            print(f"{label(config)}: done ({time.time() - t0:.0f} s)", flush=True)

        test = configs[-1]
        resume = {"config": label(test)}
        try:
            kill_run = work / "kill"
            seed_from(ref_run, kill_run)
            resume.update(kill_and_resume(recipe, kill_run, test, work / "kill.log"))
            uninterrupted = work / f"run-{len(configs) - 1}"
            resume["adapter_max_abs"] = adapter_max_abs(kill_run / "adapter", uninterrupted / "adapter")
            a, b = train_log(kill_run), train_log(uninterrupted)
            resume["log_equal"] = a == b
            resume["loss_max_abs"] = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
            resume["optimizer_kept"], resume["optimizer_layout"] = optimizer_kept(work / "model", test, work)
        except Exception as e:
            resume["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        ok = "error" not in resume and resume.get("killed") and resume.get("rerun_code") == 0 \
            and resume.get("adapter_max_abs", 1.0) <= RESUME_TOL and resume.get("loss_max_abs", 1.0) <= RESUME_TOL \
            and resume.get("optimizer_kept")
        if not ok:
            failures.append(f"resume on {label(test)}: {resume}")

    print_tables(rows, resume)
    print(f"\n{time.time() - t0:.0f} s wall; " + ("all checks passed" if not failures else "FAILED: " + " | ".join(failures)))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "date": time.strftime("%Y-%m-%d %H:%M"),
                                               "rows": rows, "resume": resume, "failures": failures}, indent=1))
    sys.exit(1 if failures else 0)


def print_tables(rows: list[dict], resume: dict) -> None:
    def acc(e):
        return f"{e['base'][0]:.3f} -> {e['adapted'][0]:.3f}" if e else "-"

    print("\n| configuration | greedy: same completions / tokens before divergence | entropy max abs diff (nats) "
          "| gate agreement | loss max abs diff | adapter rel. diff | eval greedy base -> adapted | chunked vocab | LoRA dtype |")
    print("|---|---|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | failed: {r['error']} |")
            continue
        if "greedy_same" not in r:  # the reference
            print(f"| {r['config']} | - | - | - | - | - | {acc(r['eval'])} | {'yes' if r['chunked'] else 'NO'} | {r['lora']} |")
            continue
        print(f"| {r['config']} | {r['greedy_same']:.3f} / {r['greedy_tokens']:.3f} | {r['entropy_max_abs']:.2e} | "
              f"{r['gate_agree']:.3f} | {r['loss_max_abs']:.2e} | {r['adapter_rel']:.2e} | {acc(r['eval'])} | "
              f"{'yes' if r['chunked'] else 'NO'} | {r['lora']} |")
    print(f"\n({rows[0].get('sequences', '?')} training sequences, {rows[0].get('steps', '?')} steps, {GREEDY_PROMPTS} "
          "prompts in the greedy comparison)")
    print("\n| resume on | killed mid-training (checkpoints on disk) | rerun | adapter max abs diff vs uninterrupted "
          "| training log equal (loss max abs diff) | optimizer state after save + load |")
    print("|---|---|---|---:|---|---|")
    if "error" in resume:
        print(f"| {resume['config']} | failed: {resume['error']} |")
        return
    print(f"| {resume['config']} | {'yes' if resume['killed'] else 'NO'} (steps {resume['checkpoints_at_kill']}) | "
          f"exit {resume['rerun_code']}, {resume['resumed'] or 'did not resume'} | {resume['adapter_max_abs']:.2e} | "
          f"{'yes' if resume['log_equal'] else 'no'} ({resume['loss_max_abs']:.1e}) | "
          f"{'same devices and dtypes' if resume['optimizer_kept'] else 'MOVED'}: {resume['optimizer_layout']} |")


if __name__ == "__main__":
    main()
