"""The cpu verl platform is active only with VERL_PLATFORM=cpu, and its pieces do what they claim."""

import os
import subprocess
import sys

import pytest

from verl_patches.cpu_platform import dedupe_backend

PROBE = """
import verl
from verl.plugin.platform import PlatformRegistry
from verl.utils.device import get_device_name, get_nccl_backend, get_resource_name, is_support_ipc
import torch.distributed as dist
print("cpu" in PlatformRegistry.registered_names(), getattr(dist.init_process_group, "_iib_lpo_dedup", False))
if "cpu" in PlatformRegistry.registered_names():
    print(get_device_name(), get_nccl_backend(), get_resource_name(), is_support_ipc())
    import verl.utils.fsdp_utils as fu
    print(fu.CPUOffloadPolicy().pin_memory)
    from verl.utils.device import get_device_id
    print(get_device_id())
"""


def _probe(env_update):
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    env.update(env_update)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_nothing_changes_without_verl_platform_cpu():
    assert _probe({}) == ["False", "False"]


def test_cpu_platform_answers_what_verl_asks():
    assert _probe({"VERL_PLATFORM": "cpu"}) == ["True", "True", "cpu", "gloo", "GPU", "False", "False", "cpu"]


@pytest.mark.parametrize(
    "backend, expected",
    [("cpu:gloo,cpu:gloo", "cpu:gloo"), ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:nccl"), ("gloo", "gloo"), (None, None)],
)
def test_dedupe_backend(backend, expected):
    assert dedupe_backend(backend) == expected


def test_gloo_process_group_initialises_with_verl_backend_string(tmp_path):
    code = (
        "import verl, torch.distributed as dist\n"
        "from verl.utils.distributed import initialize_global_process_group_ray\n"
        "initialize_global_process_group_ray()\n"
        "print(dist.get_backend())\n"
    )
    env = {**os.environ, "VERL_PLATFORM": "cpu", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29517"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "cpu:gloo"  # verl's "cpu:gloo,cpu:gloo" without the duplicate entry
