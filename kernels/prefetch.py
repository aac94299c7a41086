"""Host→device prefetch of selected event tokens, overlapped with compute.

Selected tokens are packed on the host into a pinned staging buffer (one
``index_select`` per layer), then copied to the device on a side stream; the compute
stream waits on the copy's event only when the layer that needs it runs. Two buffers
alternate, so the copy for layer ``l + 1`` runs while layer ``l`` attends. On CPU the
same calls run inline (the "device" buffer is the staging buffer).
"""

from __future__ import annotations

import torch


class Prefetcher:
    def __init__(self, device: torch.device | str, max_tokens: int, num_kv_heads: int, head_size: int,
                 dtype: torch.dtype, buffers: int = 2):
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        shape = (2, max_tokens, num_kv_heads, head_size)  # keys, values
        self.staging = [torch.empty(shape, dtype=dtype, pin_memory=self.on_cuda) for _ in range(buffers)]
        self.landed = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(buffers)] \
            if self.on_cuda else self.staging
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.copied: list[torch.cuda.Event | None] = [None] * buffers  # copy into landed[b] done
        self.consumed: list[torch.cuda.Event | None] = [None] * buffers  # readers of landed[b] done
        self.count = [0] * buffers
        self.max_tokens = max_tokens

    def submit(self, buffer: int, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        """Start moving ``keys[index]``, ``values[index]`` (host ``[tokens, kvH, D]``) into ``buffer``."""
        n = index.numel()
        if n > self.max_tokens:
            raise ValueError(f"prefetch of {n} tokens exceeds the staging size {self.max_tokens}")
        staging = self.staging[buffer]
        if self.copied[buffer] is not None:
            # the previous copy out of this pinned buffer must be done before we overwrite it
            self.copied[buffer].synchronize()
        torch.index_select(keys, 0, index, out=staging[0, :n])
        torch.index_select(values, 0, index, out=staging[1, :n])
        self.count[buffer] = n
        if not self.on_cuda:
            return
        with torch.cuda.stream(self.stream):
            if self.consumed[buffer] is not None:
                self.stream.wait_event(self.consumed[buffer])
            self.landed[buffer][:, :n].copy_(staging[:, :n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copied[buffer] = event

    def wait(self, buffer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer's keys and values on the device, once the current stream may read them."""
        if self.on_cuda and self.copied[buffer] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[buffer])
        n = self.count[buffer]
        return self.landed[buffer][0, :n], self.landed[buffer][1, :n]

    def release(self, buffer: int) -> None:
        """The current stream's readers of ``buffer`` are queued; a later copy waits for them."""
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.consumed[buffer] = event
