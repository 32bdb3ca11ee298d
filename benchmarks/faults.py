"""Kill -9 at seeded random moments in every stage, rerun until finished, compare with an uninterrupted run.

    python benchmarks/faults.py [--trials 6] [--kills 4] [--seed 0]

In a temp folder: a tiny random llama over the digit tokenizer (tests/conftest.py), 8 JSONL problems, and a
recipe (8 training problems x 4 rollouts, 2 held out, ~15 training steps, a checkpoint every 2). First one
uninterrupted `rmx-local run` (the reference; the time each stage starts is noted from its log). Then each
trial runs the same command in a fresh run folder and SIGKILLs it up to `--kills` times: that many distinct
stages are drawn and visited in pipeline order (a stage the folder already finished gives way to the next
unfinished one); each run is killed a uniform random time (up to the reference's length of that stage) after
the stage starts, and the folder is inspected; then the command is rerun to the end. "start" is the lock,
the model and problems.json (after the imports, which write nothing).
The finished folder must equal the reference: the final adapter's tensors (exactly), the summary's metrics
(selection, gate, training report, evaluation), and the journals and stage files (rollouts.jsonl,
entropies.jsonl, the training log, problems.json, selected.json) byte for byte.
Printed: one row per kill (stage, seconds into it, finished work the folder held, work the rerun redoes),
each with its trial's verdict. Shortcuts: one thread per run (`threads = 1`, for identical numerics and a
quiet shared machine); in-flight work that no file records (a half-sampled group, an unfinished evaluation)
is redone but not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TRAIN, EVAL, GROUP, BATCH = 8, 2, 2, 4  # problems, held out, problems per rollout group, entropy batch (4 rollouts each)
# (stage, the log line that starts it); "start": lock, model, problems.json (after the imports)
STAGES = [("start", "model: resolving"), ("rollouts", "rollouts: start"), ("entropy", "entropy: start"),
          ("eval base", "eval base greedy: start"), ("train", "train: start"),
          ("eval adapted", "eval adapted greedy: start"), ("save", "save: ")]
JOURNALS = ["problems.json", "rollouts.jsonl", "selected.json", "entropies.jsonl"]


class Child:
    """`rmx-local run` in a subprocess, its log lines timestamped as they arrive."""

    def __init__(self, recipe: Path, run_dir: Path, env: dict):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "rmx_local", "run", str(recipe), f"run_dir={json.dumps(str(run_dir))}",
                                      "--plain"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip()))

    def seen(self, marker: str) -> float | None:
        return next((t for t, text in list(self.lines) if marker in text), None)

    def wait_for(self, marker: str) -> float | None:
        """Seconds after start when `marker` was logged, or None if the run ended first."""
        while (t := self.seen(marker)) is None:
            if self.proc.poll() is not None:
                self.reader.join()
                return self.seen(marker)
            time.sleep(0.01)
        return t

    def finish(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        return code

    def stage_at(self, t: float) -> str:
        return ([name for name, marker in STAGES if (s := self.seen(marker)) is not None and s <= t] or ["imports"])[-1]


def count_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a torn last line
            pass
    return out


def folder_state(run: Path) -> dict:
    """Finished work a run folder holds (what a rerun reuses), and what a rerun will do again."""
    rollouts = {r["id"] for r in count_lines(run / "rollouts.jsonl")}
    problems = json.loads((run / "problems.json").read_text())["train"] if (run / "problems.json").is_file() else []
    order = [p["id"] for p in problems]
    groups = [order[i : i + GROUP] for i in range(0, len(order), GROUP)]
    selected = json.loads((run / "selected.json").read_text())["sequences"] if (run / "selected.json").is_file() else []
    keys = [(s["id"], s["k"]) for s in selected]
    scored = {(r["id"], r["k"]) for r in count_lines(run / "entropies.jsonl")}
    batches = [keys[i : i + BATCH] for i in range(0, len(keys), BATCH)]
    train = next(iter(sorted((run / "train").glob("*"))), None) if (run / "train").is_dir() else None
    logged = len(count_lines(train / "log.jsonl")) if train else 0
    ckpts = [int(p.name.split("-")[1]) for p in train.glob("step-*") if (p / "state.json").is_file()] if train else []
    final = bool(train and (train / "final.json").is_file())
    return {
        "rollouts": len(rollouts), "rollouts_redone": sum(len(set(g) & rollouts) for g in groups if 0 < len(set(g) & rollouts) < len(g)),
        "entropies": len(scored), "sequences": len(keys),
        "entropies_redone": sum(len(set(b) & scored) for b in batches if 0 < len(set(b) & scored) < len(b)),
        "checkpoint": max(ckpts, default=0), "steps_redone": 0 if final else logged - max(ckpts, default=0), "final": final,
        "evals": len(list((run / "eval").glob("*.json"))) if (run / "eval").is_dir() else 0,
        "summary": (run / "summary.json").is_file(),
    }


def unfinished(state: dict) -> list[str]:
    done = {"rollouts": state["rollouts"] == TRAIN, "entropy": state["sequences"] > 0 and state["entropies"] == state["sequences"],
            "eval base": state["evals"] >= 1, "train": state["final"], "eval adapted": state["evals"] >= 2,
            "save": state["summary"]}
    return [] if state["summary"] else ["start"] + [name for name, _ in STAGES[1:] if not done[name]]


def compare(run: Path, ref: Path) -> list[str]:
    """What differs between a finished run folder and the reference (empty = equal)."""
    import numpy as np
    from safetensors.numpy import load_file

    diffs = []
    a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (run, ref))
    if a.keys() != b.keys() or any(not np.array_equal(a[k], b[k]) for k in a):
        diffs.append("adapter")
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (run, ref))
    for key in ("selection", "gate", "train", "eval", "train_sequences"):
        if sa.get(key) != sb.get(key):
            diffs.append(f"summary.{key}")
    logs = [f"train/{p.parent.name}/log.jsonl" for p in ref.glob("train/*/final.json")]
    for name in JOURNALS + logs:
        if (run / name).read_bytes() != (ref / name).read_bytes():
            diffs.append(name)
    return diffs


@dataclass
class Kill:
    trial: int
    target: str
    stage: str
    into_s: float
    state: dict = field(default_factory=dict)
    verdict: str = ""


def describe(state: dict) -> tuple[str, str]:
    reused = (f"rollouts {state['rollouts']}/{TRAIN}, entropies {state['entropies']}/{state['sequences'] or '?'}, "
              f"ckpt step {state['checkpoint']}{' (final)' if state['final'] else ''}, evals {state['evals']}/2")
    redone = [f"{state['rollouts_redone']} problems" if state["rollouts_redone"] else "",
              f"{state['entropies_redone']} sequences" if state["entropies_redone"] else "",
              f"{state['steps_redone']} steps" if state["steps_redone"] > 0 else ""]
    return reused, ", ".join(x for x in redone if x) or "-"


def run_trials(trials: int, kills: int, seed: int, work: Path, log=print) -> list[Kill]:
    from conftest import save_digit_model, tiny_recipe

    save_digit_model(work / "model")
    data = work / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": f"Question number {i}?", "answer": str(1 + i % 2)}) + "\n"
                            for i in range(TRAIN + EVAL + 2)))
    recipe = work / "tiny.toml"
    recipe.write_text(tiny_recipe(work / "model", data, train_size=TRAIN, eval_size=EVAL, group=GROUP, max_tokens=8,
                                  gate_batch=BATCH, threads=1))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RMX_LOCAL_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1")

    reference = Child(recipe, work / "reference", env)
    if reference.finish() != 0:
        raise SystemExit("the uninterrupted run failed:\n" + "\n".join(t for _, t in reference.lines[-20:]))
    ends = [reference.seen(m) for _, m in STAGES[1:]] + [reference.lines[-1][0]]
    length = {name: max(end - reference.seen(m), 0.05) for (name, m), end in zip(STAGES, ends)}
    log(f"reference run: {reference.lines[-1][0]:.1f} s; stage lengths " + ", ".join(f"{k} {v:.1f}" for k, v in length.items()))

    rng = random.Random(seed)
    rows: list[Kill] = []
    names = [name for name, _ in STAGES]
    for trial in range(trials):
        run, mine = work / f"trial-{trial}", []
        for drawn in sorted(rng.sample(names, kills), key=names.index):  # a trial walks forward through the stages
            left = unfinished(folder_state(run))
            target = next((s for s in names[names.index(drawn):] if s in left), None)
            if target is None:
                break  # the run already finished
            delay = rng.uniform(0.0, length[target])
            child = Child(recipe, run, env)
            started = child.wait_for(dict(STAGES)[target])
            if started is not None:
                time.sleep(max(0.0, started + delay - (time.monotonic() - child.t0)))
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGKILL)
                child.finish()
                at = time.monotonic() - child.t0
                stage = child.stage_at(at)
                into = at - (child.seen(dict(STAGES)[stage]) if stage in names else 0.0)
                mine.append(Kill(trial, target, stage, into, folder_state(run)))
                log(f"trial {trial}: killed in {stage} (+{into:.2f} s)")
            else:
                log(f"trial {trial}: the run ended (exit code {child.finish()}) before the kill in {target}")
        reruns = 0
        while True:
            reruns += 1
            final = Child(recipe, run, env)
            if final.finish() == 0:
                break
            if reruns == 3:
                raise SystemExit(f"trial {trial}: rerun failed:\n" + "\n".join(t for _, t in final.lines[-20:]))
        diffs = compare(run, work / "reference")
        for k in mine:
            k.verdict = "equal" if not diffs else "DIFFERS: " + ", ".join(diffs)
        log(f"trial {trial}: {'equal' if not diffs else 'DIFFERS: ' + ', '.join(diffs)}")
        rows += mine
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--kills", type=int, default=4, help="kills per trial, in distinct stages (at most 7)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="rmx-faults-") as tmp:
        rows = run_trials(args.trials, args.kills, args.seed, Path(tmp), log=lambda s: print(s, file=sys.stderr, flush=True))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("| # | trial | stage at the kill | s into it | finished work reused | work redone | final folder vs uninterrupted |")
    print("|---:|---:|---|---:|---|---|---|")
    for i, k in enumerate(rows, 1):
        reused, redone = describe(k.state)
        print(f"| {i} | {k.trial} | {k.stage} | {k.into_s:.2f} | {reused} | {redone} | {k.verdict} |")
    stages = sorted({k.stage for k in rows}, key=[s for s, _ in STAGES].index)
    equal = sum(k.verdict == "equal" for k in rows)
    print(f"\n{len(rows)} kills in {len(stages)} stages ({', '.join(stages)}); {equal}/{len(rows)} followed by a finished "
          f"run equal to the uninterrupted one; {time.time() - t0:.0f} s wall, {cpu.ru_utime + cpu.ru_stime:.0f} s CPU "
          "of the runs")


if __name__ == "__main__":
    main()
