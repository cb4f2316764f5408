"""Activation offloading: tensors saved for backward wait in pinned CPU memory.

Under `with OffloadActivations():` every tensor autograd saves for backward
passes through `pack`; one of at least `min_bytes` bytes that is not a
parameter (nor a view of one) has the bytes of its storage it reads (for a
whole tensor, the whole storage) copied to pinned host memory, and its device
memory is released. Those bytes are copied once however many saved tensors
view them (q, k and v each save their own view of one input). In backward,
`unpack` brings them back and rebuilds the same view; while one is brought
back, the next `prefetch` copies in backward order (the earlier layers'
inputs) are already on their way on the side stream, so the copy of layer
i−1's input overlaps layer i's backward.

Combined with activation checkpointing (non-reentrant `torch.utils.checkpoint`,
what `model.gradient_checkpointing_enable(use_reentrant=False)` uses) the only
tensors saved outside the checkpointed blocks are each block's inputs (the
checkpoint saves them through the current saved-tensor hooks; the block's
internals are recomputed), so only layer inputs travel.

Memory, N = micro_batch·seq_len tokens, L layers, c = bytes of the compute dtype:
    device:  the tensors below `min_bytes`, parameters, and at most
             `max_in_flight` forward tensors whose copy is still running, plus,
             in backward, the tensor in use and `prefetch` tensors arriving.
             With checkpointing: ≈ 2 layer inputs, 2·c·N·h (`lowmem.memory`
             counts "two blocks' worth stay on the device").
    host:    every offloaded storage once: with checkpointing ≈ L·c·N·h.
             PyTorch's pinned allocator rounds each block up to a power of
             two and keeps it for reuse; `lowmem.memory.pinned_host_bytes`
             predicts the total from the storages the model saves.
`stats` counts these bytes as they happen; on the CPU it says what would have
moved, since host and device are the same memory there.

Correctness on CUDA rests on five orderings, each marked WHY below. The design
follows torchtune's `training/_activation_offloading.py` (streams, keeping the
source alive until its copy ends), with prefetch and de-duplication added.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from lowmem.memory import OFFLOAD_MIN_BYTES


@dataclass
class OffloadStats:
    """Bytes and tensors that went through the hooks (cumulative)."""

    offloaded_bytes: int = 0      # copied (or, on the CPU, would be copied) to the host
    offloaded_tensors: int = 0
    shared_saves: int = 0         # further saves of a tensor already offloaded (not copied again)
    kept_bytes: int = 0           # saved, but below min_bytes (or not a plain tensor): left in place
    parameter_saves: int = 0      # parameters or their views: left in place, never copied
    returned_bytes: int = 0       # brought back in backward
    host_bytes: int = 0           # host copies alive now
    peak_host_bytes: int = 0
    sizes: list[int] = field(default_factory=list)   # bytes of each offloaded tensor, in order


@dataclass
class _Entry:
    """One offloaded span of a storage: every saved tensor that views it, saved any number of times."""

    host: torch.Tensor | None        # the bytes on the host (on the CPU: a view of the storage itself)
    nbytes: int                      # bytes copied: the span of the storage the first save reads
    start: int = 0                   # where that span begins in the storage, bytes
    saves: int = 1                   # saves not yet unpacked
    device: torch.Tensor | None = None   # brought back (or arriving) on the device
    ready: object = None             # CUDA event: the copy back has finished


@dataclass(eq=False)
class _Saved:
    """What `pack` hands autograd: the entry holding the storage, and how this tensor views it."""

    entry: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int                      # in elements of `dtype`, from the start of the entry's span
    forget: weakref.finalize | None = None   # runs if autograd drops this save unread


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: saved tensors ≥ `min_bytes` go to (pinned) host memory until backward.

    Enter it around the forward pass; backward may run inside or after it.
    Each saved tensor is unpacked once (no `retain_graph` / double backward).
    What moves is the part of its storage a tensor reads, once however many saved tensors view it.
    """

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES, prefetch: int = 1, max_in_flight: int = 4,
                 pin_memory: bool = True, device: str | torch.device | None = None):
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self.max_in_flight = max(1, max_in_flight)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.cuda = self.device.type == "cuda"
        self.pin_memory = pin_memory and self.cuda
        self.stats = OffloadStats()
        self._entries: dict[int, _Entry] = {}
        self._order: list[int] = []          # entry ids in pack (forward) order
        self._next_id = 0
        # storage address -> (a weak reference to the storage, its version then, entry id)
        self._alive: dict[int, tuple[StorageWeakRef, int, int]] = {}
        self._in_flight: list[tuple[torch.Tensor, object]] = []  # forward sources still being copied
        self._backward_started = False
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
        super().__init__(self._pack, self._unpack)

    # ------------------------------------------------------------ what moves

    def _is_parameter(self, t: torch.Tensor) -> bool:
        # A view of a parameter (e.g. the Wᵀ a linear saves) shares its storage;
        # copying it would move weights, not activations.
        return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)

    def _eligible(self, t: torch.Tensor) -> bool:
        return (type(t) is torch.Tensor and t.device.type == self.device.type and t.layout == torch.strided
                and t.numel() > 0 and t.numel() * t.element_size() >= self.min_bytes)

    # ------------------------------------------------------------ forward

    def _pack(self, t: torch.Tensor):
        self._backward_started = False   # (again) in a forward pass
        if self._is_parameter(t):
            self.stats.parameter_saves += 1
            return t
        if not self._eligible(t):
            self.stats.kept_bytes += t.numel() * t.element_size()
            return t
        storage = t.untyped_storage()
        size = t.element_size()
        start = t.storage_offset() * size       # the bytes t reads: [start, end)
        end = start + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * size
        known = self._alive.get(storage.data_ptr())
        if known is not None:
            ref, version, entry_id = known
            entry = self._entries.get(entry_id)
            # The same storage (not merely the same address: a storage can move, by
            # resize_ or set_), not written since (views share one version counter),
            # and t within the span copied, at a whole number of t's elements from it.
            if (entry is not None and not ref.expired() and ref == StorageWeakRef(storage)
                    and version == t._version and entry.start <= start and end <= entry.start + entry.nbytes
                    and (start - entry.start) % size == 0 and entry.nbytes % size == 0):
                # q, k and v projections read one input, each through its own view: one copy.
                entry.saves += 1
                self.stats.shared_saves += 1
                return self._saved(entry_id, t, (start - entry.start) // size)
        nbytes = end - start
        host = self._to_host(t, start, nbytes)
        entry_id = self._next_id
        self._next_id += 1
        self._entries[entry_id] = _Entry(host=host, nbytes=nbytes, start=start)
        self._order.append(entry_id)
        self._alive[storage.data_ptr()] = (StorageWeakRef(storage), t._version, entry_id)
        self.stats.offloaded_bytes += nbytes
        self.stats.offloaded_tensors += 1
        self.stats.sizes.append(nbytes)
        self.stats.host_bytes += nbytes
        self.stats.peak_host_bytes = max(self.stats.peak_host_bytes, self.stats.host_bytes)
        return self._saved(entry_id, t, 0)

    def _saved(self, entry_id: int, t: torch.Tensor, offset: int) -> _Saved:
        saved = _Saved(entry_id, t.dtype, tuple(t.shape), t.stride(), offset)
        # A forward whose graph is freed without backward never unpacks its saves: when
        # autograd drops one, its entry loses a save (and goes with its last).
        saved.forget = weakref.finalize(saved, self._forget, entry_id)
        return saved

    def _forget(self, entry_id: int) -> None:
        if entry_id in self._entries:
            self._drop_save(entry_id)

    def _drop_save(self, entry_id: int) -> None:
        """One save of the entry is done with (read, or dropped unread); the last takes the entry."""
        entry = self._entries[entry_id]
        entry.saves -= 1
        if entry.saves == 0:
            del self._entries[entry_id]
            self._order.remove(entry_id)
            if entry.device is None:   # never brought back: its host copy goes now
                self.stats.host_bytes -= entry.nbytes

    def _to_host(self, t: torch.Tensor, start: int, nbytes: int) -> torch.Tensor:
        """The `nbytes` of t's storage from byte `start` on the host (on the CPU: a view of them)."""
        whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        source = whole[start:start + nbytes]
        if not self.cuda:
            return source  # host and device are the same memory: nothing to copy
        compute = torch.cuda.current_stream(self.device)
        self._release_finished(compute)
        host = torch.empty_like(source, device="cpu", pin_memory=self.pin_memory)
        # WHY: t is written by kernels queued on the compute stream; the copy
        # must not read it before they finish.
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            host.copy_(source, non_blocking=True)
            done = self.copy_stream.record_event()
        # WHY: t's memory belongs to the compute stream's pool. Once the forward
        # drops t the allocator may hand that memory to the next compute kernel
        # while the copy still reads it, so the storage is kept (through `source`,
        # which t's own later set_ or resize_ cannot move) until the copy is done.
        self._in_flight.append((source, done))
        return host

    def _release_finished(self, compute, everything: bool = False) -> None:
        while self._in_flight:
            _, done = self._in_flight[0]
            if not everything and done.query():
                self._in_flight.pop(0)       # finished: the source may be freed and reused at once
            elif everything or len(self._in_flight) > self.max_in_flight:
                # WHY: after this wait, any compute kernel that reuses the source's
                # memory runs after the copy has read it.
                compute.wait_event(done)
                self._in_flight.pop(0)
            else:
                break

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.cuda and self._in_flight:
            # WHY: the copies still running hold their sources on the device through the
            # loss; after this wait (of the compute stream, not the host) they may go.
            self._release_finished(torch.cuda.current_stream(self.device), everything=True)

    # ------------------------------------------------------------ backward

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if not self._backward_started:
            self._backward_started = True
            self._alive.clear()   # the forward's saves are done
            if self.cuda:
                self._release_finished(torch.cuda.current_stream(self.device), everything=True)
        entry = self._entries.get(packed.entry)
        if entry is None:
            raise RuntimeError("offloaded activation unpacked twice: OffloadActivations does not "
                               "support retain_graph=True or double backward")
        packed.forget.detach()   # read: _forget must not count it again when autograd drops it
        self._bring_back(entry)
        position = self._order.index(packed.entry)
        started = 0
        for earlier in reversed(self._order[:position]):   # next in backward order
            if started >= self.prefetch:
                break
            if self._entries[earlier].device is None:
                self._bring_back(self._entries[earlier])
                started += 1
        if self.cuda:
            # WHY: the compute stream is about to read the tensor; its copy ran on
            # the side stream and must have landed first.
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
        span = entry.device.view(packed.dtype)   # as_strided's offset counts from its storage's start
        tensor = torch.as_strided(span, packed.shape, packed.stride, span.storage_offset() + packed.offset)
        self._drop_save(packed.entry)
        return tensor

    def _bring_back(self, entry: _Entry) -> None:
        if entry.device is not None:
            return
        self.stats.returned_bytes += entry.nbytes
        self.stats.host_bytes -= entry.nbytes
        if not self.cuda:
            entry.device, entry.host = entry.host, None
            return
        compute = torch.cuda.current_stream(self.device)
        # Allocated on the compute stream, so the tensor is freed and reused in
        # compute-stream order after its last use; no record_stream needed.
        device = torch.empty_like(entry.host, device=self.device)
        # WHY: that memory may have just been freed by a compute kernel still
        # queued; the copy must not overwrite it before that kernel has run.
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            device.copy_(entry.host, non_blocking=True)
            entry.ready = self.copy_stream.record_event()
        # Dropping the pinned host copy now is safe: the non-blocking copy records
        # an event with PyTorch's pinned-memory allocator, which does not reuse the
        # block before the copy has finished.
        entry.device, entry.host = device, None


def activation_offloading(enabled: bool, **options) -> contextlib.AbstractContextManager:
    """`OffloadActivations(**options)` when enabled, else a context that does nothing."""
    return OffloadActivations(**options) if enabled else contextlib.nullcontext()
