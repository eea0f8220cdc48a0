"""Batched frozen-feature extraction: tiles.zarr (or tokens.zarr for expression encoders) ->
features zarr, one store per sample; :func:`extract_features_group` runs one encoder over a group
of samples (one model load, samples whose store is current skipped: the ``features`` jobs).

Input ``tiles.zarr``: array ``images`` (N, 224, 224, 3) uint8 chunked (C, 224, 224, 3). Blocks of
whole chunks are decoded by ``read_threads`` threads straight from the chunk files
(:class:`~morphomol.data.chunks.ChunkReader`: no zarr slicing, no fresh memory) into a ring of
reused buffers, page-locked on CUDA, in order. On CUDA each block is copied on a side stream one
block ahead of the compute and the model runs under bf16 autocast with channels_last; on the CPU in
fp32. With patch tokens the features and the tokens come from one forward pass. Results are
copied back asynchronously and written by a background thread. Expression encoders (Geneformer)
read ``tokens.zarr``'s ``tile_counts`` (N, G) with gene names from its ``genes`` attribute.

Output: a features store written through :mod:`morphomol.data.features` (the one reader/writer
of that layout; temporary sibling renamed on success): ``features`` (N, D) float32, optional
``tokens`` (N, T, D) float16 (patch tokens), attrs ``encoder``, ``weights_sha256`` (or
``random-init:seed=N``), ``dim``, ``n_tiles``, ``tiles_store``, ``pooling``, ``arch`` (geometry),
``precision``, ``kind`` (+ ``n_tokens``).

Library code: the Snakemake adapter (``scripts/features.py``) maps the config to the explicit
arguments of :func:`extract_features_group`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
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
    """Blocks of whole chunks, decoded in order by ``threads`` threads into reused buffers.

    Thread ``w`` reads blocks ``w, w+W, ...`` into its own ``depth`` buffers (page-locked when
    ``pin``); iterating yields ``(start, stop, tensor, release)``: ``release(event)`` hands the
    buffer back once the consumer is done with it (on CUDA: once ``event``, the copy, completed).
    """

    def __init__(self, array: Any, blocks: list[tuple[int, int]], *, pin: bool, threads: int = 2,
                 depth: int = 2) -> None:
        from morphomol.data.chunks import ChunkReader

        self.array, self.blocks, self.pin = array, blocks, pin
        self.rd = ChunkReader(array)
        self.W = max(1, int(threads))
        rows = (max((e - s for s, e in blocks), default=0) // self.rd.C + 2) * self.rd.C
        self.rows = rows
        self.depth = max(2, int(depth))
        self.free: list[queue.Queue[Any]] = [queue.Queue() for _ in range(self.W)]
        self.outs: list[queue.Queue[Any]] = [queue.Queue() for _ in range(self.W)]
        self.read_seconds = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        for w in range(self.W):
            for _ in range(self.depth):
                self.free[w].put((None, None))  # buffers are allocated on first use
        self.threads = [threading.Thread(target=self._run, args=(w,), name=f"features-reader-{w}", daemon=True)
                        for w in range(self.W)]
        for t in self.threads:
            t.start()

    def _buffer(self) -> torch.Tensor:
        shape = (self.rows, *self.rd.row_shape)
        tdt = torch.from_numpy(np.empty(0, self.rd.dtype)).dtype
        return torch.empty(shape, dtype=tdt, pin_memory=self.pin)

    def _fill(self, buf: torch.Tensor, s: int, e: int) -> torch.Tensor:
        out = buf.numpy()
        C = self.rd.C
        if self.rd.base is None or s % C:
            out[: e - s] = np.asarray(self.array[s:e])
            return buf[: e - s]
        for c in range(s // C, -(-e // C)):
            self.rd.read(c, out[c * C - s: c * C - s + C])
        return buf[: e - s]

    def _run(self, w: int) -> None:
        try:
            for s, e in self.blocks[w:: self.W]:
                while True:
                    if self._stop.is_set():
                        return
                    try:
                        buf, ev = self.free[w].get(timeout=0.2)
                        break
                    except queue.Empty:
                        continue
                if ev is not None:
                    ev.synchronize()  # the previous block in this buffer reached the device
                t0 = time.perf_counter()
                buf = self._buffer() if buf is None else buf
                view = self._fill(buf, s, e)
                with self._lock:
                    self.read_seconds += time.perf_counter() - t0
                self.outs[w].put((s, e, view, buf))
        except BaseException as exc:  # surfaced in the consumer
            self.outs[w].put(exc)

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor, Any]]:
        for i in range(len(self.blocks)):
            w = i % self.W
            item = self.outs[w].get()
            if isinstance(item, BaseException):
                raise item
            s, e, view, buf = item

            def release(ev: Any = None, w: int = w, buf: torch.Tensor = buf) -> None:
                self.free[w].put((buf, ev))

            yield s, e, view, release

    def close(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=5)


class _Writer:
    """Writes finished blocks in a background thread (a D2H copy is waited for there)."""

    def __init__(self, writer: Any, depth: int = 3) -> None:
        self.writer = writer
        self.q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.done = 0
        self.thread = threading.Thread(target=self._run, name="features-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                s, e, f, t, ev = item
                if ev is not None:
                    ev.synchronize()
                self.writer.write(s, e, f.numpy(), t.numpy() if t is not None else None)
                self.done = e
            except BaseException as exc:  # surfaced in put() / close()
                self.error = exc

    def put(self, item: tuple[Any, ...]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def features_and_tokens(encoder: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, patch tokens) of a batch in one forward pass where the encoder allows it
    (the same operations as ``encoder(x)`` and ``encoder.forward_tokens(x)``), else two passes."""
    own = getattr(encoder, "forward_with_tokens", None)
    if own is not None:
        return own(x)
    from morphomol.encoders import _modules as m
    from morphomol.encoders.base import pool_tokens

    if type(encoder) is m.TimmViTEncoder:
        t = encoder.model.forward_features(encoder.preprocess(x))
        k = int(encoder.model.num_prefix_tokens)
        return pool_tokens(t, k, encoder.pooling), t[:, k:]
    if type(encoder) is m.HFViTEncoder:
        h = encoder.model(pixel_values=encoder.preprocess(x)).last_hidden_state
        return pool_tokens(h, 1, encoder.pooling), h[:, 1:]
    if type(encoder) is m.ConchEncoder:
        t = encoder.model.trunk.forward_features(encoder.preprocess(x))
        pooled = encoder.model.ln_contrast(encoder.model.attn_pool_contrast(t)[:, 0])
        if encoder.pooling == "proj":
            pooled = pooled @ encoder.model.proj_contrast
        return pooled, t[:, int(encoder.model.trunk.num_prefix_tokens):]
    return encoder(x), encoder.forward_tokens(x)  # type: ignore[operator]


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
    read_threads: int = 2,
) -> dict[str, Any]:
    """Run a frozen encoder over every tile of ``tiles_zarr`` and write ``out_zarr``.

    Returns a summary (n_tiles, dim, seconds, tiles_per_second, read_seconds). ``encoder`` may be
    passed pre-built (benchmarks, feature jobs over several samples); otherwise it is created from
    the registry, ``overrides_field`` naming the config key of ``overrides`` in errors (see
    :func:`morphomol.encoders.create_encoder`). ``read_threads``: decode threads of the reader.
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
            if patch_tokens:  # one forward pass for both
                feat, tok = features_and_tokens(encoder, x)  # type: ignore[arg-type]
                return feat.float(), tok.to(torch.float16)
            return encoder(x).float(), None

    n_tokens = 0
    if patch_tokens:
        probe = torch.zeros((1, *src.shape[1:]), dtype=torch.uint8, device=dev)
        n_tokens = int(run_batch(probe)[1].shape[1])  # type: ignore[union-attr]

    blocks = _blocks(n, chunk, batch_size)
    out_path = Path(out_zarr)
    t0 = time.perf_counter()
    last_log = t0
    precision = "bf16-autocast" if cuda else "fp32"
    log.info("features %s: %d tiles from %s on %s (%s), batch %d, dim %d, %d read threads", encoder_name, n,
             tiles_zarr, dev, precision, batch_size, dim, read_threads)
    to_dev = spec.kind == "image"  # expression encoders take host counts
    copy_stream = torch.cuda.Stream(dev) if cuda and to_dev else None
    reader = _Reader(src, blocks, pin=cuda, threads=read_threads)
    try:
        rows = max(1, min(n, blocks[0][1] - blocks[0][0])) if blocks else 1
        with open_features_writer(out_path, n, dim, chunk_rows=rows, n_tokens=n_tokens if patch_tokens else None,
                                  token_chunk_rows=max(1, min(chunk, rows))) as writer:
            bg = _Writer(writer)

            def to_host(x: torch.Tensor) -> torch.Tensor:
                if not x.is_cuda:
                    return x
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                host.copy_(x, non_blocking=True)
                return host

            def compute(s: int, e: int, block: torch.Tensor) -> None:
                nonlocal last_log
                outs, touts = [], []
                for b in range(0, e - s, batch_size):
                    f, t = run_batch(block[b: b + batch_size])
                    outs.append(f)
                    if t is not None:
                        touts.append(t)
                hf = to_host(outs[0] if len(outs) == 1 else torch.cat(outs))
                ht = to_host(touts[0] if len(touts) == 1 else torch.cat(touts)) if touts else None
                ev = None
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record()
                bg.put((s, e, hf, ht, ev))
                now = time.perf_counter()
                if now - last_log >= log_every_s:
                    log.info("features %s: %d/%d tiles (%.1f tiles/s)", encoder_name, bg.done, n,
                             bg.done / max(now - t0, 1e-9))
                    last_log = now

            staged = None  # CUDA: the block copied on the side stream, computed after the next copy is queued
            try:
                for s, e, block, release in reader:
                    if copy_stream is None:
                        x = block.to(dev) if to_dev and cuda else block
                        compute(s, e, x)
                        release(None)
                        continue
                    with torch.cuda.stream(copy_stream):
                        x = block.to(dev, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(copy_stream)
                    release(ev)
                    if staged is not None:
                        compute(*staged)
                    torch.cuda.current_stream(dev).wait_event(ev)
                    x.record_stream(torch.cuda.current_stream(dev))
                    staged = (s, e, x)
                if staged is not None:
                    compute(*staged)
            finally:
                bg.close()
            if bg.done != n:
                raise RuntimeError(f"feature extraction stopped at {bg.done} of {n} tiles")
            log.info("features %s: %d/%d tiles (%.1f tiles/s)", encoder_name, n, n,
                     n / max(time.perf_counter() - t0, 1e-9))
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
        "read_threads": int(getattr(features, "read_threads", 2)),
    }


def extract_features_for(encoder_name: str, *, store: str | Path, out: str | Path, encoder: EncoderConfig,
                         features: FeaturesConfig, vit: ViTConfig) -> dict[str, Any]:
    """The ``features`` rule: :func:`extract_features` of one sample's ``store`` (tiles.zarr, or
    tokens.zarr for expression encoders) into ``out`` with the settings of
    :func:`feature_job_args`. Returns the summary."""
    return extract_features(store, out, encoder_name, **feature_job_args(encoder_name, encoder, features, vit))


def store_is_current(out: str | Path, store: str | Path, encoder_name: str, encoder: torch.nn.Module, *,
                     patch_tokens: bool) -> str | None:
    """Why ``out`` must be (re)computed, or None when it is a finished store of this very encoder
    (name, weights digest, pooling, geometry) over the current ``store`` (every row, tokens as
    asked, written after the store's last change)."""
    from morphomol.data.features import read_features_attrs

    p, src = Path(out), Path(store)
    if not p.exists():
        return "missing"
    try:
        attrs = read_features_attrs(p)
        g = open_zarr_group(src)
        n = int(g["images" if "images" in g else "tile_counts"].shape[0])
        has_tokens = "tokens" in open_zarr_group(p)
    except Exception as exc:  # unreadable: recompute
        return f"unreadable ({type(exc).__name__})"
    expected = {"encoder": encoder_name, "weights_sha256": str(getattr(encoder, "weights_id", "unknown")),
                "pooling": str(getattr(encoder, "pooling", "")), "n_tiles": n}
    for k, v in expected.items():
        if attrs.get(k) != v:
            return f"{k} differs"
    arch = getattr(encoder, "config", {}).get("arch", {})
    from morphomol.util.jsonio import json_safe

    if attrs.get("arch") != json_safe(dict(arch)):
        return "arch differs"
    if has_tokens != bool(patch_tokens):
        return "patch tokens differ"
    stamp = max((q.stat().st_mtime for q in (src / "zarr.json", src) if q.exists()), default=0.0)
    if (p / "zarr.json").stat().st_mtime < stamp:
        return "older than its input store"
    return None


def extract_features_group(encoder_name: str, *, samples: Sequence[str], stores: Sequence[str | Path],
                           outs: Sequence[str | Path], encoder: EncoderConfig, features: FeaturesConfig,
                           vit: ViTConfig) -> dict[str, dict[str, Any]]:
    """The ``features`` jobs: one encoder over a group of samples (TRIDENT-style), one model load.

    ``stores[i]`` (tiles.zarr, or tokens.zarr for expression encoders) of ``samples[i]`` is
    extracted into ``outs[i]`` with the settings of :func:`feature_job_args`, unless ``outs[i]``
    is already current (:func:`store_is_current`: a rerun after a new sample, or after a failure,
    redoes only what is missing or stale). Returns per sample the summary, or ``{"skipped": why}``.
    """
    if not (len(samples) == len(stores) == len(outs)):
        raise InputError(f"{len(samples)} samples, {len(stores)} input stores and {len(outs)} outputs",
                         field="features", expected="one input store and one output per sample")
    args = feature_job_args(encoder_name, encoder, features, vit)
    enc = create_encoder(encoder_name, args.pop("weights"), overrides_field=args.pop("overrides_field"),
                         **args.pop("overrides"))
    done: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for sample, store, out in zip(samples, stores, outs, strict=True):
        why = store_is_current(out, store, encoder_name, enc, patch_tokens=args["patch_tokens"])
        if why is None:
            log.info("features %s: %s is current (same encoder, weights and input): skipped", encoder_name, sample)
            done[sample] = {"skipped": "current"}
            continue
        log.info("features %s: %s (%s)", encoder_name, sample, why)
        done[sample] = extract_features(store, out, encoder_name, encoder=enc, **args)
    n = sum(d.get("n_tiles", 0) for d in done.values())
    log.info("features %s: %d samples (%d computed, %d tiles) in %.1f s", encoder_name, len(samples),
             sum("n_tiles" in d for d in done.values()), n, time.perf_counter() - t0)
    return done
