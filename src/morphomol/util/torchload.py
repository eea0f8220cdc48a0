"""One short, safe reason for a refused ``torch.load(weights_only=True)`` (no torch import here).

PyTorch's own message advises re-running ``torch.load`` with ``weights_only=False`` (arbitrary code
execution for an untrusted file) or allow-listing globals. morphomol never does either, so that advice
is never repeated to the user: :func:`load_failure_reason` keeps only what the file holds that was
refused (e.g. ``GLOBAL __main__.Foo``) or the first line of any other error.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL = re.compile(r"(?:Unsupported global: )?GLOBAL ([A-Za-z0-9_.]+)")
_UNSAFE = re.compile(r"weights_only|add_safe_globals|safe_globals|allowlist", re.IGNORECASE)


def load_failure_reason(exc: BaseException) -> str:
    """``TypeName: reason`` without PyTorch's advice to load untrusted pickles."""
    text = _ANSI.sub("", str(exc)).strip()
    name = type(exc).__name__
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        m = _GLOBAL.search(text)
        what = f" (it holds {m.group(1)})" if m else ""
        detail = ""
        m2 = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        if m2 and not m:
            detail = ": " + re.split(r"\.\s", m2.group(1))[0]
        return (f"{name}: not plain tensors and containers{what}{detail}; pickled Python objects are never loaded")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _UNSAFE.search(ln)]
    return f"{name}: {lines[0][:300]}" if lines else name


__all__ = ["load_failure_reason"]
