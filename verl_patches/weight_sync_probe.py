"""Opt-in probe: a fingerprint of the rollout engine's weights after every verl weight sync.

With ``IIB_LPO_WEIGHT_PROBE_FILE=<path>`` set, each call of vLLM's
``process_weights_after_loading`` made by verl's weight sync (once per sync, after all buckets,
``verl/workers/rollout/vllm_rollout/utils.py``) appends one JSON line to ``<path>``:
``{"pid", "time", "sha256"}``, the hash of every parameter of the engine's model in name order.
Tests assert on these lines that the weights inside the vLLM worker changed after each training
step. Applied from the ``vllm.general_plugins`` entry point; without the variable nothing runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any

PROBE_ENV = "IIB_LPO_WEIGHT_PROBE_FILE"


def model_fingerprint(model: Any) -> str:
    """sha256 over (name, float32 bytes) of ``model.named_parameters()`` in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.numel() == 0:
            continue
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def apply() -> bool:
    """Wrap ``vllm.model_executor.model_loader.utils.process_weights_after_loading`` (idempotent)."""
    path = os.environ.get(PROBE_ENV)
    if not path:
        return False
    import vllm.model_executor.model_loader.utils as loader_utils

    original = loader_utils.process_weights_after_loading
    if getattr(original, "_iib_lpo_probe", False):
        return True

    @functools.wraps(original)
    def process_and_fingerprint(model: Any, *args: Any, **kwargs: Any):
        result = original(model, *args, **kwargs)
        record = {"pid": os.getpid(), "time": time.time(), "sha256": model_fingerprint(model)}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return result

    process_and_fingerprint._iib_lpo_probe = True
    loader_utils.process_weights_after_loading = process_and_fingerprint
    return True
