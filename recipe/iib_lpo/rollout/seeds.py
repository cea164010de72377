"""Seeds of a prompt's sessions: every random choice is reproducible from the row, the step and the session.

Every seed is a ``derived_seed`` of ``prompt_seed_key(kwargs)`` = JSON [``data_source``,
``extra_info.index``] (a row without either is refused with a ``ValueError`` naming its uid),
verl's ``global_steps``, and the session's parent / round / branch (``session_seeds``). Fork
points, latent draws and the latent schedule's draws use ``actor_rollout_ref.rollout.seed`` as
the root; vLLM's per-request token sampling seed uses ``agent_loop.sampling_seed`` (None: no
per-request seed). ``fork_seeds`` gives the (fork, latent) seeds of one fork point; round 1 uses
the parts of the single-round recipe, so R = 1 draws what it always drew. Pure: no verl.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from recipe.iib_lpo.rollout.layout import AGENT_NAME, ROLE_INITIAL, SessionRole


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def prompt_seed_key(kwargs: Mapping[str, Any]) -> str:
    """The per-prompt part of every seed: JSON ``[data_source, extra_info.index]``.

    Both fields come from the dataset row (data_prep writes them; verl's RLHFDataset passes the
    row's columns to ``run()`` as kwargs). ``extra_info.index`` alone repeats across the files of
    a mixed dataset, and verl's top-level ``index`` kwarg is 0 when ``extra_info.index`` is
    missing, so neither is used alone and ``kwargs["index"]`` is not used at all.

    Raises:
        ValueError: naming the row's uid and the missing or malformed field: ``data_source``
            (not a non-empty str) or ``extra_info.index`` (absent, or not an int / non-empty str).
    """
    uid = kwargs.get("uid", "<no uid>")
    data_source = kwargs.get("data_source")
    if not isinstance(data_source, str) or not data_source:
        raise ValueError(
            f"prompt uid={uid}: the row's 'data_source' is {data_source!r}; {AGENT_NAME} keys its fork, latent and "
            "sampling seeds on (data_source, extra_info.index) and needs both (data_prep.prepare writes them)"
        )
    extra_info = kwargs.get("extra_info")
    index = extra_info.get("index") if isinstance(extra_info, Mapping) else None
    if isinstance(index, bool) or not (isinstance(index, (int, np.integer)) or (isinstance(index, str) and index)):
        raise ValueError(
            f"prompt uid={uid} (data_source={data_source!r}): the row's 'extra_info.index' is {index!r}; "
            f"{AGENT_NAME} keys its fork, latent and sampling seeds on (data_source, extra_info.index) and needs "
            "an int or non-empty str there (data_prep.prepare writes the row's position in its source)"
        )
    return json.dumps([data_source, index if isinstance(index, str) else int(index)])


@dataclass(frozen=True)
class SessionSeeds:
    """The seeds one session uses (all 63-bit ints from ``derived_seed``).

    fork: the draw of the fork point this session's round forks at (an initial rollout: its own
    fork point, which round 1 forks at); latent: that fork point's K latent draws (one
    latent-service request); inject: this branch's latent-schedule draw (None for an initial
    rollout); sampling: the vLLM per-request seed (None unless ``agent_loop.sampling_seed`` is set).
    """

    fork: int
    latent: int
    inject: int | None
    sampling: int | None


def _round_parts(round_index: int) -> tuple:
    # round 1 keeps the seed parts of the single-round recipe (same draws as before rounds existed)
    return () if round_index <= 1 else ("round", round_index)


def fork_seeds(seed_key: str, global_steps: Any, parent: int, round_index: int, rollout_seed: int) -> tuple[int, int]:
    """(fork, latent) seeds of the fork point that round ``round_index``'s branches of ``parent``
    continue from: round 1 forks the initial rollout, round r >= 2 the survivor of round r - 1."""
    parts = _round_parts(round_index)
    return (derived_seed(rollout_seed, global_steps, seed_key, "fork", parent, *parts),
            derived_seed(rollout_seed, global_steps, seed_key, "latent", parent, *parts))


def session_seeds(
    seed_key: str, global_steps: Any, role: SessionRole, rollout_seed: int, sampling_seed: int | None
) -> SessionSeeds:
    """Seeds of one session from the prompt's ``prompt_seed_key``, the step and the session's role.

    fork / latent depend on the parent and round only (a round's branches share them); inject
    and sampling are per branch. ``rollout_seed`` is ``actor_rollout_ref.rollout.seed``. Round 1
    uses the parts of the single-round recipe, so R = 1 draws what it always drew.
    """
    parent = role.parent_index
    fork_round = 1 if role.role == ROLE_INITIAL else role.round_index
    fork, latent = fork_seeds(seed_key, global_steps, parent, fork_round, rollout_seed)
    parts = _round_parts(fork_round)
    branch_parts = () if role.role == ROLE_INITIAL else (*parts, role.branch_index)
    return SessionSeeds(
        fork=fork,
        latent=latent,
        inject=None if role.role == ROLE_INITIAL else derived_seed(rollout_seed, global_steps, seed_key, "inject",
                                                                    parent, *parts, role.branch_index),
        sampling=None if sampling_seed is None else derived_seed(sampling_seed, global_steps, seed_key, parent,
                                                                 *branch_parts),
    )
