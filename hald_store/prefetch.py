"""Run an iterator ahead of its consumer in a background thread."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(it: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield the items of ``it``, produced up to ``depth`` items ahead in a daemon thread.

    Errors raised by ``it`` are re-raised in the consumer. When the consumer stops early
    (``break``, an exception, garbage collection) the producer stops after its current item.
    """
    q: queue.Queue = queue.Queue(max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # forwarded to the consumer
            put(e)

    thread = threading.Thread(target=worker, name="hald-store-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)
