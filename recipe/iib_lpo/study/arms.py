"""The study's arms: what each one changes relative to the recipe's defaults, as Hydra overrides.

Every arm trains from the same warm start on the same prompts for the same steps with the same
number of trajectories per prompt, n = M x (1 + K x R); ``check_equal_budget`` refuses a set of arms
that breaks this. DAPO's dynamic sampling generates extra groups to fill its batch: the study counts
them (``generated_trajectories``) instead of hiding them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One arm. ``algorithm``: ``iib_lpo`` or verl's ``grpo`` estimator (DAPO is GRPO + DAPO's changes).
    ``num_branches`` K and ``rounds`` R fix n together with M (``num_initial``); for GRPO / DAPO they only
    set n. ``latent``: the I2B-LPO run injects the trained latent (latent.mode=cvae)."""

    name: str
    label: str
    algorithm: str
    change: str  # one line for the report: what this arm changes
    num_initial: int = 2
    num_branches: int = 4
    rounds: int = 1
    latent: bool = False
    overrides: tuple[str, ...] = ()

    @property
    def trajectories_per_prompt(self) -> int:
        return self.num_initial * (1 + self.num_branches * self.rounds)


def dapo_overrides(max_response_length: int, overlong_buffer_len: int, overlong_penalty: float = 1.0) -> list[str]:
    """DAPO's four changes in verl 0.9.1 keys: clip-higher, token-level loss, overlong reward shaping, dynamic
    sampling. The same keys and values as ``run_scripts/run_qwen7b_dapo.sh`` (tests/test_study.py compares them)."""
    if not 1 <= overlong_buffer_len <= max_response_length:
        raise ValueError(f"overlong_buffer_len {overlong_buffer_len} must be in [1, max_response_length "
                         f"{max_response_length}]")
    return [
        "actor_rollout_ref.actor.use_kl_loss=false",
        "actor_rollout_ref.actor.clip_ratio=0.2",
        "actor_rollout_ref.actor.clip_ratio_low=0.2",
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
        "actor_rollout_ref.actor.clip_ratio_c=10.0",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
        "reward.reward_manager.name=dapo",
        "+reward.reward_kwargs.overlong_buffer_cfg.enable=true",
        f"+reward.reward_kwargs.overlong_buffer_cfg.len={overlong_buffer_len}",
        f"+reward.reward_kwargs.overlong_buffer_cfg.penalty_factor={overlong_penalty}",
        "+reward.reward_kwargs.overlong_buffer_cfg.log=true",
        f"+reward.reward_kwargs.max_resp_len={max_response_length}",
        "algorithm.filter_groups.enable=true",
        "algorithm.filter_groups.metric=acc",
        "algorithm.filter_groups.max_num_gen_batches=0",
        "algorithm.filter_groups.max_inflight_gen_batches=1",
    ]


def study_arms(max_response_length: int, num_initial: int = 2, num_branches: int = 4) -> dict[str, Arm]:
    """The arms of issue 23, in report order. With M = 2 and K = 4 every arm has n = 10 trajectories per prompt;
    the R = 2 arm keeps n with K = 2 per round (as run_scripts/run_qwen7b_ablation_rounds.sh does on GPU).
    The recipe's default I2B-LPO forks and resamples without the latent (README "The latent"), so the
    paper's "no latent" ablation is the default arm itself and the latent is the arm that adds it."""
    if num_branches % 2:
        raise ValueError(f"num_branches must be even (the R = 2 arm uses K / 2 per round), got {num_branches}")
    # DAPO's overlong buffer: a quarter of the response, as the GPU script (1024 of 4096)
    buffer = max(1, max_response_length // 4)
    common = dict(num_initial=num_initial, num_branches=num_branches)
    arms = [
        Arm("grpo", "GRPO", "grpo", "verl's GRPO: group z-score advantage on all n samples", **common),
        Arm("dapo", "DAPO", "grpo", "GRPO + clip-higher 0.28, token-mean loss, overlong shaping, dynamic sampling",
            overrides=tuple(dapo_overrides(max_response_length, buffer)), **common),
        Arm("iib_lpo", "I2B-LPO", "iib_lpo", "the recipe's default: fork at high entropy, plain resample, IB filter "
            "(keep ceil(K/2) of K), IB reward lambda 0.5, R = 1", **common),
        Arm("iib_lpo_latent", "+ latent", "iib_lpo", "default + the trained CVAE latent injected at the fork "
            "(the paper's latent; the default has none)", latent=True, **common),
        Arm("no_ib_filter", "no IB filter", "iib_lpo", "default with N = K: every branch kept",
            overrides=(f"iib_lpo.ib.top_n={num_branches}",), **common),
        Arm("no_ib_reward", "no IB reward", "iib_lpo", "default with lambda_ib = 0: GRPO's advantage on the kept set",
            overrides=("iib_lpo.advantage.lambda_ib=0.0",), **common),
        Arm("rounds2", "R = 2", "iib_lpo", f"two IB rounds of K = {num_branches // 2} branches (same n)",
            num_initial=num_initial, num_branches=num_branches // 2, rounds=2),
    ]
    return {arm.name: arm for arm in arms}


def check_equal_budget(arms) -> int:
    """The common number of trajectories per prompt of ``arms``; ValueError naming the arms that differ."""
    counts = {arm.name: arm.trajectories_per_prompt for arm in arms}
    if len(set(counts.values())) > 1:
        raise ValueError(f"arms with different trajectories per prompt cannot be compared: {counts}")
    return next(iter(counts.values()))
