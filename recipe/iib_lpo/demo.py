"""CPU end-to-end demo of the recipe (the README's main command, ``bash run_scripts/demo_cpu.sh``).

    python -m recipe.iib_lpo.demo [--algo iib_lpo|grpo|both] [--steps N] [--seed S] [--out DIR] [--smoke] [--fresh]

1. warm start: a tiny tokenizer + Qwen2 built offline, fine-tuned on the demo problems' step-by-step
   solutions until it solves part of the held-out problems (``demo_warmstart``);
2. the CVAE stage: ``python -m recipe.iib_lpo.train_cvae`` (prefix mode, tiny offline encoder);
3. I2B-LPO and 4. GRPO with verl's trainer, ``python -m recipe.iib_lpo.main +profile=cpu``
   (``cpu_run.run_cpu_training``), same warm start, prompts, steps, seed and trajectories per prompt;
5. evaluation of the three models with ``python -m recipe.iib_lpo.eval run`` on held-out problems,
   then ``<out>/report.md`` and ``<out>/plots/*.png`` (``demo_report``).

The stages live in ``demo_pipeline``; nothing is mocked. ``prepare_demo_data`` is the small helper
the tests and benchmarks use to get demo parquet files.
"""

from __future__ import annotations

import sys
from pathlib import Path


def prepare_demo_data(out_dir: Path, num_problems: int, seed: int) -> Path:
    from data_prep.prepare import main as prepare_main

    data_dir = out_dir / "data"
    rc = prepare_main(
        ["--dataset", "demo", "--out", str(data_dir), "--num-problems", str(num_problems), "--seed", str(seed),
         "--val-size", "0.25"]
    )
    if rc != 0:
        raise SystemExit(f"data preparation failed (exit code {rc})")
    return data_dir


def main(argv: list[str] | None = None) -> int:
    from recipe.iib_lpo.demo_pipeline import main as pipeline_main

    return pipeline_main(argv)


if __name__ == "__main__":
    sys.exit(main())
