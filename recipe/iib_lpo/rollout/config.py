"""``BranchingRolloutConfig``: the rollout's part of the recipe's top-level ``iib_lpo`` group.

``from_trainer_config(config)`` reads ``iib_lpo.{num_initial_rollouts, num_branches, branching,
entropy, latent, agent_loop, ib}`` (defaults: M=2, K=3, R=``ib.rounds``=1; the key list and
defaults are in docs/ARCHITECTURE.md), refuses unknown keys in ``latent`` (``LATENT_KEYS``) and
``agent_loop`` (``AGENT_LOOP_KEYS``) -- a stale ``latent.alpha`` block would otherwise be ignored --
and validates: ``entropy.source`` must be "topk", ``latent.mode`` one of ``LATENT_MODES`` (cvae
needs ``latent.placeholder_token_id``), ``parent_wait_timeout_s`` > 0, ``ib`` must pass
``ib_step.rounds_problems``, and ``branching.sibling_first_tokens=distinct`` needs latent mode none
and one round. ``latent_probability(global_steps)`` is p_inject of the latent
schedule at verl's 1-based step (0 with ``latent.mode=none``). Pure: no verl at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from recipe.iib_lpo.algorithm.alpha_schedule import LatentSchedule
from recipe.iib_lpo.algorithm.branching import BranchingConfig
from recipe.iib_lpo.algorithm.entropy import EntropyConfig
from recipe.iib_lpo.algorithm.ib import IBConfig
from recipe.iib_lpo.algorithm.ib_step import rounds_problems
from recipe.iib_lpo.latent.service import LatentServiceConfig
from recipe.iib_lpo.rollout.layout import group_size

LATENT_MODES = ("cvae", "none")
LATENT_KEYS = ("mode", "placeholder_token_id", "total_steps", "schedule", "service")
AGENT_LOOP_KEYS = ("parent_wait_timeout_s", "sampling_seed", "validation_agent_loop")


def _refuse_unknown_keys(group: str, raw: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(raw) - set(known))
    if not unknown:
        return
    hint = ""
    if group == "latent" and "alpha" in unknown:
        hint = (" (latent.alpha was replaced: latent.schedule.{kind,p_init,p_min,decay_rate} now schedule the "
                "probability that a branch gets a latent, latent.schedule.scale is the constant embedding scale)")
    raise ValueError(f"unknown key(s) {unknown} in iib_lpo.{group}; known: {list(known)}{hint}")


@dataclass(frozen=True)
class BranchingRolloutConfig:
    num_initial: int = 2
    num_branches: int = 3
    branching: BranchingConfig = field(default_factory=BranchingConfig)
    entropy: EntropyConfig = field(default_factory=lambda: EntropyConfig(source="topk", top_k=20))
    latent_mode: str = "none"  # the recipe's default (config/iib_lpo.yaml; README "The latent")
    placeholder_token_id: int | None = None
    schedule: LatentSchedule = field(default_factory=LatentSchedule)
    total_steps: int | None = None
    service: LatentServiceConfig = field(default_factory=LatentServiceConfig)
    parent_wait_timeout_s: float = 1800.0
    sampling_seed: int | None = None
    validation_agent_loop: str = "single_turn_agent"
    # iib_lpo.ib: rounds R, and (R > 1) the estimator and top_n the rollout ranks a round's branches with
    ib: IBConfig = field(default_factory=IBConfig)

    @property
    def rounds(self) -> int:
        return self.ib.rounds

    @property
    def group_size(self) -> int:
        return group_size(self.num_initial, self.num_branches, self.rounds)

    @classmethod
    def from_trainer_config(cls, config: Any) -> BranchingRolloutConfig:
        from omegaconf import OmegaConf

        raw = config.get("iib_lpo", None)
        raw = OmegaConf.to_container(raw, resolve=True) if raw is not None and not isinstance(raw, dict) else dict(raw or {})
        latent = dict(raw.get("latent") or {})
        agent = dict(raw.get("agent_loop") or {})
        _refuse_unknown_keys("latent", latent, LATENT_KEYS)
        _refuse_unknown_keys("agent_loop", agent, AGENT_LOOP_KEYS)
        entropy = dict(raw.get("entropy") or {})
        entropy.setdefault("source", "topk")
        ib = IBConfig(**dict(raw.get("ib") or {}))
        total_steps = latent.get("total_steps")
        if total_steps is None:
            total_steps = config.get("trainer", {}).get("total_training_steps", None)
        out = cls(
            num_initial=int(raw.get("num_initial_rollouts", 2)),
            num_branches=int(raw.get("num_branches", 3)),
            branching=BranchingConfig(**dict(raw.get("branching") or {})),
            entropy=EntropyConfig(**entropy),
            latent_mode=str(latent.get("mode", "none")),
            placeholder_token_id=latent.get("placeholder_token_id"),
            schedule=LatentSchedule(**dict(latent.get("schedule") or {})),
            total_steps=None if total_steps is None else int(total_steps),
            service=LatentServiceConfig.from_dict(latent.get("service")),
            parent_wait_timeout_s=float(agent.get("parent_wait_timeout_s", 1800.0)),
            sampling_seed=None if agent.get("sampling_seed") is None else int(agent["sampling_seed"]),
            validation_agent_loop=str(agent.get("validation_agent_loop", "single_turn_agent")),
            ib=ib,
        )
        out.validate()
        return out

    def validate(self) -> None:
        if self.entropy.source != "topk":
            raise ValueError(
                f"iib_lpo.entropy.source={self.entropy.source!r}: the branching rollout gets entropies from the "
                "rollout engine's top-k log-probs, so only 'topk' is supported here"
            )
        if self.latent_mode not in LATENT_MODES:
            raise ValueError(f"iib_lpo.latent.mode must be one of {LATENT_MODES}, got {self.latent_mode!r}")
        if self.latent_mode == "cvae" and self.placeholder_token_id is None:
            raise ValueError("iib_lpo.latent.mode=cvae needs iib_lpo.latent.placeholder_token_id")
        if not self.parent_wait_timeout_s > 0:
            raise ValueError(f"iib_lpo.agent_loop.parent_wait_timeout_s must be > 0, got {self.parent_wait_timeout_s}")
        for problem in rounds_problems(self.ib, self.num_branches):
            raise ValueError(problem)
        if self.branching.sibling_first_tokens == "distinct":
            # measured as its own arm, alone (README "The latent"); a ranked round would also need the
            # fork rows of its survivors, which the rollout does not request
            if self.latent_mode != "none":
                raise ValueError("iib_lpo.branching.sibling_first_tokens=distinct is a token-space alternative to the "
                                 "latent: set iib_lpo.latent.mode=none (or sibling_first_tokens=independent)")
            if self.rounds > 1:
                raise ValueError("iib_lpo.branching.sibling_first_tokens=distinct supports iib_lpo.ib.rounds=1 only, "
                                 f"got rounds={self.rounds}")

    def latent_probability(self, global_step: Any) -> float:
        """p_inject of the latent schedule at verl's (1-based) global step; 0 with latent.mode=none."""
        if self.latent_mode == "none":
            return 0.0
        if self.schedule.needs_total_steps and self.total_steps is None:
            raise ValueError(
                f"latent schedule kind {self.schedule.kind!r} needs the number of training steps: set "
                "iib_lpo.latent.total_steps or trainer.total_training_steps"
            )
        step = max(0, int(global_step) - 1) if global_step is not None else 0
        return self.schedule.p_inject(step, self.total_steps)
