"""Pure-string normalisation of one answer and its exact rational value (no parsing, no sympy).

:func:`normalize_answer` gives the text that both the exact fast path (``key``, ``number``, in
this process, no IPC) and math-verify (``latex``, in the verifier process) see. math-verify has
its own normaliser (``latex2sympy2_extended.normalize_latex``, run by ``parse`` with
``LatexExtractionConfig``'s ``NormalizationConfig``), and it still runs on what we send; but it
is not a replacement for this one (measured on tests/test_reward_constants.py and
tests/test_reward_checker.py):

* it gives another normal form for 11 of the 14 pinned forms of ``test_normalised_form`` (9
  not only in whitespace). Its unit rule drops a trailing ``\\text{..}`` whatever it holds:
  ``2\\text{ pi}``, ``2\\text{ i}``, ``2\\text{ infinity}`` become ``2`` and ``3\\,\\mathrm{e}``
  becomes ``3`` (math-verify alone scores all four equal to the bare number). Its unit list
  has single letters (``5 m`` -> ``5``) but not ``dollars``; it keeps number words (``five``),
  ``pi`` as a word, thin-space thousands (``10\\,000``) and degree marks (``45°``) as they are;
* it cannot serve the fast path: importing ``latex2sympy2_extended.math_normalization`` imports
  sympy and antlr4 (through the package ``__init__``), which only the verifier process loads.

Rules that math-verify also has and whose removal changes no verdict in the tables (``\\dfrac``,
``{,}``, a leading ``\\$``, ``x=3``) stay because they feed the fast path: removing each moved
2, 1, 1 and 4 table rows from ``exact_*`` to a verifier round trip (measured). The others are
pinned by the tests (removing ``\\left``/``\\right``, spacing or math delimiters breaks the
normalised key of ``test_normalize_answer_details``; the constant rewrites, degrees, trailing
units and whole ``\\text{..}`` break 24, 2, 3 and 3 rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

# ---------------------------------------------------------------------------------------------
# Input limits (shared by extraction and checking) and word lists
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
#: Mathematical constants and functions written as words. A number followed by one of them is
#: an expression, never a number with a unit ("2 pi" is 2*pi, "2 sqrt 3" is 2*sqrt(3)). ``e`` and
#: ``i`` are lowercase only (``E``/``I`` can be choice letters); the others in any case.
CONSTANT_WORDS = frozenset("pi e i inf infty infinity".split())
FUNCTION_WORDS = frozenset(
    "sqrt sin cos tan sec csc cot arcsin arccos arctan sinh cosh tanh log ln exp".split()
)
#: Words that turn "number + words" into an operation or a hedge, not a quantity with a unit:
#: "4 squared" is 16 and "3 or more" is no single answer, so neither may score as the number.
#: (Infix words such as "times" or "plus" need an operand after them, which the unit rules
#: never accept anyway, and "3 times" is a count.)
_OPERATOR_WORDS = frozenset("squared cubed factorial and or not but if".split())
#: A tail with any of these is not a unit. "sec" stays a unit (seconds; a secant needs an argument).
_NOT_UNIT_WORDS = (CONSTANT_WORDS | FUNCTION_WORDS | _OPERATOR_WORDS) - {"sec"}
#: Characters that do not occur in math answers but do in code and shell text.
NON_MATH_MARKERS = ('"', "`", ";", "@", "#", "?", "__")

_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_TEXT_WRAPPERS = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit|operatorname)"
TEXT_GROUP_RE = re.compile(_TEXT_WRAPPERS + r"\s*\{([^{}]*)\}")
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


def unescaped_chars(text: str, start: int = 0, end: int | None = None):
    """``(index, char)`` of each character of ``text[start:end]`` that no backslash escapes (a
    backslash and the character after it are skipped together, so ``\\{`` is no brace)."""
    i = start
    end = len(text) if end is None else end
    while i < end:
        if text[i] == "\\":
            i += 2
            continue
        yield i, text[i]
        i += 1


def strip_delimiters(s: str) -> str:
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
    s = strip_delimiters(answer)
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

