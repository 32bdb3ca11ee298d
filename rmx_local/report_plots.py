"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display needed).

Every function takes plain numbers and returns PNG bytes; `rmx_local.report` gathers the numbers from a run folder.
Shortcut: one fixed, small style (sizes for a ~900 px wide page), no user theming.
"""

from __future__ import annotations

import io

import numpy as np

from rmx_local.errors import RmxError

BLUE, ORANGE, GREEN, RED, GREY = "#3b6fb6", "#e08a2c", "#3a9a5b", "#c8443a", "#8a8a8a"
DPI = 100


def require_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RmxError("the report needs matplotlib", fix='pip install "rmx-local[report]"  (or: pip install matplotlib)') from None
    return Figure, FigureCanvasAgg


def _figure(width: float, height: float):
    figure_cls, canvas_cls = require_matplotlib()
    fig = figure_cls(figsize=(width, height), dpi=DPI)
    canvas_cls(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _tidy(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(axis="y", alpha=0.25)


def entropy_histogram(entropies: np.ndarray, tau: float, paper_tau: float) -> bytes:
    """Histogram of completion-token base entropies, with the run's tau and the paper's tau marked."""
    fig = _figure(8, 3.4)
    ax = fig.add_subplot()
    top = max(float(entropies.max()) if entropies.size else 1.0, tau, paper_tau) * 1.02
    ax.hist(entropies, bins=np.linspace(0, top, 60), color=BLUE, alpha=0.85)
    ax.set_yscale("log")
    for value, colour, name in ((tau, RED, "this run's tau"), (paper_tau, GREY, "paper's tau")):
        share = float((entropies > value).mean()) if entropies.size else 0.0
        ax.axvline(value, color=colour, lw=2, ls="-" if colour == RED else "--",
                   label=f"{name} {value:.2f}: gates {share:.1%} of tokens")
    ax.set_xlabel("base entropy of the completion token (nats)")
    ax.set_ylabel("tokens (log scale)")
    ax.legend(frameon=False, loc="upper right")
    _tidy(ax)
    return _png(fig)


def decision_points(rel_all: np.ndarray, rel_gated: np.ndarray, kinds: list[str], share_all: list[float],
                    share_gated: list[float]) -> bytes:
    """Left: where in the completion decision points fall; right: which kinds of token they are."""
    fig = _figure(9, 3.4)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    bins = np.linspace(0, 1, 11)
    for data, colour, name in ((rel_all, GREY, "all completion tokens"), (rel_gated, RED, "decision points")):
        weights = np.full(data.size, 1.0 / max(data.size, 1))
        left.hist(data, bins=bins, weights=weights, histtype="step" if colour == GREY else "stepfilled",
                  color=colour, alpha=1.0 if colour == GREY else 0.55, lw=2, label=name)
    left.set_xlabel("position in the completion (0 = first token, 1 = last)")
    left.set_ylabel("share of tokens")
    left.legend(frameon=False)
    x = np.arange(len(kinds))
    right.bar(x - 0.2, share_all, 0.4, color=GREY, label="all tokens")
    right.bar(x + 0.2, share_gated, 0.4, color=RED, alpha=0.75, label="decision points")
    right.set_xticks(x, kinds)
    right.set_ylabel("share of tokens")
    right.legend(frameon=False)
    for ax in (left, right):
        _tidy(ax)
    fig.tight_layout()
    return _png(fig)


def training_curves(history: list[dict]) -> bytes:
    """Loss, policy term, KL term, gradient norm and learning rate per optimizer step."""
    panels = [("loss", "loss"), ("policy", "policy term (A·CE on D)"), ("kl", "KL term (off D)"),
              ("grad_norm", "gradient norm (pre-clip)"), ("lr", "learning rate")]
    panels = [(k, t) for k, t in panels if any(k in h for h in history)]
    fig = _figure(10, 3.0)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    steps = np.array([h.get("step", i + 1) for i, h in enumerate(history)])
    for ax, (key, title) in zip(axes, panels):
        values = np.array([h.get(key, np.nan) for h in history], dtype=float)
        noisy = len(values) > 20 and key != "lr"
        ax.plot(steps, values, color=BLUE, lw=1, alpha=0.45 if noisy else 1.0)
        if noisy:  # a running mean makes the trend readable over noisy per-step values
            w = max(3, len(values) // 10)
            smooth = np.convolve(values, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1 :], smooth, color=BLUE, lw=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        _tidy(ax)
    fig.tight_layout()
    return _png(fig)


def accuracy_bars(rows: list[dict]) -> bytes:
    """Base vs adapted accuracy with ±1 SE bars, one pair per evaluation: rows of {label, base, adapted} (mean, se)."""
    fig = _figure(max(5.0, 1.6 * len(rows) + 2), 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    for offset, key, colour in ((-0.2, "base", GREY), (0.2, "adapted", GREEN)):
        means = [r[key][0] if r.get(key) else np.nan for r in rows]
        ses = [r[key][1] if r.get(key) else 0.0 for r in rows]
        bars = ax.bar(x + offset, means, 0.4, yerr=ses, capsize=4, color=colour, label=key)
        for bar, m in zip(bars, means):
            if np.isfinite(m):
                ax.text(bar.get_x() + bar.get_width() / 2, m + 0.02, f"{m:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, [r["label"] for r in rows], fontsize=9)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy (±1 SE)")
    ax.legend(frameon=False, loc="upper left", ncols=2)
    _tidy(ax)
    return _png(fig)
