"""The training loop every study shares, read top to bottom in :mod:`.loop`.

* :mod:`.runtime`     where and how a run executes (seed, threads, device), determinism, autocast
* :mod:`.sources`     the batch-source protocol and in-memory sources
* :mod:`.resume`      preemption (SIGTERM / SIGUSR1 -> ``resume.pt``) and safe resuming
* :mod:`.loop`        ``fit``: AdamW, warm-up + cosine, grad clipping, validation, early stopping
* :mod:`.checkpoint`  the run's outputs and the best model as safetensors + JSON
"""
