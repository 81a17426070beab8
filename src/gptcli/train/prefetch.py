"""Training batches off the critical path.

A background thread reads the next micro batches from the BatchLoader while the device computes, as
(B, T+1) token windows in pinned host memory when the device is CUDA (so the copy to the device is
asynchronous). Each micro step then makes one host-to-device copy, and the input/target shift is two views
of the copied windows. The batches are exactly the loader's: the same windows in the same order, each with
its key (objectives.TRAIN_STREAM, epoch, window index), which an objective's draw is seeded by.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch

from ..objectives import TRAIN_STREAM

if TYPE_CHECKING:
    from ..data.source import Loader


def windows_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(inputs (B, T), targets (B, T)) shifted by one → the (B, T+1) windows they were cut from."""
    return torch.cat([inputs, targets[:, -1:]], dim=1)  # (B, T+1)


def on_device(windows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One copy of (B, T+1) windows to `device`, then the shift there: (inputs (B, T), targets (B, T))."""
    windows = windows.to(device, non_blocking=windows.is_pinned())
    return windows[:, :-1], windows[:, 1:]


def window_keys(handed_out: dict) -> np.ndarray:
    """The keys an objective seeds each window's draw with: (TRAIN_STREAM, epoch, window) for one dir (B, 3);
    for a mixture, whose windows come from several sources, (TRAIN_STREAM, window's number in the mixture's
    schedule) (B, 2), a number no other window of its segment shares."""
    if "numbers" in handed_out:
        numbers = np.asarray(handed_out["numbers"], dtype=np.int64)
        return np.stack([np.full_like(numbers, TRAIN_STREAM), numbers], axis=1)  # (B, 2)
    windows = np.asarray(handed_out["windows"], dtype=np.int64)
    return np.stack([np.full_like(windows, TRAIN_STREAM), np.full_like(windows, handed_out["epoch"]), windows],
                    axis=1)  # (B, 3)


class BatchPrefetcher:
    """A BatchLoader read `depth` micro batches ahead by a daemon thread; `next_batch()` hands them out on
    the device. The loader's cursor travels with each batch, so `state_dict()` is the position after the
    last batch handed out, not the last one read ahead: a checkpoint resumes at exactly the next batch."""

    def __init__(self, loader: "Loader", device: torch.device, depth: int = 2):
        self.loader, self.device, self.depth = loader, device, depth
        self.pin = device.type == "cuda"
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.handed_out: Optional[dict] = None  # the loader's state after the last batch handed out
        self.last_keys: Optional[np.ndarray] = None  # the keys of the windows the loader handed out last
        loader.observe(self.note_keys)

    def note_keys(self, handed_out: dict) -> None:
        """The loader's observer (called on the reading thread, as next_batch chooses the windows)."""
        self.last_keys = window_keys(handed_out)

    def next_windows(self) -> tuple[torch.Tensor, np.ndarray]:
        """The next micro batch as (B, T+1) windows on the device, and their keys (B, 3)."""
        if self.thread is None:
            self.start()
        item: Union[tuple[torch.Tensor, np.ndarray, dict], BaseException] = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        windows, keys, self.handed_out = item
        return windows.to(self.device, non_blocking=windows.is_pinned()), keys

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro batch as (inputs (B, T), targets (B, T)) on the device."""
        windows, _ = self.next_windows()
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        if self.handed_out is None:  # not started: nothing is read ahead of the loader's own position
            return self.loader.state_dict()
        return self.handed_out

    def load_state_dict(self, state: dict) -> None:
        if self.thread is not None:
            raise RuntimeError("the data position cannot change once batches are read ahead")
        self.loader.load_state_dict(state)

    def start(self) -> None:
        self.handed_out = self.loader.state_dict()
        self.thread = threading.Thread(target=self.read_ahead, name="batch-prefetch", daemon=True)
        self.thread.start()

    def read_ahead(self) -> None:
        try:
            while not self.stopping.is_set():
                windows = windows_of(*self.loader.next_batch())
                self.put((windows.pin_memory() if self.pin else windows, self.last_keys, self.loader.state_dict()))
        except BaseException as error:  # handed to the training thread, which raises it
            self.put(error)

    def put(self, item) -> None:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
