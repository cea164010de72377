"""recipe/iib_lpo/config/iib_lpo.yaml documents every knob with its default. These tests keep it
honest: each group equals the defaults of the dataclass that consumes it (so the YAML can't drift
from the code), and the agent loop's parser accepts the file as a verl config group."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import recipe.iib_lpo as recipe_pkg
from recipe.iib_lpo.algorithm.advantage import AdvantageConfig
from recipe.iib_lpo.rollout import config as rollout_config
from recipe.iib_lpo.rollout.config import BranchingRolloutConfig
from recipe.iib_lpo.algorithm.alpha_schedule import LatentSchedule
from recipe.iib_lpo.algorithm.branching import BranchingConfig
from recipe.iib_lpo.algorithm.ib import IBConfig
from recipe.iib_lpo.latent.service import LatentServiceConfig
from recipe.iib_lpo.algorithm.loss_terms import LossTermsConfig

YAML_PATH = Path(recipe_pkg.__file__).parent / "config" / "iib_lpo.yaml"


@pytest.fixture(scope="module")
def group() -> dict:
    return OmegaConf.to_container(OmegaConf.load(YAML_PATH), resolve=True)["iib_lpo"]


def _defaults(dataclass_obj) -> dict:
    return {f.name: getattr(dataclass_obj, f.name) for f in dataclasses.fields(dataclass_obj)}


@pytest.mark.parametrize(
    "path, expected",
    [
        (("branching",), BranchingConfig()),
        (("latent", "schedule"), LatentSchedule()),
        (("latent", "service"), LatentServiceConfig()),
        (("ib",), IBConfig()),
        (("advantage",), AdvantageConfig()),
        (("loss_terms",), LossTermsConfig()),
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else "",
)
def test_yaml_group_equals_dataclass_defaults(group, path, expected):
    node = group
    for key in path:
        node = node[key]
    assert node == _defaults(expected)


def test_layout_and_agent_loop_values_equal_rollout_defaults(group):
    defaults = BranchingRolloutConfig()
    # entropies always come from the engine's top-k log-probs: the YAML offers k, not a source
    assert group["entropy"] == {"top_k": defaults.entropy.top_k} and defaults.entropy.source == "topk"
    assert group["num_initial_rollouts"] == defaults.num_initial
    assert group["num_branches"] == defaults.num_branches
    assert group["latent"]["mode"] == defaults.latent_mode
    assert group["latent"]["placeholder_token_id"] == defaults.placeholder_token_id
    assert group["latent"]["total_steps"] == defaults.total_steps
    # every latent / agent_loop key the YAML documents is one the parser accepts, and vice versa
    assert set(group["latent"]) == set(rollout_config.LATENT_KEYS)
    assert set(group["agent_loop"]) == set(rollout_config.AGENT_LOOP_KEYS)
    assert group["agent_loop"] == {
        "parent_wait_timeout_s": defaults.parent_wait_timeout_s,
        "sampling_seed": defaults.sampling_seed,
        "validation_agent_loop": defaults.validation_agent_loop,
    }


def test_agent_loop_parses_the_yaml_as_a_trainer_config_group():
    config = OmegaConf.merge(
        OmegaConf.load(YAML_PATH),
        {"iib_lpo": {"latent": {"mode": "cvae", "placeholder_token_id": 151665}}, "trainer": {"total_training_steps": 100}},
    )
    parsed = BranchingRolloutConfig.from_trainer_config(config)
    assert (parsed.num_initial, parsed.num_branches, parsed.placeholder_token_id) == (2, 3, 151665)
    assert parsed.schedule == LatentSchedule() and parsed.branching == BranchingConfig()
    assert parsed.total_steps == 100
    # cosine schedule from 1.0 to 0.1 over 100 steps: p_inject at verl's global step 51 (step 50) = 0.55.
    assert parsed.latent_probability(51) == pytest.approx(0.1 + 0.9 * 0.5)
    assert parsed.latent_probability(1) == 1.0 and parsed.schedule.scale == 1.0


def test_a_stale_alpha_block_or_unknown_key_is_refused_not_ignored():
    base = {"trainer": {"total_training_steps": 10}}
    stale = {"iib_lpo": {"latent": {"placeholder_token_id": 3, "alpha": {"schedule": "cosine"}}}}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['alpha'\] in iib_lpo.latent.*latent.schedule.scale"):
        BranchingRolloutConfig.from_trainer_config(OmegaConf.merge(OmegaConf.load(YAML_PATH), stale, base))
    typo = {"iib_lpo": {"latent": {"placeholder_token_id": 3}, "agent_loop": {"sampling_sed": 1}}}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sampling_sed'\] in iib_lpo.agent_loop"):
        BranchingRolloutConfig.from_trainer_config(OmegaConf.merge(OmegaConf.load(YAML_PATH), typo, base))


def test_the_yaml_fails_loudly_without_a_placeholder_for_cvae_latents():
    config = OmegaConf.merge(OmegaConf.load(YAML_PATH), {"iib_lpo": {"latent": {"mode": "cvae"}},
                                                         "trainer": {"total_training_steps": 10}})
    with pytest.raises(ValueError, match="placeholder_token_id"):
        BranchingRolloutConfig.from_trainer_config(config)


def test_iterative_rounds_parse_and_unrankable_estimators_are_refused():
    config = OmegaConf.merge(
        OmegaConf.load(YAML_PATH),
        {"iib_lpo": {"ib": {"rounds": 2}, "latent": {"placeholder_token_id": 3}}, "trainer": {"total_training_steps": 10}},
    )
    parsed = BranchingRolloutConfig.from_trainer_config(config)
    assert parsed.rounds == 2 and parsed.group_size == 2 * (1 + 3 * 2)
    ibro = OmegaConf.merge(config, {"iib_lpo": {"ib": {"estimator": "ibro"}}})
    with pytest.raises(ValueError, match=r"rounds=2 with iib_lpo.ib.estimator='ibro'"):
        BranchingRolloutConfig.from_trainer_config(ibro)
