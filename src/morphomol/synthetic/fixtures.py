"""Small in-memory cohorts with known structure, for tests and benchmarks (no files)."""

from __future__ import annotations

import numpy as np

from morphomol.models.vit import N_TOKENS
from morphomol.train.sources import InMemoryTiles


def synthetic_tiles(n: int, n_core: int = 8, n_targets: int = 3, *, seed: int = 0, img_size: int = 224,
                    sample: str = "synth") -> tuple[InMemoryTiles, list[str], list[str]]:
    """A small cohort with known structure (tests, ``benchmarks/bench_train.py --synthetic``).

    Per tile a morphology latent ``b`` (image brightness) and a molecular latent ``u`` (rate of
    core gene 0 on every token). Targets (log1p space): ``t0 = b + u`` (jointly determined),
    ``t1 = b`` (morphology only), ``t2 = u`` (expression only), further targets copy
    ``log1p`` of a core gene's tile count.
    """
    rng = np.random.default_rng(seed)
    b = rng.uniform(0, 1, n).astype(np.float32)
    u = rng.uniform(0, 1, n).astype(np.float32)
    noise = rng.integers(0, 40, size=(n, img_size, img_size, 3), dtype=np.int16)
    image = np.clip(40 + 150 * b[:, None, None, None] + noise, 0, 255).astype(np.uint8)
    rates = np.full((n, N_TOKENS, n_core), 0.3, dtype=np.float32)
    rates[:, :, 0] = 2.0 * u[:, None]
    tokens = rng.poisson(rates).astype(np.float32)
    tile = tokens.sum(axis=1)
    cols = [b + u, b, u] + [np.log1p(tile[:, j % n_core]) for j in range(max(0, n_targets - 3))]
    target = np.stack(cols[:n_targets], axis=1).astype(np.float32)
    ids = [f"{sample}__{i:06d}" for i in range(n)]
    ds = InMemoryTiles(ids, image=image, tokens=tokens, tile=tile, target=target)
    return ds, [f"CORE{j}" for j in range(n_core)], [f"ADD{j}" for j in range(n_targets)]
