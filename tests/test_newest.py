"""newest.py's hand-over between its reading thread and the reader (a watch's, through a real
server, in test_inspect.py)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator

import pytest

from gradwire.newest import Cancellable, Newest
from tests.background import eventually


class _Call:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def test_the_newest_is_taken_with_the_weight_of_those_it_replaced_then_the_error() -> None:
    def stream(hold: Callable[[Cancellable], None]) -> Iterator[int]:
        yield from (1, 2, 3)
        raise RuntimeError("the stream's end")

    newest = Newest(stream, weight=lambda message: 10 * message)
    newest._thread.join(10)
    assert newest.take() == (3, 10 + 20)  # 1 and 2 replaced
    with pytest.raises(RuntimeError, match="the stream's end"):
        newest.take()  # after every message before it
    assert newest.take() is None
    newest.close()


def test_each_message_is_taken_when_the_reader_keeps_up() -> None:
    go = [threading.Event() for _ in range(3)]

    def stream(hold: Callable[[Cancellable], None]) -> Iterator[int]:
        for i in range(3):
            go[i].wait(10)
            yield i

    newest = Newest(stream, weight=lambda message: 1)
    taken = []
    for event in go:
        event.set()
        taken.append(newest.take())
    assert taken == [(0, 0), (1, 0), (2, 0)]
    assert newest.take() is None
    newest.close()


def test_close_cancels_the_call_even_one_made_after_it() -> None:
    made, call = threading.Event(), _Call()
    closed = threading.Event()

    def stream(hold: Callable[[Cancellable], None]) -> Iterator[int]:
        closed.wait(10)  # the call is made only once the reader has closed
        hold(call)
        made.set()
        call.cancelled.wait(10)
        return iter(())

    newest = Newest(stream, weight=lambda message: 1)
    closer = threading.Thread(target=newest.close)  # waits for the reading thread
    closer.start()
    eventually(lambda: newest._closed)
    closed.set()
    closer.join(20)
    assert made.is_set() and call.cancelled.is_set()
    assert not newest._thread.is_alive()


_WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


def test_the_stream_is_opened_in_the_readers_context() -> None:
    """As if the reader made the call itself: a thread starts with an empty context."""

    def stream(hold: Callable[[Cancellable], None]) -> Iterator[str]:
        yield _WHO.get()

    token = _WHO.set("the reader")
    try:
        newest = Newest(stream, weight=lambda message: 1)
    finally:
        _WHO.reset(token)
    newest._thread.join(10)
    assert newest.take() == ("the reader", 0)
    newest.close()


def test_the_weight_dropped_is_counted_once_and_close_lets_go_of_every_message() -> None:
    go, took, more = threading.Event(), threading.Event(), threading.Event()

    def stream(hold: Callable[[Cancellable], None]) -> Iterator[int]:
        yield from (1, 2)  # 1 replaced by 2
        go.wait(10)
        yield 3
        took.wait(10)
        yield 4  # not taken before the close
        more.wait(10)
        yield 5  # read after the close

    newest = Newest(stream, weight=lambda message: 10 * message)
    eventually(lambda: newest._dropped == 10)
    assert newest.take() == (2, 10)
    go.set()
    assert newest.take() == (3, 0)  # what was dropped before 2 is not counted again
    took.set()
    eventually(lambda: newest._pending == [4])
    closer = threading.Thread(target=newest.close)  # waits for the reading thread
    closer.start()
    eventually(lambda: newest._closed)
    more.set()
    closer.join(20)
    assert newest.take() is None  # neither 4, pending at the close, nor 5, read after it
