"""The user-turn prompt wrapped around every problem.

The default is the one the authors' code used for training and evaluation (see
docs/METHOD.md, "Defaults from the authors' code"): the raw problem, a newline, and an
instruction to reason step by step and box the final answer. The chat template itself (Qwen's)
is applied later by the tokenizer (verl applies it at rollout time), so the parquet only stores
the list of chat messages.

Templates are filled by plain substitution of the literal field ``{question}``, not with
``str.format``: the default template itself contains ``\\boxed{}``, whose braces ``str.format``
would read as a replacement field.
"""

from __future__ import annotations

QUESTION_FIELD = "{question}"

DEFAULT_PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


def validate_template(template: str) -> str:
    """Return ``template`` unchanged if it contains the ``{question}`` field, else raise ValueError."""
    if not isinstance(template, str):
        raise ValueError(f"prompt template must be a string, got {type(template).__name__}")
    if QUESTION_FIELD not in template:
        raise ValueError(
            f"prompt template must contain the field {QUESTION_FIELD!r} where the problem text goes; "
            f"got {template!r}"
        )
    return template


def format_prompt(question: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The user-turn text for ``question`` under ``template`` (default: the paper code's)."""
    validate_template(template)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return template.replace(QUESTION_FIELD, question)


def build_chat_prompt(question: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> list[dict]:
    """verl's ``prompt`` column for one problem: a single user message (no system message)."""
    return [{"role": "user", "content": format_prompt(question, template)}]
