"""Dynamic micro-batching: request threads submit one input each, one thread runs batched forward passes."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


class BatcherError(RuntimeError):
    """Base class for the batcher's own refusals."""


class QueueFull(BatcherError):
    """The bounded queue is full; the caller should answer 503 with Retry-After."""


class DeadlineExceeded(BatcherError):
    """The item's deadline passed before it reached a forward pass; it was not computed."""


class BatcherStopped(BatcherError):
    """The batcher thread is not running (stopped, or died)."""


class BatchObserver:
    """Hooks for metrics; the default does nothing, so the batcher needs no metrics to run."""

    def queue_depth(self, depth: int) -> None:
        """The number of queued items changed."""

    def dequeued(self, waited_s: float) -> None:
        """One item left the queue after waiting `waited_s`."""

    def batch_done(self, size: int, forward_s: float) -> None:
        """One forward pass over `size` items took `forward_s`."""


@dataclass
class _Item:
    tensor: torch.Tensor
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Groups submitted tensors into batches for `predict`, a callable (collated batch) -> per-row outputs.

    `collate` (default torch.stack) turns the batch's items into `predict`'s input, in the batcher thread. A batch
    waits for more items (at most max_wait_s after its oldest) only while callers announced with `preparing` are
    still on their way; with nobody preparing, what is queued runs at once.
    """

    def __init__(
        self,
        predict: Callable[[torch.Tensor], torch.Tensor],
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        observer: BatchObserver | None = None,
        name: str = "micro-batcher",
        collate: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_s >= 0")
        self.predict = predict
        self.collate = collate
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.observer = observer or BatchObserver()
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._preparing = 0  # items announced by callers that are still decoding them
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._setup: Callable[[], None] | None = None
        self._set_up = threading.Event()
        self._setup_error: BaseException | None = None

    # Lifecycle

    def start(self, setup: Callable[[], None] | None = None) -> MicroBatcher:
        """Start the batcher thread, which runs `setup` (e.g. sizing its threads, the warm-up) before any batch;
        returns self once `setup` is done, or raises its error (the thread then ends)."""
        self._setup = setup
        self._thread.start()
        self._set_up.wait()
        if self._setup_error is not None:
            raise self._setup_error
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Finish what is queued, then end the thread; later submits raise BatcherStopped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while the batcher thread runs and accepts work."""
        return self._thread.is_alive() and not self._stopping

    @property
    def depth(self) -> int:
        """Items waiting for a forward pass."""
        return len(self._queue)

    # Request side

    @contextmanager
    def preparing(self, count: int = 1) -> Iterator[None]:
        """Announce `count` items that will be submitted inside this block: a batch may wait for them."""
        with self._cond:
            self._preparing += count
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= count
                self._cond.notify()

    def submit(self, tensor: torch.Tensor, timeout_s: float = 30.0) -> Future:
        """Queue one input; the future's result is its row of `predict`'s output."""
        item = _Item(tensor, deadline=time.monotonic() + timeout_s)
        with self._cond:
            if not self.alive:
                raise BatcherStopped("the batcher is not running")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} items waiting)")
            self._queue.append(item)
            depth = len(self._queue)
            self._cond.notify()
        self.observer.queue_depth(depth)
        return item.future

    # Batcher thread

    def _run_setup(self) -> bool:
        """Run `setup` in this thread; False (stopped, the error kept for start) when it raised."""
        try:
            if self._setup is not None:
                self._setup()
            return True
        except BaseException as error:  # start() raises it in the caller
            self._setup_error = error
            with self._cond:
                self._stopping = True
            return False
        finally:
            self._set_up.set()

    def _run(self) -> None:
        if not self._run_setup():
            return
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._process(batch)
        except BaseException:  # the thread ends here; /readyz reports it through `alive`
            log.critical("the batcher thread died", exc_info=True)
        finally:
            self._fail_pending()

    def _next_batch(self) -> list[_Item] | None:
        """Block until a batch is due: full, nobody preparing more, or the oldest waited max_wait_s. None = stop."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            due = self._queue[0].enqueued + self.max_wait_s
            # Wait only while items are being prepared: waiting for nobody would cost every lone request max_wait_s.
            while len(self._queue) < self.max_batch_size and self._preparing > 0 and not self._stopping:
                remaining = due - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(self.max_batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            depth = len(self._queue)
        self.observer.queue_depth(depth)
        return batch

    def _live(self, batch: list[_Item]) -> list[_Item]:
        """Drop cancelled and expired items; mark the rest running so callers can no longer cancel them."""
        now = time.monotonic()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue
            self.observer.dequeued(now - item.enqueued)
            if now > item.deadline:
                item.future.set_exception(DeadlineExceeded("the request deadline passed while queued"))
            else:
                live.append(item)
        return live

    def _process(self, batch: list[_Item]) -> None:
        live = self._live(batch)
        if not live:
            return
        try:
            start = time.perf_counter()
            outputs = self.predict(self.collate([item.tensor for item in live]))
            self.observer.batch_done(len(live), time.perf_counter() - start)
            if len(outputs) != len(live):
                raise RuntimeError(f"predict returned {len(outputs)} rows for a batch of {len(live)}")
        except Exception as error:  # one bad batch fails only its own futures
            log.exception("forward pass failed for a batch of %d", len(live))
            for item in live:
                item.future.set_exception(error)
            return
        except BaseException as error:  # the thread dies: still answer this batch's callers
            for item in live:
                item.future.set_exception(BatcherStopped(f"the batcher thread died: {error!r}"))
            raise
        for item, output in zip(live, outputs, strict=True):
            item.future.set_result(output)

    def _fail_pending(self) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
        for item in pending:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherStopped("the batcher stopped before this item ran"))
        self.observer.queue_depth(0)
