"""Batched frozen-feature extraction: tiles.zarr (or tokens.zarr for expression encoders) ->
features zarr.

Input ``tiles.zarr``: array ``images`` (N, 224, 224, 3) uint8 chunked (C, 224, 224, 3). Whole
chunks are read sequentially by a background thread (so store I/O overlaps compute), pinned on
CUDA and copied with ``non_blocking=True``; the model runs under bf16 autocast with channels_last
on CUDA and in fp32 on CPU. Expression encoders (Geneformer) read ``tokens.zarr``'s
``tile_counts`` (N, G) with gene names from its ``genes`` attribute.

Output (written to a temporary sibling and renamed, :func:`morphomol.util.atomic.atomic_path`):
``features`` (N, D) float32, optional ``tokens`` (N, T, D) float16 (patch tokens), attrs
``encoder``, ``weights_sha256`` (or ``random-init:seed=N``), ``dim``, ``n_tiles``,
``tiles_store``, ``pooling``, ``arch`` (geometry), ``precision``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphomol.util.atomic import atomic_path
from morphomol.encoders import create_encoder, get_spec
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("features")

VIT_GEOMETRY_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available", field="features.device",
                         expected="auto, cpu or an available cuda device")
    return dev


def encoder_settings(
    encoder: str,
    encoders_cfg: Mapping[str, Any] | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    features_cfg: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Weights path, architecture overrides, batch size, device and patch_tokens for ``encoder``
    from the config sections ``encoders``, ``model`` and ``features``.

    ``vit_s`` takes its geometry from ``model.vit`` (embed_dim/depth/num_heads...) so that the
    frozen ViT-S of the feature cache is the network the models use; any encoder may add
    ``encoders.<name>.overrides`` and ``encoders.<name>.pooling``.
    """
    entry = dict((encoders_cfg or {}).get(encoder) or {})
    fcfg = dict(features_cfg or {})
    overrides: dict[str, Any] = {}
    if encoder == "vit_s":
        vit = dict((model_cfg or {}).get("vit") or {})
        overrides.update({k: vit[k] for k in VIT_GEOMETRY_KEYS if k in vit})
    overrides.update(dict(entry.get("overrides") or {}))
    if entry.get("pooling"):
        overrides["pooling"] = entry["pooling"]
    return {
        "weights": entry.get("weights") or None,
        "overrides": overrides,
        "batch_size": int(entry.get("batch_size") or fcfg.get("batch_size") or 256),
        "device": fcfg.get("device", "auto"),
        "patch_tokens": bool(entry.get("patch_tokens", fcfg.get("patch_tokens", False))),
    }


def _open_group(path: str | Path) -> Any:
    import zarr

    p = Path(path)
    if not p.exists():
        raise InputError("store not found", file=p, expected="a zarr group")
    try:
        return zarr.open_group(str(p), mode="r")
    except Exception as exc:
        raise InputError(f"cannot open zarr group ({type(exc).__name__}: {exc})", file=p,
                         expected="a zarr v3 group") from None


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
    log_every_s: float = 30.0,
) -> dict[str, Any]:
    """Run a frozen encoder over every tile of ``tiles_zarr`` and write ``out_zarr``.

    Returns a summary (n_tiles, dim, seconds, tiles_per_second, read_seconds). ``encoder`` may be
    passed pre-built (benchmarks); otherwise it is created from the registry.
    """
    import zarr

    spec = get_spec(encoder_name)
    dev = resolve_device(device)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}", field="features.batch_size")
    group = _open_group(tiles_zarr)
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
        encoder = create_encoder(encoder_name, weights, allow_random=allow_random, **dict(overrides or {}))
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
        with atomic_path(out_path) as tmp:
            out = zarr.open_group(str(tmp), mode="w")
            rows = max(1, min(n, blocks[0][1] - blocks[0][0])) if blocks else 1
            feats = out.create_array("features", shape=(n, dim), chunks=(rows, dim), dtype="float32")
            toks = None
            if patch_tokens:
                toks = out.create_array("tokens", shape=(n, n_tokens, dim),
                                        chunks=(max(1, min(chunk, rows)), n_tokens, dim), dtype="float16")
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
                    feats[ps:pe] = pf.numpy()
                    if toks is not None and pt is not None:
                        toks[ps:pe] = pt.numpy()
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
            out.attrs.update(
                {
                    "encoder": encoder_name,
                    "weights_sha256": str(getattr(encoder, "weights_id", "unknown")),
                    "dim": dim,
                    "n_tiles": n,
                    "tiles_store": str(tiles_zarr),
                    "pooling": str(getattr(encoder, "pooling", "")),
                    "arch": _json_safe(getattr(encoder, "config", {}).get("arch", {})),
                    "precision": precision,
                    "kind": spec.kind,
                    **({"n_tokens": n_tokens} if patch_tokens else {}),
                }
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


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def read_features(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(features (N, D) float32, attrs) of a features zarr."""
    g = _open_group(path)
    if "features" not in g:
        raise InputError("store has no 'features' array", file=path, field="features",
                         expected="a features zarr written by the features rule")
    return np.asarray(g["features"][:], dtype=np.float32), dict(g.attrs)


def run_rule(smk: Any) -> dict[str, Any]:
    """Snakemake entry (scripts/features.py): settings from params, one sample, one encoder."""
    settings = encoder_settings(
        smk.wildcards.encoder,
        encoders_cfg=smk.params.encoders,
        model_cfg=smk.params.model,
        features_cfg=smk.params.cfg,
    )
    return extract_features(
        tiles_zarr=smk.input.store,
        out_zarr=smk.output.store,
        encoder_name=smk.wildcards.encoder,
        weights=settings["weights"],
        batch_size=settings["batch_size"],
        device=settings["device"],
        overrides=settings["overrides"],
        patch_tokens=settings["patch_tokens"],
    )
