"""rmx-local beside what a user would pick instead, on one recipe, one model, one LoRA and one clock.

    python benchmarks/baselines.py RECIPE [--methods fewshot,rmx,rft,grpo] [--seeds 0,1,2] [--lrs 1e-5,1e-4] [--shots 3]
        [--budget-x 10] [--max-s S] [--eval-every-s 300] [--out runs/baselines] [--set key=value ...] [--report]

Methods (every one scored greedily on the recipe's held-out problems by the project's own scorer,
`stages.evaluate.score`; the paired z is against the base model's answers to the same problems, and, where the
seed has a `fewshot` row, also against the few-shot base's, so a format fix is not sold as reasoning):
  fewshot  no training: the base with `--shots` worked examples (the seed's first training problems, their
        calculation and the answer in the graded format) before each held-out question; its clock is the
        model load.
  rmx   the recipe as it is (`run_pipeline` in a fresh run folder); checkpoints: the base and the end.
  rft   the recipe with `train.objective = "rft"` in the rmx run's folder, so it reuses that seed's rollouts;
        its clock is its own run (model load, grading, training) plus the rmx run's rollout and grading time.
  grpo  TRL's `GRPOTrainer` (needs `pip install -e .[baselines]`): the recipe's dequantized base model, its LoRA
        (rank, alpha, dropout, targets), train problems, prompts (the project's prompt builder, chat template
        applied, passed as plain text), verifier as the reward, num_generations = per-step batch = rollout.n,
        its temperature, top_p and max tokens, beta 0; everything else TRL's defaults. Held-out scoring every
        `--eval-every-s` clock seconds; it stops at `--budget-x` x rmx's clock (capped by `--max-s`), when the
        accuracy has not risen for two checkpoints, or after `--grpo-epochs` epochs.
Settings of rmx-local beside the recipe (the frontier): `--methods rmx[,rft] --tag NAME --set key=value ...` runs
them as the method "rmx NAME" ("rft NAME" on that run's rollouts) in OUT/rmx-NAME-seedS/. With `--reuse-rollouts`
(settings of the gate or training only, e.g. the gate controls) "rmx NAME" trains in the seed's plain rmx folder
instead, on its rollouts and entropies (their stage keys leave out gate and train), and is charged that run's
rollout, grading and entropy time, as rft is charged its rollout and grading time.
Clock: wall-clock and process CPU seconds (all threads) from the same start (model load), held-out scoring
excluded (the same work for every method). CPU seconds are the fair clock on a shared machine; budgets and
the headline use them. Results: OUT/results.jsonl (one line per finished run, resumable: finished rows are
skipped), a GRPO run's checkpoints as they come in OUT/grpo-*/curve.jsonl, `--report` prints the table and
headline and writes OUT/baselines.png (a GRPO run still going or killed shows its checkpoints so far, from
OUT/grpo-*/points.jsonl). Shortcut: a killed GRPO run restarts from scratch. TRL's gradient checkpointing is
turned off (it trades compute, which is the measured quantity here, for memory nobody lacks at this size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ---------------------------------------------------------------- bookkeeping (tested without trl)

class Clock:
    """Wall and CPU seconds since `start`, minus every `paused()` block."""

    def __init__(self, wall: Callable[[], float] = time.time, cpu: Callable[[], float] = time.process_time):
        self._wall, self._cpu = wall, cpu
        self._w0, self._c0 = wall(), cpu()

    def now(self) -> tuple[float, float]:
        return self._wall() - self._w0, self._cpu() - self._c0

    @contextlib.contextmanager
    def paused(self):
        w, c = self._wall(), self._cpu()
        try:
            yield
        finally:
            self._w0 += self._wall() - w
            self._c0 += self._cpu() - c


@dataclass
class Checkpointer:
    """Held-out scoring at a clock cadence, with the budget and plateau stops.

    `evaluate()` returns per-problem correctness; it runs with the clock paused. `after_step()` returns the
    reason to stop ("budget", "plateau") or None."""

    clock: Clock
    evaluate: Callable[[], list[float]]
    every_s: float
    budget_s: float
    patience: int = 2
    on_best: Callable[[], None] = lambda: None
    on_point: Callable[[dict], None] = lambda point: None
    stop_at: float = math.inf  # a wall-clock time (time.time()) after which the run ends with a last checkpoint
    points: list[dict] = field(default_factory=list)
    _next: float = 0.0

    def checkpoint(self, step: int) -> None:
        wall, cpu = self.clock.now()
        with self.clock.paused():
            per_problem = self.evaluate()
            acc = float(np.mean(per_problem))
            self.points.append({"step": step, "wall": wall, "cpu": cpu, "acc": acc, "per_problem": per_problem})
            if acc > max((p["acc"] for p in self.points[:-1]), default=-1.0):
                self.on_best()
            self.on_point(self.points[-1])
        self._next = cpu + self.every_s

    def after_step(self, step: int) -> str | None:
        cpu = self.clock.now()[1]
        if cpu >= self.budget_s or time.time() >= self.stop_at:
            self.checkpoint(step)
            return "budget" if cpu >= self.budget_s else "deadline"
        if cpu >= self._next:
            self.checkpoint(step)
            if self.plateaued():
                return "plateau"
        return None

    def plateaued(self) -> bool:
        """The last `patience` checkpoints (after step 0) are no better than the best one before them."""
        trained = [p["acc"] for p in self.points if p["step"] > 0]
        return len(trained) > self.patience and max(trained[-self.patience:]) <= max(trained[: -self.patience])


def acc_at(points: list[dict], t: float, key: str = "cpu") -> float:
    """Accuracy at clock `t`, linear between checkpoints; the last one held after the end."""
    xs, ys = [p[key] for p in points], [p["acc"] for p in points]
    return float(np.interp(t, xs, ys))


def time_to_reach(points: list[dict], target: float, key: str = "cpu") -> float | None:
    """First clock time the (linearly interpolated) curve reaches `target`; None if it never does."""
    for a, b in zip(points, points[1:]):
        if b["acc"] >= target > a["acc"]:
            return a[key] + (target - a["acc"]) / (b["acc"] - a["acc"]) * (b[key] - a[key])
    return points[0][key] if points and points[0]["acc"] >= target else None


def paired(per_problem: list[float], base: list[float]) -> tuple[float, float, float]:
    """(accuracy, its SE, paired z vs base)."""
    a, d = np.asarray(per_problem, float), np.asarray(per_problem, float) - np.asarray(base, float)
    se = a.std(ddof=1) / math.sqrt(len(a))
    d_se = d.std(ddof=1) / math.sqrt(len(d))
    return float(a.mean()), float(se), float(d.mean() / d_se) if d_se > 0 else 0.0


def headline(rmx: dict, grpo: dict) -> dict:
    """GRPO's accuracy at rmx's clock; GRPO's best and when; GRPO's time to rmx's accuracy and the ratio."""
    r_end = rmx["points"][-1]
    best = max(grpo["points"], key=lambda p: (p["acc"], -p["cpu"]))
    reach = time_to_reach(grpo["points"], r_end["acc"])
    return {"rmx_cpu": r_end["cpu"], "rmx_acc": r_end["acc"], "grpo_acc_at_rmx": acc_at(grpo["points"], r_end["cpu"]),
            "grpo_best": best["acc"], "grpo_best_cpu": best["cpu"], "grpo_cpu_to_rmx_acc": reach,
            "ratio": reach / r_end["cpu"] if reach is not None else None}


# ---------------------------------------------------------------- methods

def _recipe(args, seed: int, run_dir: Path, *extra: str):
    from rmx_local.recipe import load_recipe

    return load_recipe(args.recipe, [*args.set, f"seed={seed}", f"run_dir={json.dumps(str(run_dir))}", *extra])


def _eval_files(recipe, train_key: str) -> tuple[list[float], list[float]]:
    run, key = Path(recipe.run_dir), recipe.section_hash("model", "task", "eval", "seed")
    read = lambda name: json.loads((run / "eval" / name).read_text())["greedy"]["per_problem"]
    return read(f"base-{key}.json"), read(f"adapted-{train_key}-{key}.json")


def _excluding_eval(summary: dict, which: str) -> float:
    total = summary["total_s" if which == "timings_s" else "total_cpu_s"]
    return total - sum(v for k, v in summary[which].items() if k.startswith("eval"))


def tagged(method: str, tag: str) -> str:
    return f"{method} {tag}" if tag else method


def rmx_dir(args, seed: int) -> Path:
    own = args.tag and not args.reuse_rollouts
    return Path(args.out) / (f"rmx-{args.tag}-seed{seed}" if own else f"rmx-seed{seed}")


def rmx_row(args, seed: int, results: dict) -> dict:
    """The rmx run whose rollouts a method trains on (KeyError when it has not run: list rmx first)."""
    return results[("rmx" if args.reuse_rollouts else tagged("rmx", args.tag), seed, None)]


def run_rmx(args, seed: int, lr: float | None, results: dict) -> dict:
    from rmx_local.pipeline import run_pipeline
    from rmx_local.ui import UI

    if args.reuse_rollouts:  # main() refuses it without --tag
        return on_rollouts_of(args, seed, rmx_row(args, seed, results), ("rollouts", "verify", "entropy"))
    run_dir = rmx_dir(args, seed)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh folder: nothing reused, the clock is honest
    recipe = _recipe(args, seed, run_dir)
    s = run_pipeline(recipe, UI(rich=False))
    base, adapted = _eval_files(recipe, s["train"]["key"])
    wall, cpu = _excluding_eval(s, "timings_s"), _excluding_eval(s, "cpu_timings_s")
    return {"base": base, "stages_wall": s["timings_s"], "stages_cpu": s["cpu_timings_s"],
            "points": [{"step": 0, "wall": 0.0, "cpu": 0.0, "acc": float(np.mean(base))},
                       {"step": s["train"]["steps"], "wall": wall, "cpu": cpu, "acc": float(np.mean(adapted)), "per_problem": adapted}]}


def run_rft(args, seed: int, lr: float | None, results: dict) -> dict:
    return on_rollouts_of(args, seed, rmx_row(args, seed, results), ("rollouts", "verify"), "train.objective=rft")


def on_rollouts_of(args, seed: int, rmx: dict, shared: tuple[str, ...], *extra: str) -> dict:
    """Train in rmx's run folder on its rollouts; the `shared` stages' time is charged from rmx's row."""
    from rmx_local.pipeline import run_pipeline
    from rmx_local.stages.train import TRAIN_KEY_SECTIONS
    from rmx_local.ui import UI

    recipe = _recipe(args, seed, rmx_dir(args, seed), *extra)
    key = recipe.section_hash(*TRAIN_KEY_SECTIONS)
    shutil.rmtree(Path(recipe.run_dir) / "train" / key, ignore_errors=True)
    s = run_pipeline(recipe, UI(rich=False))
    base, adapted = _eval_files(recipe, s["train"]["key"])
    wall = _excluding_eval(s, "timings_s") + sum(rmx["stages_wall"].get(k, 0.0) for k in shared)
    cpu = _excluding_eval(s, "cpu_timings_s") + sum(rmx["stages_cpu"].get(k, 0.0) for k in shared)
    return {"base": base, "stages_wall": s["timings_s"], "stages_cpu": s["cpu_timings_s"], "train_sequences": s["train_sequences"],
            "points": [{"step": 0, "wall": 0.0, "cpu": 0.0, "acc": float(np.mean(base))},
                       {"step": s["train"]["steps"], "wall": wall, "cpu": cpu, "acc": float(np.mean(adapted)), "per_problem": adapted}]}


def run_grpo(args, seed: int, lr: float, results: dict) -> dict:
    """TRL GRPO with the clock paused for held-out scoring; the best checkpoint's adapter kept as a PEFT folder."""
    clock = Clock()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rmx_local.backends import SampleParams
    from rmx_local.backends.torch_backend import TorchBackend
    from rmx_local.stages import RunContext
    from rmx_local.stages.evaluate import score
    from rmx_local.stages.rollouts import encode_prompts, split_problems
    from rmx_local.ui import UI
    from rmx_local.verify import verify_many

    run_dir = Path(args.out) / f"grpo-seed{seed}-lr{lr:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    r = _recipe(args, seed, run_dir)
    if r.threads:
        torch.set_num_threads(r.threads)
    ctx = RunContext(r, run_dir, UI(rich=False))
    splits = split_problems(ctx)
    tokenizer = AutoTokenizer.from_pretrained(ctx.source.hf_path)
    model = AutoModelForCausalLM.from_pretrained(ctx.source.hf_path, dtype=torch.float32)
    ctx._backend = TorchBackend(model, tokenizer, "cpu", r.rollout.batch_size, r.model)
    texts, _ = encode_prompts(ctx, splits["train"])
    data = Dataset.from_dict({"prompt": texts, "answer": [p.answer for p in splits["train"]]})

    def correct(completions, answer, **_):
        return [float(v.correct) for v in verify_many(list(completions), list(answer))]

    t = r.train
    config = GRPOConfig(
        output_dir=str(run_dir / "trl"), learning_rate=lr, beta=0.0, num_generations=r.rollout.n,
        per_device_train_batch_size=r.rollout.n, gradient_accumulation_steps=1, num_train_epochs=args.grpo_epochs,
        max_completion_length=r.rollout.max_tokens, temperature=r.rollout.temperature, top_p=r.rollout.top_p,
        seed=seed, use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0, gradient_checkpointing=False)  # TRL turns it on: memory we have, compute we lack
    lora = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=list(t.targets),
                      bias="none", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=lora)
    greedy = SampleParams(1, 0.0, 1.0, r.eval.max_tokens, seed)
    curve = run_dir / "curve.jsonl"

    def evaluate() -> list[float]:
        ctx._backend.model = trainer.model
        was_training = trainer.model.training
        trainer.model.eval()
        per_problem = score(ctx, splits["eval"], greedy, "held-out")["per_problem"]
        trainer.model.train(was_training)
        return per_problem

    rmx = results.get(("rmx", seed, None))
    budget = min(args.budget_x * rmx["points"][-1]["cpu"] if rmx else math.inf, args.max_s)
    def record(point: dict) -> None:
        with open(run_dir / "points.jsonl", "a") as f:
            f.write(json.dumps(point) + "\n")

    ck = Checkpointer(clock, evaluate, args.eval_every_s, budget, stop_at=args.stop_at, on_point=record,
                      on_best=lambda: trainer.model.save_pretrained(str(run_dir / "best" / "adapter")))
    state = {"stop": "epochs"}

    class Cadence(TrainerCallback):
        def on_step_end(self, _args, st, control, **kw):
            stop = ck.after_step(st.global_step)
            with open(curve, "a") as f:
                f.write(json.dumps({"step": st.global_step, "clock": clock.now(), "log": st.log_history[-1:]}) + "\n")
            if stop:
                state["stop"] = stop
                control.should_training_stop = True

    trainer.add_callback(Cadence())
    ck.checkpoint(0)
    trainer.train()
    if ck.points[-1]["step"] != trainer.state.global_step:
        ck.checkpoint(trainer.state.global_step)
    return {"base": ck.points[0]["per_problem"], "points": ck.points, "stop": state["stop"], "budget_cpu": budget,
            "steps": trainer.state.global_step}


def run_fewshot(args, seed: int, lr: float | None, results: dict) -> dict:
    """The base zero-shot (the other methods' base: the seed's rmx run's when it ran first) and with `args.shots`
    training problems as worked examples."""
    clock = Clock()
    from rmx_local.backends import SampleParams
    from rmx_local.stages import RunContext
    from rmx_local.stages.evaluate import score
    from rmx_local.stages.rollouts import split_problems
    from rmx_local.ui import UI

    run_dir = Path(args.out) / f"fewshot-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    r = _recipe(args, seed, run_dir)
    ctx = RunContext(r, run_dir, UI(rich=False))
    splits = split_problems(ctx)
    ctx.backend  # noqa: B018 (loads the model: the only cost of this method)
    wall, cpu = clock.now()
    greedy = SampleParams(1, 0.0, 1.0, r.eval.max_tokens, seed)
    shots = tuple(splits["train"][: args.shots])
    rmx = results.get(("rmx", seed, None))  # its base answers, when it ran first: the same problems and prompt
    base = rmx["base"] if rmx else score(ctx, splits["eval"], greedy, "base")["per_problem"]
    few = score(ctx, splits["eval"], greedy, f"{args.shots}-shot base", shots=shots)
    return {"base": base, "shots": [p.id for p in shots], "unparseable": few["unparseable"], "example": few["example"],
            "points": [{"step": 0, "wall": 0.0, "cpu": 0.0, "acc": float(np.mean(base))},
                       {"step": 0, "wall": wall, "cpu": cpu, "acc": float(np.mean(few["per_problem"])),
                        "per_problem": few["per_problem"]}]}


METHODS = {"fewshot": run_fewshot, "rmx": run_rmx, "rft": run_rft, "grpo": run_grpo}


# ---------------------------------------------------------------- report

def load_results(out: Path) -> dict:
    path = out / "results.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    results = {(r["method"], r["seed"], r["lr"]): r for r in rows}
    for points in out.glob("grpo-seed*-lr*/points.jsonl"):  # a GRPO run still going or killed: its curve so far
        seed, lr = points.parent.name.removeprefix("grpo-seed").split("-lr")
        pts = [json.loads(x) for x in points.read_text().splitlines()]
        if ("grpo", int(seed), float(lr)) not in results and pts:
            results[("grpo", int(seed), float(lr))] = {"method": "grpo", "seed": int(seed), "lr": float(lr), "partial": True,
                                                       "base": pts[0]["per_problem"], "points": pts, "stop": "unfinished"}
    return results


def rounds_results(out: Path, results: dict) -> dict:
    """`rounds = R` runs made in a copy of an rmx run folder (OUT/roundsR-seedS, round 1 reused): one curve each,
    round 1 at the rmx run's clock, round r adding its own run's clock (held-out scoring excluded)."""
    found = {}
    for run in sorted(out.glob("rounds*-seed*")):
        seed = int(run.name.split("-seed")[1])
        rmx = results.get(("rmx", seed, None))
        if rmx is None or not (run / "rounds.json").exists():
            continue
        points, (wall, cpu) = list(rmx["points"]), (rmx["points"][-1]["wall"], rmx["points"][-1]["cpu"])
        for r in range(2, len(json.loads((run / "rounds.json").read_text())) + 1):
            s = json.loads((run / f"round-{r}" / "summary.json").read_text())
            wall, cpu = wall + _excluding_eval(s, "timings_s"), cpu + _excluding_eval(s, "cpu_timings_s")
            adapted = next((run / f"round-{r}" / "eval").glob(f"adapted-{s['train']['key']}-*.json"))
            per_problem = json.loads(adapted.read_text())["greedy"]["per_problem"]
            points.append({"step": r, "wall": wall, "cpu": cpu, "acc": float(np.mean(per_problem)), "per_problem": per_problem})
        found[("rmx rounds", seed, None)] = {"base": rmx["base"], "points": points}
    return found


def over_seeds(results: dict) -> list[str]:
    """One line per method (and GRPO lr): its end checkpoint averaged over seeds, gains paired per seed against that
    seed's base (and few-shot base), ± the SE across seeds (0 with one seed). The end, not the best checkpoint:
    choosing GRPO's best reads the held-out set."""
    from rmx_local.scoring import mean_se

    groups: dict[tuple, list] = {}
    for (method, seed, lr), r in results.items():
        groups.setdefault((method, lr), []).append((seed, r))
    lines = ["| method | seeds | CPU s (mean) | held-out acc (mean ± SE over seeds) | gain vs base | gain vs few-shot base |",
             "|---|---|---:|---|---|---|"]
    for (method, lr), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        rows.sort(key=lambda sr: sr[0])
        end = [r["points"][-1] for _, r in rows]
        acc = [p["acc"] for p in end]
        gain = [p["acc"] - float(np.mean(r["base"])) for p, (_, r) in zip(end, rows)]
        few = [p["acc"] - results[("fewshot", s, None)]["points"][-1]["acc"] for p, (s, _) in zip(end, rows)
               if ("fewshot", s, None) in results]
        (a, a_se), (g, g_se), (f, f_se) = mean_se(acc), mean_se(gain), mean_se(few)
        vs_few = f"{f:+.3f} ± {f_se:.3f}" if few and method != "fewshot" else ""
        name = f"{method} lr {lr:g}" if lr else method
        lines.append(f"| {name} | {','.join(str(s) for s, _ in rows)} | {np.mean([p['cpu'] for p in end]):.0f} | "
                     f"{a:.3f} ± {a_se:.3f} | {g:+.3f} ± {g_se:.3f} | {vs_few} |")
    return lines


def report(out: Path) -> str:
    results = load_results(out)
    results.update(rounds_results(out, results))
    lines = ["| method | seed | lr | checkpoint | wall s | CPU s | held-out acc ± SE | z vs base | gain vs few-shot base (z) |",
             "|---|---|---|---|---:|---:|---|---:|---|"]
    for (method, seed, lr), r in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        best = max(r["points"], key=lambda p: (p["acc"], -p["cpu"]))
        few = results.get(("fewshot", seed, None))
        for i, p in enumerate(r["points"]):
            label = "base" if i == 0 else "end" if i == len(r["points"]) - 1 else "best" if p is best else "checkpoint"
            if method == "fewshot" and i:
                label = f"{len(r['shots'])}-shot base"
            per_problem = p.get("per_problem", r["base"])
            acc, se, z = paired(per_problem, r["base"])
            vs_few = ""
            if few and method != "fewshot" and len(few["base"]) == len(per_problem):
                few_acc, (_, _, fz) = few["points"][-1]["acc"], paired(per_problem, few["points"][-1]["per_problem"])
                vs_few = f"{acc - few_acc:+.3f} ({fz:+.1f})"
            lines.append(f"| {method} | {seed} | {lr if lr is not None else ''} | {label} (step {p['step']}) | {p['wall']:.0f} | "
                         f"{p['cpu']:.0f} | {acc:.3f} ± {se:.3f} | {z:+.1f} | {vs_few} |")
    for (method, seed, lr), g in sorted(results.items(), key=lambda kv: str(kv[0])):
        if method == "grpo" and ("rmx", seed, None) in results:
            h = headline(results[("rmx", seed, None)], g)
            reach = f"{h['grpo_cpu_to_rmx_acc']:.0f} CPU s ({h['ratio']:.1f}x rmx)" if h["ratio"] else "never"
            lines.append(f"\nseed {seed}, GRPO lr {lr:g}: rmx {h['rmx_acc']:.3f} at {h['rmx_cpu']:.0f} CPU s; GRPO at that time "
                         f"{h['grpo_acc_at_rmx']:.3f}; GRPO best {h['grpo_best']:.3f} at {h['grpo_best_cpu']:.0f} CPU s; "
                         f"GRPO reaches rmx's accuracy after {reach}; stopped by {g.get('stop')}")
    plot(results, out / "baselines.png")
    return "\n".join([*lines, "", *over_seeds(results)])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    colors = {"rmx": "tab:blue", "rft": "tab:green", "grpo": "tab:red", "rmx rounds": "tab:purple"}
    spare = iter(["tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"] * 3)
    for method in sorted({m for m, _, _ in results} - set(colors)):  # settings run with --tag
        colors[method] = next(spare)
    top_lr = max((l for m, _, l in results if m == "grpo"), default=None)
    for (method, seed, lr), r in sorted(results.items(), key=lambda kv: str(kv[0])):
        xs, ys = [p["cpu"] for p in r["points"]], [p["acc"] for p in r["points"]]
        style = ("-o" if lr == top_lr else ":o") if method == "grpo" else "--o"  # the largest GRPO lr solid
        label = f"{method} seed {seed}" + (f" lr {lr:g}" if lr else "")
        ax.plot(xs, ys, style, color=colors.get(method, "k"), alpha=0.4 + 0.6 * (seed == 0), markersize=3, label=label)
    ax.set_xlabel("process CPU seconds from model load (held-out scoring excluded)")
    held_out = len(next(iter(results.values()))["base"]) if results else 0
    ax.set_ylabel(f"greedy accuracy, {held_out} held-out problems")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--methods", default="rmx,rft,grpo")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lrs", default="1e-5,1e-4", help="GRPO learning rates")
    ap.add_argument("--budget-x", type=float, default=10.0)
    ap.add_argument("--max-s", type=float, default=math.inf, help="cap on GRPO's CPU-second budget")
    ap.add_argument("--eval-every-s", type=float, default=300.0, help="GRPO held-out scoring cadence, CPU seconds")
    ap.add_argument("--grpo-epochs", type=float, default=2.0)
    ap.add_argument("--stop-at", type=lambda s: time.mktime(time.strptime(time.strftime("%Y-%m-%d ") + s, "%Y-%m-%d %H:%M")),
                    default=math.inf, help="HH:MM local time: GRPO ends then with a last checkpoint (a safety net)")
    ap.add_argument("--shots", type=int, default=3, help="fewshot: worked examples before each question")
    ap.add_argument("--out", default="runs/baselines")
    ap.add_argument("--set", action="append", default=[], help="recipe override for every method, e.g. threads=1")
    ap.add_argument("--tag", default="", help="name of a setting of rmx (and rft) given by --set: method 'rmx TAG'")
    ap.add_argument("--reuse-rollouts", action="store_true",
                    help="rmx TAG trains on the seed's rmx run's rollouts and entropies (gate and train settings only)")
    ap.add_argument("--report", action="store_true", help="only print the table from OUT/results.jsonl")
    args = ap.parse_args()
    if args.tag and "grpo" in args.methods.split(","):
        ap.error("--tag names a setting of rmx and rft; run grpo without it")
    if args.reuse_rollouts and not args.tag:
        ap.error("--reuse-rollouts needs --tag (the setting's name); the plain rmx run makes the rollouts")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        results = load_results(out)
        for method in args.methods.split(","):
            for seed in map(int, args.seeds.split(",")):
                for lr in (map(float, args.lrs.split(",")) if method == "grpo" else [None]):
                    name = tagged(method, args.tag)
                    if (name, seed, lr) in results and not results[(name, seed, lr)].get("partial"):
                        continue
                    row = {"method": name, "seed": seed, "lr": lr, "recipe": args.recipe, "set": args.set,
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **METHODS[method](args, seed, lr, results)}
                    results[(name, seed, lr)] = row
                    with open(out / "results.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"done: {method} seed {seed} lr {lr}: acc {row['points'][-1]['acc']:.3f} at "
                          f"{row['points'][-1]['cpu']:.0f} CPU s", flush=True)
    print(report(out))


if __name__ == "__main__":
    main()
