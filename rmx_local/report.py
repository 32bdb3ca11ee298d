"""`rmx-local report RUN`: one self-contained HTML page (RUN/report/index.html) plus its PNGs, from a finished run.

What the page shows, all read from the run folder (nothing is recomputed, no model is loaded; only the tokenizer,
to name tokens): the base entropies of the training completions with the run's and the paper's tau; where the
decision points fall (position in the completion, kind of token); the training curves; base vs adapted accuracy
with ±1 SE for every evaluation the folder holds (the run's own `eval/`, and any `summary.json` under `RUN/eval*/`,
e.g. saved there by `rmx-local eval --out`); the held-out problems that flipped; three example rollouts with their
decision points highlighted. Images are embedded as base64 so the page can be mailed or attached as one file.
An `rmx-local eval --out` summary gives one bar pair per data set, runtime and target (against `base`, else the
first target). Shortcut: any other `summary.json` is read generically: every `[mean, se]` pair (or {mean, se})
under a metric name, the one under a key `base` as the base.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from rmx_local import report_plots as plots
from rmx_local.errors import RmxError
from rmx_local.io import atomic_write_bytes, atomic_write_text, read_json, read_jsonl
from rmx_local.runfolder import require_finished, run_tokenizer
from rmx_local.sweep import table as sweep_table

KINDS = ("first token", "digit", "operator", "word", "other")
OPERATORS = set("+-*/×x÷=()<>^%")
PAGE_CSS = """
body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:960px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;margin-top:34px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0} img{max-width:100%} .note{color:#555;font-size:14px}
table{border-collapse:collapse;margin:8px 0} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
th{background:#f6f6f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:8px;padding:8px 14px;min-width:150px}
.card b{font-size:20px;display:block}
.rollout{font:14px/1.9 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;border:1px solid #ddd;border-radius:6px;padding:8px 10px;background:#fcfcfc}
.tok{border-radius:2px;padding:1px 0} .gate{border-bottom:3px solid #c8443a;font-weight:bold}
.prompt{color:#666;font-size:14px} .good{color:#3a9a5b} .bad{color:#c8443a}
"""


def token_kind(text: str, position: int) -> str:
    """first token | digit | operator | word | other, from the token's text (leading space ignored)."""
    if position == 0:
        return "first token"
    t = text.strip()
    if t and t.isdigit():
        return "digit"
    if t and all(c in OPERATORS for c in t):
        return "operator"
    if t and any(c.isalpha() for c in t):
        return "word"
    return "other"


def training_sequences(run_dir: Path) -> list[dict]:
    """The selected training sequences, each with its base entropies `H` (from entropies.jsonl)."""
    seqs = read_json(run_dir / "selected.json")["sequences"]
    entropy = {(r["id"], r["k"]): r["H"] for r in read_jsonl(run_dir / "entropies.jsonl")}
    return [dict(s, H=np.asarray(entropy[(s["id"], s["k"])], dtype=np.float32)) for s in seqs if (s["id"], s["k"]) in entropy]


def decision_point_stats(seqs: list[dict], tau: float, tokenizer) -> dict:
    """Relative positions of all / gated tokens and the share of each token kind among all / gated tokens."""
    rel_all, rel_gated, kinds_all, kinds_gated = [], [], [], []
    for s in seqs:
        n = len(s["completion_ids"])
        for t, (tok, h) in enumerate(zip(s["completion_ids"], s["H"])):
            kind = token_kind(tokenizer.decode([tok]), t)
            rel = t / max(n - 1, 1)
            rel_all.append(rel)
            kinds_all.append(kind)
            if h > tau:
                rel_gated.append(rel)
                kinds_gated.append(kind)

    def shares(kinds: list[str]) -> list[float]:
        return [kinds.count(k) / max(len(kinds), 1) for k in KINDS]

    return {"rel_all": np.asarray(rel_all), "rel_gated": np.asarray(rel_gated),
            "share_all": shares(kinds_all), "share_gated": shares(kinds_gated), "gated": len(kinds_gated)}


def own_evals(run_dir: Path, summary: dict) -> tuple[dict | None, dict | None]:
    """The run's own base and adapted evaluation files (per-problem results), matched by the training key."""
    train_key = summary.get("train", {}).get("key", "")
    for adapted_path in sorted((run_dir / "eval").glob(f"adapted-{train_key}-*.json")):
        eval_key = adapted_path.stem.removeprefix(f"adapted-{train_key}-")
        base_path = run_dir / "eval" / f"base-{eval_key}.json"
        if base_path.is_file():
            return read_json(base_path), read_json(adapted_path)
    return None, None


def _pairs(node, path: tuple[str, ...] = ()):
    """(path, mean, se) for every [mean, se] list or {mean, se} dict inside a JSON object."""
    if isinstance(node, dict):
        if isinstance(node.get("mean"), (int, float)) and isinstance(node.get("se"), (int, float)):
            yield path, float(node["mean"]), float(node["se"])
            return
        for k, v in node.items():
            yield from _pairs(v, path + (str(k),))
    elif isinstance(node, list) and len(node) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in node):
        yield path, float(node[0]), float(node[1])


def _eval_summary_rows(data: dict, folder: str) -> list[dict]:
    """Rows from an `rmx-local eval --out` summary: per data set and runtime, each target against `base` (or the first)."""
    rows = []
    for entry in data["data"]:
        for runtime, results in entry.get("results", {}).items():
            labels = list(results)
            ref = "base" if "base" in results else labels[0]
            for label in labels:
                if label != ref:
                    r, b = results[label], results[ref]
                    rows.append({"label": f"{folder}: {entry.get('spec', '?')}\n{Path(label).name} [{runtime}]",
                                 "base": (b["accuracy"], b["se"]), "adapted": (r["accuracy"], r["se"])})
    return rows


def external_evals(run_dir: Path) -> list[dict]:
    """Rows {label, base, adapted} from every summary.json under RUN/eval*/ (e.g. `rmx-local eval --out`)."""
    rows = []
    for path in sorted(run_dir.glob("eval*/**/summary.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        folder = path.parent.relative_to(run_dir).as_posix()
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            rows += _eval_summary_rows(data, folder)
            continue
        found: dict[str, dict[str, tuple[float, float]]] = {}
        for keys, mean, se in _pairs(data):
            if not keys or any(k in ("delta", "diff", "difference", "paired") for k in keys) or not 0 <= mean <= 1:
                continue
            role = "base" if "base" in keys else "adapted"
            metric = next((k for k in reversed(keys) if k not in ("base", "adapted") and not k.isdigit()), "accuracy")
            found.setdefault(metric, {}).setdefault(role, (mean, se))
        rows += [{"label": f"{folder}\n{metric}", **roles} for metric, roles in found.items()]
    return rows


def accuracy_rows(summary: dict, run_dir: Path) -> list[dict]:
    names = {"greedy": "held-out\ngreedy", "sampled": "held-out\npass@1 (sampled)"}
    rows = [{"label": names.get(m, m), "base": r["base"], "adapted": r.get("adapted")} for m, r in summary.get("eval", {}).items()]
    return rows + external_evals(run_dir)


def flips(run_dir: Path, base: dict, adapted: dict) -> dict[str, list[dict]]:
    """Held-out problems whose greedy answer went wrong -> right and right -> wrong."""
    problems = read_json(run_dir / "problems.json").get("eval", [])
    b, a = base["greedy"]["per_problem"], adapted["greedy"]["per_problem"]
    out: dict[str, list[dict]] = {"wrong → right": [], "right → wrong": []}
    for p, x, y in zip(problems, b, a):
        if x < 0.5 <= y:
            out["wrong → right"].append(p)
        elif y < 0.5 <= x:
            out["right → wrong"].append(p)
    return out


def pick_examples(seqs: list[dict], tau: float, n: int = 3) -> list[dict]:
    """A right rollout, a wrong one and one more, from different problems: each of a typical length (closest to the
    75th percentile), with decision points where possible (a runaway rollout explains little, a 3-token one too)."""
    typical = float(np.percentile([len(s["completion_ids"]) for s in seqs], 75)) if seqs else 0.0
    chosen: list[dict] = []
    for want in (lambda s: s["reward"] > 0, lambda s: s["reward"] <= 0, lambda s: True):
        pool = [s for s in seqs if want(s) and s["id"] not in {c["id"] for c in chosen}]
        if pool and len(chosen) < n:
            chosen.append(min(pool, key=lambda s: (not (s["H"] > tau).any(), abs(len(s["completion_ids"]) - typical))))
    return chosen


def _entropy_colour(h: float, top: float) -> str:
    """White (certain) to deep orange (uncertain), as a CSS rgba background."""
    return f"rgba(224,138,44,{min(h / max(top, 1e-6), 1.0) * 0.85:.2f})"


def rollout_html(seq: dict, tau: float, tokenizer, top: float, question: str = "") -> str:
    spans = []
    for tok, h in zip(seq["completion_ids"], seq["H"]):
        text = html.escape(tokenizer.decode([tok])).replace("\n", "↵\n")
        cls = "tok gate" if h > tau else "tok"
        spans.append(f'<span class="{cls}" style="background:{_entropy_colour(float(h), top)}" title="H = {h:.2f} nats">{text}</span>')
    verdict = '<span class="good">right</span>' if seq["reward"] > 0 else '<span class="bad">wrong</span>'
    gated = int((seq["H"] > tau).sum())
    asked = f'<p class="prompt">{html.escape(question)}</p>' if question else ""
    return (f'<p class="note">problem <code>{html.escape(seq["id"])}</code> · rollout {seq["k"]} · {verdict} · advantage '
            f'{seq["advantage"]:+.2f} · {gated} of {len(seq["completion_ids"])} tokens are decision points</p>'
            f'{asked}<div class="rollout">{"".join(spans)}</div>')


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><p class="note">({name})</p>'


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{v}</b>{html.escape(k)}</div>' for k, v in items) + "</div>"


def write_report(run_dir: str | Path) -> Path:
    """Render RUN/report/index.html and its PNGs; returns the page's path."""
    run_dir = Path(run_dir)
    summary = require_finished(run_dir)
    plots.require_matplotlib()
    gate = summary.get("gate", {})
    tau, paper_tau = float(summary["tau"]), float(gate.get("paper_tau", 1.4))
    tokenizer = run_tokenizer(run_dir)
    seqs = training_sequences(run_dir)
    flat = np.concatenate([s["H"] for s in seqs]) if seqs else np.zeros(0, np.float32)
    stats = decision_point_stats(seqs, tau, tokenizer)
    history = read_jsonl(run_dir / "train" / summary["train"]["key"] / "log.jsonl")
    rows = accuracy_rows(summary, run_dir)

    images = {"entropy.png": plots.entropy_histogram(flat, tau, paper_tau),
              "decision-points.png": plots.decision_points(stats["rel_all"], stats["rel_gated"], list(KINDS),
                                                           stats["share_all"], stats["share_gated"])}
    if history:
        images["training.png"] = plots.training_curves(history)
    if rows:
        images["accuracy.png"] = plots.accuracy_bars(rows)
    out = run_dir / "report"
    for name, png in images.items():
        atomic_write_bytes(out / name, png)
    page = render_page(run_dir, summary, images, seqs, tau, paper_tau, stats, rows, tokenizer, float(flat.max()) if flat.size else 1.0)
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def render_page(run_dir, summary, images, seqs, tau, paper_tau, stats, rows, tokenizer, top) -> str:
    s, greedy = summary.get("selection", {}), summary.get("eval", {}).get("greedy", {})
    cards = [("model", html.escape(str(summary.get("model", "?")).removeprefix("embedded:"))),
             ("training problems / rollouts", f'{summary.get("train_problems", "?")} / {summary.get("train_sequences", "?")}'),
             ("decision points", f'{summary["gated_fraction"]:.1%} of tokens (tau {tau:.2f})'),
             ("training steps", f'{summary["train"].get("steps", "?")}')]
    if greedy.get("adapted"):
        d = greedy.get("delta", (0.0, 0.0))
        z = f" ({d[0] / d[1]:+.1f} SE)" if d[1] > 0 else ""
        cards.insert(0, (f"greedy accuracy on {summary.get('eval_problems', '?')} held-out problems",
                         f'{greedy["base"][0]:.3f} → {greedy["adapted"][0]:.3f}{z}'))
    parts = [f"<h1>rmx-local report: {html.escape(run_dir.resolve().name)}</h1>",
             f'<p class="sub">{html.escape(str(run_dir))} · recipe {summary.get("recipe_hash", "?")} · '
             f'rollout accuracy {s.get("accuracy", 0):.3f}, {s.get("mixed", "?")} mixed problems</p>', _cards(cards)]
    parts += ["<h2>Accuracy: base vs adapted</h2>",
              '<p class="note">Bars are ±1 standard error over problems. The held-out problems were never trained on.</p>',
              _img("accuracy.png", images["accuracy.png"], "accuracy") if "accuracy.png" in images else "<p>No evaluation in this run.</p>"]
    parts += _sweep_section(summary)
    parts += _flip_section(run_dir, summary)
    parts += ["<h2>Where the model is uncertain</h2>",
              f'<p class="note">Base-model entropy of every completion token of the {len(seqs)} training rollouts. Tokens right '
              f"of the red line are this run's <b>decision points</b>, the only places the correction is trained to change; "
              f"elsewhere a KL term holds it to the base model. The paper's tau ({paper_tau}) was set for a larger, more "
              f"certain model.</p>", _img("entropy.png", images["entropy.png"], "entropy histogram"),
              "<h2>Where the decision points fall</h2>",
              f'<p class="note">{stats["gated"]} decision points: their position in the completion, and what kind of token '
              f"they are, against all completion tokens.</p>",
              _img("decision-points.png", images["decision-points.png"], "decision points")]
    if "training.png" in images:
        parts += ["<h2>Training</h2>", '<p class="note">Per optimizer step: the loss is the policy term plus 0.2 x the KL '
                  "term; the policy term is advantage-weighted cross-entropy on decision points, so it is negative when wrong "
                  "rollouts dominate a step.</p>", _img("training.png", images["training.png"], "training curves")]
    parts += ["<h2>Example rollouts</h2>", '<p class="note">Background: base entropy (darker = less certain; hover for the '
              "value). Underlined in red, bold: decision points (entropy above tau).</p>"]
    questions = {p["id"]: f'{p["question"]} (gold answer {p["answer"]})' for p in read_json(run_dir / "problems.json").get("train", [])}
    parts += [rollout_html(seq, tau, tokenizer, top, questions.get(seq["id"], "")) for seq in pick_examples(seqs, tau)]
    parts.append(f'<p class="note">Files: {", ".join(images)} beside this page; the numbers in summary.json, gate.json, '
                 "train/*/log.jsonl and eval/ of the run folder.</p>")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>rmx-local report: {html.escape(run_dir.name)}</title>'
            f"<style>{PAGE_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def _sweep_section(summary: dict) -> list[str]:
    """A sweep run: every variant's row, the chosen one marked, and why it was chosen (validation only)."""
    sweep = summary.get("sweep")
    if not sweep:
        return []
    heads, rows = sweep_table(sweep)
    dropped = f" Dropped by sweep.max_minutes: {', '.join(sweep['dropped'])}." if sweep.get("dropped") else ""
    return [f"<h2>Sweep: {len(rows)} variants on one set of rollouts</h2>",
            f'<p class="note">Chosen on {sweep["val_problems"]} validation problems (greedy; ± SE, the last column '
            f"paired against the base): <b>{html.escape(sweep['chosen'])}</b>, {html.escape(sweep['reason'])}. Only it was "
            f"scored on the held-out problems; every other variant's adapter is in its own folder "
            f"(`rmx-local export RUN --variant NAME`).{html.escape(dropped)}</p>",
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in heads) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"]


def _flip_section(run_dir: Path, summary: dict) -> list[str]:
    base, adapted = own_evals(run_dir, summary)
    if not base or not adapted or "greedy" not in base or "greedy" not in adapted:
        return []
    f = flips(run_dir, base, adapted)
    n = len(base["greedy"]["per_problem"])
    parts = ["<h2>Which held-out problems flipped</h2>",
             f'<p class="note">Greedy answers on the {n} held-out problems: <b class="good">{len(f["wrong → right"])} '
             f'wrong → right</b>, <b class="bad">{len(f["right → wrong"])} right → wrong</b>; the rest kept their '
             "verdict.</p><table><tr><th>flip</th><th>examples (question → gold answer)</th></tr>"]
    for name, items in f.items():
        shown = "; ".join(f"{html.escape(p['question'])} → {html.escape(str(p['answer']))}" for p in items[:6])
        more = f" … and {len(items) - 6} more" if len(items) > 6 else ""
        parts.append(f"<tr><td>{name} ({len(items)})</td><td>{shown or '-'}{more}</td></tr>")
    parts.append("</table>")
    return parts


def report_after_run(run_dir: str | Path, line) -> Path | None:
    """Write the report at the end of `rmx-local run`; a missing matplotlib is a one-line note, not a failure."""
    try:
        path = write_report(run_dir)
    except RmxError as e:
        if "matplotlib" not in e.message:
            raise
        line(f"report: skipped ({e.line()})")
        return None
    return path

