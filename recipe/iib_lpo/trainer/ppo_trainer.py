"""verl 0.9.1's synchronous V1 trainer with the I2B-LPO step (METHOD.md steps 5-8).

``IibLpoTrainer`` is ``PPOTrainerSync`` with six hooks changed; everything else (rollout,
reward, old log-probs, rollout correction, actor update, weight sync, validation, checkpoints)
is verl's. With ``algorithm.adv_estimator`` other than ``iib_lpo`` (the GRPO / DAPO baselines
launched through the same entry point) it behaves exactly like ``PPOTrainerSync``.

- ``_compute_advantage``: after verl's reward (and rollout correction, as the base does; KL in
  the reward is refused at start-up: r_v must stay the verifiable reward), S_IB per trajectory
  (token-level estimators over each row's own tokens, ``ib.own_tokens``), Top-N filter per fork
  source, the ``iib_lpo`` advantage over the kept group (``ib_step.iib_lpo_step``); dropped rows
  get advantage 0 and zero ``response_mask`` AND ``loss_mask`` (the engine's token-mean
  denominator is ``loss_mask.sum()``), so they add nothing to the loss. verl's advantage-estimator
  registry is not used: the step needs per-row fields verl's estimator call does not pass.
- ``_update_actor``: with ``iib_lpo.advantage.dropped_rows=remove`` (default) verl's update runs on
  the rows that train (``update_row_indices``), with the mini-batch size that gives verl's number of
  optimizer steps; the step returns the whole batch (metrics, dump, TransferQueue clean-up).
- ``_dump_generations``: with ``trainer.rollout_data_dir`` set, verl's per-step generation dump
  also carries each row's step (``STEP_ROW_FIELDS``: role, S_IB, keep, advantage, ...).
- ``on_init_end``: installs ``trainer.loss.iib_lpo_ppo_loss`` when ``iib_lpo.loss_terms.lambda_reg > 0``.
- ``_save_checkpoint`` / ``_load_checkpoint``: verl's, honouring ``trainer.resume_mode``
  (disable / auto: the folder ``latest_checkpointed_iteration.txt`` names / resume_path:
  ``trainer.resume_from_path``). The recipe's state (``recipe_state``: every setting that changes
  what a step does) is written into the step folder BEFORE verl's files, whose tracker file verl
  writes last, so a save cut off midway leaves the tracker on the previous complete checkpoint;
  on resume the folder must hold the actor, the dataloader state and the recipe state (else a
  refusal naming what is missing), and a setting that differs refuses with the field named, so
  step k+1 after a resume is the step an uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo.rollout_corr_helper import (
    compute_rollout_corr_metrics_from_logprobs,
    compute_rollout_correction_and_add_to_batch,
)
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions
from verl.workers.utils.padding import response_to_nested

from recipe.iib_lpo.algorithm.advantage import ADV_ESTIMATOR_NAME, AdvantageConfig, group_zscore
from recipe.iib_lpo.algorithm.ib import IBConfig, TextStats, ib_estimator_spec, question_text, trajectory_ib_inputs
from recipe.iib_lpo.algorithm.ib_step import ROW_BRANCH, ROW_INITIAL, ROW_RESAMPLE, IBStepResult, RowRole, iib_lpo_step, row_role
from recipe.iib_lpo.algorithm.loss_terms import LossTermsConfig
from recipe.iib_lpo.trainer.step_metrics import iib_lpo_step_metrics, importance_sampling_metrics, is_truncation_threshold

logger = logging.getLogger(__name__)

RECIPE_STATE_FILE = "iib_lpo_state.json"
# what a resumable step folder must hold besides the recipe state (verl writes them)
CHECKPOINT_PARTS = ("actor", "data.pt")


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def recipe_state(config: Any, global_steps: int) -> dict:
    """Every recipe setting that changes what a step does, besides the step itself (saved with each
    checkpoint and compared on resume, key by key): the group layout (M, K, rounds), the fork rule,
    the entropy's k, the latent (mode, schedule, its horizon), the IB settings, the advantage and
    loss terms, and the seeds (rollout seed, ``iib_lpo.agent_loop.sampling_seed``)."""
    iib = config.iib_lpo
    latent = iib.latent
    return {
        "global_steps": int(global_steps),
        "latent_mode": str(latent.get("mode")),
        "latent_schedule": _plain(latent.get("schedule")),
        "latent_total_steps": latent.get("total_steps"),
        "rollout_seed": int(config.actor_rollout_ref.rollout.get("seed", 0)),
        "sampling_seed": iib.agent_loop.get("sampling_seed"),
        "num_initial_rollouts": int(iib.num_initial_rollouts),
        "num_branches": int(iib.num_branches),
        "rounds": int(iib.ib.rounds),
        "branching": _plain(iib.get("branching")),
        "entropy_top_k": int(iib.entropy.top_k),
        "ib": _plain(iib.ib),
        "advantage": _plain(iib.get("advantage")),
        "loss_terms": _plain(iib.get("loss_terms")),
    }


def resume_folder(trainer_config: Any) -> str | None:
    """The step folder verl 0.9.1's ``_load_checkpoint`` resumes from under ``trainer.resume_mode``
    (None: a fresh start). Raises ValueError for a mode verl does not know (verl only logs it)."""
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    mode = trainer_config.resume_mode
    if mode == "disable":
        return None
    if mode == "auto":
        return find_latest_ckpt_path(os.path.abspath(trainer_config.default_local_dir))
    if mode == "resume_path":
        folder = os.path.abspath(str(trainer_config.resume_from_path))
        if not os.path.basename(folder.rstrip("/")).startswith("global_step_"):
            raise ValueError(f"trainer.resume_from_path={trainer_config.resume_from_path!r} must be a global_step_<N> "
                             "folder (verl reads the step from its name)")
        return folder
    raise ValueError(f"trainer.resume_mode={mode!r}: verl knows disable, auto and resume_path")


def dead_actor_error(err: BaseException, dead: list[str], global_steps: int | None,
                     checkpoint_dir: str) -> RuntimeError | None:
    """The error a run stops with when a Ray actor died under it: what died, at which step, and the
    checkpoint ``trainer.resume_mode=auto`` would continue from. ``dead`` names the actors found
    dead after ``err`` (``probe_dead_actors``): verl's agent loop turns a dead server's
    ``ActorDiedError`` into failed groups, so ``err`` is then the replay buffer's "no materializable
    trajectories", not Ray's error. Without ``dead``, Ray's actor-death error in ``err``'s cause
    chain names the actor's class. None when neither shows a dead actor."""
    from ray.exceptions import RayActorError
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    what = ", ".join(dead)
    if not what:
        cause = err
        while cause is not None and not isinstance(cause, RayActorError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            return None
        actor_class = re.search(r"class_name:\s*([\w.]+)", str(cause))  # Ray lists the dead actor's class
        what = actor_class.group(1) if actor_class else type(cause).__name__
    last = find_latest_ckpt_path(os.path.abspath(checkpoint_dir))
    where = (f"the last complete checkpoint is {last}: rerun with trainer.resume_mode=auto to continue from it"
             if last else "no checkpoint was saved yet (trainer.save_freq), so the run starts again from step 1")
    first_line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return RuntimeError(f"a Ray actor died during training step {global_steps}: {what}. The trainer stopped; "
                        f"{where}. (The error that stopped the step: {type(err).__name__}: {first_line})")


def probe_dead_actors(handles: dict[str, Any], timeout_s: float = 10.0) -> list[str]:
    """The names in ``handles`` (name -> Ray actor handle) whose actor is dead: a ``__ray_ready__``
    call fails with ``RayActorError``. An actor still busy after ``timeout_s`` counts as alive."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    refs = {name: handle.__ray_ready__.remote() for name, handle in handles.items()}
    dead = []
    for name, ref in refs.items():
        try:
            ray.get(ref, timeout=timeout_s)
        except RayActorError:
            dead.append(name)
        except GetTimeoutError:
            pass
    return dead


def check_resume_folder(folder: str, saved_state: dict | None, now: dict) -> None:
    """Refuse a step folder that is incomplete or was written under other settings (ValueError naming
    the missing parts or each differing field with its saved and current value)."""
    missing = [part for part in CHECKPOINT_PARTS if not os.path.exists(os.path.join(folder, part))]
    if saved_state is None:
        missing.append(RECIPE_STATE_FILE)
    if missing:
        raise ValueError(
            f"resuming from {folder}: the checkpoint is incomplete (missing {missing}); it was cut off while "
            "saving or not written by this recipe's trainer. Resume from the previous global_step_* folder "
            "(trainer.resume_mode=resume_path trainer.resume_from_path=...) or start fresh"
        )
    changed = {k: {"saved": saved_state.get(k), "now": v} for k, v in now.items() if saved_state.get(k) != v}
    if changed:
        fields = ", ".join(f"{k} (saved {d['saved']!r}, now {d['now']!r})" for k, d in changed.items())
        raise ValueError(
            f"resuming from {folder}: these settings differ from the checkpoint's: {fields}. The resumed "
            "steps would not continue the run; restore them (or start a new run in a new trainer.default_local_dir)"
        )


# what the trainer adds to each training row of verl's generation dump (trainer.rollout_data_dir)
STEP_ROW_FIELDS = ("iib_role", "iib_session_id", "iib_parent_index", "iib_round", "iib_fork_source",
                   "iib_prefix_length", "iib_reward", "iib_ib_score", "iib_keep", "iib_advantage")


def step_rows(keys: list[str], roles: list[RowRole], extra_fields: list[dict], rewards: torch.Tensor,
              result: IBStepResult, response_mask: torch.Tensor) -> dict[str, dict]:
    """Per batch key, the I2B-LPO step of that row (``STEP_ROW_FIELDS``): its role (``ROW_*``),
    session, parent, round, fork source (session id, -1 for none) and inherited prefix length, the
    r_v and S_IB it was scored with, whether the Top-N filter kept it, and its advantage (the value
    on every token of its response mask; 0 for a dropped row or one without response tokens)."""
    out = {}
    for i, key in enumerate(keys):
        tokens = result.advantages[i][response_mask[i] > 0]
        out[key] = {
            "iib_role": roles[i].kind, "iib_session_id": roles[i].session_id,
            "iib_parent_index": roles[i].parent_index, "iib_round": roles[i].round_index,
            "iib_fork_source": int(extra_fields[i].get("iib_fork_source", -1)),
            "iib_prefix_length": roles[i].prefix_length, "iib_reward": float(rewards[i]),
            "iib_ib_score": float(result.scores[i]), "iib_keep": bool(result.keep[i]),
            "iib_advantage": float(tokens[0]) if tokens.numel() else 0.0,
        }
    return out


def update_row_indices(trains: Sequence[bool], multiple: int) -> list[int]:
    """The batch rows (indices, in batch order) the actor update gets when the IB filter's dropped
    rows are removed: every row with ``trains`` (kept, with a loss token), plus the fewest other
    rows, first in batch order, that make the count a positive multiple of ``multiple``
    (mini-batches x data-parallel ranks x the micro-batch size, when it is fixed); those stay
    loss-masked. The batch length must itself be a multiple of ``multiple`` (verl pads it so), so
    the fill always exists."""
    n = len(trains)
    if multiple < 1 or n == 0 or n % multiple:
        raise ValueError(f"a batch of {n} rows cannot be split into a multiple of {multiple}")
    train = [i for i, t in enumerate(trains) if t]
    target = max(1, math.ceil(len(train) / multiple)) * multiple
    fill = [i for i, t in enumerate(trains) if not t][: target - len(train)]
    return sorted(train + fill)


class _PinnedExtraInfo(dict):
    """A ``KVBatchMeta.extra_info`` whose ``pinned`` entries survive ``update``: verl's
    ``_update_actor`` sets the mini-batch size to ppo_mini_batch_size x rollout.n rows, which counts
    rows a batch without the dropped rows no longer has."""

    def __init__(self, base: dict, pinned: dict):
        self._pinned = dict(pinned)
        super().__init__(base)
        super().update(self._pinned)

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        super().update(self._pinned)


class IibLpoTrainer(PPOTrainerSync):
    """``PPOTrainerSync`` + the I2B-LPO step (module docstring)."""

    _iib_step_rows: dict[str, dict] | None = None  # the last step's ``step_rows``, for the generation dump
    _iib_update_trains: list[bool] | None = None  # this step's rows with a loss token (dropped_rows=remove)

    def _iib_enabled(self) -> bool:
        return self.config.algorithm.adv_estimator == ADV_ESTIMATOR_NAME

    # -- hooks --------------------------------------------------------------------------------

    def on_init_end(self):
        super().on_init_end()
        lambda_reg = float(self.config.iib_lpo.loss_terms.lambda_reg) if self._iib_enabled() else 0.0
        if lambda_reg > 0:
            from verl.utils.config import omega_conf_to_dataclass

            from recipe.iib_lpo.trainer.loss import iib_lpo_ppo_loss

            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(partial(iib_lpo_ppo_loss, actor_config, lambda_reg=lambda_reg))

    def _save_checkpoint(self):
        if self._iib_enabled():
            # first: verl writes its tracker file last, so a cut-off save is never resumed from
            folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, RECIPE_STATE_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(recipe_state(self.config, self.global_steps), f, indent=1)
            os.replace(tmp, os.path.join(folder, RECIPE_STATE_FILE))
        super()._save_checkpoint()

    def _load_checkpoint(self):
        folder = resume_folder(self.config.trainer) if self._iib_enabled() else None
        if folder is not None:  # checked before verl loads anything from it
            path = os.path.join(folder, RECIPE_STATE_FILE)
            saved = None
            if os.path.exists(path):
                with open(path) as f:
                    saved = json.load(f)
            step = int(folder.rstrip("/").split("global_step_")[-1])
            now = recipe_state(self.config, step)
            if saved is not None and saved.get("latent_total_steps") is not None and now["latent_total_steps"] is None:
                self.config.iib_lpo.latent.total_steps = saved["latent_total_steps"]
                now["latent_total_steps"] = saved["latent_total_steps"]
            check_resume_folder(folder, saved, now)
        super()._load_checkpoint()

    def actor_handles(self, agent_loop_manager: Any = None) -> dict[str, Any]:
        """The run's Ray actors by a name a user can act on: rollout servers, agent-loop workers, training workers."""
        handles = {}
        manager = getattr(self, "llm_server_manager", None)
        for i, replica in enumerate(getattr(manager, "rollout_replicas", None) or []):
            for j, server in enumerate(getattr(replica, "servers", None) or []):
                handles[f"rollout server {i}.{j} ({type(replica).__name__})"] = server
        for i, worker in enumerate(getattr(agent_loop_manager, "agent_loop_workers", None) or []):
            handles[f"agent-loop worker {i}"] = worker
        for i, worker in enumerate(getattr(getattr(self, "actor_rollout_wg", None), "workers", None) or []):
            handles[f"actor worker {i}"] = worker
        return handles

    # -- the I2B-LPO step ---------------------------------------------------------------------

    def _compute_advantage(self, batch, metrics: dict):
        metrics["diagnostics/zero_variance_groups"] = self._zero_variance_groups(batch)
        if not self._iib_enabled():
            return super()._compute_advantage(batch, metrics)
        start = time.perf_counter()
        # algorithm.use_kl_in_reward is refused at start-up (startup_checks): r_v must stay the
        # verifiable reward, so token_level_rewards are verl's scores unchanged
        fields = ["uid", "session_id", "data_source", "extra_info", "extra_fields", "responses", "response_mask",
                  "rm_scores", "rollout_log_probs", "old_log_probs", "entropy", "prompts"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        nested_mask = data["response_mask"]
        rows = {key: data.pop(key).tolist() for key in ("uid", "session_id", "data_source", "extra_info", "extra_fields")}
        prompt_lengths = [int(p.shape[0]) for p in data.pop("prompts").unbind(0)]
        lengths = [int(r.shape[0]) for r in data.pop("responses").unbind(0)]
        data = DataProto(batch=data.to_padded_tensor())
        data.batch["token_level_scores"] = data.batch["rm_scores"]
        data.batch["token_level_rewards"] = data.batch["token_level_scores"]

        # kind, round, inherited prefix and (rounds > 1) the rollout's Top-N decision of every row (ib_step.row_role)
        roles = [row_role(u, s, e) for u, s, e in zip(rows["uid"], rows["session_id"], rows["extra_fields"], strict=True)]
        rollout_corr_config = self.config.algorithm.get("rollout_correction", None)
        bypass = rollout_corr_config is not None and rollout_corr_config.get("bypass_mode", False)
        # before rollout correction can touch the mask
        metrics.update(self._importance_sampling_by_role(data, roles, rows["extra_fields"], rollout_corr_config))
        if rollout_corr_config is not None and "rollout_log_probs" in data.batch and not bypass:
            metrics.update(self._rollout_corr_by_role(data, roles))
            data, is_metrics = compute_rollout_correction_and_add_to_batch(data, rollout_corr_config)
            metrics.update(is_metrics)

        rewards = data.batch["token_level_rewards"].sum(dim=-1).to(torch.float64)
        if bool(((rewards < 0) | (rewards > 1)).any()):
            raise ValueError(
                f"I2B-LPO needs verifiable rewards r_v in [0, 1] for its IB scores; got {rewards.min():.3f}..."
                f"{rewards.max():.3f}. Use the binary reward style (reward_style=binary) and no reward shaping."
            )
        iib = self.config.iib_lpo
        ib_config = IBConfig(**dict(iib.ib))
        adv_config = AdvantageConfig(**dict(iib.advantage))
        mask = data.batch["response_mask"]
        stats = [self._text_stats_of_row(e, role) for e, role in zip(rows["extra_fields"], roles, strict=True)]
        token_adv = (self._grpo_token_advantages(rewards, roles, adv_config.eps)
                     if ib_estimator_spec(ib_config.estimator).needs_token_advantages else None)
        entropy = data.batch.get("entropy")
        max_tokens = int(self.config.actor_rollout_ref.rollout.response_length)
        trajectories = [
            trajectory_ib_inputs(  # a branch's token-level terms over its own tokens, as the rollout ranks it
                question=question_text(rows["extra_info"][i]), reward=float(rewards[i]), num_tokens=lengths[i],
                max_tokens=max_tokens, prefix_length=roles[i].prefix_length, text_stats=stats[i],
                entropies=entropy[i] if entropy is not None else None,
                token_advantage=token_adv[i] if token_adv is not None else None,
            )
            for i in range(len(roles))
        ]
        result = iib_lpo_step(trajectories, roles, mask, ib_config, adv_config.lambda_ib, adv_config.eps)
        data.batch["advantages"], data.batch["returns"] = result.advantages, result.returns
        data.batch["response_mask"] = result.response_mask
        if adv_config.dropped_rows == "remove":  # _update_actor leaves the others out
            self._iib_update_trains = [bool(k) and bool(m.any()) for k, m in zip(result.keep, result.response_mask)]

        out_fields = ["advantages", "returns", "response_mask"]
        if "rollout_is_weights" in data.batch:
            out_fields.append("rollout_is_weights")
        output = {name: response_to_nested(data.batch[name], nested_mask) for name in out_fields}
        output["loss_mask"] = output["response_mask"]
        self._iib_step_rows = step_rows(batch.keys, roles, rows["extra_fields"], rewards, result, mask)
        batch = tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(output, batch_size=len(batch))
        )
        metrics.update(
            iib_lpo_step_metrics(roles, rows["extra_fields"], rewards, result.scores, result.keep, prompt_lengths,
                                 [s.rep4 for s in stats], recomputed_keep=result.recomputed_keep)
        )
        metrics["timing_s/iib_lpo_ib_filter_adv"] = time.perf_counter() - start
        return batch

    def _update_actor(self, batch, metrics: dict):
        """verl's update on the rows that train (``update_row_indices``) when ``iib_lpo.advantage.
        dropped_rows=remove``; the step still returns the whole batch (metrics, dump, clean-up)."""
        trains, self._iib_update_trains = self._iib_update_trains, None
        if trains is None:
            return super()._update_actor(batch, metrics)
        dp_size = max(self.actor_rollout_wg._dispatch_info["actor"]) + 1  # filled by _balance_batch
        rows_per_mini_batch = (int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size)
                               * int(self.config.actor_rollout_ref.rollout.n))
        num_mini_batches = len(batch) // rows_per_mini_batch  # _balance_batch padded to a multiple
        actor = self.config.actor_rollout_ref.actor
        # without dynamic batch sizes verl's engine splits each rank's mini-batch into fixed micro-batches
        micro = 1 if actor.get("use_dynamic_bsz", False) else int(actor.ppo_micro_batch_size_per_gpu)
        rows = update_row_indices(trains, num_mini_batches * dp_size * micro)
        mini_batch = len(rows) // num_mini_batches  # as many optimizer steps as verl takes on the whole batch
        update = batch.select_keys([batch.keys[i] for i in rows])
        update.extra_info = _PinnedExtraInfo(update.extra_info, {"global_batch_size": mini_batch,
                                                                 "mini_batch_size": mini_batch})
        if dp_size > 1:  # the rows left are re-spread over the ranks by tokens, as verl's _balance_batch does
            workload = calculate_workload(torch.tensor([tag["seq_len"] for tag in update.tags], dtype=torch.int64))
            parts = get_seqlen_balanced_partitions(workload, k_partitions=dp_size, equal_size=True)
            update.reorder([j for part in parts for j in part])
        super()._update_actor(update, metrics)
        metrics["iib_lpo/update_rows"] = len(rows)
        metrics["iib_lpo/update_rows_removed"] = len(batch) - len(rows)
        return batch

    def _dump_generations(self, inputs, outputs, gts, scores, reward_extra_infos_dict, dump_path):
        """verl's generation dump (``trainer.rollout_data_dir``, one JSONL per step) with each training
        row's I2B-LPO step added (``STEP_ROW_FIELDS``, from ``step_rows``); validation dumps and the
        baselines' are verl's own."""
        rows, keys = self._iib_step_rows, reward_extra_infos_dict.get("uid")
        if rows and keys is not None and all(k in rows for k in keys):
            reward_extra_infos_dict = {**reward_extra_infos_dict,
                                       **{name: [rows[k][name] for k in keys] for name in STEP_ROW_FIELDS}}
        super()._dump_generations(inputs, outputs, gts, scores, reward_extra_infos_dict, dump_path)

    @staticmethod
    def _text_stats_of_row(extra_fields: dict, role: RowRole) -> TextStats:
        """The IB text statistics the agent loop stored with the row; a row without them is refused
        (it did not come from the branching agent loop, or its ``extra_info.question`` was missing)."""
        stats = TextStats.from_extra_fields(extra_fields)
        if stats is None:
            raise ValueError(
                f"row uid={role.uid} session_id={role.session_id}: no IB text statistics "
                f"({sorted(TextStats.FIELDS.values())}) in its extra_fields. The branching agent loop writes them "
                "as each trajectory finishes when the row has extra_info.question; train I2B-LPO with "
                "actor_rollout_ref.rollout.agent.default_agent_loop=iib_lpo_branching on data_prep's parquet files"
            )
        return stats

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _zero_variance_groups(batch) -> float:
        """``step_metrics.zero_variance_group_share`` of verl's rewards, grouped by prompt uid (all algorithms)."""
        from recipe.iib_lpo.trainer.step_metrics import zero_variance_group_share

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["uid", "rm_scores"])
        rewards = [float(r.sum()) for r in data["rm_scores"].unbind(0)]
        return zero_variance_group_share(rewards, data.pop("uid").tolist())  # pop: the NonTensorStack, not its values

    @staticmethod
    def _grpo_token_advantages(rewards: torch.Tensor, roles: list[RowRole], eps: float) -> torch.Tensor:
        """z(r_v) per row over its prompt group: the A of the ``ibro`` estimator's mean(A * H)."""
        groups: dict[str, list[int]] = {}
        for i, role in enumerate(roles):
            groups.setdefault(role.uid, []).append(i)
        return group_zscore(rewards, groups, [True] * len(roles), eps).to(torch.float32)

    @staticmethod
    def _rollout_corr_by_role(data: DataProto, roles: list[RowRole]) -> dict[str, float]:
        """verl's off-policy metrics (old vs rollout log-probs) for initial and branch tokens apart."""
        out = {}
        for name, kinds in (("initial", (ROW_INITIAL, ROW_RESAMPLE)), ("branch", (ROW_BRANCH,))):
            rows = [i for i, r in enumerate(roles) if r.kind in kinds]
            if not rows:
                continue
            idx = torch.tensor(rows)
            sub = compute_rollout_corr_metrics_from_logprobs(
                data.batch["old_log_probs"][idx], data.batch["rollout_log_probs"][idx],
                data.batch["response_mask"][idx],
            )
            out.update({f"iib_lpo/{name}_{k.split('/', 1)[1]}": v for k, v in sub.items()})
        return out

    @staticmethod
    def _importance_sampling_by_role(data: DataProto, roles: list[RowRole], extra_fields: list[dict],
                                     rollout_corr_config: Any) -> dict[str, float]:
        """``step_metrics.importance_sampling_metrics`` (``iib_lpo/is/<role>/...``) of the batch, with the
        truncation threshold of the run's ``algorithm.rollout_correction.rollout_is_threshold`` (verl's
        default 2.0 without one), over every sampled response token (the mask before the Top-N filter
        and rollout correction, so dropped branches count too). {} without both ``old_log_probs`` and
        ``rollout_log_probs``, and in bypass mode, where verl copies the rollout's log-probs into
        ``old_log_probs`` (every w = 1)."""
        bypass = rollout_corr_config is not None and rollout_corr_config.get("bypass_mode", False)
        if bypass or "old_log_probs" not in data.batch or "rollout_log_probs" not in data.batch:
            return {}
        threshold = is_truncation_threshold(
            rollout_corr_config.get("rollout_is_threshold") if rollout_corr_config is not None else None
        )
        return importance_sampling_metrics(roles, extra_fields, data.batch["old_log_probs"],
                                           data.batch["rollout_log_probs"], data.batch["response_mask"], threshold)
