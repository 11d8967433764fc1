"""Length reward: DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, §3.4)."""
from __future__ import annotations

import functools

from rewards.base import REWARDS, completion_text


@REWARDS.register("length")
def length_penalty(prompts, completions, *, max_length: int, cache_length: int,
                   tokenizer: str | None = None, **columns) -> list[float]:
    """0 up to `max_length - cache_length`, then linear down to -1 at `max_length`, -1 beyond.

    R(n) = 0 if n <= L - C;  (L - C - n) / C if L - C < n <= L;  -1 if n > L
    with n the completion length, L = max_length, C = cache_length (DAPO §3.4).

    Args:
        max_length: L, usually the generation limit (DAPO: 20480 tokens).
        cache_length: C, the width of the penalty ramp (DAPO: 4096), 0 < C <= L.
        tokenizer: a tokenizer path to count tokens; None counts characters.

    Example:
        >>> length_penalty(None, ["a" * 6, "a" * 8, "a" * 10, "a" * 11], max_length=10, cache_length=4)
        [0.0, -0.5, -1.0, -1.0]
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"reward 'length': need 0 < cache_length <= max_length, got cache_length={cache_length}, "
            f"max_length={max_length}"
        )
    texts = [completion_text(c) for c in completions]
    if tokenizer is None:
        lengths = [len(t) for t in texts]
    else:
        tok = _load_tokenizer(tokenizer)
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    start = max_length - cache_length
    return [max(-1.0, min(0.0, (start - n) / cache_length)) for n in lengths]


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
