"""The final answer of a model response: the last box, else the last ``####`` line, else the last
``Answer:`` / ``The answer is`` line, which must then be mathematics, not prose.

math-verify does not do this the same way (measured on ``EXTRACTION_CASES`` of
tests/test_reward_checker.py and the fallback tables of tests/test_reward_constants.py):

* its box extraction (``latex2sympy2_extended``'s ``extract_boxed_content``, what ``parse`` with
  ``LatexExtractionConfig`` uses) differs on 5 of the 13 box rows: it joins an earlier box
  to the last one (``\\boxed{1} first try, then \\boxed{2}`` -> ``1,2``), takes the rest of the
  text after ``\\boxed 5`` (``5$.``), returns ``""`` for ``\\boxed{}``, ``{3`` for the truncated
  ``\\boxed{3`` and ``foo{3}`` for ``\\boxedfoo{3}``; nor does it cap length or nesting;
* its LaTeX extractor reads an answer line only inside ``$..$``/``\\(..\\)``: it finds nothing in
  19 of the 21 accepted plain answer lines (``the answer is 42.``, ``Answer: x = 3``,
  ``#### 1,234``); the extractor that does (``ExprExtractionConfig``) runs ``sympy.parse_expr``,
  i.e. ``eval``, and is never used here;
* it has no notion of prose after the answer phrase ("The answer is not obvious"): it returns
  nothing there, but also for the real plain answers above, so its silence tells nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from recipe.iib_lpo.reward.normalization import (
    CONSTANT_WORDS,
    FUNCTION_WORDS,
    MAX_ANSWER_CHARS,
    MAX_BRACE_DEPTH,
    NON_MATH_MARKERS,
    TEXT_GROUP_RE,
    normalize_answer,
    strip_delimiters,
    unescaped_chars,
)


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
    end = min(len(text), open_index + MAX_ANSWER_CHARS + 2)
    for i, ch in unescaped_chars(text, open_index, end):
        if ch == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH + 1:  # +1: the box's own brace
                return None, "answer_too_deep"
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i], "ok"
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
    if any(marker in answer for marker in NON_MATH_MARKERS):
        return False
    raw = TEXT_GROUP_RE.sub(" 0 ", strip_delimiters(answer))  # explicit LaTeX text: accepted
    raw = re.sub(r"\\[A-Za-z]+", lambda m: "\\", raw)  # a command is an operator next to a word
    if not re.search(r"[^\W_]|\\|[\u221e\u221a]", raw):  # letters, digits, commands, infinity, root
        return False
    for m in _LINE_WORD_RE.finditer(raw):
        word = m.group(0)
        if max(len(part) for part in word.split("-")) < 2 or word.lower() in CONSTANT_WORDS | FUNCTION_WORDS:
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
