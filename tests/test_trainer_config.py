"""The trainer entry config composes, its derived settings are filled, and bad configs fail at start-up.

No Ray: Hydra composes ``iib_lpo_trainer`` (verl's ppo_trainer + the recipe group) exactly as
``python -m recipe.iib_lpo.main`` does, then ``prepare_config`` runs the start-up check.
"""

import os
import subprocess
import sys

import pytest

from recipe.iib_lpo.trainer.startup_checks import RecipeConfigError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "recipe", "iib_lpo", "config")


def _compose(overrides=()):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(CONFIG_DIR), version_base=None):
        return compose(config_name="iib_lpo_trainer", overrides=list(overrides))


@pytest.fixture
def cvae_ckpt(tmp_path, tiny_qwen2_dir):
    import json

    import torch

    from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE, save_cvae_checkpoint

    hidden = json.loads((tiny_qwen2_dir / "config.json").read_text())["hidden_size"]
    torch.manual_seed(0)

    def make(policy_hidden):
        cvae = LatentCVAE(CVAEConfig(embed_dim=16, latent_dim=4, hidden_width=16, policy_hidden_size=policy_hidden,
                                     projector_hidden_width=16))
        return save_cvae_checkpoint(tmp_path / f"cvae_{policy_hidden}.pt", cvae, encoder_name="enc", mode="prefix")

    return make(hidden), make(hidden + 8)


def _good(tiny_qwen2_dir, ckpt):
    return [f"actor_rollout_ref.model.path={tiny_qwen2_dir}", "iib_lpo.latent.mode=cvae", "iib_lpo.latent.placeholder_token_id=3",
            f"iib_lpo.latent.service.checkpoint_path={ckpt}"]


def test_composes_with_recipe_selections_and_derives_server_knobs(tiny_qwen2_dir, cvae_ckpt):
    from recipe.iib_lpo.rollout.manager import agent_loop_config_path
    from recipe.iib_lpo.main import prepare_config

    config = _compose(_good(tiny_qwen2_dir, cvae_ckpt[0]))
    prepare_config(config)
    rollout = config.actor_rollout_ref.rollout
    assert config.algorithm.adv_estimator == "iib_lpo" and rollout.name == "iib_lpo_vllm"
    assert rollout.n == config.iib_lpo.num_initial_rollouts * (1 + config.iib_lpo.num_branches) == 8
    assert rollout.agent.agent_loop_config_path == agent_loop_config_path()
    assert dict(rollout.custom.iib_lpo) == {"latent_injection": True, "latent_placeholder_token_id": 3,
                                             "max_topk_logprobs": 20}
    assert config.algorithm.rollout_correction.rollout_is == "token"
    none = _compose(_good(tiny_qwen2_dir, cvae_ckpt[0]) + ["iib_lpo.latent.mode=none"])
    prepare_config(none)
    assert none.actor_rollout_ref.rollout.custom.iib_lpo.latent_injection is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["actor_rollout_ref.rollout.n=6"], r"rollout.n=6 .* = 8 sessions per prompt: set rollout.n=8"),
        (["actor_rollout_ref.rollout.name=vllm"], r"rollout.name='vllm': I2B-LPO needs 'iib_lpo_vllm'"),
        (["actor_rollout_ref.rollout.calculate_log_probs=false"], r"calculate_log_probs=False"),
        (["iib_lpo.ib.estimator=nope"], r"estimator='nope' is unknown"),
        (["iib_lpo.advantage.lambda_ib=-1"], r"iib_lpo.advantage: .*lambda_ib"),
        (["iib_lpo.loss_terms.lambda_reg=0.005"], r"calculate_entropy=True"),
        (["+reward.custom_reward_function.reward_kwargs.reward_style=signed"], r"reward_style='signed'"),
        (["iib_lpo.latent.placeholder_token_id=null"], r"placeholder_token_id is not set"),
        (["iib_lpo.latent.placeholder_token_id=100000"], r"outside the policy's embedding table \(vocab_size="),
        (["iib_lpo.latent.service.checkpoint_path=/nonexistent/cvae.pt"], r"does not exist"),
        # overrides written for the flat layout before the restructure name modules that moved
        (["actor_rollout_ref.rollout.agent.agent_loop_manager_class=recipe.iib_lpo.agent_loop.IibLpoAgentLoopManagerTQ"],
         r"no module 'recipe.iib_lpo.agent_loop' in this recipe .* the recipe's own is "
         r"'recipe.iib_lpo.rollout.manager.IibLpoAgentLoopManagerTQ'"),
        (["reward.custom_reward_function.path=pkg://recipe.iib_lpo.answer_checking"],
         r"reward.custom_reward_function.path='pkg://recipe.iib_lpo.answer_checking': no module"),
    ],
)
def test_bad_configs_fail_at_start_up_naming_the_key(tiny_qwen2_dir, cvae_ckpt, overrides, message):
    from recipe.iib_lpo.main import prepare_config

    config = _compose(_good(tiny_qwen2_dir, cvae_ckpt[0]) + overrides)
    with pytest.raises(RecipeConfigError, match=message):
        prepare_config(config)


# Every configuration the trainer or the rollout cannot run, and the key its refusal must name. Each
# is refused by the start-up check (main.prepare_config, DRY_RUN=1 too), not at step N by a worker.
REFUSED = [
    (["algorithm.use_kl_in_reward=True"], ["algorithm.use_kl_in_reward", "Set algorithm.use_kl_in_reward=False"]),
    (["+iib_lpo.entropy.source=logits"], ["iib_lpo.entropy.source='logits'", "only 'topk'"]),
    (["iib_lpo.entropy.top_k=0"], ["iib_lpo.entropy", "top_k"]),
    (["iib_lpo.ib.estimator=answer_likelihood"], ["iib_lpo.ib.estimator='answer_likelihood' is unknown"]),
    (["trainer.v1.trainer_mode=colocate_async"], ["trainer.v1.trainer_mode='colocate_async'",
                                                  "set trainer.v1.trainer_mode=sync"]),
    (["trainer.use_v1=false"], ["trainer.use_v1=False", "set trainer.use_v1=True"]),
    (["actor_rollout_ref.rollout.n=6"], ["actor_rollout_ref.rollout.n=6", "set rollout.n=8"]),
    # rounds: what the rollout's parser refuses (rollout/config.py) is refused here first
    (["iib_lpo.ib.rounds=2", "actor_rollout_ref.rollout.n=14", "iib_lpo.ib.estimator=ibro"],
     ["iib_lpo.ib.rounds=2 with iib_lpo.ib.estimator='ibro'"]),
    (["iib_lpo.ib.rounds=2", "actor_rollout_ref.rollout.n=14", "iib_lpo.ib.top_n=0"],
     ["iib_lpo.ib.rounds=2 with iib_lpo.ib.top_n=0"]),
    (["iib_lpo.ib.rounds=2", "iib_lpo.num_branches=0", "actor_rollout_ref.rollout.n=2"],
     ["iib_lpo.ib.rounds=2 with iib_lpo.num_branches=0"]),
    (["iib_lpo.ib.rounds=0"], ["iib_lpo.ib: IBConfig.rounds"]),
    # latent: the parser's checks
    (["iib_lpo.latent.mode=always"], ["iib_lpo.latent.mode must be one of"]),
    (["iib_lpo.latent.placeholder_token_id=null"], ["iib_lpo.latent.placeholder_token_id"]),
    (["+iib_lpo.latent.alpha=1.0"], ["in iib_lpo.latent", "'alpha'"]),
    (["+iib_lpo.latent.service.gpus=1"], ["iib_lpo.latent.service", "'gpus'"]),
    (["iib_lpo.latent.schedule.kind=step"], ["iib_lpo.latent.schedule"]),
    (["iib_lpo.latent.schedule.scale=0"], ["iib_lpo.latent.schedule", "scale"]),
    (["+iib_lpo.agent_loop.sampling_sed=1"], ["in iib_lpo.agent_loop", "'sampling_sed'"]),
    (["iib_lpo.agent_loop.parent_wait_timeout_s=0"], ["iib_lpo.agent_loop.parent_wait_timeout_s"]),
    (["iib_lpo.branching.rho=0"], ["iib_lpo.branching", "rho"]),
]


def test_every_refused_combination_is_refused_at_start_up_naming_its_key(tiny_qwen2_dir, cvae_ckpt):
    """Walks ``REFUSED``; the good config itself passes, so each refusal is the override's."""
    from recipe.iib_lpo.main import prepare_config
    from recipe.iib_lpo.rollout.config import BranchingRolloutConfig

    good = _good(tiny_qwen2_dir, cvae_ckpt[0])
    prepare_config(_compose(good))
    unrefused, unnamed = [], []
    for overrides, expected in REFUSED:
        config = _compose(good + overrides)
        try:
            prepare_config(config, check_files=False)  # what DRY_RUN=1 runs
        except RecipeConfigError as err:
            missing = [text for text in expected if text not in str(err)]
            if missing:
                unnamed.append((overrides, missing, str(err)))
            continue
        unrefused.append(overrides)
    assert unrefused == [] and unnamed == [], (unrefused, unnamed)
    # the rollout's own parser refuses none of the good config, so nothing is left for a worker to find
    BranchingRolloutConfig.from_trainer_config(_compose(good))


def test_kl_in_reward_is_fine_for_the_baselines(tiny_qwen2_dir):
    """The refusal is I2B-LPO's (r_v must stay the verifiable reward); GRPO keeps verl's KL-in-reward."""
    from recipe.iib_lpo.main import prepare_config

    prepare_config(_compose([f"actor_rollout_ref.model.path={tiny_qwen2_dir}", "algorithm.adv_estimator=grpo",
                             "actor_rollout_ref.rollout.name=vllm", "algorithm.use_kl_in_reward=True"]))
    with pytest.raises(RecipeConfigError, match=r"trainer.v1.trainer_mode='separate_async'"):
        prepare_config(_compose([f"actor_rollout_ref.model.path={tiny_qwen2_dir}", "algorithm.adv_estimator=grpo",
                                 "actor_rollout_ref.rollout.name=vllm", "trainer.v1.trainer_mode=separate_async"]))


def test_sampling_seed_on_cpu_needs_unchunked_prefill(tiny_qwen2_dir, cvae_ckpt, monkeypatch):
    """vLLM-CPU crashes on the first seeded request whose prefill is split ('CPU Generator does not use
    offset', measured with the demo's trainer), so the start-up check refuses the combination there."""
    from recipe.iib_lpo.main import prepare_config

    seeded = _good(tiny_qwen2_dir, cvae_ckpt[0]) + ["iib_lpo.agent_loop.sampling_seed=0"]
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    with pytest.raises(RecipeConfigError, match="enable_chunked_prefill=False"):
        prepare_config(_compose(seeded))
    prepare_config(_compose(seeded + ["actor_rollout_ref.rollout.enable_chunked_prefill=False"]))
    monkeypatch.delenv("VERL_PLATFORM")
    prepare_config(_compose(seeded))  # a GPU run keeps chunked prefill


def test_cvae_checkpoint_for_another_hidden_size_is_refused(tiny_qwen2_dir, cvae_ckpt):
    from recipe.iib_lpo.main import prepare_config

    with pytest.raises(RecipeConfigError, match="policy_hidden_size"):
        prepare_config(_compose(_good(tiny_qwen2_dir, cvae_ckpt[1])))


def test_baseline_estimator_skips_the_recipe_check(tiny_qwen2_dir):
    from recipe.iib_lpo.main import prepare_config

    config = _compose([f"actor_rollout_ref.model.path={tiny_qwen2_dir}", "algorithm.adv_estimator=grpo",
                       "actor_rollout_ref.rollout.name=vllm"])
    prepare_config(config)  # no CVAE, no placeholder: fine for GRPO
    # the baselines use the recipe's manager class too, so a moved path is refused for them as well
    stale = _compose([f"actor_rollout_ref.model.path={tiny_qwen2_dir}", "algorithm.adv_estimator=grpo",
                      "actor_rollout_ref.rollout.name=vllm",
                      "actor_rollout_ref.rollout.agent.agent_loop_manager_class="
                      "recipe.iib_lpo.agent_loop.IibLpoAgentLoopManagerTQ"])
    with pytest.raises(RecipeConfigError, match="no module 'recipe.iib_lpo.agent_loop'"):
        prepare_config(stale)


def test_dry_run_prints_the_resolved_config_without_ray(tmp_path):
    env = {**os.environ, "DRY_RUN": "1"}
    env.pop("VERL_PLATFORM", None)
    out = subprocess.run(
        [sys.executable, "-m", "recipe.iib_lpo.main", "iib_lpo.latent.placeholder_token_id=151665",
         "iib_lpo.latent.service.checkpoint_path=/not/yet/trained.pt"],
        capture_output=True, text=True, timeout=180, env=env, cwd=os.path.join(CONFIG_DIR, "..", "..", ".."),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import yaml

    printed = yaml.safe_load(out.stdout[out.stdout.index("actor_rollout_ref:"):])
    assert printed["algorithm"]["adv_estimator"] == "iib_lpo"
    assert printed["actor_rollout_ref"]["rollout"]["custom"]["iib_lpo"]["latent_placeholder_token_id"] == 151665
    assert printed["iib_lpo"]["num_branches"] == 3
