"""Comments in prompts, as A1111 (1.8 and later) reads them with its "Enable comments" setting: from a `#` to the
end of its line is left out of what is drawn, and a line that is only a comment goes whole. The text is stripped
when the job is queued, so the infotext and history hold the prompt as it was drawn, as in A1111."""
from __future__ import annotations

from typing import Any

# The request fields that hold prompts.
PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")


def strip_comments(text: str) -> str:
    """The text without its comments."""
    if "#" not in text:
        return text
    kept = []
    for line in text.split("\n"):
        code, hash_sign, _comment = line.partition("#")
        if not hash_sign:
            kept.append(line)
        elif code.strip():
            kept.append(code.rstrip())
    return "\n".join(kept)


def without_comments(fields: dict[str, Any]) -> dict[str, Any]:
    """The prompt fields of a request's fields that change when their comments are left out."""
    return {name: strip_comments(fields[name]) for name in PROMPT_FIELDS
            if isinstance(fields.get(name), str) and strip_comments(fields[name]) != fields[name]}
