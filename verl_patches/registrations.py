"""One place that registers every recipe component with verl's registries.

Imported through the `verl.plugins` entry point (verl_patches.verl_plugin) in every process that
imports verl. Registration is idempotent: the module can also be imported directly, and verl's
registries reject a second registration of a name.
"""

_REGISTERED = False


def register_all() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from verl_patches import cpu_platform

    cpu_platform.activate()  # VERL_PLATFORM=cpu only; must precede verl's first get_platform()
    from verl_patches.rollout_server import register_rollout_server  # rollout.name=iib_lpo_vllm

    # algorithm.adv_estimator=iib_lpo is not a verl advantage estimator: the recipe trainer's
    # _compute_advantage runs the step (recipe/iib_lpo/algorithm/advantage.py says why)
    register_rollout_server()
    _REGISTERED = True


def is_registered() -> bool:
    """True once register_all() ran in this process (verl swallows plugin import errors)."""
    return _REGISTERED
