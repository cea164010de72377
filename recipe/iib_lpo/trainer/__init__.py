"""verl glue of the training step (METHOD.md steps 5-8): the trainer subclass (ppo_trainer),
its per-step metrics (step_metrics), start-up refusals (startup_checks), the policy loss with
the optional IB term (loss), and the command that runs it on CPU (cpu_run)."""
