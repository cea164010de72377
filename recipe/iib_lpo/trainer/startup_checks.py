"""One check of a run's config before anything starts (no Ray, no GPU, no model load).

``check_iib_lpo_config(config)`` raises ``RecipeConfigError`` listing every problem, each naming
the key and the fix, so a bad run fails at start-up instead of at step 1. ``main.prepare_config``
calls it before anything starts, and so does ``DRY_RUN=1`` of every launch script (with
``check_files=False``: the config alone), so a config can be validated on a laptop.

For every run through the entry point (the baselines too): :func:`entry_point_problems` (verl's
V1 synchronous trainer is the only one the entry point runs) and :func:`recipe_path_problems`
(paths written for the recipe's old flat layout). With ``algorithm.adv_estimator=iib_lpo`` also:
the group layout, the rollout / agent loop selections, ``algorithm.use_kl_in_reward`` (refused),
the IB estimator, every check the branching rollout's own parser makes
(``rollout.config.BranchingRolloutConfig.from_trainer_config``: unknown ``latent`` /
``agent_loop`` keys, ``entropy.source``, ``latent.mode``, ``parent_wait_timeout_s``, rounds), the
rounds' estimator / top_n, the recipe's dataclasses, the reward style and the latent's pieces.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from omegaconf import OmegaConf

from recipe.iib_lpo.algorithm.advantage import ADV_ESTIMATOR_NAME, AdvantageConfig
from recipe.iib_lpo.algorithm.alpha_schedule import LatentSchedule
from recipe.iib_lpo.algorithm.branching import BranchingConfig
from recipe.iib_lpo.algorithm.entropy import EntropyConfig
from recipe.iib_lpo.algorithm.ib import IBConfig, list_ib_estimators
from recipe.iib_lpo.algorithm.ib_step import rounds_problems
from recipe.iib_lpo.algorithm.loss_terms import LossTermsConfig
from recipe.iib_lpo.latent.service import LatentServiceConfig
from recipe.iib_lpo.rollout.layout import AGENT_NAME as AGENT_LOOP_NAME
from verl_patches import cpu_platform
from verl_patches.rollout_server import ROLLOUT_NAME

MANAGER_CLASS = "recipe.iib_lpo.rollout.manager.IibLpoAgentLoopManagerTQ"


def estimator_problems(estimator: str) -> list[str]:
    """Why the trainer cannot score with IB estimator ``estimator`` (empty when it can): every
    registered estimator trains, so only an unknown name is refused."""
    if estimator not in list_ib_estimators():
        return [f"iib_lpo.ib.estimator={estimator!r} is unknown; registered: {list_ib_estimators()}"]
    return []


# the trainer mode the recipe's entry point implements: IibLpoTrainer is verl's PPOTrainerSync
SYNC_TRAINER_MODE = "sync"


def entry_point_problems(config: Any) -> list[str]:
    """What ``python -m recipe.iib_lpo.main`` cannot run, for every algorithm: it always runs verl's V1
    synchronous trainer (``trainer.use_v1=True``, ``trainer.v1.trainer_mode=sync``), whatever those
    keys say, so any other value is refused instead of ignored."""
    trainer = config.trainer
    problems = []
    if not trainer.get("use_v1", True):
        problems.append("trainer.use_v1=False: the recipe's entry point runs verl's V1 trainer only; set "
                        "trainer.use_v1=True (or run verl's own python -m verl.trainer.main_ppo for the legacy trainer)")
    mode = (trainer.get("v1") or {}).get("trainer_mode", SYNC_TRAINER_MODE)
    if mode != SYNC_TRAINER_MODE:
        problems.append(f"trainer.v1.trainer_mode={mode!r}: the recipe's entry point runs verl's synchronous "
                        f"V1 trainer only (its trainer is PPOTrainerSync + the I2B-LPO step); set "
                        f"trainer.v1.trainer_mode={SYNC_TRAINER_MODE}")
    return problems


def rollout_parser_problem(config: Any) -> str | None:
    """The first problem the branching rollout's parser (``BranchingRolloutConfig.from_trainer_config``,
    run again in every agent-loop worker) finds, or None: the same words the workers would raise."""
    from recipe.iib_lpo.rollout.config import BranchingRolloutConfig

    try:
        BranchingRolloutConfig.from_trainer_config(config)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def recipe_path_problems(config: Any) -> list[str]:
    """Dotted paths into this recipe (the agent-loop manager class, the reward function's module)
    that do not exist: an override written for an older layout names the module it moved from."""
    agent = config.actor_rollout_ref.rollout.agent
    reward = config.get("reward", {}).get("custom_reward_function") or {}
    manager, reward_path = agent.get("agent_loop_manager_class"), reward.get("path")
    paths = []
    if isinstance(manager, str) and manager.startswith("recipe.iib_lpo."):
        paths.append(("actor_rollout_ref.rollout.agent.agent_loop_manager_class", manager, manager.rsplit(".", 1)[0],
                      MANAGER_CLASS))
    if isinstance(reward_path, str) and reward_path.startswith("pkg://recipe.iib_lpo."):
        paths.append(("reward.custom_reward_function.path", reward_path, reward_path[len("pkg://"):],
                      "pkg://recipe.iib_lpo.reward"))
    problems = []
    for key, value, module, current in paths:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            problems.append(f"{key}={value!r}: no module {module!r} in this recipe (docs/ARCHITECTURE.md lists where "
                            f"each module went); the recipe's own is {current!r}")
    return problems


class RecipeConfigError(ValueError):
    """The run's config cannot work; the message lists every problem with its fix."""


def _model_config(model_path: str) -> dict | None:
    path = os.path.join(str(model_path), "config.json")
    if not os.path.isfile(path):
        return None  # a hub id: checked when the model loads
    with open(path) as f:
        return json.load(f)


def check_iib_lpo_config(config: Any, check_files: bool = True) -> None:
    """Raise ``RecipeConfigError`` if the I2B-LPO pieces of ``config`` do not belong together.

    ``check_files=False`` (``DRY_RUN=1``) skips what needs the run's files (the CVAE checkpoint,
    the model's config.json) and checks the config alone.
    """
    problems = entry_point_problems(config) + recipe_path_problems(config)
    if config.algorithm.adv_estimator != ADV_ESTIMATOR_NAME:
        if problems:
            raise RecipeConfigError("config check failed:\n  - " + "\n  - ".join(problems))
        return
    iib = OmegaConf.to_container(config.iib_lpo, resolve=True)
    rollout = config.actor_rollout_ref.rollout
    m, k, rounds = iib["num_initial_rollouts"], iib["num_branches"], iib["ib"].get("rounds", 1)
    if rollout.n != m * (1 + k * rounds):
        n = m * (1 + k * rounds)
        per_round = "" if rounds == 1 else f" x iib_lpo.ib.rounds={rounds}"
        problems.append(
            f"actor_rollout_ref.rollout.n={rollout.n} but iib_lpo.num_initial_rollouts={m} x (1 + "
            f"iib_lpo.num_branches={k}{per_round}) = {n} sessions per prompt: set rollout.n={n}"
        )
    if rollout.name != ROLLOUT_NAME:
        problems.append(f"actor_rollout_ref.rollout.name={rollout.name!r}: I2B-LPO needs {ROLLOUT_NAME!r} "
                        "(top-k log-probs for entropies, the latent token)")
    if rollout.agent.default_agent_loop != AGENT_LOOP_NAME:
        problems.append(f"actor_rollout_ref.rollout.agent.default_agent_loop={rollout.agent.default_agent_loop!r}: "
                        f"I2B-LPO needs {AGENT_LOOP_NAME!r}")
    if config.algorithm.get("use_kl_in_reward", False):
        problems.append("algorithm.use_kl_in_reward=True: I2B-LPO scores and normalises the verifiable reward r_v "
                        "in [0, 1] (IB scores, z(r_v)); a KL penalty folded into the reward would change both. Set "
                        "algorithm.use_kl_in_reward=False")
    if not rollout.calculate_log_probs:
        problems.append("actor_rollout_ref.rollout.calculate_log_probs=False: branches carry their parent's rollout "
                        "log-probs and rollout correction needs them; set it to True")
    problems += estimator_problems(iib["ib"]["estimator"])
    if ((iib.get("agent_loop") or {}).get("sampling_seed") is not None and rollout.get("enable_chunked_prefill", True)
            and cpu_platform.requested()):
        # measured: the first prompt split across scheduler steps crashes the engine
        problems.append("iib_lpo.agent_loop.sampling_seed is set on the CPU platform with chunked prefill: vLLM-CPU "
                        "cannot split the prefill of a seeded request ('CPU Generator does not use offset'); set "
                        "actor_rollout_ref.rollout.enable_chunked_prefill=False")
    if isinstance(rounds, int) and rounds > 1:
        # the rollout ranks rounds 1..R-1 itself (ib_step.rounds_problems: the agent loop refuses the same)
        try:
            problems += rounds_problems(IBConfig(**iib["ib"]), k)
        except (TypeError, ValueError):
            pass  # reported below as an iib_lpo.ib problem
    latent = iib.get("latent") or {}
    groups = (("ib", IBConfig, iib["ib"]), ("advantage", AdvantageConfig, iib["advantage"]),
              ("loss_terms", LossTermsConfig, iib["loss_terms"]), ("branching", BranchingConfig, iib.get("branching")),
              ("entropy", lambda **kw: EntropyConfig(**{"source": "topk", **kw}), iib.get("entropy")),
              ("latent.schedule", LatentSchedule, latent.get("schedule")),
              ("latent.service", lambda **kw: LatentServiceConfig.from_dict(kw), latent.get("service")))
    for name, build, raw in groups:
        try:
            build(**dict(raw or {}))
        except (TypeError, ValueError) as err:
            problems.append(f"iib_lpo.{name}: {err}")
    parser_problem = rollout_parser_problem(config)
    if parser_problem is not None and not any(parser_problem in p for p in problems):  # not listed above already
        problems.append(f"{parser_problem} (refused by the branching rollout's config parser)")
    if iib["loss_terms"]["lambda_reg"] > 0 and not config.actor_rollout_ref.actor.calculate_entropy:
        problems.append("iib_lpo.loss_terms.lambda_reg > 0 needs the per-token entropy in the actor update: set "
                        "actor_rollout_ref.actor.calculate_entropy=True")
    reward_kwargs = dict(config.reward.get("custom_reward_function", {}).get("reward_kwargs", {}) or {})
    if reward_kwargs.get("reward_style", "binary") != "binary":
        problems.append(f"reward_style={reward_kwargs['reward_style']!r}: IB scores use r_v in [0, 1]; use the "
                        "binary reward style with I2B-LPO")
    problems += _latent_problems(config, iib, check_files)
    if problems:
        raise RecipeConfigError("I2B-LPO config check failed:\n  - " + "\n  - ".join(problems))


def _latent_problems(config: Any, iib: dict, check_files: bool) -> list[str]:
    latent = iib["latent"]
    custom = config.actor_rollout_ref.rollout.get("custom")
    custom = OmegaConf.to_container(custom, resolve=True) if OmegaConf.is_config(custom) else dict(custom or {})
    server = custom.get("iib_lpo") or {}
    problems = []
    if latent["mode"] == "none":
        return problems
    if not server.get("latent_injection"):
        problems.append("iib_lpo.latent.mode=cvae but actor_rollout_ref.rollout.custom.iib_lpo.latent_injection "
                        "is false: the engine would reject latent requests; set it true or use latent.mode=none")
    placeholder = latent.get("placeholder_token_id")
    if placeholder is None:
        problems.append("iib_lpo.latent.placeholder_token_id is not set: choose an unused embedding row of the "
                        "policy (Qwen2.5: 151665, Qwen3: 151669)")
    elif server.get("latent_placeholder_token_id") != placeholder:
        problems.append(f"iib_lpo.latent.placeholder_token_id={placeholder} but the server's "
                        f"rollout.custom.iib_lpo.latent_placeholder_token_id={server.get('latent_placeholder_token_id')}: "
                        "they must be the same id")
    model = _model_config(config.actor_rollout_ref.model.path) if check_files else None
    if model is not None and placeholder is not None and not 0 <= int(placeholder) < int(model["vocab_size"]):
        problems.append(f"iib_lpo.latent.placeholder_token_id={placeholder} is outside the policy's embedding "
                        f"table (vocab_size={model['vocab_size']})")
    checkpoint = latent["service"].get("checkpoint_path")
    if checkpoint is None:
        problems.append("iib_lpo.latent.service.checkpoint_path is not set: train the CVAE first "
                        "(python -m recipe.iib_lpo.train_cvae, run_scripts/run_cvae.sh) or use latent.mode=none")
    elif check_files and not os.path.exists(checkpoint):
        problems.append(f"iib_lpo.latent.service.checkpoint_path={checkpoint} does not exist")
    elif model is not None:
        from recipe.iib_lpo.latent.cvae import CVAECheckpointError, load_cvae_checkpoint

        try:  # the loader validates the file and compares the projector width with the policy's
            load_cvae_checkpoint(checkpoint, expected_policy_hidden_size=int(model["hidden_size"]))
        except CVAECheckpointError as err:
            problems.append(f"iib_lpo.latent.service.checkpoint_path: {err}")
    return problems
