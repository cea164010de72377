"""The GPU launch scripts (run_scripts/run_*.sh, common.sh, prepare_data.sh, run_cvae.sh).

Every training script is dry-run through the real entry point (``DRY_RUN=1``: the script builds its
command line, ``python -m recipe.iib_lpo.main`` composes the Hydra config, runs the recipe's start-up
check and prints the resolved config as YAML, without Ray or a GPU), with every path pointing at
nothing. The tests then check the printed configs: the values that define each algorithm, the
settings all runs share (rollout.n = 8 everywhere), that I2B-LPO and DAPO differ from the GRPO
baseline only in algorithm keys (an explicit allowed list), and that no key verl 0.9.1 parses but
ignores is set. prepare_data.sh and run_cvae.sh print their commands under DRY_RUN; those are parsed
with the tools' own argument parsers and checked against the files the training configs read.

Each dry run is a fresh interpreter importing verl (~10-20 s of CPU); they run concurrently in one
module fixture.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RUN_SCRIPTS = ROOT / "run_scripts"

# every training launcher and the arguments its dry run gets
TRAINING_SCRIPTS = {
    "run_qwen7b.sh": [],
    "run_qwen7b_grpo.sh": [],
    "run_qwen7b_dapo.sh": [],
    "run_qwen7b_entropy_reg.sh": [],
    "run_qwen7b_klcov.sh": [],
    "run_qwen7b_ablation_no_latent.sh": [],
    "run_qwen7b_ablation_no_ib_filter.sh": [],
    "run_qwen7b_ablation_no_ib_reward.sh": [],
    "run_qwen7b_ablation_rounds.sh": ["2"],
    "run_qwen3_14b.sh": [],
    "run_qwen7b_multinode.sh": ["submit"],
}
# (M, K, R) where a script changes the default layout (2, 3, 1)
LAYOUT = {"run_qwen7b_ablation_rounds.sh": (2, 2, 2)}
# run_*.sh files that are not training launchers
OTHER_RUN_SCRIPTS = {
    "run_cvae.sh",  # the CVAE stage: test_run_cvae_* below
    "run_eval.sh",  # evaluation CLI wrapper: tests/test_eval_cli.py
}
DRY_RUN_TIMEOUT_S = 600  # per script; a dry run takes 10-80 s depending on the machine's load
EVAL_SETS = ["math500", "aime2024", "aime2025", "amc23", "olympiadbench"]
# Variables the scripts read. The dry runs start from an environment without any of them, so a
# developer's exported settings cannot change what the tests see.
SCRIPT_VARS = re.compile(
    r"^(DRY_RUN|DATA_DIR|OUTPUT_DIR|MODEL_PATH|MODEL_PROFILE|TRAIN_FILES|VAL_FILES|CVAE_.*|NNODES|GPUS_PER_NODE|"
    r"RAY_.*|HEAD_IP|RUN_SCRIPT|MAX_.*|TEMPERATURE|TOP_P|TRAIN_BATCH_SIZE|LR|TOTAL_EPOCHS|NUM_.*|PPO_.*|SEED|"
    r"VAL_.*|TEST_FREQ|SAVE_FREQ|RESUME_MODE|WANDB_.*|USE_WANDB|PLACEHOLDER_TOKEN_ID|ACTOR_.*|ROLLOUT_.*|"
    r"LOGPROB_.*|MODEL_EXTRA_OVERRIDES|EXPERIMENT_NAME|LATENT_.*|IB_TOP_N|LAMBDA_IB|OVERLONG_.*|ENTROPY_COEFF|"
    r"KL_COV_RATIO|RAW_DIR|TOKENIZER_DIR|DATASETS|.*_SRC|.*_PASS_RATE_FILE|IIB_LPO_.*|VERL_FILE_LOGGER_PATH)$"
)


@dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str

    def config(self) -> dict:
        assert self.returncode == 0, f"exit {self.returncode}\n--- stderr ---\n{self.stderr[-4000:]}"
        try:
            cfg = yaml.safe_load(self.stdout)
        except yaml.YAMLError as err:  # stdout must be the config alone
            raise AssertionError(f"stdout is not YAML: {err}\n--- stdout head ---\n{self.stdout[:2000]}") from err
        assert isinstance(cfg, dict), f"stdout is not a YAML mapping: {self.stdout[:500]!r}"
        return cfg


def _base_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not SCRIPT_VARS.match(k)}
    env.update(
        DATA_DIR=str(tmp / "nowhere" / "data"),
        OUTPUT_DIR=str(tmp / "nowhere" / "outputs"),
        USE_WANDB="0",
        IIB_LPO_PYTHON=sys.executable,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TORCH_COMPILE_DISABLE="1",
    )
    env.update(extra)
    return env


def _run(script: str, args: list[str], env: dict[str, str], timeout: float = DRY_RUN_TIMEOUT_S) -> ScriptRun:
    proc = subprocess.run(["bash", str(RUN_SCRIPTS / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return ScriptRun(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def dry_runs(env_dir) -> dict[str, ScriptRun]:
    """DRY_RUN=1 of every training script (concurrently), keyed by script name."""
    env = _base_env(env_dir, DRY_RUN="1", HEAD_IP="192.0.2.1")
    workers = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(_run, name, args, env) for name, args in TRAINING_SCRIPTS.items()}
        return {name: fut.result() for name, fut in futures.items()}


@pytest.fixture(scope="module")
def configs(dry_runs) -> dict[str, dict]:
    return {name: run.config() for name, run in dry_runs.items()}


def flatten(node, prefix: str = "") -> dict[str, object]:
    """Dotted keys -> leaf values (lists are leaves)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        if not node and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: node}


_MISSING = object()


def config_diff(a: dict, b: dict) -> dict[str, tuple]:
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k, _MISSING), fb.get(k, _MISSING)) for k in sorted(set(fa) | set(fb))
            if fa.get(k, _MISSING) != fb.get(k, _MISSING)}


def get(cfg: dict, dotted: str):
    node = cfg
    for key in dotted.split("."):
        node = node[key]
    return node


# ---------------------------------------------------------------------------------------------
# coverage and output format
# ---------------------------------------------------------------------------------------------
def test_every_run_script_is_tested():
    on_disk = {p.name for p in RUN_SCRIPTS.glob("run_*.sh")}
    assert on_disk == set(TRAINING_SCRIPTS) | OTHER_RUN_SCRIPTS


@pytest.mark.parametrize("script", list(TRAINING_SCRIPTS))
def test_dry_run_prints_only_the_config(configs, dry_runs, script):
    cfg = configs[script]
    # stdout is exactly verl's config + the recipe group: nothing else parsed as a top-level key
    assert {"actor_rollout_ref", "algorithm", "data", "reward", "trainer", "iib_lpo"} <= set(cfg)
    assert "DRY_RUN" in dry_runs[script].stderr  # the scripts' own messages go to stderr


def test_dry_run_writes_nothing(dry_runs, env_dir):
    assert not (env_dir / "nowhere").exists()  # neither DATA_DIR nor OUTPUT_DIR was created


# ---------------------------------------------------------------------------------------------
# settings every run shares
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", list(TRAINING_SCRIPTS))
def test_shared_settings(configs, env_dir, script):
    cfg = configs[script]
    data_dir = env_dir / "nowhere" / "data"
    out_dir = env_dir / "nowhere" / "outputs"
    # trajectories per prompt: M x (1 + K x R) = 8 for every algorithm (the rounds ablation: 2 x (1 + 2 x 2) = 10)
    m, k, r = LAYOUT.get(script, (2, 3, 1))
    assert get(cfg, "actor_rollout_ref.rollout.n") == m * (1 + k * r)
    assert get(cfg, "iib_lpo.num_initial_rollouts") == m and get(cfg, "iib_lpo.num_branches") == k
    assert get(cfg, "iib_lpo.ib.rounds") == r
    assert get(cfg, "data.train_files") == [str(data_dir / "math_train.parquet"), str(data_dir / "dapo_math_train.parquet")]
    assert get(cfg, "data.val_files") == [str(data_dir / f"{d}_test.parquet") for d in EVAL_SETS]
    expected = {
        "data.max_prompt_length": 2048,
        "data.max_response_length": 4096,
        "data.train_batch_size": 32,
        "data.filter_overlong_prompts": True,
        "actor_rollout_ref.rollout.temperature": 0.9,
        "actor_rollout_ref.rollout.top_p": 0.9,
        "actor_rollout_ref.rollout.prompt_length": 2048,
        "actor_rollout_ref.rollout.response_length": 4096,
        "actor_rollout_ref.rollout.calculate_log_probs": True,
        "actor_rollout_ref.actor.optim.lr": 1e-6,
        "actor_rollout_ref.actor.use_kl_loss": False,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 16,
        "actor_rollout_ref.actor.strategy": "fsdp2",
        "actor_rollout_ref.rollout.val_kwargs.do_sample": True,
        "actor_rollout_ref.rollout.val_kwargs.temperature": 0.6,
        "actor_rollout_ref.rollout.val_kwargs.top_p": 0.95,
        "actor_rollout_ref.rollout.val_kwargs.n": 1,
        "trainer.total_epochs": 2,
        "trainer.test_freq": 100,
        "trainer.save_freq": 100,
        "trainer.n_gpus_per_node": 8,
        "trainer.nnodes": 2 if script == "run_qwen7b_multinode.sh" else 1,
        "trainer.logger": ["console", "file"],
        "trainer.project_name": "iib_lpo",
        "algorithm.rollout_correction.rollout_is": "token",  # the same correction for every method
        "reward.custom_reward_function.path": "pkg://recipe.iib_lpo.reward",
        "reward.custom_reward_function.name": "compute_score",
        "distillation.enabled": False,
    }
    assert {k: get(cfg, k) for k in expected} == expected
    experiment = get(cfg, "trainer.experiment_name")
    assert get(cfg, "trainer.default_local_dir") == str(out_dir / experiment / "ckpt")


def test_experiment_names_are_distinct(configs):
    names = [get(c, "trainer.experiment_name") for n, c in configs.items() if n != "run_qwen7b_multinode.sh"]
    assert len(set(names)) == len(names), names


# ---------------------------------------------------------------------------------------------
# the values that define each algorithm
# ---------------------------------------------------------------------------------------------
GRPO_KEYS = {
    "algorithm.adv_estimator": "grpo",
    "actor_rollout_ref.rollout.name": "vllm",
    "actor_rollout_ref.rollout.agent.default_agent_loop": "single_turn_agent",
    "actor_rollout_ref.rollout.agent.agent_loop_manager_class": None,
    "actor_rollout_ref.actor.clip_ratio_low": 0.2,
    "actor_rollout_ref.actor.clip_ratio_high": 0.2,
    "actor_rollout_ref.actor.clip_ratio_c": 3.0,
    "actor_rollout_ref.actor.loss_agg_mode": "token-mean",
    "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla",
    "actor_rollout_ref.actor.entropy_coeff": 0,
    "reward.reward_manager.name": "naive",
    "algorithm.filter_groups.enable": False,
}
IIB_LPO_KEYS = {
    **GRPO_KEYS,
    "algorithm.adv_estimator": "iib_lpo",
    "actor_rollout_ref.rollout.name": "iib_lpo_vllm",
    "actor_rollout_ref.rollout.agent.default_agent_loop": "iib_lpo_branching",
    "actor_rollout_ref.rollout.agent.agent_loop_manager_class": "recipe.iib_lpo.rollout.manager.IibLpoAgentLoopManagerTQ",
    "iib_lpo.latent.mode": "none",
    "iib_lpo.latent.placeholder_token_id": 151665,
    "iib_lpo.latent.service.num_gpus": 0,
    "iib_lpo.latent.service.device": "cuda",
    "iib_lpo.ib.top_n": None,
    "iib_lpo.advantage.lambda_ib": 0.5,
    # derived by the entry point from iib_lpo.latent: the server and the agent loop agree
    "actor_rollout_ref.rollout.custom.iib_lpo.latent_injection": False,
    "actor_rollout_ref.rollout.custom.iib_lpo.latent_placeholder_token_id": 151665,
}
EXPECTED_ALGORITHM = {
    "run_qwen7b.sh": IIB_LPO_KEYS,
    "run_qwen7b_multinode.sh": IIB_LPO_KEYS,
    "run_qwen7b_grpo.sh": GRPO_KEYS,
    "run_qwen7b_dapo.sh": {
        **GRPO_KEYS,
        "actor_rollout_ref.actor.clip_ratio_high": 0.28,
        "actor_rollout_ref.actor.clip_ratio_c": 10.0,
        "reward.reward_manager.name": "dapo",
        "reward.reward_kwargs": {
            "overlong_buffer_cfg": {"enable": True, "len": 1024, "penalty_factor": 1.0, "log": True},
            "max_resp_len": 4096,
        },
        "algorithm.filter_groups.enable": True,
        "algorithm.filter_groups.metric": "acc",
    },
    "run_qwen7b_entropy_reg.sh": {**GRPO_KEYS, "actor_rollout_ref.actor.entropy_coeff": 0.001},
    "run_qwen7b_klcov.sh": {
        **GRPO_KEYS,
        "actor_rollout_ref.actor.policy_loss.loss_mode": "kl_cov",
        "actor_rollout_ref.actor.policy_loss.kl_cov_ratio": 0.002,
        "actor_rollout_ref.actor.policy_loss.ppo_kl_coef": 1.0,
    },
    "run_qwen7b_ablation_no_latent.sh": {
        **IIB_LPO_KEYS,
        "iib_lpo.latent.mode": "none",
        "actor_rollout_ref.rollout.custom.iib_lpo.latent_injection": False,
    },
    "run_qwen7b_ablation_no_ib_filter.sh": {**IIB_LPO_KEYS, "iib_lpo.ib.top_n": 3},
    "run_qwen7b_ablation_no_ib_reward.sh": {**IIB_LPO_KEYS, "iib_lpo.advantage.lambda_ib": 0.0},
    "run_qwen7b_ablation_rounds.sh": {**IIB_LPO_KEYS, "iib_lpo.ib.rounds": 2, "iib_lpo.num_branches": 2},
    "run_qwen3_14b.sh": {
        **IIB_LPO_KEYS,
        "iib_lpo.latent.placeholder_token_id": 151669,
        "actor_rollout_ref.rollout.custom.iib_lpo.latent_placeholder_token_id": 151669,
        "actor_rollout_ref.model.path": "Qwen/Qwen3-14B",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload": True,
        "data.apply_chat_template_kwargs": {"enable_thinking": False},
    },
}


def test_expectations_cover_every_script():
    assert set(EXPECTED_ALGORITHM) == set(TRAINING_SCRIPTS)


@pytest.mark.parametrize("script", list(TRAINING_SCRIPTS))
def test_algorithm_keys(configs, script):
    cfg = configs[script]
    expected = EXPECTED_ALGORITHM[script]
    assert {k: get(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("script, ckpt", [("run_qwen7b.sh", "cvae.pt"), ("run_qwen3_14b.sh", "cvae_qwen3-14b.pt")])
def test_cvae_checkpoint_per_policy(configs, env_dir, script, ckpt):
    assert get(configs[script], "iib_lpo.latent.service.checkpoint_path") == str(env_dir / "nowhere" / "outputs" / "cvae" / ckpt)


def test_7b_runs_share_model_and_memory_plan(configs):
    keys = ["actor_rollout_ref.model.path", "actor_rollout_ref.rollout.gpu_memory_utilization",
            "actor_rollout_ref.rollout.tensor_model_parallel_size", "actor_rollout_ref.actor.fsdp_config.param_offload",
            "actor_rollout_ref.actor.fsdp_config.optimizer_offload", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
            "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu"]
    plans = {s: tuple(get(c, k) for k in keys) for s, c in configs.items() if s != "run_qwen3_14b.sh"}
    assert set(plans.values()) == {("Qwen/Qwen2.5-7B", 0.6, 2, False, False, 12288, 24576)}, plans


# ---------------------------------------------------------------------------------------------
# I2B-LPO and DAPO against the GRPO baseline: only algorithm keys differ
# ---------------------------------------------------------------------------------------------
# Keys that may differ from the GRPO baseline, with the reason each one belongs to the algorithm.
RUN_IDENTITY = [
    "trainer.experiment_name",
    "actor_rollout_ref.rollout.trace.experiment_name",  # ${trainer.experiment_name}, resolved
    "trainer.default_local_dir",                         # the run's checkpoint dir, named after it
]
ALLOWED_VS_GRPO = {
    "run_qwen7b.sh": RUN_IDENTITY + [
        "algorithm.adv_estimator",                       # the I2B-LPO advantage
        "actor_rollout_ref.rollout.name",                # the recipe's vLLM server (top-k log-probs, latent token)
        # ${actor_rollout_ref.rollout.name} resolved, in verl's (disabled) distillation group
        "distillation.teacher_models.teacher_model.inference.name",
        "actor_rollout_ref.rollout.agent.*",             # the branching agent loop, its registration, its manager
        "actor_rollout_ref.rollout.custom.*",            # the server's latent knobs, derived from iib_lpo.*
        "iib_lpo.*",                                     # the recipe's own group, read only by adv_estimator=iib_lpo
    ],
    "run_qwen7b_dapo.sh": RUN_IDENTITY + [
        "actor_rollout_ref.actor.clip_ratio_high",       # clip-higher
        "actor_rollout_ref.actor.clip_ratio_c",          # DAPO's dual-clip bound
        "reward.reward_manager.name",                    # overlong reward shaping (dapo reward manager) ...
        "reward.reward_kwargs.*",                        # ... and its settings
        "algorithm.filter_groups.*",                     # dynamic sampling
    ],
}
# keys that must be among the differences (so the comparison cannot pass vacuously)
MUST_DIFFER = {
    "run_qwen7b.sh": {"algorithm.adv_estimator", "actor_rollout_ref.rollout.name",
                      "actor_rollout_ref.rollout.agent.default_agent_loop"},
    "run_qwen7b_dapo.sh": {"actor_rollout_ref.actor.clip_ratio_high", "reward.reward_manager.name",
                           "algorithm.filter_groups.enable"},
}


@pytest.mark.parametrize("script", list(ALLOWED_VS_GRPO))
def test_differs_from_grpo_only_in_algorithm_keys(configs, script):
    diff = config_diff(configs[script], configs["run_qwen7b_grpo.sh"])
    print(f"\n{script} vs run_qwen7b_grpo.sh: {len(diff)} differing keys")
    for key, (mine, grpo) in diff.items():
        show = lambda v: "<absent>" if v is _MISSING else repr(v)  # noqa: E731
        print(f"  {key}: {show(mine)} | grpo: {show(grpo)}")
    patterns = ALLOWED_VS_GRPO[script]
    outside = [k for k in diff if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    assert outside == [], f"{script} differs from the GRPO baseline outside algorithm keys: {outside}"
    assert MUST_DIFFER[script] <= set(diff)


# ---------------------------------------------------------------------------------------------
# no key that verl 0.9.1 parses but ignores
# ---------------------------------------------------------------------------------------------
LEGACY_GROUPS = ["reward_model", "custom_reward_function", "sandbox_fusion"]


@pytest.mark.parametrize("script", list(TRAINING_SCRIPTS))
def test_legacy_keys_stay_at_verl_defaults(configs, script):
    cfg = configs[script]
    for group in LEGACY_GROUPS:  # verl 0.9.1's defaults: every legacy leaf is null
        set_leaves = {k: v for k, v in flatten(cfg[group], f"{group}.").items() if v is not None}
        assert set_leaves == {}, f"{script} sets legacy keys that verl 0.9.1 ignores: {set_leaves}"
    # the V1 replay buffer ignores max_num_gen_batches > 0 (it only logs a warning)
    assert get(cfg, "algorithm.filter_groups.max_num_gen_batches") == 0


def _code_lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        code = re.sub(r"(^|\s)#.*$", "", line)  # drop comments
        if code.strip():
            out.append(code)
    return out


@pytest.mark.parametrize("path", sorted(RUN_SCRIPTS.glob("*.sh")), ids=lambda p: p.name)
def test_scripts_set_no_legacy_key(path):
    legacy = re.compile(r"(^|[\s\"'(])\+{0,2}(reward_model|custom_reward_function|sandbox_fusion)\.")
    offending = [line for line in _code_lines(path) if legacy.search(line)]
    assert offending == []


# ---------------------------------------------------------------------------------------------
# clear errors on bad input (no Python is started: the scripts stop first)
# ---------------------------------------------------------------------------------------------
def test_missing_data_files_fail_with_a_clear_error(env_dir):
    run = _run("run_qwen7b_grpo.sh", [], _base_env(env_dir), timeout=60)
    assert run.returncode == 2
    assert "missing data files" in run.stderr and "prepare_data.sh" in run.stderr
    assert "math_train.parquet" in run.stderr and run.stdout == ""


def test_missing_cvae_checkpoint_fails_with_a_clear_error(env_dir):
    data = env_dir / "data_present"
    data.mkdir(exist_ok=True)
    for name in ["math_train", "dapo_math_train", *(f"{d}_test" for d in EVAL_SETS)]:
        (data / f"{name}.parquet").touch()
    # the latent is opt-in (LATENT_MODE=cvae); then its checkpoint must exist
    run = _run("run_qwen7b.sh", [], _base_env(env_dir, DATA_DIR=str(data), MODEL_PATH=str(env_dir / "no_model"),
                                              LATENT_MODE="cvae"), timeout=60)
    assert run.returncode == 2
    assert "CVAE checkpoint not found" in run.stderr and "run_cvae.sh" in run.stderr


@pytest.mark.parametrize("var, value, message", [
    ("DRY_RUN", "yes", "DRY_RUN must be 0 or 1"),
    ("TRAIN_BATCH_SIZE", "thirty", "TRAIN_BATCH_SIZE must be a non-negative integer"),
    ("PPO_MINI_BATCH_SIZE", "5", "must be a multiple of PPO_MINI_BATCH_SIZE"),
    ("MODEL_PROFILE", "llama", "MODEL_PROFILE must be"),
    ("USE_WANDB", "maybe", "USE_WANDB must be"),
])
def test_bad_settings_fail_with_a_clear_error(env_dir, var, value, message):
    run = _run("run_qwen7b_grpo.sh", [], _base_env(env_dir, **{"DRY_RUN": "1", var: value}), timeout=60)
    assert run.returncode == 2 and message in run.stderr


def test_bad_ablation_knob_fails(env_dir):
    run = _run("run_qwen7b.sh", [], _base_env(env_dir, DRY_RUN="1", IB_TOP_N="4"), timeout=60)
    assert run.returncode == 2 and "IB_TOP_N=4 exceeds NUM_BRANCHES=3" in run.stderr


@pytest.mark.parametrize("script, args, override, message", [
    # I2B-LPO layouts (one round and R rounds): the recipe's check, not verl's mid-run crash
    ("run_qwen7b.sh", [], "algorithm.use_kl_in_reward=True", "algorithm.use_kl_in_reward=True: I2B-LPO"),
    ("run_qwen7b_ablation_rounds.sh", ["2"], "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.rollout.n=8 but"),
    # a baseline: the checks every algorithm gets
    ("run_qwen7b_grpo.sh", [], "trainer.v1.trainer_mode=async", "trainer.v1.trainer_mode='async'"),
])
def test_dry_run_runs_the_start_up_checks(env_dir, script, args, override, message):
    """DRY_RUN=1 refuses what a real run's start-up check refuses, before any config is printed."""
    run = _run(script, [*args, override], _base_env(env_dir, DRY_RUN="1"))
    assert run.returncode != 0 and run.stdout == ""
    assert "config check failed" in run.stderr and message in run.stderr


def test_multinode_needs_an_action_and_prints_ray_commands(env_dir):
    env = _base_env(env_dir, DRY_RUN="1")
    run = _run("run_qwen7b_multinode.sh", [], env, timeout=60)
    assert run.returncode == 2 and "usage:" in run.stderr
    run = _run("run_qwen7b_multinode.sh", ["worker"], env, timeout=60)
    assert run.returncode == 2 and "HEAD_IP" in run.stderr
    run = _run("run_qwen7b_multinode.sh", ["head"], {**env, "HEAD_IP": "192.0.2.1"}, timeout=60)
    assert run.returncode == 0
    assert re.search(r"ray start --head --node-ip-address=192\.0\.2\.1 .*--num-gpus=8", run.stderr)
    run = _run("run_qwen7b_multinode.sh", ["worker"], {**env, "HEAD_IP": "192.0.2.1"}, timeout=60)
    assert run.returncode == 0 and re.search(r"ray start --address=192\.0\.2\.1:6379 --num-gpus=8", run.stderr)


def test_multinode_submit_names_the_ray_job(dry_runs):
    assert "ray job submit --address http://192.0.2.1:8265" in dry_runs["run_qwen7b_multinode.sh"].stderr


# ---------------------------------------------------------------------------------------------
# prepare_data.sh and run_cvae.sh: the commands they would run
# ---------------------------------------------------------------------------------------------
def _printed_commands(run: ScriptRun, module: str) -> list[list[str]]:
    assert run.returncode == 0, run.stderr
    cmds = [shlex.split(line) for line in run.stdout.splitlines() if line.strip()]
    for cmd in cmds:
        assert cmd[:3] == [sys.executable, "-m", module], cmd
    return [cmd[3:] for cmd in cmds]


def test_prepare_data_writes_what_the_runs_read(env_dir, configs):
    from data_prep.prepare import build_parser

    run = _run("prepare_data.sh", [], _base_env(env_dir, DRY_RUN="1"), timeout=60)
    parsed = [build_parser().parse_args(argv) for argv in _printed_commands(run, "data_prep.prepare")]
    assert [a.dataset for a in parsed] == [*EVAL_SETS, "math", "dapo_math", "gsm8k"]
    outputs = {}
    for args in parsed:
        split = args.split or ("test" if args.dataset in EVAL_SETS else "train")
        outputs[args.dataset] = str(Path(args.out) / f"{args.dataset}_{split}.parquet")
    cfg = configs["run_qwen7b.sh"]
    assert [outputs[d] for d in EVAL_SETS] == get(cfg, "data.val_files")
    assert [outputs["math"], outputs["dapo_math"]] == get(cfg, "data.train_files")
    for args in parsed:  # every training set is decontaminated against all five eval sets
        if args.dataset not in EVAL_SETS:
            assert args.decontaminate_against == get(cfg, "data.val_files"), args.dataset


def test_prepare_data_takes_sources_from_the_environment(env_dir):
    raw = env_dir / "raw"
    (raw / "math").mkdir(parents=True, exist_ok=True)
    env = _base_env(env_dir, DRY_RUN="1", RAW_DIR=str(raw), AIME2024_SRC="/src/aime24.jsonl",
                    DATASETS="aime2024 math")
    sources = {a[a.index("--dataset") + 1]: a[a.index("--source") + 1]
               for a in _printed_commands(_run("prepare_data.sh", [], env, timeout=60), "data_prep.prepare")}
    assert sources == {"aime2024": "/src/aime24.jsonl", "math": str(raw / "math")}


def test_run_cvae_writes_the_checkpoint_the_runs_load(env_dir, configs):
    from recipe.iib_lpo.latent.training import build_arg_parser

    data_dir = env_dir / "nowhere" / "data"
    for profile, script, model in [("qwen2.5-7b", "run_qwen7b.sh", "Qwen/Qwen2.5-7B"),
                                   ("qwen3-14b", "run_qwen3_14b.sh", "Qwen/Qwen3-14B")]:
        run = _run("run_cvae.sh", [], _base_env(env_dir, DRY_RUN="1", MODEL_PROFILE=profile), timeout=60)
        (argv,) = _printed_commands(run, "recipe.iib_lpo.train_cvae")
        args = build_arg_parser().parse_args(argv)
        assert args.out == get(configs[script], "iib_lpo.latent.service.checkpoint_path")
        assert (args.mode, args.encoder, args.policy_model) == ("fork", "microsoft/deberta-v2-xlarge", model)
        assert args.train_parquet == [str(data_dir / "math_train.parquet"), str(data_dir / "gsm8k_train.parquet")]
