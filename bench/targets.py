"""The four target lines at the top of BENCHMARKS.md, recomputed from the committed raw points.

    python -m bench.targets                      # from benchmarks/rollout/points.jsonl + benchmarks/trainer/runs.jsonl
    python -m bench.targets --rollout DIR --trainer DIR

The rollout lines come from ``bench.rollout_bench`` points (M = 2, K = 3, L = 128, the code's
detokenization, CVAE latent) at 32 and 4 prompts per batch; the training-step line from
``bench.trainer_breakdown --arms grpo iib_lpo ...`` runs (``timing_s/step``, steps after the first).
Each line is the median; the table under them gives min-max, the number of alternating repeats and
the machine load. A value that was not measured prints as "not measured", never as a number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.rollout_bench import DEFAULT, Point, load_results
from bench.trainer_breakdown import load_runs, step_ratios

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks"
SMALL_BATCH = Point(k=DEFAULT.k, length=DEFAULT.length, prompts=4)


def _cell(stat: dict | None, digits: int = 2) -> tuple[str, str]:
    if stat is None:
        return "not measured", "-"
    return f"{stat['median']:.{digits}f}", f"{stat['min']:.{digits}f}-{stat['max']:.{digits}f}"


def target_lines(rollout_points: dict[str, dict], trainer_runs: list[dict]) -> tuple[list[str], list[str]]:
    """(the four lines, a markdown table with their spread, repeats and load)."""
    big, small = rollout_points.get(DEFAULT.key), rollout_points.get(SMALL_BATCH.key)
    step = step_ratios(trainer_runs).get("iib_lpo", {}).get("timing_s/step")
    rows = [("rollout wall-time ratio at 32 prompts", big and big["summary"]["wall_ratio"], big, 2, "<= 1.00"),
            ("rollout wall-time ratio at 4 prompts", small and small["summary"]["wall_ratio"], small, 2, "<= 1.10"),
            ("generated-token ratio", big and big["summary"]["token_ratio"], big, 3, "<= 0.65"),
            ("training-step ratio", step, None, 2, "<= 1.00")]
    lines, table = [], ["| line | median | min-max | repeats | load1 | target |", "|---|---|---|---|---|---|"]
    trainer_loads = [x for run in trainer_runs for x in (run["load_before"][0], run["load_after"][0])]
    for name, stat, point, digits, target in rows:
        median, spread = _cell(stat, digits)
        lines.append(f"{name}: {median}")
        if point is not None:
            load = point["summary"]["load1"]
            load_cell = f"{load['median']:.1f} ({load['min']:.1f}-{load['max']:.1f})"
        elif stat is not None and trainer_loads:
            load_cell = f"{min(trainer_loads):.1f}-{max(trainer_loads):.1f}"
        else:
            load_cell = "-"
        table.append(f"| {name} | {median} | {spread} | {stat['n'] if stat else '-'} | {load_cell} | {target} |")
    return lines, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollout", type=Path, default=RESULTS / "rollout", help="folder with points.jsonl")
    parser.add_argument("--trainer", type=Path, default=RESULTS / "trainer", help="folder with runs.jsonl")
    args = parser.parse_args(argv)
    points = {rec["point"]["key"]: rec for rec in load_results(args.rollout)}
    lines, table = target_lines(points, load_runs(args.trainer))
    print("\n".join(lines + [""] + table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
