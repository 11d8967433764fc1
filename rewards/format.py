"""Format reward: does the completion follow a layout (by default R1's think-then-answer)."""
from __future__ import annotations

import functools
import re

from rewards.base import REWARDS, completion_text

THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


@REWARDS.register("format")
def format_reward(prompts, completions, *, pattern: str = THINK_ANSWER, fullmatch: bool = True,
                  **columns) -> list[float]:
    """1.0 where the completion matches `pattern` (a regex, `.` matching newlines too), else 0.0.

    Args:
        pattern: the regex; default `<think>…</think><answer>…</answer>` (DeepSeek-R1's format).
        fullmatch: the whole completion (stripped of outer whitespace) must match; False: the
            pattern may occur anywhere.

    Example:
        >>> format_reward(None, ["<think>2+2</think>\\n<answer>4</answer>", "4", "ok <answer>4</answer>"])
        [1.0, 0.0, 0.0]
        >>> format_reward(None, ["ok <answer>4</answer>"], pattern=r"<answer>.*?</answer>", fullmatch=False)
        [1.0]
    """
    regex = _compile(pattern)
    match = regex.fullmatch if fullmatch else regex.search
    return [1.0 if match(completion_text(c).strip()) else 0.0 for c in completions]


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"reward 'format': invalid regex pattern {pattern!r}: {e}") from None
