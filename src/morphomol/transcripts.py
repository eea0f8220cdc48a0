"""A sample's transcripts as the batches the tiling and token stages consume: streamed from the
Xenium bundle, assigned to registration regions, gene names mapped to the sample's gene index."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from morphomol.geometry import Batch


def sample_batches(bundle: Any, reg: Any, genes: Sequence[str], *, batch_size: int, qv_min: float | None
                   ) -> Iterator[Batch]:
    """Stream a XeniumBundle as :class:`Batch` es (region assignment + gene lookup table)."""
    pos = {g: i for i, g in enumerate(genes)}
    lut_cache: tuple[int, np.ndarray] | None = None
    simple = len(reg.regions) == 1 and not getattr(reg.regions[0], "polygon_um", None)
    for b in bundle.iter_transcripts(batch_size=batch_size, qv_min=qv_min, drop_controls=True):
        names = b.gene_names
        if lut_cache is None or lut_cache[0] != id(names):
            lut_cache = (id(names), np.array([pos.get(n, -1) for n in names], dtype=np.int32))
        if simple and getattr(reg, "region_assignment", "nearest") != "drop":
            region = np.zeros(len(b.x), np.int32)
        else:
            region = np.asarray(reg.assign_regions(b.x, b.y), dtype=np.int32)
        yield Batch(b.x, b.y, region, b.gene_codes, lut_cache[1])


def sample_genes(bundle: Any) -> list[str]:
    """All non-control genes of a sample: those present in the transcripts plus the panel file."""
    from morphomol.io.xenium import is_control

    genes = set(bundle.feature_names())
    panel = bundle.gene_panel()
    if panel:
        genes |= {g for g in panel if not is_control(g)}
    return sorted(genes)
