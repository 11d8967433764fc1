"""Math accuracy reward: does the completion's final answer equal the gold answer (math-verify)."""
from __future__ import annotations

import re
import threading
from decimal import Decimal

from rewards.base import REWARDS, answer_text, completion_text, get_column

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"\s*-?\d+(?:,\d{3})*(?:\.\d+)?\s*")


@REWARDS.register("math_accuracy")
def math_accuracy(prompts, completions, *, column: str = "answer", **columns) -> list[float | None]:
    r"""1.0 where the answer equals the gold in `column`, 0.0 where not, None where gold is missing.

    The answer is the last `<answer>...</answer>` of the completion if it has one, else the whole
    completion. A plain-number gold is compared by value with the last number of the answer
    (so echoing "44 + 47 =" scores 0); other golds go through math-verify's `parse` + `verify`,
    which compare `\boxed{}`, LaTeX and expressions symbolically. Gold that math-verify cannot parse falls back to exact match of the last
    number of each (None if the gold has no number either).

    Args:
        column: the dataset column holding the gold answers.

    Example:
        >>> math_accuracy(None, [r"so \boxed{\frac{1}{2}}", "<answer>0.5</answer>", "it is 3", "44 + 47 = "],
        ...               answer=["1/2", "0.5", "4", "91"])
        [1.0, 1.0, 0.0, 0.0]
    """
    from math_verify import parse, verify  # sympy underneath: ~1 s to import, so only when used

    golds = get_column(columns, column, "math_accuracy", len(completions))
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    scores: list[float | None] = []
    for completion, gold in zip(completions, golds):
        gold = "" if gold is None else str(gold).strip()
        if not gold:
            scores.append(None)
            continue
        answer = answer_text(completion_text(completion))
        if _PLAIN_NUMBER.fullmatch(gold):
            # A numeric gold is compared with the last number stated: math-verify would accept an
            # echo of the question ("44 + 47 =" verifies as 91), which RL learns to exploit.
            scores.append(float(_last_number(answer) == _last_number(gold)))
            continue
        gold_parsed = parse(gold, parsing_timeout=timeout)
        if gold_parsed:
            answer_parsed = parse(answer, parsing_timeout=timeout)
            scores.append(float(verify(gold_parsed, answer_parsed, timeout_seconds=timeout)))
        else:
            gold_number = _last_number(gold)
            scores.append(None if gold_number is None else float(gold_number == _last_number(answer)))
    return scores


def _last_number(text: str) -> Decimal | None:
    """The last number in `text` ("1,000.50" -> Decimal("1000.50")), compared by value."""
    found = _NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "")) if found else None
