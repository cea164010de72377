"""Markdown tables in the paper's layout, merged from any number of runs' summary JSONs.

Main table (docs/PAPER_RESULTS.md): one row per run, per benchmark ``P@1 | P@k | #Tok`` with
P@1 = mean accuracy over samples, P@k the unbiased pass@k at the largest k every listed run has
for that benchmark (the paper: k = 256 on AIME, 16 on MATH-500 / OlympiadBench), values in %.
Diversity table: Pass@1, Distinct-1, Distinct-4, Self-BLEU and Self-ROUGE-L as diversity
(1 - similarity), 4-gram repetition rate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Benchmark column order and display names (paper order first; others follow alphabetically).
BENCHMARK_DISPLAY: tuple[tuple[str, str], ...] = (
    ("aime25", "AIME25"),
    ("aime24", "AIME24"),
    ("math500", "MATH500"),
    ("olympiad", "Olympiad"),
    ("amc", "AMC23"),
)


def _benchmark_key(name: str) -> tuple[int, str]:
    squashed = name.lower().replace("-", "").replace("_", "")
    for rank, (pattern, _) in enumerate(BENCHMARK_DISPLAY):
        if pattern in squashed:
            return rank, name
    return len(BENCHMARK_DISPLAY), name


def display_name(name: str) -> str:
    squashed = name.lower().replace("-", "").replace("_", "")
    for pattern, shown in BENCHMARK_DISPLAY:
        if pattern == squashed:
            return shown
    return name


def load_run_summaries(paths: Sequence[str | Path]) -> list[dict]:
    """Run summaries from paths that are run folders, ``summary.json`` files, folders holding run
    folders (an eval ``--out``), or single ``<benchmark>.summary.json`` files."""
    runs: dict[str, dict] = {}

    def add_benchmark(summary: dict, folder: Path) -> None:
        # where the per-problem JSONL lives (for the length histograms)
        summary = {**summary, "summary_dir": str(folder)}
        run = runs.setdefault(summary["run"], {"run": summary["run"], "model_path": summary.get("model_path"), "benchmarks": {}})
        run["benchmarks"][summary["benchmark"]] = summary

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(path.glob("*.summary.json")) or sorted(path.glob("*/*.summary.json"))
            if not files:
                raise FileNotFoundError(f"{path}: no *.summary.json found (is it an eval output folder?)")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path} does not exist")
        for file in files:
            payload = json.loads(file.read_text(encoding="utf-8"))
            if "benchmarks" in payload:  # a run-level summary.json
                for summary in payload["benchmarks"].values():
                    add_benchmark(summary, file.parent)
            elif "benchmark" in payload and "metrics" in payload:
                add_benchmark(payload, file.parent)
            else:
                raise ValueError(f"{file}: not an eval summary")
    return list(runs.values())


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def common_k(runs: Sequence[dict], benchmark: str) -> int | None:
    """The largest k whose pass@k every run that has ``benchmark`` reports."""
    sets = [set(map(int, r["benchmarks"][benchmark]["metrics"]["pass_at_k"])) for r in runs if benchmark in r["benchmarks"]]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def main_table(runs: Sequence[dict]) -> str:
    """The paper's main-table layout: Run | <bench> P@1 | P@k | #Tok | ..."""
    benchmarks = sorted({b for r in runs for b in r["benchmarks"]}, key=_benchmark_key)
    ks = {b: common_k(runs, b) for b in benchmarks}
    header = ["Run"]
    for b in benchmarks:
        header += [f"{display_name(b)} P@1", f"P@{ks[b]}", "#Tok"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run["run"]]
        for b in benchmarks:
            summary = run["benchmarks"].get(b)
            if summary is None:
                cells += ["-", "-", "-"]
                continue
            m = summary["metrics"]
            cells += [_pct(m["p_at_1"]), _pct(m["pass_at_k"][str(ks[b])]), f"{m['mean_tokens']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diversity_table(runs: Sequence[dict]) -> str:
    """Diversity per run and benchmark; Self-BLEU / Self-ROUGE-L shown as 1 - similarity."""
    header = [
        "Run",
        "Benchmark",
        "Pass@1",
        "Distinct-1",
        "Distinct-4",
        "Self-BLEU (1-sim)",
        "Self-ROUGE-L (1-sim)",
        "Rep-4",
        "maj@n",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        for b in sorted(run["benchmarks"], key=_benchmark_key):
            m = run["benchmarks"][b]["metrics"]
            lines.append(
                "| "
                + " | ".join(
                    [
                        run["run"],
                        display_name(b),
                        _pct(m["p_at_1"]),
                        _num(m.get("distinct_1")),
                        _num(m.get("distinct_4")),
                        _num(m.get("self_bleu_diversity")),
                        _num(m.get("self_rouge_l_diversity")),
                        _num(m.get("rep4")),
                        _pct(m.get("maj_at_n")),
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def protocol_lines(runs: Sequence[dict]) -> list[str]:
    """One line per (run, benchmark): the settings behind the numbers."""
    out = []
    for run in runs:
        for b in sorted(run["benchmarks"], key=_benchmark_key):
            s = run["benchmarks"][b]
            m, sp = s["metrics"], s["fingerprint"]["sampling"]
            out.append(
                f"- {run['run']} / {display_name(b)}: {m['num_problems']} problems, n={m['n']}, "
                f"T={sp['temperature']}, top-p={sp['top_p']}, max_tokens={sp['max_tokens']}, seed={sp['seed']}; "
                f"truncated {100 * m['truncated_fraction']:.1f}%, no parseable answer {100 * m['unparseable_fraction']:.1f}%"
                + (f"; undefined (excluded): {m['undefined_counts']}" if m.get("undefined_counts") else "")
            )
    return out


def render_report(runs: Sequence[dict]) -> str:
    """The full markdown report: main table, diversity table, protocol and notes."""
    if not runs:
        raise ValueError("no runs to report")
    notes = {s.get("diversity_note") for r in runs for s in r["benchmarks"].values() if s.get("diversity_note")}
    parts = [
        "# Evaluation results",
        "",
        "P@1 = mean accuracy over the n samples of each problem; P@k = unbiased pass@k (Chen et al. 2021); "
        "#Tok = mean response tokens. Values in %.",
        "",
        main_table(runs),
        "",
        "## Diversity",
        "",
        "Higher is better in every diversity column: Self-BLEU and Self-ROUGE-L are shown as diversity "
        "(1 - similarity). Rep-4 (fraction of repeated word 4-grams in a response) is lower = less looping.",
        "",
        diversity_table(runs),
        "",
        "## Protocol",
        "",
        *protocol_lines(runs),
    ]
    if notes:
        parts += ["", *sorted(notes)]
    return "\n".join(parts) + "\n"


def write_report(runs: Sequence[dict], out_dir: str | Path) -> Path:
    """Write ``results.md`` and ``results.json`` (the merged summaries) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(list(runs), indent=2, sort_keys=True), encoding="utf-8")
    path = out / "results.md"
    path.write_text(render_report(runs), encoding="utf-8")
    return path
