"""Figures for the eval report (matplotlib, Agg backend: no display needed).

- ``pass_at_k.png``: pass@k vs k (log2 axis), one panel per benchmark, one line per run;
- ``lengths.png``: histograms of response length in tokens, one panel per benchmark;
- ``diversity.png``: grouped bars of the diversity metrics (all "higher = more diverse").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recipe.iib_lpo.eval.report import _benchmark_key, display_name  # noqa: E402

DIVERSITY_BARS = (
    ("distinct_1", "Distinct-1"),
    ("distinct_4", "Distinct-4"),
    ("self_bleu_diversity", "Self-BLEU\n(1-sim)"),
    ("self_rouge_l_diversity", "Self-ROUGE-L\n(1-sim)"),
)


def _benchmarks(runs: Sequence[dict]) -> list[str]:
    return sorted({b for r in runs for b in r["benchmarks"]}, key=_benchmark_key)


def _panels(count: int, width: float = 4.2, height: float = 3.4):
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def plot_pass_at_k(runs: Sequence[dict], out_png: str | Path) -> Path:
    """pass@k (%) against k for every run, one panel per benchmark."""
    benchmarks = _benchmarks(runs)
    fig, axes = _panels(len(benchmarks))
    for ax, bench in zip(axes, benchmarks):
        ks: set[int] = set()
        for run in runs:
            summary = run["benchmarks"].get(bench)
            if summary is None:
                continue
            curve = sorted((int(k), 100 * v) for k, v in summary["metrics"]["pass_at_k"].items())
            ks.update(k for k, _ in curve)
            ax.plot([k for k, _ in curve], [v for _, v in curve], marker="o", label=run["run"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
        ax.set_ylim(-2, 102)  # a fixed 0-100 % scale keeps panels and runs comparable
        ax.set_xlabel("k (samples)")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(display_name(bench))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Unbiased pass@k")
    fig.tight_layout()
    return _save(fig, out_png)


def token_counts_by_run(runs: Sequence[dict]) -> dict[str, dict[str, list[int]]]:
    """Per run and benchmark, the token count of every sample (read from the per-problem JSONL)."""
    counts: dict[str, dict[str, list[int]]] = {}
    for run in runs:
        for bench, summary in run["benchmarks"].items():
            records_file = Path(summary["summary_dir"]) / summary["records_file"]
            with open(records_file, encoding="utf-8") as handle:
                tokens = [t for line in handle if line.strip() for t in json.loads(line)["num_tokens"]]
            counts.setdefault(run["run"], {})[bench] = tokens
    return counts


def plot_length_histograms(counts: dict[str, dict[str, list[int]]], out_png: str | Path, bins: int = 30) -> Path:
    """Response-length histograms (tokens), runs overlaid, one panel per benchmark."""
    benchmarks = sorted({b for per_run in counts.values() for b in per_run}, key=_benchmark_key)
    fig, axes = _panels(len(benchmarks))
    for ax, bench in zip(axes, benchmarks):
        series = {run: per_run[bench] for run, per_run in counts.items() if per_run.get(bench)}
        upper = max(max(v) for v in series.values()) if series else 1
        edges = [upper * i / bins for i in range(bins + 1)] if upper > 0 else [0, 1]
        for run, values in series.items():
            ax.hist(values, bins=edges, alpha=0.5, label=f"{run} (mean {sum(values) / len(values):.0f})")
        ax.set_xlabel("response tokens")
        ax.set_ylabel("samples")
        ax.set_title(display_name(bench))
        ax.legend(fontsize=8)
    fig.suptitle("Response length")
    fig.tight_layout()
    return _save(fig, out_png)


def plot_diversity(runs: Sequence[dict], out_png: str | Path) -> Path:
    """Grouped bars of the diversity metrics per benchmark and run (higher = more diverse)."""
    benchmarks = _benchmarks(runs)
    fig, axes = _panels(len(benchmarks), width=5.0)
    width = 0.8 / max(len(runs), 1)
    for ax, bench in zip(axes, benchmarks):
        for i, run in enumerate(runs):
            summary = run["benchmarks"].get(bench)
            if summary is None:
                continue
            values = [summary["metrics"].get(key) for key, _ in DIVERSITY_BARS]
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(DIVERSITY_BARS))]
            # an undefined metric (None) is left out (NaN bar), never drawn as 0
            ax.bar(xs, [math.nan if v is None else v for v in values], width=width, label=run["run"])
        ax.set_xticks(range(len(DIVERSITY_BARS)))
        ax.set_xticklabels([label for _, label in DIVERSITY_BARS], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(display_name(bench))
        ax.legend(fontsize=8)
    fig.suptitle("Diversity among samples (higher = more diverse)")
    fig.tight_layout()
    return _save(fig, out_png)


def write_all_plots(runs: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """All three figures into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_pass_at_k(runs, out / "pass_at_k.png"),
        plot_length_histograms(token_counts_by_run(runs), out / "lengths.png"),
        plot_diversity(runs, out / "diversity.png"),
    ]


def _save(fig, out_png: str | Path) -> Path:
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
