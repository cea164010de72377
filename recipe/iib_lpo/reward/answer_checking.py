"""Answer extraction and equivalence checking for the verifiable math reward (METHOD.md step 5).

Model output is untrusted, so this module is built around three rules:

1. Nothing here evaluates text. No ``eval``/``exec``/``sympify``/``parse_expr`` of raw text on
   any path. Numbers in the fast path are parsed with :class:`fractions.Fraction`; everything
   else goes to math-verify with ONLY its LaTeX extractor (``LatexExtractionConfig``, an ANTLR
   grammar that builds sympy objects directly). math-verify's ``ExprExtractionConfig`` is never
   used because it feeds the text to ``sympy.parse_expr``, which is ``eval`` underneath. As a
   second line of defence the verifier process replaces ``parse_expr`` (which ``sympify`` of a
   string also calls) with a guard that only lets bare numeric literals through (latex2sympy
   builds numbers with ``sympy.Number(<digit token>)``) and reports anything else.

2. Every check has a hard time limit that works in any thread. math-verify's own timeout uses
   ``signal.alarm``, which only works in the main thread, while verl calls custom reward
   functions through ``loop.run_in_executor`` (a worker thread of a Ray actor). And some sympy
   work cannot be interrupted at all (``9^{9^{9}}`` is one C-level big-integer power that
   ignores signals). So sympy runs in a small pool of persistent verifier processes started with
   ``subprocess.Popen`` (no ``multiprocessing``: nothing re-imports the caller's ``__main__``,
   so scripts without an ``if __name__ == "__main__":`` guard work, unlike verl's ``math_verify``
   scorer). The caller waits on the pipe with ``select`` until a deadline and kills and replaces
   the process when the deadline passes. Inside the process a soft ``setitimer`` limit (its
   main thread) stops interruptible work earlier so that the common slow case costs no restart.
   The process also runs under an address-space limit, dies with its parent, and is replaced if
   it crashes (deep-recursion segfaults, out-of-memory).

3. Cheap work first. Size and nesting caps reject pathological answers before any parsing; a
   pure-string normaliser plus an exact rational comparison decides most answers (GSM8K-style
   numbers, fractions, decimals, percents) without sympy or IPC. Only the rest (radicals,
   intervals, sets, expressions) reaches math-verify.

Every outcome carries a ``reason`` and is counted (:func:`equivalence_path_counts`); failures
are logged. See tests/test_reward_checker.py for the behaviour table and
tests/test_reward_constants.py for constants vs units and the line-answer fallbacks.
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
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Knobs (module constants; defaults chosen for MATH/GSM8K-style answers).
# ---------------------------------------------------------------------------------------------
#: Longest answer (characters) that is checked at all. The longest MATH-500 answer has 159
#: characters; anything over this is scored as wrong with reason ``answer_too_long``.
MAX_ANSWER_CHARS = 1000
#: Deepest ``{}`` nesting accepted inside an answer, and deepest ``()``/``[]`` nesting; deeper is
#: ``answer_too_deep``. Real answers nest a few levels (``\frac{\sqrt{2}}{2}`` is 2). The caps
#: matter for time: math-verify's LaTeX grammar is exponential in nesting (measured on a 2-core
#: box: 10 nested ``\frac`` 0.1-0.3 s, 14 nested 1-2 s, 16 nested 7 s; 8 nested parentheses 0.4 s,
#: 32 nested 10 s).
MAX_BRACE_DEPTH = 10
MAX_PAREN_DEPTH = 6
#: Free-standing letter runs at least this long that are not known math words mark an answer as
#: text (prose, code, shell), which is then compared as a normalised string only: sympy would
#: read ``touch`` as the product t*o*u*c*h, which can be slow and is never the intended meaning.
MIN_TEXT_WORD_LETTERS = 5
_MATH_WORDS = frozenset(
    "arcsin arccos arctan arcsec arccsc arccot sinh cosh tanh infty infinity sqrt frac dfrac"
    " undefined".split()
)
#: Mathematical constants and functions written as words. A number followed by one of them is
#: an expression, never a number with a unit ("2 pi" is 2*pi, "2 sqrt 3" is 2*sqrt(3)). ``e`` and
#: ``i`` are lowercase only (``E``/``I`` can be choice letters); the others in any case.
_CONSTANT_WORDS = frozenset("pi e i inf infty infinity".split())
_FUNCTION_WORDS = frozenset(
    "sqrt sin cos tan sec csc cot arcsin arccos arctan sinh cosh tanh log ln exp".split()
)
#: Words that turn "number + words" into an operation or a hedge, not a quantity with a unit:
#: "4 squared" is 16 and "3 or more" is no single answer, so neither may score as the number.
#: (Infix words such as "times" or "plus" need an operand after them, which the unit rules
#: never accept anyway, and "3 times" is a count.)
_OPERATOR_WORDS = frozenset("squared cubed factorial and or not but if".split())
#: A tail with any of these is not a unit. "sec" stays a unit (seconds; a secant needs an argument).
_NOT_UNIT_WORDS = (_CONSTANT_WORDS | _FUNCTION_WORDS | _OPERATOR_WORDS) - {"sec"}
#: Characters that do not occur in math answers but do in code and shell text.
_NON_MATH_MARKERS = ('"', "`", ";", "@", "#", "?", "__")
#: Default hard time limit (seconds) of one equivalence check, measured from the request to
#: the verifier process (start-up of a fresh process is not counted). math-verify's own default
#: is 5 s per operation.
DEFAULT_TIMEOUT_S = 5.0
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

_STATS_LOCK = threading.Lock()
_PATH_COUNTS: Counter = Counter()


def _count(reason: str) -> None:
    with _STATS_LOCK:
        _PATH_COUNTS[reason] += 1


def equivalence_path_counts() -> dict[str, int]:
    """How many equivalence checks ended by which path/reason in this process (a snapshot)."""
    with _STATS_LOCK:
        return dict(_PATH_COUNTS)


def reset_equivalence_path_counts() -> None:
    with _STATS_LOCK:
        _PATH_COUNTS.clear()


class VerifierUnavailableError(RuntimeError):
    """The verifier process could not be started: an environment problem, not a bad answer."""


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Extraction:
    """Result of extracting the final answer from a response.

    ``answer`` is None when there is no usable answer; ``reason`` then says why
    (``no_answer``, ``empty_answer``, ``unterminated_box``, ``answer_too_long``,
    ``answer_too_deep``, ``unparseable_answer``: a ``####``/answer line holds prose, not math).
    ``source`` says where a found answer came from (``boxed``, ``gsm8k_hashes``,
    ``answer_line``; also set for ``unparseable_answer``).
    """

    answer: str | None
    reason: str
    source: str | None = None


def _braced_group(text: str, open_index: int) -> tuple[str | None, str]:
    """Content of the ``{...}`` group whose ``{`` is at ``open_index``; bounded work.

    Escaped braces (``\\{``, ``\\}``) do not open or close groups, so ``\\boxed{\\{1,2\\}}``
    yields ``\\{1,2\\}``.
    """
    depth = 0
    i = open_index
    end = min(len(text), open_index + MAX_ANSWER_CHARS + 2)
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH + 1:  # +1: the box's own brace
                return None, "answer_too_deep"
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i], "ok"
        i += 1
    if end < len(text):
        return None, "answer_too_long"
    return None, "unterminated_box"


# A box command that really opens a box: ``\\boxed{``/``\\fbox{`` (spaces allowed before the
# brace) or ``\\boxed 5`` (TeX's single-token argument).
_BOX_START_RE = re.compile(r"\\(?:boxed|fbox)[ \t]*(?=\{)|\\boxed[ \t]+(?=[^\s{$])")


def _last_box(text: str) -> Extraction | None:
    """The last ``\\boxed{..}``, ``\\boxed x`` or ``\\fbox{..}``; None when there is none.

    One regex scan (linear, in C), so a megabyte of ``\\boxedfoo`` costs milliseconds.
    """
    last = None
    for last in _BOX_START_RE.finditer(text):
        pass
    if last is None:
        return None
    k = last.end()
    if text[k] == "{":
        content, reason = _braced_group(text, k)
        if content is None:
            return Extraction(None, reason)
        return _finish(content, "boxed")
    m = re.match(r"[^\s$]{1,%d}" % (MAX_ANSWER_CHARS + 1), text[k : k + MAX_ANSWER_CHARS + 2])
    return _finish(m.group(0), "boxed")


def _finish(content: str, source: str) -> Extraction:
    content = content.strip()
    if not content:
        return Extraction(None, "empty_answer")
    if len(content) > MAX_ANSWER_CHARS:
        return Extraction(None, "answer_too_long")
    return Extraction(content, "ok", source)


# The start of an answer statement; the answer is the rest of its line. The prefix alone is
# matched so that the last statement wins even when a line holds two ("the answer is 5. Wait,
# the answer is not 5" -> "not 5", which is then rejected as prose).
_ANSWER_LINE_RE = re.compile(r"(?i)\banswer\s*(?:is\s*)?[:\uff1a]\s*|\banswer\s+is\s+")


def _clean_line_answer(line: str) -> str:
    """Answer text from the rest of an ``Answer:``/``####`` line; text after it is dropped."""
    s = line.strip().strip("*").strip()
    if s.startswith("$$"):
        end = s.find("$$", 2)
        s = s[2:end] if end > 0 else s[2:]
    elif s.startswith("$"):
        end = s.find("$", 1)
        s = s[1:end] if end > 0 else s[1:]
    elif s.startswith("\\("):
        end = s.find("\\)")
        s = s[2:end] if end > 0 else s[2:]
    else:
        # A sentence may follow the answer ("42. This is because..."); ``3.5`` has no space.
        m = re.search(r"[.;!?](\s|$)", s)
        if m:
            s = s[: m.start()]
    return s.strip().strip("*").strip()


# A word (letters, hyphenated parts allowed) and what may stand next to a free-standing one.
_LINE_WORD_RE = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")
_PROSE_NEIGHBOURS = frozenset(" \t\r\n,.;:!?'\"")


def _is_math_line_answer(answer: str) -> bool:
    """Whether the text found after ``####`` / ``Answer:`` / ``The answer is`` is a math answer.

    These fallbacks also match prose ("The answer is not obvious, let me think"), so unlike a box
    their text must look like mathematics. Accepted: text that normalises to a plain number
    (``42``, ``\\frac{1}{2}``, ``50\\%``, ``five``, ``12 dollars``); otherwise an expression whose
    letters are variables (single letters, or runs touching a digit, operator or bracket:
    ``2xy``, ``(ab)``), constants or functions written as words (``pi``, ``sqrt``, ``infinity``,
    ``sin``), LaTeX commands, or the content of ``\\text{..}``-like groups (written as LaTeX on
    purpose). Rejected: a free-standing word of two or more letters that is none of those
    ("not", "obvious", "yes", "xy" alone), code or shell markers, and text with no letter, digit
    or LaTeX command ("..", "---"). Pure string work, nothing is evaluated.
    """
    normalized = normalize_answer(answer)
    if not normalized.key:
        return False
    if normalized.number is not None:
        return True
    if any(marker in answer for marker in _NON_MATH_MARKERS):
        return False
    raw = _TEXT_GROUP_RE.sub(" 0 ", _strip_delimiters(answer))  # explicit LaTeX text: accepted
    raw = re.sub(r"\\[A-Za-z]+", lambda m: "\\", raw)  # a command is an operator next to a word
    if not re.search(r"[^\W_]|\\|[\u221e\u221a]", raw):  # letters, digits, commands, infinity, root
        return False
    for m in _LINE_WORD_RE.finditer(raw):
        word = m.group(0)
        if max(len(part) for part in word.split("-")) < 2 or word.lower() in _CONSTANT_WORDS | _FUNCTION_WORDS:
            continue
        before = raw[m.start() - 1] if m.start() > 0 else " "
        after = raw[m.end()] if m.end() < len(raw) else " "
        if before in _PROSE_NEIGHBOURS and after in _PROSE_NEIGHBOURS:
            return False
    return True


def _rest_of_line(text: str, start: int) -> str:
    return text[start : start + MAX_ANSWER_CHARS * 4].split("\n", 1)[0]


def _line_answer(line: str, source: str) -> Extraction:
    found = _finish(_clean_line_answer(line), source)
    if found.answer is not None and not _is_math_line_answer(found.answer):
        return Extraction(None, "unparseable_answer", source)
    return found


def extract_answer_detailed(text: str) -> Extraction:
    """Final answer of ``text``: the last box, else the last ``####`` line, else ``Answer:``.

    Only the last candidate of the chosen kind is used: if it is not a mathematical answer
    (:func:`_is_math_line_answer`) the result is ``unparseable_answer``, without looking at
    earlier ones ("The answer is 5. No wait, the answer is not 5" has no answer).
    """
    if not isinstance(text, str):
        return Extraction(None, "bad_input_type")
    box = _last_box(text)
    if box is not None:
        return box
    hash_pos = text.rfind("####")
    if hash_pos >= 0:
        return _line_answer(_rest_of_line(text, hash_pos + 4), "gsm8k_hashes")
    last = None
    for last in _ANSWER_LINE_RE.finditer(text):
        pass
    if last is not None:
        return _line_answer(_rest_of_line(text, last.end()), "answer_line")
    return Extraction(None, "no_answer")


def extract_answer(text: str) -> str | None:
    """The final answer in a model response, or None (see :func:`extract_answer_detailed`).

    Priority: the last ``\\boxed{...}`` (nested braces allowed) / ``\\boxed x`` / ``\\fbox{...}``,
    taken as it is; else the rest of the line after the last ``####`` (GSM8K); else the rest of
    the line after the last ``Answer:`` / ``The answer is``. Text after the answer (after a
    closed ``$..$``, or a sentence after ``. ``) is ignored; a line answer that is prose rather
    than mathematics gives None.
    """
    return extract_answer_detailed(text).answer


# ---------------------------------------------------------------------------------------------
# Normalisation and the exact fast path (pure string work, no sympy)
# ---------------------------------------------------------------------------------------------
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_TEXT_WRAPPERS = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit|operatorname)"
_TEXT_GROUP_RE = re.compile(_TEXT_WRAPPERS + r"\s*\{([^{}]*)\}")
_WHOLE_TEXT_RE = re.compile(r"^" + _TEXT_WRAPPERS + r"\s*\{([^{}]*)\}$")
_NUMBER_RE = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_TRAILING_UNIT_RE = re.compile(
    r"^(?P<num>" + _NUMBER_RE + r")\s*(?:" + _TEXT_WRAPPERS + r"\s*\{[^{}]*\}(?:\^\{?\d\}?)?\s*)+$"
)
_TRAILING_WORD_UNIT_RE = re.compile(
    r"^(?P<num>" + _NUMBER_RE + r")\s+[A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){0,2}(?:\^\{?\d\}?)?$"
)
# Constants written as words or in text wrappers -> their LaTeX form (applied to pred and gold).
_WRAPPED_CONSTANT_RE = re.compile(
    _TEXT_WRAPPERS + r"\s*\{\s*(?P<c>(?i:pi|infty|infinity|inf)|e|i)\s*\}"
)
# ``\e`` is not LaTeX, models write it for e; ``\\e`` (a line break, then e) is not it.
_FAKE_E_RE = re.compile(r"(?<!\\)\\e(?![A-Za-z])")
_WORD_PI_RE = re.compile(r"(?<![A-Za-z\\])pi(?![A-Za-z])", re.IGNORECASE)
_WORD_INFINITY_RE = re.compile(r"(?<![A-Za-z\\])(?:infinity|infty|inf)(?![A-Za-z])", re.IGNORECASE)
_WORD_SQRT_PAREN_RE = re.compile(r"(?<![A-Za-z\\])sqrt\s*\(([^()]{0,%d})\)" % MAX_ANSWER_CHARS)
_WORD_SQRT_NUMBER_RE = re.compile(r"(?<![A-Za-z\\])sqrt\s*(\d+(?:\.\d+)?)")
_WORD_SQRT_RE = re.compile(r"(?<![A-Za-z\\])sqrt(?![A-Za-z])")
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*(?P<rhs>[^=]+)$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\(?:quad|qquad|displaystyle|textstyle)(?![A-Za-z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])|\\circ\s*$")
_PERCENT_RE = re.compile(r"(?:\\%|%|\\text\{\s*\\?%\s*\}|\s*\bpercent\b)\s*$")
_MAX_EXACT_DIGITS = 60


@dataclass(frozen=True)
class NormalizedAnswer:
    latex: str  # cleaned LaTeX, spacing kept (for math-verify)
    key: str  # ``latex`` without whitespace (for exact string comparison)
    number: Fraction | None  # exact value when the answer is a plain rational number
    percent: bool  # the answer carried a percent sign


def _strip_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def _latex_constants(s: str) -> str:
    """Constants written as words or wrapped in ``\\text``/``\\mathrm`` -> LaTeX.

    ``pi`` -> ``\\pi``; ``inf``/``infty``/``infinity`` -> ``\\infty``; ``sqrt(x)``/``sqrt 2``
    -> ``\\sqrt{x}``/``\\sqrt{2}``; ``\\mathrm{e}``, ``\\text{i}``, ``\\e`` -> ``e``, ``i``. Only
    whole words change (``pie``, ``\\inf`` and ``\\pi`` stay as they are).
    """

    def wrapped(m: re.Match) -> str:
        c = m.group("c")
        if c.lower() == "pi":
            return "\\pi "
        if c.lower() in ("inf", "infty", "infinity"):
            return "\\infty "
        return c  # e / i

    s = _WRAPPED_CONSTANT_RE.sub(wrapped, s)
    s = _FAKE_E_RE.sub("e", s)
    s = _WORD_PI_RE.sub(lambda m: "\\pi ", s)
    s = _WORD_INFINITY_RE.sub(lambda m: "\\infty ", s)
    s = _WORD_SQRT_PAREN_RE.sub(lambda m: "\\sqrt{" + m.group(1) + "}", s)
    s = _WORD_SQRT_NUMBER_RE.sub(lambda m: "\\sqrt{" + m.group(1) + "}", s)
    s = _WORD_SQRT_RE.sub(lambda m: "\\sqrt", s)
    return s.strip()


def _is_unit_tail(tail: str) -> bool:
    """Whether the text after a number is a unit: no constant, function or operator word in it."""
    words = re.findall(r"[A-Za-z]+", re.sub(r"\\[A-Za-z]+", " ", tail))
    # e and i are constants in lowercase only (E, I can be choice letters, names); others any case
    return not any((w if len(w) == 1 else w.lower()) in _NOT_UNIT_WORDS for w in words)


def _word_number(s: str) -> int | None:
    s = s.lower().strip()
    if s in _WORD_NUMBERS:
        return _WORD_NUMBERS[s]
    if s in _TENS:
        return _TENS[s]
    parts = re.split(r"[-\s]", s)
    if len(parts) == 2 and parts[0] in _TENS and parts[1] in _WORD_NUMBERS and 0 < _WORD_NUMBERS[parts[1]] < 10:
        return _TENS[parts[0]] + _WORD_NUMBERS[parts[1]]
    return None


def _exact_number(key: str) -> Fraction | None:
    """Exact value of a plain rational written as int, decimal, ``a/b`` or ``\\frac{a}{b}``."""
    if len(key) > _MAX_EXACT_DIGITS:
        return None
    if re.fullmatch(_NUMBER_RE, key):
        return Fraction(key)
    m = re.fullmatch(r"(?P<sign>[+-]?)\\frac(?:\{(?P<a>[+-]?\d+)\}|(?P<a1>\d))(?:\{(?P<b>[+-]?\d+)\}|(?P<b1>\d))", key)
    if m is None:
        m = re.fullmatch(r"(?P<sign>[+-]?)(?P<a>\d+)/(?P<b>\d+)", key)
    if m is None:
        return None
    gd = m.groupdict()
    num = int(gd.get("a") or gd.get("a1"))
    den = int(gd.get("b") or gd.get("b1"))
    if den == 0:
        return None
    value = Fraction(num, den)
    return -value if gd["sign"] == "-" else value


def normalize_answer(answer: str) -> NormalizedAnswer:
    """Conservative pure-string normalisation of one answer (no parsing, no evaluation).

    Handles: math delimiters, ``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``, LaTeX spacing,
    degrees, percent signs, a leading ``\\$``, trailing units (``\\text{ cm}``, ``10 cm``),
    single-variable assignments (``x=3``), thousands separators (``1,000``, ``1{,}000``,
    ``10\\,000``), a trailing period, ``\\text{...}`` wrappers, choice letters (``(C)``) and
    number words (``five``). Units are only dropped after a number so that text answers stay,
    and never when the tail holds a constant, function or postfix-operation word
    (``_NOT_UNIT_WORDS``): constants written as words become LaTeX first (:func:`_latex_constants`),
    so ``2 pi`` normalises to ``2 \\pi``, not ``2``.
    """
    s = _strip_delimiters(answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])\s*\.?", "", s)
    s = s.replace("{,}", ",")
    s = re.sub(r"(\d)\\,(?=\d{3}(?!\d))", r"\1", s)  # 10\,000 thin-space thousands separator
    s = _SPACING_RE.sub(" ", s).strip()
    s = _latex_constants(s)
    s = _DEGREE_RE.sub("", s).strip()
    percent = False
    m = _PERCENT_RE.search(s)
    if m:
        percent = True
        s = s[: m.start()].strip()
    if s.startswith("\\$"):
        s = s[2:].strip()
    elif s.startswith("$"):
        s = s[1:].strip()
    s = s.rstrip(".").strip()
    m = _ASSIGNMENT_RE.match(s)
    # ``x=3`` -> ``3``; ``a=1,b=2`` (several assignments) is left to math-verify.
    if m and ("," not in m.group("rhs") or _THOUSANDS_RE.match(m.group("rhs").strip())):
        s = m.group("rhs").strip()
    m = _TRAILING_UNIT_RE.match(s) or _TRAILING_WORD_UNIT_RE.match(s)
    if m and _is_unit_tail(s[m.end("num") :]):
        s = m.group("num")
    m = re.fullmatch(r"(" + _NUMBER_RE + r")\s*(?:degrees?|dollars?)", s)
    if m:
        s = m.group(1)
    whole = _WHOLE_TEXT_RE.match(s)
    if whole:
        s = whole.group(1).strip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    choice = re.fullmatch(r"\(([A-Za-z])\)", s)
    if choice:
        s = choice.group(1)
    words = _word_number(s) if re.fullmatch(r"[A-Za-z -]+", s) else None
    if words is not None:
        s = str(words)
    elif re.fullmatch(r"[A-Za-z ]+", s):
        s = " ".join(s.lower().split())
    key = re.sub(r"\s+", "", s)
    return NormalizedAnswer(latex=s, key=key, number=_exact_number(key), percent=percent)


def _input_problem(answer: str) -> str | None:
    """Why ``answer`` is not worth parsing (too long, too deeply nested, unbalanced), or None."""
    if len(answer) > MAX_ANSWER_CHARS:
        return "answer_too_long"
    braces = parens = 0
    i = 0
    while i < len(answer):
        ch = answer[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            braces += 1
            if braces > MAX_BRACE_DEPTH:
                return "answer_too_deep"
        elif ch == "}":
            braces -= 1
            if braces < 0:
                return "answer_unbalanced"
        elif ch in "([":
            parens += 1
            if parens > MAX_PAREN_DEPTH:
                return "answer_too_deep"
        elif ch in ")]":
            parens -= 1
        i += 1
    return "answer_unbalanced" if braces else None


def _looks_like_text(latex: str) -> bool:
    """Prose/code rather than a math expression (see MIN_TEXT_WORD_LETTERS)."""
    if any(marker in latex for marker in _NON_MATH_MARKERS):
        return True
    # Drop \text{...} groups and \commands, then look for long free-standing words.
    stripped = re.sub(r"\\[A-Za-z]+", " ", _TEXT_GROUP_RE.sub(" ", latex))
    words = re.findall(r"[A-Za-z]{%d,}" % MIN_TEXT_WORD_LETTERS, stripped)
    return any(w.lower() not in _MATH_WORDS for w in words)


def _replace_surrogates(s: str) -> str:
    """Lone surrogates cannot be encoded; replace them so every later step sees valid text."""
    return s.encode("utf-8", "replace").decode("utf-8") if _has_surrogates(s) else s


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """``equal`` plus the path that decided it (or why the check failed, then equal=False).

    Deciding reasons: ``exact_string`` (same normalised text), ``exact_number`` (plain rationals
    compared exactly), ``text_mismatch`` (the prediction is prose/code, not math, and differs as
    text), ``math_verify``. Failure reasons (logged; equal is False): ``answer_too_long``,
    ``answer_too_deep``, ``answer_unbalanced`` (and ``gold_*`` for the gold), ``bad_input_type``,
    ``empty_answer``, ``timeout``, ``verifier_crashed``, ``verifier_busy``,
    ``unsafe_parse_blocked``, ``verifier_error:<Exception>``.
    """

    equal: bool
    reason: str

    @property
    def failed(self) -> bool:
        return self.reason not in ("exact_string", "exact_number", "text_mismatch", "math_verify")


def check_equivalence(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> CheckResult:
    """Whether ``pred`` and ``gold`` are the same answer, with the path that decided it."""
    result = _check_equivalence(pred, gold, timeout_s)
    _count(result.reason)
    if result.failed and result.reason not in ("empty_answer",):
        logger.warning("answer check failed (%s); pred=%.80r gold=%.80r", result.reason, pred, gold)
    return result


def answers_equivalent(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True when ``pred`` is mathematically the same answer as ``gold``.

    Safe for untrusted ``pred`` (never evaluated) and bounded by ``timeout_s`` seconds of
    verifier time in any thread; a check that fails or times out returns False (logged and
    counted, see :func:`check_equivalence`).
    """
    return check_equivalence(pred, gold, timeout_s).equal


def _check_equivalence(pred: str, gold: str, timeout_s: float) -> CheckResult:
    if not isinstance(pred, str) or not isinstance(gold, str):
        return CheckResult(False, "bad_input_type")
    pred, gold = _replace_surrogates(pred), _replace_surrogates(gold)
    problem = _input_problem(pred)
    if problem:
        return CheckResult(False, problem)
    problem = _input_problem(gold)
    if problem:
        return CheckResult(False, problem.replace("answer", "gold"))
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p.key or not g.key:
        return CheckResult(False, "empty_answer")
    if p.key == g.key:
        return CheckResult(True, "exact_string")
    if p.number is not None and g.number is not None:
        equal = p.number == g.number
        if p.percent != g.percent:
            pct, other = (p, g) if p.percent else (g, p)
            equal = equal or pct.number / 100 == other.number
        return CheckResult(equal, "exact_number")
    if _looks_like_text(p.latex):
        return CheckResult(False, "text_mismatch")
    pairs = [(p.latex, g.latex)]
    if p.percent != g.percent:
        pct, other = (p, g) if p.percent else (g, p)
        scaled = "\\frac{" + pct.latex + "}{100}"
        pairs.append((scaled, other.latex) if pct is p else (other.latex, scaled))
    deadline = time.monotonic() + timeout_s
    last = CheckResult(False, "math_verify")
    for pred_latex, gold_latex in pairs:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return CheckResult(False, "timeout")
        last = _pool().check(pred_latex, gold_latex, remaining)
        if last.equal or last.failed:
            return last
    return last


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
