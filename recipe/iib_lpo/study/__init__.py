"""The study (issue 23): GRPO, DAPO, I2B-LPO and its ablations on the CPU demo task, several seeds each,
compared problem by problem on the held-out split. ``python -m recipe.iib_lpo.study``; README "The study"."""
