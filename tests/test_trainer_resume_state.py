"""Resume without Ray: which step folder ``trainer.resume_mode`` selects, what the recipe state holds,
when a resume is refused, and that the recipe state is written before verl's checkpoint files."""

import json
import os

import pytest

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "recipe", "iib_lpo", "config")


def _compose(overrides=()):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(CONFIG_DIR), version_base=None):
        return compose(config_name="iib_lpo_trainer", overrides=list(overrides))


def _complete_step(root, step, state):
    folder = root / f"global_step_{step}"
    (folder / "actor").mkdir(parents=True)
    (folder / "data.pt").write_bytes(b"")
    (folder / "iib_lpo_state.json").write_text(json.dumps(state))
    return folder


def test_resume_folder_follows_verls_resume_modes(tmp_path):
    from omegaconf import OmegaConf

    from recipe.iib_lpo.trainer.ppo_trainer import resume_folder

    _complete_step(tmp_path, 1, {})
    (tmp_path / "global_step_2").mkdir()  # a save cut off before verl wrote its tracker
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")

    def trainer(**kw):
        return OmegaConf.create({"default_local_dir": str(tmp_path), "resume_from_path": None, **kw})

    assert resume_folder(trainer(resume_mode="disable")) is None
    assert resume_folder(trainer(resume_mode="auto")) == str(tmp_path / "global_step_1")
    explicit = str(tmp_path / "global_step_2")
    assert resume_folder(trainer(resume_mode="resume_path", resume_from_path=explicit)) == explicit
    with pytest.raises(ValueError, match="must be a global_step_<N> folder"):
        resume_folder(trainer(resume_mode="resume_path", resume_from_path=str(tmp_path)))
    with pytest.raises(ValueError, match="resume_mode='latest'"):
        resume_folder(trainer(resume_mode="latest"))
    os.remove(tmp_path / "latest_checkpointed_iteration.txt")
    assert resume_folder(trainer(resume_mode="auto")) is None  # nothing saved yet: a fresh start


def test_recipe_state_holds_every_step_setting_and_a_difference_is_named(tmp_path):
    from recipe.iib_lpo.trainer.ppo_trainer import check_resume_folder, recipe_state

    base = recipe_state(_compose(), 2)
    assert {"latent_mode", "latent_schedule", "latent_total_steps", "sampling_seed", "rollout_seed", "branching",
            "ib", "advantage", "loss_terms", "rounds", "num_branches", "num_initial_rollouts",
            "entropy_top_k"} <= set(base)
    folder = _complete_step(tmp_path, 2, base)
    check_resume_folder(str(folder), base, base)  # same settings: resumes
    # each of these changes what a step does; each is refused by name
    changes = {
        "latent_schedule": "iib_lpo.latent.schedule.p_min=0.3",
        "latent_mode": "iib_lpo.latent.mode=cvae",
        "ib": "iib_lpo.ib.top_n=1",
        "branching": "iib_lpo.branching.rho=0.2",
        "advantage": "iib_lpo.advantage.lambda_ib=0.9",
        "sampling_seed": "iib_lpo.agent_loop.sampling_seed=5",
        "rollout_seed": "actor_rollout_ref.rollout.seed=3",
    }
    for field, override in changes.items():
        now = recipe_state(_compose([override]), 2)
        with pytest.raises(ValueError, match=rf"differ from the checkpoint's: {field} \(saved"):
            check_resume_folder(str(folder), base, now)


def test_incomplete_step_folder_is_refused_with_what_is_missing(tmp_path):
    from recipe.iib_lpo.trainer.ppo_trainer import check_resume_folder

    folder = _complete_step(tmp_path, 3, {"global_steps": 3})
    os.remove(folder / "data.pt")
    with pytest.raises(ValueError, match=r"incomplete \(missing \['data.pt'\]\)"):
        check_resume_folder(str(folder), {"global_steps": 3}, {"global_steps": 3})
    with pytest.raises(ValueError, match=r"missing \['data.pt', 'iib_lpo_state.json'\]"):
        check_resume_folder(str(folder), None, {"global_steps": 3})


def test_recipe_state_is_written_before_verls_checkpoint(tmp_path, monkeypatch):
    """verl writes its tracker file at the end of its save; the recipe state must already be there, so a
    save cut off anywhere in verl's part never leaves a tracked folder without it."""
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from recipe.iib_lpo.trainer.ppo_trainer import RECIPE_STATE_FILE, IibLpoTrainer

    config = _compose([f"trainer.default_local_dir={tmp_path}"])
    seen = []

    def verl_save(self):
        path = tmp_path / f"global_step_{self.global_steps}" / RECIPE_STATE_FILE
        seen.append(json.loads(path.read_text()) if path.exists() else None)

    monkeypatch.setattr(PPOTrainerSync, "_save_checkpoint", verl_save)
    trainer = IibLpoTrainer.__new__(IibLpoTrainer)
    trainer.config, trainer.global_steps = config, 4
    trainer._save_checkpoint()
    assert seen and seen[0] is not None and seen[0]["global_steps"] == 4
    assert not list(tmp_path.glob("**/*.tmp"))


def test_a_dead_actor_stops_the_run_naming_it_and_the_checkpoint_that_resumes(tmp_path):
    from ray.exceptions import ActorDiedError

    from recipe.iib_lpo.trainer.ppo_trainer import dead_actor_error

    class _Died(ActorDiedError):  # Ray's text for a killed actor, as its error carries it
        def __str__(self):
            return ("The actor died unexpectedly before finishing this task.\n\tclass_name: IibLpoVLLMHttpServer\n"
                    "\tactor_id: 1f2e\n\tpid: 4242")

    assert dead_actor_error(ValueError("not an actor"), [], 3, str(tmp_path)) is None
    fresh = dead_actor_error(_Died(), [], 1, str(tmp_path))
    assert "step 1: IibLpoVLLMHttpServer." in str(fresh)
    assert "no checkpoint was saved yet" in str(fresh)
    _complete_step(tmp_path, 2, {})
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    # wrapped the way an error raised from the actor's death reaches the trainer
    try:
        try:
            raise _Died()
        except ActorDiedError as died:
            raise RuntimeError("agent loop failed") from died
    except RuntimeError as wrapped:
        stopped = dead_actor_error(wrapped, [], 3, str(tmp_path))
    assert f"{tmp_path / 'global_step_2'}: rerun with trainer.resume_mode=auto" in str(stopped)
    assert "training step 3: IibLpoVLLMHttpServer." in str(stopped)
    # verl's agent loop turns the death into failed groups: the error names no actor, the probe does
    swallowed = RuntimeError("Sync replay buffer selected terminal groups with no materializable trajectories.")
    stopped = dead_actor_error(swallowed, ["rollout server 0.0 (IibLpoVLLMReplica)"], 3, str(tmp_path))
    assert "training step 3: rollout server 0.0 (IibLpoVLLMReplica). The trainer stopped" in str(stopped)
    assert "no materializable trajectories" in str(stopped)
    assert dead_actor_error(swallowed, [], 3, str(tmp_path)) is None


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_the_actor_probe_names_the_dead_actor_only():
    import os
    import signal

    import ray

    from recipe.iib_lpo.trainer.ppo_trainer import probe_dead_actors

    @ray.remote(num_cpus=0)
    class _Pid:
        def pid(self):
            return os.getpid()

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        alive, doomed = _Pid.remote(), _Pid.remote()
        os.kill(ray.get(doomed.pid.remote(), timeout=60), signal.SIGKILL)
        assert probe_dead_actors({"alive": alive, "doomed": doomed}, timeout_s=30) == ["doomed"]
    finally:
        ray.shutdown()
