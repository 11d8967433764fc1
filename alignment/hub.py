"""Ask the Hugging Face Hub once whether it answers, before reading a hub dataset or config through it.

huggingface_hub retries a request that cannot connect 5 times, with 1 + 2 + 4 + 8 + 8 s of back-off
(`huggingface_hub/utils/_http.py`): on a machine without network and without `HF_HUB_OFFLINE=1`, every hub
file that `alignkit plan` or `validate` read cost ~23 s. `unreachable` asks once per process (one HEAD request
to the endpoint, `PROBE_TIMEOUT_S`); where the hub does not answer, the readers use the local hub cache only
(`cache_only`, as `HF_HUB_OFFLINE=1` would) and their errors say why.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterator, Optional

PROBE_TIMEOUT_S = 5.0  # one HEAD request to the hub's endpoint; the hub answers in well under a second


@functools.cache
def unreachable() -> Optional[str]:
    """Why the hub did not answer one HEAD request to its endpoint (the error's type, or `HTTP 5xx`), or None when
    it answered or `HF_HUB_OFFLINE` is set (nothing will ask it). Asked once per process."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return None
    try:
        response = get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # connection errors come in many types (httpx, OSError)
        return type(err).__name__
    return f"HTTP {response.status_code}" if response.status_code >= 500 else None


def note(why: str) -> str:
    """The words for an error when the hub did not answer (`unreachable`)."""
    return (f"the hub did not answer ({why}; one try, {PROBE_TIMEOUT_S:g} s timeout) and the local hub cache "
            f"does not have it; on a machine without network set HF_HUB_OFFLINE=1")


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """Inside the block, huggingface_hub (and datasets, once imported) read their local caches only and send no
    request: what `HF_HUB_OFFLINE=1` does for a whole process."""
    from huggingface_hub import constants

    modules = [constants] + [m for m in (sys.modules.get("datasets.config"),) if m is not None]
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value
