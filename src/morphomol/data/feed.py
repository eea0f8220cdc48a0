"""The threaded feed: batches of a :class:`~morphomol.data.loader.TileStream` decoded by threads of
the training process into reused buffers and delivered on the training device.

Why threads: chunk reads, Blosc decompression and the numba collate kernels release the GIL, so
decode threads scale with cores like worker processes do, without what made worker processes
slow: fresh shared memory for every batch (page faults on ~100 MB per batch of 512 tiles), the
hand-off through the DataLoader's pipes and a host-side copy into pinned memory.

Order: the batches of an epoch come in the plan's order (the in-process order of the
:class:`TileStream`) for any number of threads, so the order, and a resume's ``skip``, never
depend on the thread count. Thread ``w`` of ``W`` decodes units ``w, w+W, ...`` (a unit is the
batches of one shuffle-buffer fill, so a chunk is decoded by one thread); ``threads=0`` decodes
in the consumer's thread.

Buffers: every thread owns ``depth`` :class:`Slot` s (page-locked on CUDA), reused for the whole
run. A batch handed out is a *lease*: on the CPU its buffers are reused once the consumer asks for
the next batch; on CUDA once the copy to the device completed (an event on the copy stream).
Consumers that keep tensors of a batch past the next one must copy them (or not pass ``device``
to the source: then every batch gets fresh buffers, as before).

Device: on CUDA each batch is copied on a side stream, one batch ahead of the step that uses it;
tokens cross as COO (int32 flat index + float32 value, ~5 k entries per tile instead of 196 x G
dense values) and are scattered into the dense ``(B, 196, G)`` tensor on that stream, outside any
compiled region; the consumer's stream waits on an event. On the CPU the decode thread scatters
the tokens into a reused dense buffer that is cleared only where the previous batch wrote.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from morphomol.data.collate import N_TOKENS, BufferPool, _kernels, _torch
from morphomol.data.loader import TileStream
from morphomol.util.logs import get_logger

log = get_logger("data.feed")

_END = object()


class Slot:
    """Reused buffers of one batch: ``image``, ``tile_counts``, ``targets`` and the tokens, as COO
    (``tokens="coo"``: scattered on the device) or as a dense buffer cleared where the previous
    batch wrote (``tokens="dense"``: the CPU feed). ``pin``: page-locked memory (CUDA), so
    host-to-device copies are asynchronous. Buffers grow when a batch needs more (COO entries vary
    per batch) and are otherwise never reallocated."""

    def __init__(self, *, tokens: str = "coo", pin: bool = False) -> None:
        self.tokens, self.pin = tokens, pin
        self._bufs: dict[str, Any] = {}
        self._flat: Any = None
        self._vals: Any = None
        self._dense: Any = None
        self.written = 0  # entries of the dense buffer the last batch wrote
        self.event: Any = None  # CUDA: the copy of the last batch out of this slot

    def _empty(self, n: int, dtype: Any) -> Any:
        torch = _torch()
        return torch.empty(max(int(n), 1), dtype=_tdtype(dtype), pin_memory=self.pin)

    def take(self, name: str, shape: tuple[int, ...], dtype: Any) -> tuple[Any, np.ndarray]:
        """(tensor, numpy view) of ``shape`` over the slot's buffer ``name``."""
        n = int(np.prod(shape))
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != _tdtype(dtype):
            buf = self._bufs[name] = self._empty(n, dtype)
        t = buf[:n].view(shape)
        return t, t.numpy()

    def _clear(self) -> None:
        if self._dense is not None and self.written:
            _kernels()["clear_at"](self._dense.numpy(), self._flat.numpy(), self.written)
        self.written = 0

    def coo(self, n: int, dtype: Any) -> tuple[Any, np.ndarray, Any, np.ndarray]:
        """COO index / value buffers for ``n`` entries (the dense buffer is cleared first)."""
        self._clear()  # uses the previous batch's indices: before they are overwritten
        if self._flat is None or self._flat.numel() < n or self._flat.dtype != _tdtype(dtype):
            cap = max(int(n * 1.25), 1)
            self._flat, self._vals = self._empty(cap, dtype), self._empty(cap, np.float32)
        return self._flat, self._flat.numpy(), self._vals, self._vals.numpy()

    def dense(self, n: int) -> tuple[Any, np.ndarray]:
        """The dense token buffer (zero wherever the current batch did not write)."""
        torch = _torch()
        if self._dense is None or self._dense.numel() < n:
            self._dense = torch.zeros(n, dtype=torch.float32, pin_memory=self.pin)
            self.written = 0
        return self._dense, self._dense.numpy()


def _tdtype(dtype: Any) -> Any:
    return _torch().from_numpy(np.empty(0, dtype)).dtype


class Feed:
    """Batches of ``stream`` on ``device`` through ``threads`` decode threads (module doc).

    Keep one per loader layout: decode states (open stores, chunk buffers) and slots live as
    long as the feed. :meth:`epoch` yields the loader's batch dicts (``image``, ``tokens``
    dense (B, 196, G_core), ``tile_counts``, ``targets``, cached feature fields, ``index``, ``tile_id``)
    with tensors on ``device``.
    """

    def __init__(self, stream: TileStream, *, threads: int, device: Any, depth: int = 2) -> None:
        torch = _torch()
        self.stream = stream
        self.threads = max(0, int(threads))
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        W = max(1, self.threads)
        self.pool = BufferPool((W + 1) * stream.buffer_chunks + 2)  # chunk buffers, shared by the threads
        self.decoders = [stream.decoder(self.pool) for _ in range(W)]
        self.slots = [[Slot(tokens="coo" if self.cuda else "dense", pin=self.cuda) for _ in range(max(2, depth))]
                      for _ in range(W)]
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def __len__(self) -> int:
        return len(self.stream)

    # ------------------------------------------------------------------ producing host batches
    def _units(self, epoch: int, skip: int, shard: tuple[int, int] | None) -> list[list[np.ndarray]]:
        """The epoch's units with the first ``skip`` batches dropped (never read)."""
        out = []
        k = int(skip)
        for u in self.stream.plan(epoch, shard):
            if k >= len(u):
                k -= len(u)
                continue
            out.append(u[k:])
            k = 0
        return out

    def _produce(self, w: int, units: list[list[np.ndarray]], free: queue.Queue[Slot], put: Any,
                 stop: threading.Event) -> None:
        """Decode ``units`` in order with decode state ``w`` into free slots; ``put(item)`` each."""
        dec = self.decoders[w]
        # one thread sees consecutive units: it keeps the last unit's chunks for the carried tiles;
        # with several, a thread's units are not consecutive: chunks go back to the pool at once
        keep = self.threads <= 1
        prev: dict[tuple[int, int], dict[str, Any]] = {}
        for u in units:
            cur: dict[tuple[int, int], dict[str, Any]] = {}
            for rows in u:
                while True:
                    if stop.is_set():
                        return
                    try:
                        slot = free.get(timeout=0.2)
                        break
                    except queue.Empty:
                        continue
                if slot.event is not None:
                    slot.event.synchronize()  # its last batch is on the device
                    slot.event = None
                put((slot, dec.collate(rows, cur, prev, slot=slot)))
            dec.rotate(prev, cur)
            prev = cur
            if not keep:
                dec.rotate(prev, {})
                prev = {}

    def _host_batches(self, units: list[list[np.ndarray]], free: list[queue.Queue[Slot]],
                      stop: threading.Event) -> Iterator[tuple[int, Slot, dict[str, Any]]]:
        if self.threads == 0:  # decode in this thread (the lease ends before the next batch is made)
            yield from self._inline(units, free[0])
            return
        W = self.threads
        outs: list[queue.Queue[Any]] = [queue.Queue() for _ in range(W)]

        def run(w: int) -> None:
            try:
                self._produce(w, units[w::W], free[w], outs[w].put, stop)
            except BaseException as exc:  # surfaced in the consumer
                outs[w].put(exc)

        threads = [threading.Thread(target=run, args=(w,), name=f"feed-{w}", daemon=True) for w in range(W)]
        for t in threads:
            t.start()
        try:
            for i, u in enumerate(units):
                w = i % W
                for _ in u:
                    item = outs[w].get()
                    if isinstance(item, BaseException):
                        raise item
                    yield (w, *item)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)

    def _inline(self, units: list[list[np.ndarray]],
                free: queue.Queue[Slot]) -> Iterator[tuple[int, Slot, dict[str, Any]]]:
        dec = self.decoders[0]
        prev: dict[tuple[int, int], dict[str, Any]] = {}
        for u in units:
            cur: dict[tuple[int, int], dict[str, Any]] = {}
            for rows in u:
                slot = free.get_nowait()  # the consumer released the previous batch before asking
                if slot.event is not None:
                    slot.event.synchronize()
                    slot.event = None
                yield 0, slot, dec.collate(rows, cur, prev, slot=slot)
            dec.rotate(prev, cur)
            prev = cur

    # ------------------------------------------------------------------ delivering on the device
    def _to_device(self, host: dict[str, Any], slot: Slot) -> dict[str, Any]:
        """Enqueue the batch's copies (and the token scatter) on the copy stream; record the event."""
        torch = _torch()
        out: dict[str, Any] = {"tile_id": host["tile_id"], "index": host["index"]}
        with torch.cuda.stream(self._copy_stream):
            for k in ("image", "tile_counts", "targets", *self.stream.feature_dims):
                if k in host:
                    out[k] = host[k].to(self.device, non_blocking=True)
            if "token_index" in host:
                B, T, G = host["token_shape"]
                dense = torch.zeros(B * T * G, dtype=torch.float32, device=self.device)
                idx = host["token_index"].to(self.device, non_blocking=True)
                dense.index_put_((idx,), host["token_value"].to(self.device, non_blocking=True))
                out["tokens"] = dense.view(B, N_TOKENS, G)
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        slot.event = ev
        out["_event"] = ev
        return out

    def epoch(self, epoch: int, *, skip: int = 0, shard: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` (skipping the first ``skip``; ``shard`` = (rank, world))."""
        torch = _torch()
        units = self._units(epoch, skip, shard)
        free: list[queue.Queue[Slot]] = []
        for slots in self.slots:
            q: queue.Queue[Slot] = queue.Queue()
            for s in slots:
                q.put(s)
            free.append(q)
        stop = threading.Event()
        gen = self._host_batches(units, free, stop)
        try:
            if not self.cuda:
                for w, slot, host in gen:
                    yield host
                    free[w].put(slot)  # the consumer asked for the next batch: the lease ends
                return
            cur = torch.cuda.current_stream(self.device)
            pending = None
            for w, slot, host in gen:
                nxt = self._to_device(host, slot)
                free[w].put(slot)  # reused after its event (the copy) completed
                if pending is not None:
                    yield self._ready(pending, cur)
                pending = nxt
            if pending is not None:
                yield self._ready(pending, cur)
        finally:
            stop.set()
            gen.close()

    @staticmethod
    def _ready(batch: dict[str, Any], stream: Any) -> dict[str, Any]:
        ev = batch.pop("_event")
        stream.wait_event(ev)
        for v in batch.values():
            if hasattr(v, "record_stream") and v.is_cuda:
                v.record_stream(stream)
        return batch
