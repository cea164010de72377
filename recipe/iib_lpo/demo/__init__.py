"""The CPU end-to-end demo (``python -m recipe.iib_lpo.demo``, ``bash run_scripts/demo_cpu.sh``)
and its building blocks: tiny offline models (tiny_models), demo data (data), the warm start
(warmstart), the stages (pipeline), the report (report), and a diagnostic that runs at demo
scale (reference_learner)."""
