"""The reward registry, the reward signature, and helpers shared by the reward families."""
from __future__ import annotations

import re
from typing import Any, Protocol

from alignment.registry import Registry


class RewardFn(Protocol):
    """`fn(prompts, completions, **columns) -> one float (or None = not applicable) per completion`."""

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]: ...


REWARDS: Registry[RewardFn] = Registry("reward")


def completion_text(completion: str | list[dict]) -> str:
    """The text of a completion: a string as is; a conversation's last message content.

    Example:
        >>> completion_text([{"role": "assistant", "content": "4"}])
        '4'
    """
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content") or ""
    if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_text(text: str) -> str:
    """The content of the last `<answer>...</answer>` in `text`, or `text` when there is none.

    Example:
        >>> answer_text("<think>2+2=5?</think><answer>4</answer>")
        '4'
    """
    found = _ANSWER_TAG.findall(text)
    return found[-1] if found else text


def get_column(columns: dict, name: str, reward: str, n: int) -> list:
    """The batch column `name`, checked to have one value per completion.

    Raises:
        KeyError: the column is missing (names the reward and the columns there are).
        ValueError: the column has the wrong length.
    """
    if name not in columns:
        data_columns = sorted(k for k in columns if k not in _TRAINER_KWARGS)
        raise KeyError(
            f"reward '{reward}' reads column '{name}', which the dataset does not have "
            f"(columns: {', '.join(data_columns) or 'none'}); set `column:` in the reward's "
            f"recipe entry or add the column to the data"
        )
    values = list(columns[name])
    if len(values) != n:
        raise ValueError(f"reward '{reward}': column '{name}' has {len(values)} values for {n} completions")
    return values


# Keyword arguments TRL's GRPOTrainer passes next to the dataset columns.
_TRAINER_KWARGS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
