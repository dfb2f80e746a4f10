"""read_ahead: the same items in the same order, errors at their place, and a worker that stops when the
consumer does."""
from __future__ import annotations

import threading

import pytest

from engine.read_ahead import read_ahead


def test_items_arrive_in_order_from_another_thread():
    threads = set()

    def numbers():
        for i in range(100):
            threads.add(threading.current_thread().name)
            yield i

    assert list(read_ahead(numbers(), depth=3)) == list(range(100))
    assert threads == {"read-ahead"}


def test_an_error_is_raised_after_the_items_before_it():
    def failing():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in read_ahead(failing()):
            got.append(item)
    assert got == [1, 2]


def test_closing_early_stops_the_worker():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    items = read_ahead(endless(), depth=2)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()
    assert not any(t.name == "read-ahead" for t in threading.enumerate())
    assert len(produced) <= 5 + 2 + 2  # what was consumed, the queue's bound, one in hand and one blocked
