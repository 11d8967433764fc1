"""Code execution reward: run the completion's Python with the row's tests in the sandbox."""
from __future__ import annotations

import logging
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from rewards.base import REWARDS, completion_text, get_column
from rewards.sandbox import SandboxUnavailable, run_python

log = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The last ```python fenced block of `text` (else the last fenced block), or None.

    Example:
        >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nand ```\\nnot this\\n```")
        'print(1)\\n'
    """
    blocks = _FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else None


@REWARDS.register("code_exec")
def code_exec(prompts, completions, *, column: str = "tests", timeout_s: float = 5.0, cpu_s: int = 5,
              memory_mb: int = 512, max_workers: int = 4, **columns) -> list[float | None]:
    """1.0 where the completion's code passes the row's tests in the sandbox, else 0.0.

    The program is the completion's last python block, then the tests (a string, or a list of
    strings such as asserts); it passes when it exits 0 within the limits and reaches its end
    (an `exit(0)` before the tests does not pass). No code block scores 0.0; missing tests, None.
    A program that reaches outside its box (files, network, other processes) fails there and
    scores 0.0.

    Args:
        column: the dataset column holding the test code.
        timeout_s, cpu_s, memory_mb: sandbox limits per program (see `rewards.sandbox.run_python`).
        max_workers: programs run at once.

    Raises:
        SandboxUnavailable: the machine cannot build the sandbox (see `rewards.sandbox`).
    """
    tests = get_column(columns, column, "code_exec", len(completions))
    codes = [extract_code(completion_text(c)) for c in completions]

    def run_one(code: str | None, test: str | list[str] | None) -> float | None:
        if not test:  # None, "" or []: no tests for this row
            return None
        if code is None:
            return 0.0
        test_code = test if isinstance(test, str) else "\n".join(test)
        # The tests must run to the end (an `exit(0)` in the solution would otherwise pass):
        # the program ends by printing a fresh token.
        token = secrets.token_hex(8)
        program = f"{code}\n\n{test_code}\n\nprint({token!r})\n"
        try:
            result = run_python(program, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb)
        except SandboxUnavailable:
            raise  # the machine, not the completion: stop rather than score every program 0
        except Exception:  # noqa: BLE001 -- run_python should not raise; a bug there must not stop training
            log.exception("code_exec: sandbox failed; scoring 0")
            return 0.0
        return 1.0 if result.ok and token in result.stdout else 0.0

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return list(pool.map(run_one, codes, tests))
