"""Activations that wait for the backward in host memory instead of on the device.

With gradient checkpointing, what the forward leaves for the backward is mostly each decoder layer's input
(tokens x hidden in the compute dtype: 32 MiB a layer at 4k tokens for Mixtral, 1 GiB for its 32 layers).
Inside `OffloadedActivations`, every tensor of at least `min_bytes` that autograd saves outside a
checkpointed region goes to host memory: a checkpoint saves its inputs that way (the recomputation inside
it keeps its own tensors on the device, for the short time it needs them). What stays is what a copy would
not free: parameters (their module holds them), other leaves that require grad (autograd holds them to
accumulate their gradient: the embedding output peft's `enable_input_require_grads` makes), and views or
expansions of a larger storage.
A tensor saved twice (an input that two ops keep) is copied once, and comes back once.

On CUDA the copy goes to pinned memory on a side stream, so it overlaps the next layer's compute, and the
device memory is handed back once the copy is done; the backward copies it back on the compute stream when
the recomputation asks for it (no prefetch: each layer waits for its own input, ~1 ms at 4k tokens over
PCIe 4). A saved tensor must not be written in place after the forward saved it: autograd's version check
cannot see the host copy. On CPU (tests, `finetune.memory` accounting) the copy goes to a NumPy buffer,
outside torch's allocator, so an accounting of torch's tensors sees what a GPU would shed.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

MIN_BYTES = 4 * 2**20  # a layer input at 4k tokens is 32 MiB; rotary tables and router outputs stay


@dataclass(eq=False)
class _Offloaded:
    device: torch.device
    dtype: torch.dtype
    shape: torch.Size
    host: torch.Tensor | np.ndarray
    copied: torch.cuda.Event | None  # CUDA: recorded on the side stream after the device-to-host copy
    restored: weakref.ref | None = field(default=None)  # the device copy while the backward holds it


class OffloadedActivations(saved_tensors_hooks):
    """`with OffloadedActivations(): loss = model(...)`; the backward may run outside the block."""

    def __init__(self, min_bytes: int = MIN_BYTES, device_types: tuple[str, ...] = ("cuda",)) -> None:
        self.min_bytes = min_bytes
        self.device_types = device_types
        self.offloaded_bytes = 0  # what went to the host in this block's forward
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        # the tensors packed so far and their host copies, to copy a tensor saved twice only once
        self._packed: dict[int, tuple[weakref.ref, _Offloaded]] = {}
        super().__init__(self._pack, self._unpack)

    def _offloadable(self, t: torch.Tensor) -> bool:
        nbytes = t.numel() * t.element_size()
        return (t.device.type in self.device_types and nbytes >= self.min_bytes and t.layout == torch.strided
                and not isinstance(t, nn.Parameter) and not (t.is_leaf and t.requires_grad) and t.is_contiguous()
                and t.untyped_storage().nbytes() == nbytes)  # the whole storage: freeing it frees the memory

    def _pack(self, t: torch.Tensor):
        if not self._offloadable(t):
            return t
        key = t.untyped_storage().data_ptr()
        seen = self._packed.get(key)
        if seen is not None and seen[0]() is not None and (seen[1].dtype, seen[1].shape) == (t.dtype, t.shape):
            return seen[1]  # the same storage, whole, contiguous: the same tensor
        self.offloaded_bytes += t.numel() * t.element_size()
        if t.device.type == "cuda":
            packed = self._to_pinned(t)
        else:
            # through DLPack, not `.numpy()`: `finetune.syncs` reports that as a host read, and this copy stands for
            # the GPU's non-blocking one
            flat = t.detach().view(-1).view(torch.uint8)
            packed = _Offloaded(t.device, t.dtype, t.shape, np.from_dlpack(flat).copy(), None)
        self._packed[key] = (weakref.ref(t.untyped_storage()), packed)
        return packed

    def _to_pinned(self, t: torch.Tensor) -> _Offloaded:
        stream = self._side_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written before it is read
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        t.record_stream(stream)  # the allocator hands t's memory out again only after the copy
        return _Offloaded(t.device, t.dtype, t.shape, host, copied)

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        restored = packed.restored() if packed.restored is not None else None
        if restored is None:
            if packed.copied is None:
                # a copy made by an op, so that an accounting of torch's tensors sees it come back
                restored = torch.from_numpy(packed.host).view(packed.dtype).view(packed.shape).clone()
            else:
                torch.cuda.current_stream(packed.device).wait_event(packed.copied)
                restored = packed.host.to(packed.device, non_blocking=True)
            packed.restored = weakref.ref(restored)
        return restored

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]


class DecoderOffload:
    """Hooks that run every forward of a model's decoder inside a fresh `OffloadedActivations` (see
    `offload_during_forward`); `offloaded_bytes` is what the latest forward sent to host memory."""

    def __init__(self, decoder: nn.Module, device_type: str, log) -> None:
        self.device_type = device_type
        self.offloaded_bytes = 0
        self._log = log
        self._active: list[OffloadedActivations] = []
        self._handles = [decoder.register_forward_pre_hook(self._enter, with_kwargs=True),
                         decoder.register_forward_hook(self._leave, with_kwargs=True, always_call=True)]

    def _enter(self, decoder, args, kwargs) -> None:
        ids, embeds = kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")
        tokens = ids.numel() if ids is not None else embeds.shape[:-1].numel()
        # the config's width, not the weight's: under ZeRO-3 the weight is an empty placeholder until gathered
        layer_input = tokens * decoder.config.hidden_size * decoder.get_input_embeddings().weight.dtype.itemsize
        self._active.append(OffloadedActivations(min_bytes=layer_input, device_types=(self.device_type,)))
        self._active[-1].__enter__()

    def _leave(self, decoder, args, kwargs, output) -> None:
        if not self._active:  # `_enter` failed: let its error be the one seen
            return
        offload = self._active.pop()
        offload.__exit__(None, None, None)
        if offload.offloaded_bytes and self._log is not None:
            self._log(f"[memory] the first training forward kept {offload.offloaded_bytes / 2**20:.2f} MiB of saved "
                      f"activations (checkpointed layer inputs and the like) in host memory")
            self._log = None  # once a run
        self.offloaded_bytes = offload.offloaded_bytes

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def offload_during_forward(decoder: nn.Module, device_type: str, log=print) -> DecoderOffload:
    """Every forward of `decoder` (a model's decoder, called with `input_ids` or `inputs_embeds`) runs inside a
    fresh `OffloadedActivations` for `device_type` that takes tensors of a layer input's size and up, and the
    first forward that saved anything says through `log` how much went to host memory. On a GPU that sheds the
    checkpointed layer inputs; on CPU the copies go to NumPy buffers (no gain there, but the same path, which is
    how the tests check it)."""
    return DecoderOffload(decoder, device_type, log)
