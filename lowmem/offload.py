"""Activation offloading: tensors saved for backward wait in pinned CPU memory.

Under `with OffloadActivations():` every tensor autograd saves for backward
passes through `pack`; one of at least `min_bytes` bytes that is not a
parameter (nor a view of one) has its storage copied to pinned host memory,
and its device memory is released. A storage is copied once however many
saved tensors view it (q, k and v each save their own view of one input).
In backward, `unpack` brings the storage back and rebuilds the same view of
it; while one is brought back, the next `prefetch` storages in backward order
(the earlier layers' inputs) are already being copied on the side stream, so
the copy of layer i−1's input overlaps layer i's backward.

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

Correctness on CUDA rests on four orderings, each marked WHY below. The design
follows torchtune's `training/_activation_offloading.py` (streams, keeping the
source alive until its copy ends), with prefetch and de-duplication added.
"""

from __future__ import annotations

import contextlib
import functools
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
    """One offloaded storage: every saved tensor that views it, saved any number of times."""

    host: torch.Tensor | None        # the storage's bytes on the host (on the CPU: the storage itself)
    nbytes: int
    saves: int = 1                   # saves not yet unpacked
    device: torch.Tensor | None = None   # brought back (or arriving) on the device
    ready: object = None             # CUDA event: the copy back has finished


@dataclass(frozen=True)
class _Saved:
    """What `pack` hands autograd: the entry holding the storage, and how this tensor views it."""

    entry: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int                      # in elements of `dtype`, as Tensor.storage_offset()


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: saved tensors ≥ `min_bytes` go to (pinned) host memory until backward.

    Enter it around the forward pass; backward may run inside or after it.
    Each saved tensor is unpacked once (no `retain_graph` / double backward).
    What moves is the tensor's storage, once however many saved tensors view it.
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
                and t.numel() * t.element_size() >= self.min_bytes)

    # ------------------------------------------------------------ forward

    def _pack(self, t: torch.Tensor):
        self._backward_started = False   # (again) in a forward pass
        if self._is_parameter(t):
            self.stats.parameter_saves += 1
            return t
        if not self._eligible(t):
            self.stats.kept_bytes += t.numel() * t.element_size()
            return t
        saved = functools.partial(_Saved, dtype=t.dtype, shape=tuple(t.shape), stride=t.stride(),
                                  offset=t.storage_offset())
        storage = t.untyped_storage()
        key = storage.data_ptr()
        known = self._alive.get(key)
        # While the recorded storage lives its address is not reused; an in-place
        # write since then bumps the version its views share.
        if (known is not None and not known[0].expired() and known[1] == t._version
                and known[2] in self._entries):
            # The same storage saved again (q, k and v projections read one input, each
            # through its own view): one copy.
            self._entries[known[2]].saves += 1
            self.stats.shared_saves += 1
            return saved(entry=known[2])
        nbytes = storage.nbytes()
        host = self._to_host(t)
        entry_id = self._next_id
        self._next_id += 1
        self._entries[entry_id] = _Entry(host=host, nbytes=nbytes)
        self._order.append(entry_id)
        self._alive[key] = (StorageWeakRef(storage), t._version, entry_id)
        self.stats.offloaded_bytes += nbytes
        self.stats.offloaded_tensors += 1
        self.stats.sizes.append(nbytes)
        self.stats.host_bytes += nbytes
        self.stats.peak_host_bytes = max(self.stats.peak_host_bytes, self.stats.host_bytes)
        return saved(entry=entry_id)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """The bytes of t's whole storage on the host (on the CPU: the storage itself)."""
        source = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
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
        # while the copy still reads it, so t is kept until the copy is done.
        self._in_flight.append((t, done))
        return host

    def _release_finished(self, compute, everything: bool = False) -> None:
        while self._in_flight:
            t, done = self._in_flight[0]
            if not everything and done.query():
                self._in_flight.pop(0)       # finished: t may be freed and reused at once
            elif everything or len(self._in_flight) > self.max_in_flight:
                # WHY: after this wait, any compute kernel that reuses t's memory
                # runs after the copy has read it.
                compute.wait_event(done)
                self._in_flight.pop(0)
            else:
                break

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
        tensor = torch.as_strided(entry.device.view(packed.dtype), packed.shape, packed.stride, packed.offset)
        entry.saves -= 1
        if entry.saves == 0:
            del self._entries[packed.entry]
            self._order.pop(position)
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
