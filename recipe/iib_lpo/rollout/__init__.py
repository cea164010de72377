"""The branching rollout as a verl agent loop (METHOD.md steps 1-4 and the in-rollout rounds).
See docs/ARCHITECTURE.md for the parts and what crosses into the trainer."""
