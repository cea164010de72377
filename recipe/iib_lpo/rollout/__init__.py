"""The branching rollout as a verl agent loop (METHOD.md steps 1-4 and the in-rollout rounds).

Parts (import the module you need; nothing is re-exported here):

- ``layout``: the sessions of a prompt's group (M initial + K branches x R rounds) and a branch's trajectory.
- ``seeds``: the per-session seeds from the row, the step and the session.
- ``config``: ``BranchingRolloutConfig``, the rollout's part of the ``iib_lpo`` config group.
- ``rounds``: fork sources, the per-prompt registry and the between-round selection.
- ``in_loop_reward``: r_v of a ranked round's branch, with verl's reward function.
- ``server_output``: the server's top-k log-probs and the per-token entropies from them.
- ``extra_fields``: the per-trajectory ``extra_fields`` the trainer reads.
- ``agent_loop``: ``BranchingAgentLoop`` (verl ``AgentLoopBase``), the session's steps.
- ``manager``: ``IibLpoAgentLoopManagerTQ`` (driver side) and ``agent_loop_config_path()``.

See docs/ARCHITECTURE.md for the design and what crosses into the trainer.
"""
