"""Extensions of verl and vLLM through their plugin/registration points (never file overwrites)."""
