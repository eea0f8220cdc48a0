"""No hub at run time: the offline environment of every rule job (torch-free, imports nothing heavy).

Every weight, model and tokenizer the pipeline uses is a local file; nothing may reach a model hub while
a job runs (cluster nodes are offline, and a hub call is a silent dependency on the network). Two things
can try anyway, and both are switched off here:

* Hugging Face libraries (huggingface_hub, transformers, datasets, timm, sentence-transformers): the
  variables of :data:`OFFLINE_ENV` (``HF_HUB_OFFLINE=1`` ...). They are read when those libraries are
  imported, so they are set in the Snakemake process (``workflow/rules/common.smk``, inherited by every
  job, local or on a cluster node) and again when a rule script imports :mod:`morphomol.smk`.
* Hub kernels: transformers kernelizes every model it loads with hub kernels when the ``kernels`` package
  is installed (``USE_HUB_KERNELS`` defaults to yes), and bitsandbytes asks the ``kernels`` package for ``kernels-community`` builds when it is
  imported (CPU 4-bit matmul on AVX512-BF16 machines; MPS), which checks the publisher on the Hub and
  downloads the kernel. :func:`disable_hub_kernels` makes ``kernels`` unimportable in the job's process
  (``sys.modules['kernels'] = None``: transformers then reports it unavailable too), so bitsandbytes
  uses its built-in kernels; its notice about the missing hub kernel (which names the Hub repository and
  suggests installing ``kernels``) is dropped from the log.

The values are forced (a stray ``HF_HUB_OFFLINE=0`` in a user's shell does not make jobs go online).
The one explicit way out is ``MORPHOMOL_ALLOW_ONLINE=1`` in the environment of the Snakemake command
(documented in the README): then nothing here is changed.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

#: environment of every rule job (forced unless :data:`ALLOW_ONLINE` is "1")
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "USE_HUB_KERNELS": "NO",          # transformers: no kernelize() with hub kernels at from_pretrained
    "DISABLE_KERNEL_MAPPING": "1",    # kernels: no hub kernel mapping of layers
    "MORPHOMOL_OFFLINE": "1",
}
#: the explicit opt-out (set by the user on purpose, e.g. to fetch something once outside the pipeline)
ALLOW_ONLINE = "MORPHOMOL_ALLOW_ONLINE"
#: loggers of the bitsandbytes backends that try hub kernels at import
BNB_HUB_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.mps.ops")


def online_allowed(environ: MutableMapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(ALLOW_ONLINE, "").strip() == "1"


def offline_environment(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set :data:`OFFLINE_ENV` in ``environ`` (default ``os.environ``); False (nothing set) when the user
    allowed online access explicitly."""
    env = os.environ if environ is None else environ
    if online_allowed(env):
        return False
    env.update(OFFLINE_ENV)
    return True


class _DropHubKernelNotice(logging.Filter):
    """Drops bitsandbytes' warning that it could not load a ``kernels-community`` build (expected offline)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


def disable_hub_kernels() -> bool:
    """Make the ``kernels`` package unimportable in this process (before bitsandbytes / transformers load
    it); False when it was already imported (too late: the job's environment still keeps it offline)."""
    for name in BNB_HUB_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropHubKernelNotice) for f in lg.filters):
            lg.addFilter(_DropHubKernelNotice())
    mod = sys.modules.get("kernels", False)
    if mod is None:
        return True
    if mod is not False:
        return False
    sys.modules["kernels"] = None  # type: ignore[assignment]  # import kernels -> ImportError
    return True


def enforce_offline() -> bool:
    """The offline environment and no hub kernels in this process (unless online access was allowed)."""
    if not offline_environment():
        return False
    disable_hub_kernels()
    return True


__all__ = ["ALLOW_ONLINE", "OFFLINE_ENV", "disable_hub_kernels", "enforce_offline", "offline_environment",
           "online_allowed"]
