"""A ``cpu`` verl platform, so verl 0.9.1's real trainer runs without a GPU (tests, CPU demo).

Active only when ``VERL_PLATFORM=cpu``: ``activate()`` is called from the recipe's
``verl.plugins`` entry point (``verl_patches.registrations``), i.e. on ``import verl`` in every
process (driver, TaskRunner, FSDP workers, vLLM server, agent-loop and reward actors: Ray
actors inherit the driver's environment). With any other value nothing here runs.

What each piece is for (measured one by one: ../shared/docs/VERL_CPU_TRAINER.md, items 1-6):
1. ``PlatformCPU`` through verl's own ``PlatformRegistry``: device name ``cpu``, backend
   ``gloo``, Ray resource ``GPU`` (declared fake GPUs are the placement-group currency), no CUDA
   IPC (weights then move through shared memory), ``current_device()`` a ``torch.device`` (verl
   does ``.to(get_device_id())``: an int would mean ``cuda:<int>``), and a device module whose
   calls verl makes are CPU no-ops or ``torch.cpu`` equivalents.
2. verl builds the backend string ``cpu:gloo,<device>:<backend>`` = ``cpu:gloo,cpu:gloo``, which
   torch rejects ("Duplicate device type cpu"): ``init_process_group`` is wrapped to drop the
   repeated entry.
3. ``EngineRegistry`` has no FSDP engine for device ``cpu``: ``VERL_ENGINE_DEVICE=cuda`` (the
   FSDP engine code itself runs on CPU).
4. FSDP2 forward-only engines (the reference model) hard-code ``CPUOffloadPolicy(pin_memory=True)``;
   pinning needs CUDA, so ``pin_memory`` is forced off.
The vLLM-side counterpart (weights kept after oneDNN packing so the weight sync can load into
them) is ``verl_patches.vllm_latent.cpu_weight_sync_fix``, loaded through vLLM's plugin group.
"""

from __future__ import annotations

import functools
import os
import types
from contextlib import contextmanager, nullcontext
from typing import Any

PLATFORM_NAME = "cpu"
_ACTIVE = False


def requested() -> bool:
    """True when this process runs with ``VERL_PLATFORM=cpu``."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


class _CPUStream:
    """Stands in for ``torch.cuda.Stream``: work on CPU is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event or _CPUEvent()


class _CPUEvent:
    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


def _make_device_module() -> types.ModuleType:
    """A module standing in for ``torch.cuda`` with the calls verl makes (grep of verl 0.9.1)."""
    import torch

    mod = types.ModuleType("verl_patches.cpu_platform.device_module")
    noop = lambda *a, **k: None  # noqa: E731
    zero = lambda *a, **k: 0  # noqa: E731
    mod.is_available = lambda: True
    mod.device_count = lambda: 1
    mod.current_device = lambda: 0
    mod.set_device = noop
    mod.synchronize = noop
    mod.empty_cache = noop
    mod.ipc_collect = noop
    mod.set_per_process_memory_fraction = noop
    mod.reset_peak_memory_stats = noop
    mod.memory_allocated = zero
    mod.memory_reserved = zero
    mod.max_memory_allocated = zero
    mod.max_memory_reserved = zero
    mod.mem_get_info = lambda *a, **k: (0, 0)
    mod.get_device_name = lambda *a, **k: "cpu"
    mod.manual_seed = torch.manual_seed
    mod.manual_seed_all = torch.manual_seed
    mod.get_rng_state = lambda *a, **k: torch.get_rng_state()
    mod.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mod.Stream = _CPUStream
    mod.Event = _CPUEvent
    mod.current_stream = lambda *a, **k: _CPUStream()
    mod.default_stream = lambda *a, **k: _CPUStream()
    mod.stream = lambda *a, **k: nullcontext()
    mod.memory = types.SimpleNamespace(_set_allocator_settings=noop)
    return mod


def _platform_class():
    import torch
    from verl.plugin.platform.platform_base import PlatformBase

    class PlatformCPU(PlatformBase):
        """verl platform for a machine without accelerators (module docstring, item 1)."""

        _device_module = _make_device_module()

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            return self._device_module

        def is_available(self) -> bool:
            return True

        def current_device(self):
            return torch.device("cpu")

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            pass

        def synchronize(self, device_index: int | None = None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    return PlatformCPU


def dedupe_backend(backend: str | None) -> str | None:
    """``"cpu:gloo,cpu:gloo"`` -> ``"cpu:gloo"``: keep the first entry per device type (item 2)."""
    if not backend or "," not in backend:
        return backend
    seen, parts = set(), []
    for part in backend.split(","):
        device = part.split(":", 1)[0].strip() if ":" in part else part.strip()
        if device not in seen:
            seen.add(device)
            parts.append(part.strip())
    return ",".join(parts)


def _wrap_init_process_group() -> None:
    import torch.distributed as dist

    original = dist.init_process_group
    if getattr(original, "_iib_lpo_dedup", False):
        return

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any):
        if args:
            args = (dedupe_backend(args[0]), *args[1:])
        if "backend" in kwargs:
            kwargs["backend"] = dedupe_backend(kwargs["backend"])
        return original(*args, **kwargs)

    init_process_group._iib_lpo_dedup = True
    dist.init_process_group = init_process_group


def _unpinned_offload_policy() -> None:
    import verl.utils.fsdp_utils as fsdp_utils

    policy = getattr(fsdp_utils, "CPUOffloadPolicy", None)
    if policy is None or getattr(policy, "_iib_lpo_unpinned", False):
        return

    class UnpinnedCPUOffloadPolicy(policy):  # a subclass: isinstance checks keep working
        _iib_lpo_unpinned = True

        def __init__(self, pin_memory: bool = True, **kwargs: Any):
            super().__init__(pin_memory=False, **kwargs)

    fsdp_utils.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


def activate() -> bool:
    """Register and select the ``cpu`` platform if ``VERL_PLATFORM=cpu``; else do nothing.

    Idempotent. Returns True when active. Must run before verl resolves its platform singleton
    (the first ``get_platform()`` call), which the ``verl.plugins`` entry point guarantees.
    """
    global _ACTIVE
    if _ACTIVE or not requested():
        return _ACTIVE
    from verl.plugin.platform import PlatformRegistry

    PlatformRegistry.register(platform=PLATFORM_NAME)(_platform_class())
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    _wrap_init_process_group()
    _unpinned_offload_policy()
    _ACTIVE = True
    return True
