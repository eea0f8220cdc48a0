"""The one numba kernel cache: build jitted kernels once per process, on first use.

numba is imported only when a kernel is first needed (importing a library module stays cheap),
and every kernel is compiled with ``cache=True`` (on-disk cache next to the source: later
processes load it instead of recompiling) and ``nogil=True``.

Usage in a library module::

    def _build() -> dict[str, Any]:
        nb = numba_module()

        @nb.njit(cache=True, nogil=True)
        def kernel(x): ...

        return {"kernel": kernel}

    def _kernels() -> dict[str, Any]:
        return njit_kernels("mymodule", _build)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_CACHE: dict[str, Any] = {}
_LOCK = threading.RLock()  # re-entrant: a builder may build the kernels it calls


def numba_module() -> Any:
    """The ``numba`` module (imported here, lazily, so that callers need no top-level import)."""
    import numba

    return numba


def njit_kernels(name: str, builder: Callable[[], T]) -> T:
    """``builder()`` once per process under ``name`` (thread-safe); later calls return the same object.

    ``builder`` defines and returns the jitted kernel(s) (a dispatcher, or a dict/tuple of them).
    Reads and writes nothing on disk itself (numba's own ``cache=True`` does).
    """
    try:
        return _CACHE[name]  # type: ignore[no-any-return]
    except KeyError:
        pass
    with _LOCK:
        if name not in _CACHE:
            _CACHE[name] = builder()
        return _CACHE[name]  # type: ignore[no-any-return]
