"""math-verify in a pool of persistent verifier processes, with a hard deadline in any thread and
an eval guard. The only module of the reward that runs sympy (inside the child process).

What this adds to math-verify's own ``parse``/``verify``, and why:

* A hard time limit that works in any thread. math-verify's timeout is ``signal.alarm``, which
  ``parse`` refuses off the main thread (tests/test_reward_runtime.py
  ``test_math_verify_default_timeout_fails_off_the_main_thread``), and verl calls the reward from
  executor threads; and some sympy work ignores signals (``9^{9^{9}}`` is one C-level power). So
  sympy runs in child processes started with ``subprocess.Popen`` (no ``multiprocessing``:
  nothing re-imports the caller's ``__main__``, so scripts without a main guard work); the
  caller waits on the pipe with ``select`` until the deadline and kills and replaces the child
  when it passes. A soft ``setitimer`` limit in the child's main thread stops interruptible work
  earlier, so the common slow case costs no restart. The child runs under an address-space
  limit, dies with its parent (``PR_SET_PDEATHSIG``) and is replaced if it crashes.
* An eval guard. Only math-verify's ``LatexExtractionConfig`` is used (an ANTLR grammar that
  builds sympy objects); ``ExprExtractionConfig`` feeds text to ``sympy.parse_expr``, i.e.
  ``eval``, and is never used. As a second line of defence the child replaces ``parse_expr``
  (which ``sympify`` of a string also calls) with a guard that lets only numeric literals
  through (latex2sympy builds numbers with ``sympy.Number(<digit token>)``).

The comparison itself (:func:`_worker_main`'s ``judge``) is math-verify's, unchanged:
``parse("\\boxed{..}", [LatexExtractionConfig(boxed_match_priority=0)])`` on both sides, then
``verify(gold, pred)``, with math-verify's default normalisation.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

# This file is also run as a script in the child (see _WORKER_BOOT): it imports nothing of the
# recipe, only the standard library here and math-verify/sympy inside _worker_main.

logger = logging.getLogger(__name__)

#: Soft limit inside the verifier, as a fraction of the hard limit: interruptible work stops
#: here and the process is kept; only work that ignores signals runs into the hard kill.
SOFT_TIMEOUT_FRACTION = 0.8
#: How long to wait for a fresh verifier process to import sympy/math-verify (a loaded 2-core
#: CI box needs a few seconds; a process that does not come up is an environment error).
STARTUP_TIMEOUT_S = 120.0
#: Most verifier processes per Python process (env ``IIB_LPO_VERIFIER_PROCS``). They are started
#: lazily, one per concurrent check, so a single-threaded caller uses one. ~60 MB each.
DEFAULT_MAX_VERIFIER_PROCS = 2
#: Address-space limit of a verifier process (env ``IIB_LPO_VERIFIER_MEMORY_MB``); exceeding it
#: raises MemoryError inside sympy (reason ``verifier_error:MemoryError``) instead of swapping.
DEFAULT_VERIFIER_MEMORY_MB = 1024


class VerifierUnavailableError(RuntimeError):
    """The verifier process could not be started: an environment problem, not a bad answer."""


@dataclass(frozen=True)
class CheckResult:
    """``equal`` plus the path that decided it (or why the check failed, then equal=False).

    Deciding reasons: ``exact_string`` (same normalised text), ``exact_number`` (plain rationals
    compared exactly), ``text_mismatch`` (the prediction is prose/code, not math, and differs as
    text), ``math_verify``. Failure reasons (logged; equal is False): ``answer_too_long``,
    ``answer_too_deep``, ``answer_unbalanced`` (and ``gold_*`` for the gold), ``bad_input_type``,
    ``empty_answer``, ``timeout``, ``verifier_crashed``, ``verifier_busy``,
    ``unsafe_parse_blocked``, ``verifier_error:<Exception>``. Defined here because the verifier
    answers with it; the in-process paths of answer_checking.py return it too.
    """

    equal: bool
    reason: str

    @property
    def failed(self) -> bool:
        return self.reason not in ("exact_string", "exact_number", "text_mismatch", "math_verify")


# ---------------------------------------------------------------------------------------------
# Verifier process pool (parent side)
# ---------------------------------------------------------------------------------------------
_WORKER_BOOT = (
    # Drop the script directory / cwd entry first so that no file next to the caller can shadow
    # sympy or the standard library, then run this file (not the package: its __init__ may
    # import heavy modules) as the worker.
    "import sys; sys.path.pop(0); import runpy; "
    "runpy.run_path(sys.argv[1], run_name='__iib_lpo_verifier__')"
)


_EOF = {"eof": True}


class _Spawner:
    """Starts verifier processes from one long-lived daemon thread.

    The verifier asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), and Linux
    ties that to the parent *thread*: a process started from a short-lived caller thread would
    be killed when that thread ends. Starting every process from this thread avoids that.
    """

    def __init__(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="iib-lpo-verifier-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            argv, box, done = self._requests.get()
            try:
                box["proc"] = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, close_fds=True
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            done.set()

    def popen(self, argv: list[str]) -> subprocess.Popen:
        box: dict = {}
        done = threading.Event()
        self._requests.put((argv, box, done))
        done.wait()
        if "error" in box:
            raise VerifierUnavailableError(f"could not start the math verifier process: {box['error']}")
        return box["proc"]


class _VerifierProcess:
    def __init__(self, spawner: _Spawner) -> None:
        self.proc = spawner.popen([sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)])
        self._buffer = b""
        self._next_id = 0
        ready = self._read_message(time.monotonic() + STARTUP_TIMEOUT_S)
        if ready is None or not ready.get("ready"):
            self.kill()
            raise VerifierUnavailableError(
                f"math verifier process did not start within {STARTUP_TIMEOUT_S:.0f} s "
                f"(python={sys.executable}); is math-verify installed?"
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - kill -9 does not hang
            logger.error("verifier process %s did not exit after SIGKILL", self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _read_message(self, deadline: float) -> dict | None:
        """Next JSON line from the worker; None on timeout, ``_EOF`` when the worker is gone.

        ``select`` with a deadline works in any thread (unlike signal-based timeouts)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return _EOF
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def check(self, pred: str, gold: str, timeout_s: float) -> tuple[CheckResult, bool]:
        """(result, process still usable)."""
        self._next_id += 1
        request = {"id": self._next_id, "pred": pred, "gold": gold, "soft_timeout_s": timeout_s * SOFT_TIMEOUT_FRACTION}
        deadline = time.monotonic() + timeout_s
        try:
            self.proc.stdin.write(json.dumps(request, ensure_ascii=True).encode("ascii") + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return CheckResult(False, "verifier_crashed"), False
        reply = self._read_message(deadline)
        if reply is None:
            return CheckResult(False, "timeout"), False
        if reply is _EOF:
            return CheckResult(False, "verifier_crashed"), False
        if reply.get("id") != self._next_id:  # pragma: no cover - protocol invariant
            return CheckResult(False, "verifier_error:protocol"), False
        return CheckResult(bool(reply["equal"]), str(reply["reason"])), True


class _VerifierPool:
    """Lazily started verifier processes; one check uses one process at a time."""

    def __init__(self, max_procs: int) -> None:
        self.max_procs = max_procs
        self.pid = os.getpid()
        self._spawner = _Spawner()
        self._slots = threading.BoundedSemaphore(max_procs)
        self._lock = threading.Lock()
        self._idle: list[_VerifierProcess] = []
        self._all: set[_VerifierProcess] = set()

    def _take(self) -> _VerifierProcess:
        with self._lock:
            while self._idle:
                proc = self._idle.pop()
                if proc.alive():
                    return proc
                self._all.discard(proc)
                proc.kill()  # reap it and close its pipes
        proc = _VerifierProcess(self._spawner)
        with self._lock:
            self._all.add(proc)
        return proc

    def _give_back(self, proc: _VerifierProcess, usable: bool) -> None:
        with self._lock:
            if usable and proc.alive():
                self._idle.append(proc)
                return
            self._all.discard(proc)
        proc.kill()

    def check(self, pred: str, gold: str, timeout_s: float) -> CheckResult:
        # Waiting for a free process is bounded too: each holder releases within its timeout.
        if not self._slots.acquire(timeout=max(30.0, 10 * timeout_s) + STARTUP_TIMEOUT_S):
            return CheckResult(False, "verifier_busy")
        try:
            for attempt in range(2):
                proc = self._take()
                result, usable = proc.check(pred, gold, timeout_s)
                self._give_back(proc, usable)
                # A crash can have an outside cause (the process was killed, e.g. by the OOM
                # killer); retry once on a fresh process. Timeouts are final.
                if result.reason != "verifier_crashed":
                    return result
            return result
        finally:
            self._slots.release()

    def warm_up(self) -> None:
        self._give_back(self._take(), True)

    def close(self) -> None:
        with self._lock:
            procs = list(self._all)
            self._all.clear()
            self._idle.clear()
        for proc in procs:
            proc.kill()


_POOL: _VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _VerifierPool:
    global _POOL
    with _POOL_LOCK:
        # After a fork the child must not share the parent's pipes: start its own pool.
        if _POOL is None or _POOL.pid != os.getpid():
            procs = int(os.environ.get("IIB_LPO_VERIFIER_PROCS", DEFAULT_MAX_VERIFIER_PROCS))
            if procs < 1:
                raise ValueError(f"IIB_LPO_VERIFIER_PROCS must be >= 1, got {procs}")
            _POOL = _VerifierPool(procs)
        return _POOL


def math_verify_check(pred_latex: str, gold_latex: str, timeout_s: float) -> CheckResult:
    """math-verify's verdict on two normalised answers, within ``timeout_s`` seconds (any thread)."""
    return _pool().check(pred_latex, gold_latex, timeout_s)


def warm_up_verifier() -> None:
    """Start one verifier process now (otherwise the first non-trivial check pays ~1 s)."""
    _pool().warm_up()


def shutdown_verifier() -> None:
    """Kill all verifier processes of this process (they are restarted on demand)."""
    with _POOL_LOCK:
        pool = _POOL
    if pool is not None and pool.pid == os.getpid():
        pool.close()


atexit.register(shutdown_verifier)



# ---------------------------------------------------------------------------------------------
# Verifier process (child side). Runs when this file is executed by _WORKER_BOOT.
# ---------------------------------------------------------------------------------------------
_SAFE_LITERAL_RE = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,4})?\s*")


# Exercise the parser/grader paths once before the eval guard is installed (lazy imports).
_WARM_UP_PAIRS = (
    ("2\\pi", "6.28318"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\{1,2\\}", "(1,2]"),
    ("\\frac{\\sqrt{2}}{2}", "10\\text{ cm}"),
    ("\\sin x+e^{i\\pi}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
)


class _UnsafeParseBlocked(Exception):
    pass


def _install_eval_guard(state: dict) -> None:
    """Replace sympy's ``parse_expr`` (eval underneath) everywhere it is reachable."""
    import latex2sympy2_extended.latex2sympy2 as l2s
    import math_verify.parser as mv_parser
    import sympy.parsing
    import sympy.parsing.sympy_parser as sympy_parser

    original = sympy_parser.parse_expr

    def guarded_parse_expr(s, *args, **kwargs):
        if isinstance(s, str) and _SAFE_LITERAL_RE.fullmatch(s):
            return original(s, *args, **kwargs)
        state["blocked"] = True
        raise _UnsafeParseBlocked("refusing to evaluate non-literal text")

    # ``sympify(str)`` imports parse_expr from sympy_parser at call time, so this covers it.
    for module in (sympy_parser, sympy.parsing, mv_parser, l2s):
        module.parse_expr = guarded_parse_expr


def _limit_process() -> None:
    import resource

    memory_mb = int(os.environ.get("IIB_LPO_VERIFIER_MEMORY_MB", DEFAULT_VERIFIER_MEMORY_MB))
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            logger.warning("could not set the verifier memory limit")
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _worker_main() -> None:  # pragma: no cover - runs in the child; exercised by every test
    import signal

    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    _limit_process()
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException
    extraction = [LatexExtractionConfig(boxed_match_priority=0)]

    def judge(pred: str, gold: str) -> bool:
        gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=extraction, parsing_timeout=None)
        pred_parsed = parse("\\boxed{" + pred + "}", extraction_config=extraction, parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))

    # sympy imports some modules lazily on first use and those sympify constant strings at
    # import time (sympy.physics.units' prefixes); do that before the guard goes in.
    import sympy.physics.units  # noqa: F401

    for warm_pred, warm_gold in _WARM_UP_PAIRS:
        judge(warm_pred, warm_gold)
    state = {"blocked": False, "timed_out": False}
    _install_eval_guard(state)

    def on_alarm(signum, frame):
        state["timed_out"] = True
        raise TimeoutException("soft verifier timeout")

    signal.signal(signal.SIGALRM, on_alarm)

    protocol.write(b'{"ready": true}\n')
    for line in sys.stdin.buffer:
        request = json.loads(line)
        state["blocked"] = state["timed_out"] = False
        try:
            try:
                # The alarm repeats every 50 ms: math-verify swallows a TimeoutException raised
                # inside one comparison and goes on with the next, so one alarm is not enough.
                signal.setitimer(signal.ITIMER_REAL, max(0.05, float(request["soft_timeout_s"])), 0.05)
                equal, reason = judge(request["pred"], request["gold"]), "math_verify"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except TimeoutException:  # also when the alarm fires just before it is cancelled
            equal, reason = False, "timeout"
        except Exception as exc:  # noqa: BLE001 - any parser/sympy failure is a failed check
            equal, reason = False, f"verifier_error:{type(exc).__name__}"
        if state["timed_out"]:
            equal, reason = False, "timeout"
        elif state["blocked"]:
            equal, reason = False, "unsafe_parse_blocked"
        reply = {"id": request["id"], "equal": equal, "reason": reason}
        protocol.write(json.dumps(reply).encode("ascii") + b"\n")


if __name__ == "__iib_lpo_verifier__":
    _worker_main()
