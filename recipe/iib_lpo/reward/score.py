"""Verifiable math reward r_v (METHOD.md step 5) as a verl 0.9.1 custom reward function.

Use it in a verl config (0.9.1 reads ``reward.custom_reward_function``; the legacy top-level
``custom_reward_function`` is ignored by ``main_ppo``)::

    reward.custom_reward_function.path=pkg://recipe.iib_lpo.reward
    reward.custom_reward_function.name=compute_score
    # optional, forwarded as keyword arguments to every call (verl.trainer.ppo.reward
    # .get_custom_reward_fn merges them over the reward manager's own kwargs):
    +reward.custom_reward_function.reward_kwargs.reward_style=signed
    +reward.custom_reward_function.reward_kwargs.timeout_s=5.0

Note that ``reward.reward_kwargs`` (used by verl's DAPO manager for the overlong buffer) is NOT
passed to the reward function; ``reward.custom_reward_function.reward_kwargs`` is.

verl's reward managers call this function through ``loop.run_in_executor`` (a worker thread of a
Ray actor). Everything below is thread-safe and bounded in time; see verifier_pool.py for how.

What is scored (the contract; model output is never evaluated):

1. Extraction, first rule that applies. (a) The last ``\\boxed{..}`` / ``\\boxed x`` /
   ``\\fbox{..}``, taken as it is (text answers allowed). (b) Else the rest of the line after the
   last ``####``. (c) Else the rest of the line after the last ``Answer:`` / ``The answer is``
   (also ``answer is:``, case-insensitive; several on a line: the last one). For (b) and
   (c) a leading ``$..$`` / ``\\(..\\)`` is taken whole, otherwise the text up to the first ``. ``,
   ``;``, ``!`` or ``?``; and it must be mathematics (a number, an expression or LaTeX): a
   free-standing prose word ("The answer is not obvious", "... is yes") gives no answer, reason
   ``unparseable_answer``. Only the last statement counts, earlier ones are not tried. No answer
   (``no_answer``, ``empty_answer``, ``unterminated_box``, ``unparseable_answer``,
   ``answer_too_long``, ``answer_too_deep``) scores as wrong.
2. Normalisation, both sides, pure string work: math delimiters, ``\\left``/``\\right``, LaTeX
   spacing, ``\\dfrac``; constants written as words or in text wrappers become LaTeX (``pi`` ->
   ``\\pi``, ``inf``/``infinity`` -> ``\\infty``, ``sqrt(x)``/``sqrt 2`` -> ``\\sqrt{..}``,
   ``\\mathrm{e}``/``\\e`` -> ``e``, ``\\text{i}`` -> ``i``); degree marks, percent signs (``50%``
   equals 50 and 0.5), a leading ``\\$``, a trailing period, ``x=`` assignments, thousands
   separators, ``\\text{..}`` wrappers, choice letters ``(C)``, number words (``five``).
3. Units are dropped only after a bare number: ``\\text{..}``/``\\mathrm{..}`` groups
   (``10\\text{ cm}^2``), one to three words of two or more letters (``5 cm``, ``12 dollars``),
   degrees (``30^\\circ``). A tail holding a constant or function (``pi``, ``e``, ``i``, ``inf``,
   ``infinity``, ``sqrt``, ``sin``, ``log``, ...; ``sec`` stays seconds) or a postfix operation
   or hedge word (``squared``, ``cubed``, ``factorial``, ``and``, ``or``, ``not``, ``but``,
   ``if``) is not a unit: ``2 pi`` is 2*pi and never 2, ``4 squared`` is not 4, ``3 or more``
   is not 3. Single letters are never units (``3 e`` is 3e, ``5 m`` stays 5m).
4. Equivalence: same normalised text; else plain rationals compared exactly; else a prediction
   that is prose is compared as text only; else math-verify's LaTeX parser, under the time limit.
"""

from __future__ import annotations

import logging
import numbers
import threading
from collections import Counter
from typing import Any

from recipe.iib_lpo.reward.answer_checking import DEFAULT_TIMEOUT_S, answers_equivalent, check_equivalence
from recipe.iib_lpo.reward.extraction import extract_answer, extract_answer_detailed
from recipe.iib_lpo.reward.verifier_pool import warm_up_verifier

__all__ = [
    "compute_score",
    "extract_answer",
    "answers_equivalent",
    "reward_reason_counts",
    "reset_reward_reason_counts",
    "warm_up_verifier",
    "REWARD_STYLES",
]

logger = logging.getLogger(__name__)

#: reward_style -> (score when correct, score when wrong). "binary" is the paper's r_v in {0, 1}
#: (METHOD.md step 5, the authors' code); "signed" is verl's DAPO convention (+1/-1). A response
#: that cannot be checked (no answer, oversized, timeout) gets the "wrong" score of the style,
#: so that in the signed style a pathological output is never better than a wrong one.
REWARD_STYLES = {"binary": (1.0, 0.0), "signed": (1.0, -1.0)}

#: kwargs that verl's reward managers add on their own (reward-model routing); accepted and unused.
_VERL_MANAGER_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})

_COUNTS_LOCK = threading.Lock()
_REASON_COUNTS: Counter = Counter()
_WARNED_KWARGS: set[str] = set()


def reward_reason_counts() -> dict[str, int]:
    """How many ``compute_score`` calls in this process ended with which ``reason``."""
    with _COUNTS_LOCK:
        return dict(_REASON_COUNTS)


def reset_reward_reason_counts() -> None:
    with _COUNTS_LOCK:
        _REASON_COUNTS.clear()


def _ground_truth_text(ground_truth: Any) -> str | None:
    """The gold answer as text; tolerates a raw GSM8K ``#### 42`` / boxed solution as gold."""
    if isinstance(ground_truth, bool):
        return None
    if isinstance(ground_truth, numbers.Integral):
        return str(int(ground_truth))
    if isinstance(ground_truth, numbers.Real):
        return repr(float(ground_truth)) if ground_truth == ground_truth else None  # NaN: no answer
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        return None
    if "####" in ground_truth or "\\boxed" in ground_truth or "\\fbox" in ground_truth:
        return extract_answer(ground_truth)
    return ground_truth.strip()


def compute_score(
    data_source: Any,
    solution_str: Any,
    ground_truth: Any,
    extra_info: dict | None = None,
    reward_style: str = "binary",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> dict:
    """Score one response against its gold answer (verl custom reward signature).

    Args:
        data_source: dataset name (all sources are math; recorded, not used).
        solution_str: the decoded response (untrusted).
        ground_truth: the gold answer (``reward_model.ground_truth`` of the parquet row); a
            number, or text (a raw ``#### x`` / ``\\boxed{x}`` solution is reduced to x).
        extra_info: the row's ``extra_info`` (unused).
        reward_style: ``"binary"`` (default, 1/0, the paper) or ``"signed"`` (+1/-1, DAPO).
        timeout_s: hard time limit of the equivalence check in seconds (default 5).
        **kwargs: verl's reward-manager extras (``reward_router_address``,
            ``reward_model_tokenizer``) are accepted; others are logged once and ignored.

    Returns:
        ``{"score": float, "acc": bool, "pred": str | None, "reason": str}``. The keys are the
        same for every call (verl stacks them across the batch into ``reward_extra_info``).
        ``reason`` is ``correct``/``wrong`` for a completed check, otherwise why the response
        could not be checked (``no_answer``, ``unparseable_answer``, ``answer_too_long``,
        ``timeout``, ...; see the module docstring and verifier_pool.CheckResult).
        Non-routine reasons are logged.
    """
    if reward_style not in REWARD_STYLES:
        raise ValueError(f"reward_style must be one of {sorted(REWARD_STYLES)}, got {reward_style!r}")
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    unknown = set(kwargs) - _VERL_MANAGER_KWARGS
    if unknown - _WARNED_KWARGS:
        _WARNED_KWARGS.update(unknown)
        logger.warning("compute_score ignores unknown keyword arguments %s", sorted(unknown))

    correct_score, wrong_score = REWARD_STYLES[reward_style]
    pred: str | None = None
    gold = _ground_truth_text(ground_truth)
    if gold is None:
        reason = "missing_ground_truth"
        logger.warning("no usable ground truth (data_source=%r, ground_truth=%.80r)", data_source, ground_truth)
    else:
        if isinstance(solution_str, bytes):
            solution_str = solution_str.decode("utf-8", "replace")
        extraction = extract_answer_detailed(solution_str)
        pred = extraction.answer
        if pred is None:
            reason = extraction.reason
            if reason not in ("no_answer", "empty_answer", "unterminated_box", "unparseable_answer"):
                logger.warning("response not checked: %s (data_source=%r)", reason, data_source)
        else:
            result = check_equivalence(pred, gold, timeout_s=float(timeout_s))
            reason = ("correct" if result.equal else "wrong") if not result.failed else result.reason

    acc = reason == "correct"
    with _COUNTS_LOCK:
        _REASON_COUNTS[reason] += 1
    if pred is not None:
        # verl stores pred in numpy object arrays and may log it: keep it encodable.
        pred = pred.encode("utf-8", "replace").decode("utf-8")
    return {"score": correct_score if acc else wrong_score, "acc": acc, "pred": pred, "reason": reason}
