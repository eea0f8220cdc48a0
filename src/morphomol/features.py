"""Batched frozen-feature extraction: tiles.zarr (or tokens.zarr for expression encoders) ->
features zarr.

Input ``tiles.zarr``: array ``images`` (N, 224, 224, 3) uint8 chunked (C, 224, 224, 3). Whole
chunks are read sequentially by a background thread (so store I/O overlaps compute), pinned on
CUDA and copied with ``non_blocking=True``; the model runs under bf16 autocast with channels_last
on CUDA and in fp32 on CPU. Expression encoders (Geneformer) read ``tokens.zarr``'s
``tile_counts`` (N, G) with gene names from its ``genes`` attribute.

Output: a features store written through :mod:`morphomol.data.features` (the one reader/writer
of that layout; temporary sibling renamed on success): ``features`` (N, D) float32, optional
``tokens`` (N, T, D) float16 (patch tokens), attrs ``encoder``, ``weights_sha256`` (or
``random-init:seed=N``), ``dim``, ``n_tiles``, ``tiles_store``, ``pooling``, ``arch`` (geometry),
``precision``, ``kind`` (+ ``n_tokens``).

Library code: the Snakemake adapter (``scripts/features.py``) maps the config to the explicit
arguments of :func:`extract_features`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from morphomol.data.features import open_features_writer, open_zarr_group
from morphomol.encoders import create_encoder, get_spec
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

if TYPE_CHECKING:
    from morphomol.config.sections import EncoderConfig, FeaturesConfig, ViTConfig

log = get_logger("features")

#: ``model.vit`` keys that set the geometry of the ``vit_s`` feature encoder
VIT_GEOMETRY_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None/empty -> cuda when available else cpu; an unavailable cuda device is an InputError."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available", field="features.device",
                         expected="auto, cpu or an available cuda device")
    return dev


def _blocks(n: int, chunk: int, batch_size: int) -> list[tuple[int, int]]:
    """Chunk-aligned [start, stop) blocks of about max(batch_size, chunk) rows."""
    per = max(1, -(-batch_size // chunk)) * chunk
    return [(s, min(n, s + per)) for s in range(0, n, per)]


class _Reader:
    """Background thread reading whole-chunk blocks in order into a bounded queue."""

    _END = object()

    def __init__(self, array: Any, blocks: list[tuple[int, int]], *, pin: bool, depth: int = 3) -> None:
        self.array = array
        self.blocks = blocks
        self.pin = pin
        self.q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.read_seconds = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="features-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for s, e in self.blocks:
                if self._stop.is_set():
                    break
                t0 = time.perf_counter()
                arr = np.ascontiguousarray(self.array[s:e])
                t = torch.from_numpy(arr)
                if self.pin:
                    t = t.pin_memory()
                self.read_seconds += time.perf_counter() - t0
                while not self._stop.is_set():
                    try:
                        self.q.put((s, e, t), timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced in the consumer
            self.error = exc
        finally:
            while True:
                try:
                    self.q.put(self._END, timeout=0.5)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        break

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        while True:
            item = self.q.get()
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self.thread.join(timeout=5)


def extract_features(
    tiles_zarr: str | Path,
    out_zarr: str | Path,
    encoder_name: str,
    weights: str | Path | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    overrides: Mapping[str, Any] | None = None,
    patch_tokens: bool = False,
    *,
    encoder: torch.nn.Module | None = None,
    allow_random: bool | None = None,
    overrides_field: str | None = None,
    log_every_s: float = 30.0,
) -> dict[str, Any]:
    """Run a frozen encoder over every tile of ``tiles_zarr`` and write ``out_zarr``.

    Returns a summary (n_tiles, dim, seconds, tiles_per_second, read_seconds). ``encoder`` may be
    passed pre-built (benchmarks); otherwise it is created from the registry, ``overrides_field``
    naming the config key of ``overrides`` in errors (see :func:`morphomol.encoders.create_encoder`).
    Reads the input store and the weights, writes ``out_zarr`` (replacing it only on success).
    """
    spec = get_spec(encoder_name)
    dev = resolve_device(device)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}", field="features.batch_size")
    group = open_zarr_group(tiles_zarr)
    genes: list[str] | None = None
    if spec.kind == "image":
        if "images" not in group:
            raise InputError("store has no 'images' array", file=tiles_zarr, field="images",
                             expected="tiles.zarr with images (N, H, W, 3) uint8")
        src = group["images"]
        if src.ndim != 4 or src.shape[-1] != 3 or src.dtype != np.uint8:
            raise InputError(f"images array has shape {src.shape} dtype {src.dtype}", file=tiles_zarr,
                             field="images", expected="(N, H, W, 3) uint8")
    else:
        if "tile_counts" not in group:
            raise InputError("store has no 'tile_counts' array", file=tiles_zarr, field="tile_counts",
                             expected="tokens.zarr with tile_counts (N, G) and attrs genes")
        src = group["tile_counts"]
        genes = list(group.attrs.get("genes") or [])
        if src.ndim != 2 or len(genes) != src.shape[1]:
            raise InputError(f"tile_counts shape {src.shape} does not match {len(genes)} genes",
                             file=tiles_zarr, field="genes", expected="one gene name per tile_counts column")
    n = int(src.shape[0])
    chunk = int(src.chunks[0]) if src.chunks[0] else max(1, batch_size)

    if encoder is None:
        encoder = create_encoder(encoder_name, weights, allow_random=allow_random, overrides_field=overrides_field,
                                 **dict(overrides or {}))
    encoder = encoder.to(dev).eval()
    if genes is not None:
        encoder.set_genes(genes)  # type: ignore[operator]
    cuda = dev.type == "cuda"
    if cuda:
        encoder = encoder.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dim = int(encoder.dim)
    if patch_tokens and not getattr(encoder, "has_tokens", False):
        raise InputError(f"encoder '{encoder_name}' does not expose patch tokens",
                         field="features.patch_tokens", expected="false for this encoder")

    def run_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if patch_tokens:
                tok = encoder.forward_tokens(x)  # type: ignore[operator]
                feat = encoder(x)
                return feat.float(), tok.to(torch.float16)
            return encoder(x).float(), None

    n_tokens = 0
    if patch_tokens:
        probe = torch.zeros((1, *src.shape[1:]), dtype=torch.uint8, device=dev)
        n_tokens = int(run_batch(probe)[1].shape[1])  # type: ignore[union-attr]

    blocks = _blocks(n, chunk, batch_size)
    out_path = Path(out_zarr)
    t0 = time.perf_counter()
    done = 0
    last_log = t0
    precision = "bf16-autocast" if cuda else "fp32"
    log.info("features %s: %d tiles from %s on %s (%s), batch %d, dim %d", encoder_name, n, tiles_zarr,
             dev, precision, batch_size, dim)
    reader = _Reader(src, blocks, pin=cuda)
    try:
        rows = max(1, min(n, blocks[0][1] - blocks[0][0])) if blocks else 1
        with open_features_writer(out_path, n, dim, chunk_rows=rows, n_tokens=n_tokens if patch_tokens else None,
                                  token_chunk_rows=max(1, min(chunk, rows))) as writer:
            pending: list[tuple[int, int, torch.Tensor, torch.Tensor | None, Any]] = []

            def to_host(x: torch.Tensor) -> torch.Tensor:
                if not x.is_cuda:
                    return x
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                host.copy_(x, non_blocking=True)
                return host

            def flush(keep: int) -> None:
                # write finished blocks; on CUDA the newest block keeps computing meanwhile
                nonlocal done, last_log
                while len(pending) > keep:
                    ps, pe, pf, pt, ev = pending.pop(0)
                    if ev is not None:
                        ev.synchronize()
                    writer.write(ps, pe, pf.numpy(), pt.numpy() if pt is not None else None)
                    done = pe
                    now = time.perf_counter()
                    if now - last_log >= log_every_s or pe == n:
                        rate = done / max(now - t0, 1e-9)
                        log.info("features %s: %d/%d tiles (%.1f tiles/s)", encoder_name, done, n, rate)
                        last_log = now

            for s, e, block in reader:
                if spec.kind == "image":
                    block = block.to(dev, non_blocking=True)
                outs, touts = [], []
                for b in range(0, e - s, batch_size):
                    f, t = run_batch(block[b : b + batch_size])
                    outs.append(f)
                    if t is not None:
                        touts.append(t)
                hf = to_host(torch.cat(outs))
                ht = to_host(torch.cat(touts)) if touts else None
                ev = None
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record()
                pending.append((s, e, hf, ht, ev))
                flush(keep=1 if cuda else 0)
            flush(keep=0)
            if done != n:
                raise RuntimeError(f"feature extraction stopped at {done} of {n} tiles")
            writer.finish(
                encoder=encoder_name,
                weights_sha256=str(getattr(encoder, "weights_id", "unknown")),
                tiles_store=str(tiles_zarr),
                pooling=str(getattr(encoder, "pooling", "")),
                arch=getattr(encoder, "config", {}).get("arch", {}),
                precision=precision,
                kind=spec.kind,
            )
    finally:
        reader.close()
    seconds = time.perf_counter() - t0
    summary = {
        "n_tiles": n,
        "dim": dim,
        "seconds": seconds,
        "tiles_per_second": n / seconds if seconds > 0 else float("nan"),
        "read_seconds": reader.read_seconds,
        "device": str(dev),
    }
    log.info("features %s: wrote %s (%d x %d) in %.1f s", encoder_name, out_path, n, dim, seconds)
    return summary


def feature_job_args(encoder_name: str, encoder: EncoderConfig, features: FeaturesConfig,
                     vit: ViTConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`extract_features` for one encoder from its config sections:
    ``encoders.<name>`` (``encoder``), ``features`` and ``model.vit`` (``vit``).

    ``weights``; ``overrides`` = for ``vit_s`` the ``model.vit`` geometry (so the frozen ViT-S of
    the feature cache is the network the models train), then ``encoders.<name>.overrides`` and
    ``encoders.<name>.pooling``; ``batch_size`` and ``patch_tokens`` (the encoder's own value,
    else the ``features`` section's); ``device``; ``overrides_field`` (the config keys the
    overrides came from, named in errors). Reads nothing.
    """
    overrides: dict[str, Any] = {}
    fields = []
    if encoder_name == "vit_s":
        geometry = vit.timm_kwargs()
        overrides.update({k: geometry[k] for k in VIT_GEOMETRY_KEYS if k in geometry})
        fields.append("model.vit")
    if encoder.overrides:
        overrides.update(dict(encoder.overrides))
        fields.append(f"encoders.{encoder_name}.overrides")
    if encoder.pooling:
        overrides["pooling"] = encoder.pooling
    return {
        "weights": encoder.weights or None,
        "overrides": overrides,
        "batch_size": int(encoder.batch_size or features.batch_size or 256),
        "device": features.device,
        "patch_tokens": bool(features.patch_tokens if encoder.patch_tokens is None else encoder.patch_tokens),
        "overrides_field": " or ".join(fields) or None,
    }


def extract_features_for(encoder_name: str, *, store: str | Path, out: str | Path, encoder: EncoderConfig,
                         features: FeaturesConfig, vit: ViTConfig) -> dict[str, Any]:
    """The ``features`` rule: :func:`extract_features` of one sample's ``store`` (tiles.zarr, or
    tokens.zarr for expression encoders) into ``out`` with the settings of
    :func:`feature_job_args`. Returns the summary."""
    return extract_features(store, out, encoder_name, **feature_job_args(encoder_name, encoder, features, vit))
