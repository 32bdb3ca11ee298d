"""benchmarks/baselines.py bookkeeping: the clock that pauses during held-out scoring, the budget and plateau
stops, and the headline interpolation. A fake trainer loop drives it, scored by the project's real greedy
scorer on a tiny model; trl is never imported."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("baselines", Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py")
bl = importlib.util.module_from_spec(spec)
sys.modules["baselines"] = bl  # dataclasses look their module up here
spec.loader.exec_module(bl)


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_clock_excludes_paused_blocks_on_both_clocks():
    wall, cpu = FakeTime(), FakeTime()
    clock = bl.Clock(wall, cpu)
    wall.t += 10
    cpu.t += 4
    with clock.paused():
        wall.t += 50
        cpu.t += 30
    wall.t += 1
    cpu.t += 1
    assert clock.now() == (11.0, 5.0)


def make_scorer(torch_backend, tmp_path, clock_parts):
    """The real held-out scorer on a tiny model; every scoring call costs 7 fake seconds that must not count."""
    from rmx_local.backends import SampleParams
    from rmx_local.recipe import load_recipe
    from rmx_local.stages import RunContext
    from rmx_local.stages.evaluate import score
    from rmx_local.tasks import Problem
    from rmx_local.ui import UI

    ctx = RunContext(load_recipe(None, ["task.template=chat", "rollout.batch_size=8"]), tmp_path, UI(rich=False))
    ctx._backend = torch_backend
    problems = [Problem(f"p{i}", f"What is {i} + 1?", str(i + 1)) for i in range(4)]
    calls = []

    def evaluate():
        for part in clock_parts:
            part.t += 7.0
        calls.append(1)
        return score(ctx, problems, SampleParams(1, 0.0, 1.0, 3, 0), "held-out")["per_problem"]

    return evaluate, calls


def test_fake_trainer_checkpoints_on_the_cpu_clock_and_stops_at_the_budget(torch_backend, tmp_path):
    wall, cpu = FakeTime(), FakeTime()
    clock = bl.Clock(wall, cpu)
    evaluate, calls = make_scorer(torch_backend, tmp_path, (wall, cpu))
    ck = bl.Checkpointer(clock, evaluate, every_s=10.0, budget_s=35.0, patience=100)
    ck.checkpoint(0)
    stop, step = None, 0
    while stop is None:  # the fake trainer: every step costs 3 CPU seconds and 6 wall seconds
        step += 1
        cpu.t += 3.0
        wall.t += 6.0
        stop = ck.after_step(step)
    assert stop == "budget" and step == 12  # 12 x 3 = 36 >= 35 CPU seconds; scoring time never counted
    assert [p["step"] for p in ck.points] == [0, 4, 8, 12]  # every 10 CPU s of training: at 12, 24, 36 s
    assert [p["cpu"] for p in ck.points] == [0.0, 12.0, 24.0, 36.0]
    assert [p["wall"] for p in ck.points] == [0.0, 24.0, 48.0, 72.0]
    assert len(calls) == 4 and all(p["acc"] == 0.0 and len(p["per_problem"]) == 4 for p in ck.points)  # a random model


def test_plateau_stop_after_two_checkpoints_without_a_new_best():
    wall, cpu = FakeTime(), FakeTime()
    accs = iter([0.3, 0.5, 0.6, 0.6, 0.55, 0.9])
    best_saved = []
    ck = bl.Checkpointer(bl.Clock(wall, cpu), lambda: [next(accs)] * 2, every_s=1.0, budget_s=1e9,
                         on_best=lambda: best_saved.append(cpu.t))
    ck.checkpoint(0)
    stops = []
    for step in range(1, 6):
        cpu.t += 1.0
        stops.append(ck.after_step(step))
        if stops[-1]:
            break
    assert stops == [None, None, None, "plateau"]  # 0.6 then 0.6, 0.55: no rise for two checkpoints
    assert [p["acc"] for p in ck.points] == [0.3, 0.5, 0.6, 0.6, 0.55]
    assert len(best_saved) == 3  # base, 0.5, 0.6 (ties are not a new best)


def test_headline_interpolates_between_checkpoints():
    rmx = {"points": [{"cpu": 0.0, "acc": 0.3}, {"cpu": 100.0, "acc": 0.7}]}
    grpo = {"points": [{"cpu": 0.0, "acc": 0.3}, {"cpu": 80.0, "acc": 0.5}, {"cpu": 200.0, "acc": 0.8},
                       {"cpu": 400.0, "acc": 0.9}, {"cpu": 500.0, "acc": 0.9}]}
    h = bl.headline(rmx, grpo)
    assert h["grpo_acc_at_rmx"] == pytest.approx(0.5 + 20 / 120 * 0.3)
    assert h["grpo_cpu_to_rmx_acc"] == pytest.approx(80 + (0.2 / 0.3) * 120)  # 160 CPU s
    assert h["ratio"] == pytest.approx(1.6)
    assert (h["grpo_best"], h["grpo_best_cpu"]) == (0.9, 400.0)  # the earliest of equal bests
    never = bl.headline({"points": [{"cpu": 0.0, "acc": 0.3}, {"cpu": 10.0, "acc": 0.95}]}, grpo)
    assert never["grpo_cpu_to_rmx_acc"] is None and never["ratio"] is None


def test_paired_z_against_base():
    base = [0, 0, 1, 1, 0, 0, 1, 0]
    after = [1, 0, 1, 1, 1, 0, 1, 1]
    acc, se, z = bl.paired(after, base)
    d = np.array(after) - np.array(base)
    assert acc == 0.75 and se == pytest.approx(np.std(after, ddof=1) / np.sqrt(8))
    assert z == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(8)))
    assert "trl" not in sys.modules


def test_a_tagged_setting_is_its_own_method_folder_and_curve(tmp_path):
    from types import SimpleNamespace

    args = SimpleNamespace(out=str(tmp_path), tag="K16", reuse_rollouts=False)
    assert bl.rmx_dir(args, 2) == tmp_path / "rmx-K16-seed2" and bl.tagged("rft", "K16") == "rft K16"
    assert bl.rmx_dir(SimpleNamespace(out=str(tmp_path), tag="", reuse_rollouts=False), 2) == tmp_path / "rmx-seed2"
    point = lambda cpu, acc: {"step": 1, "wall": cpu, "cpu": cpu, "acc": acc, "per_problem": [acc] * 4}
    rows = [{"method": m, "seed": 0, "lr": None, "base": [0.0] * 4, "points": [point(0, 0.0), point(c, a)]}
            for m, c, a in [("rmx", 100, 0.5), ("rmx K16", 180, 0.75)]]
    (tmp_path / "results.jsonl").write_text("".join(bl.json.dumps(r) + "\n" for r in rows))
    table = bl.report(tmp_path)
    assert "| rmx K16 | 0 |  | end (step 1) | 180 | 180 | 0.750" in table
    assert (tmp_path / "baselines.png").stat().st_size > 1000


def test_reused_rollouts_train_in_the_plain_rmx_folder_and_pay_for_its_sampling(tmp_path, monkeypatch):
    """`--tag random --reuse-rollouts`: the setting trains in rmx-seed0/ (its rollouts and entropies) and its
    clock adds that run's rollout, grading and entropy seconds to its own (here 7 + 100 + 10 + 20)."""
    from types import SimpleNamespace

    import rmx_local.pipeline

    args = SimpleNamespace(out=str(tmp_path), tag="random", reuse_rollouts=True, set=["train.random_gate=true"],
                           recipe=str(Path(__file__).parents[1] / "recipes" / "quickstart.toml"))
    assert bl.rmx_dir(args, 0) == tmp_path / "rmx-seed0"
    stages = {"rollouts": 100.0, "verify": 10.0, "entropy": 20.0, "train": 50.0}
    results = {("rmx", 0, None): {"stages_wall": stages, "stages_cpu": stages}}
    seen = []

    def fake_pipeline(recipe, ui):
        seen.append((Path(recipe.run_dir), recipe.train.random_gate))
        t = {"load model": 2.0, "train": 5.0, "eval adapted": 99.0}
        return {"timings_s": t, "cpu_timings_s": t, "total_s": 106.0, "total_cpu_s": 106.0, "train": {"key": "k", "steps": 3},
                "train_sequences": 8}

    monkeypatch.setattr(rmx_local.pipeline, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(bl, "_eval_files", lambda recipe, key: ([0.0, 1.0], [1.0, 1.0]))
    row = bl.run_rmx(args, 0, None, results)
    assert seen == [(tmp_path / "rmx-seed0", True)]
    assert row["points"][-1]["cpu"] == 137.0 and row["points"][-1]["acc"] == 1.0
    rft = bl.run_rft(args, 0, None, results)  # rft on the same rollouts: no entropy pass to pay for
    assert rft["points"][-1]["cpu"] == 117.0
    with pytest.raises(KeyError):  # no plain rmx row for seed 1: nothing to reuse
        bl.run_rmx(args, 1, None, results)


def test_every_gain_is_also_stated_against_the_few_shot_base(tmp_path):
    point = lambda cpu, per: {"step": 1, "wall": cpu, "cpu": cpu, "acc": float(np.mean(per)), "per_problem": per}
    base, few, rmx = [0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 1, 1]
    rows = [{"method": "fewshot", "seed": 0, "lr": None, "base": base, "shots": ["a", "b", "c"],
             "points": [point(0, base), point(9, few)]},
            {"method": "rmx", "seed": 0, "lr": None, "base": base, "points": [point(0, base), point(100, rmx)]}]
    (tmp_path / "results.jsonl").write_text("".join(bl.json.dumps(r) + "\n" for r in rows))
    table = bl.report(tmp_path)
    z = lambda a, b: (np.array(a) - b).mean() / ((np.array(a) - b).std(ddof=1) / np.sqrt(6))  # noqa: E731
    assert f"| rmx | 0 |  | end (step 1) | 100 | 100 | 0.833 ± 0.167 | {z(rmx, base):+.1f} | +0.333 ({z(rmx, few):+.1f}) |" in table
    assert f"| fewshot | 0 |  | 3-shot base (step 1) | 9 | 9 | 0.500 ± 0.224 | {z(few, base):+.1f} |  |" in table
    assert f"| rmx | 0 |  | base (step 1) | 0 | 0 | 0.167 ± 0.167 | +0.0 | -0.333 ({z(base, few):+.1f}) |" in table


def test_over_seeds_averages_end_checkpoints_and_pairs_each_seed_with_its_own_bases():
    point = lambda cpu, per: {"step": 1, "wall": cpu, "cpu": cpu, "acc": float(np.mean(per)), "per_problem": per}
    row = lambda m, seed, base, end, cpu, lr=None, mid=None: {
        "method": m, "seed": seed, "lr": lr, "base": base, "shots": ["a"],
        "points": [point(0, base), *([point(cpu / 2, mid)] if mid else []), point(cpu, end)]}
    results = {(r["method"], r["seed"], r["lr"]): r for r in [
        row("fewshot", 0, [0, 0, 0, 0], [1, 0, 0, 0], 4), row("fewshot", 1, [1, 0, 0, 0], [1, 1, 1, 0], 6),
        row("rmx", 0, [0, 0, 0, 0], [1, 1, 0, 0], 100), row("rmx", 1, [1, 0, 0, 0], [1, 1, 1, 1], 300),
        row("grpo", 0, [0, 0, 0, 0], [0, 0, 0, 0], 900, lr=1e-4, mid=[1, 1, 1, 1])]}
    lines = bl.over_seeds(results)
    # rmx: acc 0.5 and 1.0 (mean 0.75, SE 0.25); gains 0.5 and 0.75; vs few-shot 0.25 and 0.25
    assert "| rmx | 0,1 | 200 | 0.750 ± 0.250 | +0.625 ± 0.125 | +0.250 ± 0.000 |" in lines
    # GRPO's end, not its best (1.0) checkpoint
    assert "| grpo lr 0.0001 | 0 | 900 | 0.000 ± 0.000 | +0.000 ± 0.000 | -0.250 ± 0.000 |" in lines
    assert any(line.startswith("| fewshot | 0,1 | 5 | 0.500 ± 0.250 |") and line.endswith("|  |") for line in lines)
