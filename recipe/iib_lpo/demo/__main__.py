"""CPU end-to-end demo of the recipe (the README's main command, ``bash run_scripts/demo_cpu.sh``).

    python -m recipe.iib_lpo.demo [--algo iib_lpo|grpo|both] [--steps N] [--seed S] [--out DIR] [--smoke] [--fresh]

1. warm start: a tiny tokenizer + Qwen2 built offline, fine-tuned on the demo problems' step-by-step
   solutions until it solves part of the held-out problems (``demo.warmstart``);
2. the CVAE stage: ``python -m recipe.iib_lpo.train_cvae`` (prefix mode, tiny offline encoder);
3. I2B-LPO and 4. GRPO with verl's trainer, ``python -m recipe.iib_lpo.main +profile=cpu``
   (``trainer.cpu_run.run_cpu_training``), same warm start, prompts, steps, seed and trajectories per prompt;
5. evaluation of the three models with ``python -m recipe.iib_lpo.eval run`` on held-out problems,
   then ``<out>/report.md`` and ``<out>/plots/*.png`` (``demo.report``).

The stages live in ``recipe.iib_lpo.demo.pipeline``; nothing is mocked.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from recipe.iib_lpo.demo.pipeline import main as pipeline_main

    return pipeline_main(argv)


if __name__ == "__main__":
    sys.exit(main())
