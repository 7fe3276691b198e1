"""MicroBatcher on its own, with plain callables instead of a model."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.batching import BatcherStopped, BatchObserver, DeadlineExceeded, MicroBatcher, QueueFull

WAIT = 10  # seconds; generous upper bounds so nothing hangs


class Recorder(BatchObserver):
    """Remembers batch sizes and queue waits."""

    def __init__(self):
        self.sizes, self.waits = [], []

    def dequeued(self, waited_s):
        self.waits.append(waited_s)

    def batch_done(self, size, forward_s):
        self.sizes.append(size)


class Gate:
    """A predict callable that blocks until opened, so tests control when batches run."""

    def __init__(self, fn=lambda batch: batch * 2):
        self.fn = fn
        self.opened = threading.Event()
        self.entered = threading.Event()

    def __call__(self, batch):
        self.entered.set()
        assert self.opened.wait(WAIT)
        return self.fn(batch)


@pytest.fixture
def batchers():
    """Make batchers that are stopped (and their gates opened) at teardown."""
    made = []

    def make(predict, **kwargs):
        made.append(MicroBatcher(predict, **kwargs).start())
        return made[-1]

    yield make
    for batcher in made:
        if isinstance(batcher.predict, Gate):
            batcher.predict.opened.set()
        batcher.stop()


def test_results_pair_with_their_inputs_in_order(batchers):
    batcher = batchers(lambda batch: batch.sum(dim=1), max_batch_size=4, max_wait_s=0.01)
    futures = [batcher.submit(torch.full((3,), float(i))) for i in range(10)]
    assert [f.result(WAIT).item() for f in futures] == [3.0 * i for i in range(10)]


def test_concurrent_submits_form_batches(batchers):
    recorder, gate = Recorder(), Gate()
    batcher = batchers(gate, max_batch_size=8, max_wait_s=0.05, observer=recorder)
    first = batcher.submit(torch.zeros(2))
    assert gate.entered.wait(WAIT)  # the first item is in a forward pass; the rest queue up behind it
    with ThreadPoolExecutor(8) as pool:
        futures = list(pool.map(lambda i: batcher.submit(torch.full((2,), float(i))), range(8)))
    gate.opened.set()
    assert [f.result(WAIT)[0].item() for f in futures] == [2.0 * i for i in range(8)]
    assert first.result(WAIT).tolist() == [0.0, 0.0]
    assert recorder.sizes == [1, 8]
    assert len(recorder.waits) == 9


def test_batch_never_exceeds_max_size(batchers):
    recorder, gate = Recorder(), Gate()
    batcher = batchers(gate, max_batch_size=3, max_wait_s=0.0, observer=recorder)
    batcher.submit(torch.zeros(1))
    assert gate.entered.wait(WAIT)
    futures = [batcher.submit(torch.zeros(1)) for _ in range(7)]
    gate.opened.set()
    for future in futures:
        future.result(WAIT)
    assert max(recorder.sizes) == 3 and sum(recorder.sizes) == 8


def test_full_queue_refuses(batchers):
    gate = Gate()
    batcher = batchers(gate, max_batch_size=1, max_wait_s=0.0, max_queue=2)
    batcher.submit(torch.zeros(1))
    assert gate.entered.wait(WAIT)
    batcher.submit(torch.zeros(1))
    batcher.submit(torch.zeros(1))
    assert batcher.depth == 2
    with pytest.raises(QueueFull):
        batcher.submit(torch.zeros(1))


def test_expired_items_are_not_computed(batchers):
    recorder, gate = Recorder(), Gate(lambda batch: batch)
    batcher = batchers(gate, max_batch_size=4, max_wait_s=0.0, observer=recorder)
    batcher.submit(torch.zeros(1))
    assert gate.entered.wait(WAIT)
    expired = batcher.submit(torch.zeros(1), timeout_s=0.0)
    alive = batcher.submit(torch.ones(1), timeout_s=WAIT)
    gate.opened.set()
    with pytest.raises(DeadlineExceeded):
        expired.result(WAIT)
    assert alive.result(WAIT).item() == 1.0
    assert recorder.sizes == [1, 1]  # the expired item never reached a forward pass


def test_cancelled_items_are_skipped(batchers):
    recorder, gate = Recorder(), Gate(lambda batch: batch)
    batcher = batchers(gate, max_batch_size=4, max_wait_s=0.0, observer=recorder)
    batcher.submit(torch.zeros(1))
    assert gate.entered.wait(WAIT)
    assert batcher.submit(torch.zeros(1)).cancel()
    kept = batcher.submit(torch.ones(1))
    gate.opened.set()
    assert kept.result(WAIT).item() == 1.0
    assert recorder.sizes == [1, 1]


def test_exception_fails_only_its_own_batch(batchers):
    def predict(batch):
        if (batch < 0).any():
            raise RuntimeError("bad batch")
        return batch

    batcher = batchers(predict, max_batch_size=1, max_wait_s=0.0)
    bad, good = batcher.submit(-torch.ones(1)), batcher.submit(torch.ones(1))
    with pytest.raises(RuntimeError, match="bad batch"):
        bad.result(WAIT)
    assert good.result(WAIT).item() == 1.0
    assert batcher.alive


def test_wrong_row_count_fails_the_batch(batchers):
    batcher = batchers(lambda batch: batch[:0], max_batch_size=1, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="0 rows"):
        batcher.submit(torch.ones(1)).result(WAIT)


def test_dead_thread_is_reported_and_nothing_hangs(batchers):
    def predict(batch):
        raise SystemExit("simulated fatal error")

    batcher = batchers(predict, max_batch_size=1, max_wait_s=0.0)
    future = batcher.submit(torch.ones(1))
    with pytest.raises(BatcherStopped, match="died"):
        future.result(WAIT)
    batcher._thread.join(WAIT)
    assert not batcher.alive
    with pytest.raises(BatcherStopped):
        batcher.submit(torch.ones(1))


def test_stop_finishes_queued_work_then_refuses(batchers):
    gate = Gate()
    batcher = batchers(gate, max_batch_size=1, max_wait_s=0.0)
    futures = [batcher.submit(torch.ones(1)) for _ in range(3)]
    assert gate.entered.wait(WAIT)
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    gate.opened.set()
    stopper.join(WAIT)
    assert [f.result(WAIT).item() for f in futures] == [2.0, 2.0, 2.0]
    assert not batcher.alive
    with pytest.raises(BatcherStopped):
        batcher.submit(torch.ones(1))


def test_waits_for_announced_items_until_the_batch_is_full(batchers):
    recorder = Recorder()
    batcher = batchers(lambda batch: batch, max_batch_size=2, max_wait_s=WAIT, observer=recorder)
    with batcher.preparing(2):
        first = batcher.submit(torch.zeros(1))  # another item is announced: the batch waits for it
        second = batcher.submit(torch.ones(1))  # the batch is full: it runs without waiting max_wait_s
    assert first.result(WAIT).item() == 0.0 and second.result(WAIT).item() == 1.0
    assert recorder.sizes == [2]


def test_a_lone_item_does_not_wait(batchers):
    """Nobody is preparing another item: waiting max_wait_s (here far beyond the test's patience) would be waste."""
    recorder = Recorder()
    batcher = batchers(lambda batch: batch, max_batch_size=4, max_wait_s=10 * WAIT, observer=recorder)
    assert batcher.submit(torch.ones(1)).result(WAIT).item() == 1.0
    with pytest.raises(ValueError), batcher.preparing(2):
        alone = batcher.submit(torch.zeros(1))
        raise ValueError("the second image could not be decoded")  # withdrawn: the batch stops waiting for it
    assert alone.result(WAIT).item() == 0.0
    assert recorder.sizes == [1, 1]


def test_collate_builds_the_batch_in_the_batcher_thread(batchers):
    threads = []

    def collate(items):
        threads.append(threading.current_thread().name)
        return torch.stack(items).float() / 2

    batcher = batchers(lambda batch: batch, max_batch_size=2, max_wait_s=WAIT, collate=collate, name="the-batcher")
    with batcher.preparing(2):
        futures = [batcher.submit(torch.tensor([value], dtype=torch.uint8)) for value in (2, 4)]
    assert [f.result(WAIT).item() for f in futures] == [1.0, 2.0]
    assert threads == ["the-batcher"]


def test_setup_runs_in_the_batcher_thread_before_any_batch():
    # The service sizes the batcher's OpenMP threads and warms up there: the thread that runs every forward pass.
    seen = []
    batcher = MicroBatcher(lambda batch: batch, name="the-batcher")
    batcher.start(setup=lambda: seen.append((threading.current_thread().name, torch.get_num_threads())))
    try:
        assert seen == [("the-batcher", torch.get_num_threads())]
        assert batcher.submit(torch.ones(1)).result(WAIT).item() == 1.0
    finally:
        batcher.stop()


def test_a_failing_setup_raises_from_start_and_nothing_is_served():
    def setup():
        raise RuntimeError("warm-up failed")

    batcher = MicroBatcher(lambda batch: batch)
    with pytest.raises(RuntimeError, match="warm-up failed"):
        batcher.start(setup=setup)
    assert not batcher.alive
    with pytest.raises(BatcherStopped):
        batcher.submit(torch.ones(1))


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_queue": 0}, {"max_wait_s": -1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        MicroBatcher(lambda batch: batch, **kwargs)
