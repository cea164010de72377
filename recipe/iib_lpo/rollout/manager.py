"""The driver side of the branching rollout: verl's agent-loop manager and the loop's registration file.

``IibLpoAgentLoopManagerTQ`` (select with ``actor_rollout_ref.rollout.agent.agent_loop_manager_class=
recipe.iib_lpo.rollout.manager.IibLpoAgentLoopManagerTQ``) checks rollout.n against the branching
layout at start-up and sends validation batches to ``iib_lpo.agent_loop.validation_agent_loop``
(an agent loop cannot tell validation from training: verl drops the flag before calling it). It
is defined lazily, on first access: verl's V1 TransferQueue module needs the transfer_queue
package, which users of ``agent_loop_config_path()`` (and the V0 rollout path) do not.
``agent_loop_config_path()`` is the absolute path of ``config/agent_loop.yaml``, which registers
``rollout.agent_loop.BranchingAgentLoop`` in every worker
(``actor_rollout_ref.rollout.agent.agent_loop_config_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recipe.iib_lpo.rollout.config import BranchingRolloutConfig
from recipe.iib_lpo.rollout.layout import check_group_layout


def agent_loop_config_path() -> str:
    """Absolute path of config/agent_loop.yaml, which registers the branching agent loop in every worker."""
    return str(Path(__file__).resolve().parents[1] / "config" / "agent_loop.yaml")


def _make_manager_class():
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ

    class IibLpoAgentLoopManagerTQ(AgentLoopManagerTQ):
        """verl's AgentLoopManagerTQ that (1) checks rollout.n against the branching layout at
        start-up and (2) routes validation batches to ``iib_lpo.agent_loop.validation_agent_loop``
        (validation groups have ``val_kwargs.n`` sessions and must not be branched).

        Select with ``actor_rollout_ref.rollout.agent.agent_loop_manager_class=
        recipe.iib_lpo.rollout.manager.IibLpoAgentLoopManagerTQ``.
        """

        def __init__(self, config, *args, **kwargs):
            self.iib = BranchingRolloutConfig.from_trainer_config(config)
            check_group_layout(int(config.actor_rollout_ref.rollout.n), self.iib.num_initial, self.iib.num_branches,
                               self.iib.rounds)
            super().__init__(config, *args, **kwargs)

        def generate_sequences(self, prompts):
            from tensordict import NonTensorData

            if "validate" in prompts.keys() and bool(prompts["validate"]) and "agent_name" not in prompts.keys():
                prompts["agent_name"] = NonTensorData(self.iib.validation_agent_loop)
            return super().generate_sequences(prompts)

    IibLpoAgentLoopManagerTQ.__module__ = __name__
    IibLpoAgentLoopManagerTQ.__qualname__ = "IibLpoAgentLoopManagerTQ"
    return IibLpoAgentLoopManagerTQ


def __getattr__(name: str) -> Any:
    # Defined lazily: importing verl's V1 TransferQueue module needs the transfer_queue package,
    # which tier-0 users of this module (and the V0 rollout path) do not.
    if name == "IibLpoAgentLoopManagerTQ":
        cls = _make_manager_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
