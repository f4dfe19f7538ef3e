"""A TCP relay on loopback that a test can cut as a network cut does: nothing more gets
through either way, and neither end hears of it (no FIN, no RST), until the relay closes.
It can also lose one answer: the connection dropped as the server's answer to a call starts
back, the call having run (a network that fails at the wrong moment); and it can be slow,
carrying the server's bytes at a few KB a second (a slow, distant link)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterator


class Relay:
    """Relays every connection made to `port` to 127.0.0.1:`target_port`, until `cut`."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # so that close() ends the accepting thread at once
        self.port: int = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._lose_answer = threading.Event()
        self._refuse_after_loss = False
        self._bytes_per_s: float | None = None
        #: Answers lost (lose_next_answer), each with the connection that carried it.
        self.answers_lost = 0
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """From now on nothing is relayed; the connections stay open at both ends."""
        self._cut.set()

    def lose_next_answer(self, then_refuse: bool = False) -> None:
        """The next answer the server starts to send (an HTTP/2 HEADERS or DATA frame of a
        call: sent once its handler has run) is not relayed: its connection is closed at
        both ends instead, so that the caller sees the call fail UNAVAILABLE with the
        server's work done. Later connections are relayed as before; `then_refuse`: refused,
        the relay's port closed before the caller hears of the loss, as a server's is once
        it has died with a call in progress."""
        self._refuse_after_loss = then_refuse
        self._lose_answer.set()

    def slow(self, bytes_per_s: float) -> None:
        """From now on the server's bytes reach the caller at `bytes_per_s` at most, as over
        a slow link (the caller's reach the server as before)."""
        self._bytes_per_s = bytes_per_s

    def close(self) -> None:
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                accepted, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            accepted.settimeout(None)
            onward = socket.create_connection(("127.0.0.1", self._target_port))
            with self._lock:
                self._sockets += [accepted, onward]
            thread = threading.Thread(target=self._pump, args=(accepted, onward), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """Relays between `a` (the caller) and `b` (the server)."""
        peer = {a: b, b: a}
        frames = _Frames()  # the server's, so that an answer is known where it starts
        with selectors.DefaultSelector() as selector:
            for sock in (a, b):
                selector.register(sock, selectors.EVENT_READ)
            while not (self._cut.is_set() or self._closed.is_set()):
                for key, _ in selector.select(timeout=0.05):
                    if self._cut.is_set():
                        return  # what arrived stays unread, as in a cable that was pulled
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(1 << 16)
                        if data:
                            start = frames.answer_in(data) if sock is b else None
                            if start is not None and self._lose_answer.is_set():
                                self._lose_answer.clear()
                                a.sendall(data[:start])  # what came before the answer
                                self.answers_lost += 1
                                if self._refuse_after_loss:
                                    self._listener.close()  # the accepting thread ends
                            elif sock is b and self._bytes_per_s:
                                self._send_slowly(a, data, self._bytes_per_s)
                                continue
                            else:
                                peer[sock].sendall(data)
                                continue
                    except OSError:
                        pass
                    a.close()  # one end closed: close the other, as a proxy does
                    b.close()
                    return

    def _send_slowly(self, to: socket.socket, data: bytes, bytes_per_s: float) -> None:
        """`data` to `to`, a piece each 10 ms at `bytes_per_s`; what is left is dropped once
        the relay is cut or closed."""
        piece = max(1, int(bytes_per_s / 100))
        for at in range(0, len(data), piece):
            if self._cut.is_set() or self._closed.is_set():
                return
            to.sendall(data[at : at + piece])
            time.sleep(piece / bytes_per_s)


class _Frames:
    """Follows the HTTP/2 frames of a server's bytes (a server sends no preface: its bytes
    are frames from the first), read in pieces as they arrive."""

    _DATA, _HEADERS = 0x0, 0x1

    def __init__(self) -> None:
        self._header = b""  # the part of a frame's 9-byte header read so far
        self._payload_left = 0

    def answer_in(self, data: bytes) -> int | None:
        """Where in `data` the first frame of an answer (DATA or HEADERS on a stream, not
        the connection's own frames) begins; None if none begins in it. A header split
        between two pieces counts as beginning at the second's start."""
        first = None
        at = 0
        while at < len(data):
            if self._payload_left:
                skipped = min(self._payload_left, len(data) - at)
                self._payload_left -= skipped
                at += skipped
                continue
            begins = at
            taken = data[at : at + 9 - len(self._header)]
            self._header += taken
            at += len(taken)
            if len(self._header) < 9:
                break
            header, self._header = self._header, b""
            self._payload_left = int.from_bytes(header[:3], "big")
            stream = int.from_bytes(header[5:9], "big") & 0x7FFF_FFFF
            if first is None and stream and header[3] in (self._DATA, self._HEADERS):
                first = begins
        return first


@contextlib.contextmanager
def relay_to(port: int) -> Iterator[Relay]:
    relay = Relay(port)
    try:
        yield relay
    finally:
        relay.close()
