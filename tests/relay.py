"""A TCP relay on loopback that a test can cut as a network cut does: nothing more gets
through either way, and neither end hears of it (no FIN, no RST), until the relay closes."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator


class Relay:
    """Relays every connection made to `port` to 127.0.0.1:`target_port`, until `cut`."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # so that close() ends the accepting thread at once
        self.port: int = self._listener.getsockname()[1]
        self._cut = threading.Event()
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
        peer = {a: b, b: a}
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
                            peer[sock].sendall(data)
                            continue
                    except OSError:
                        pass
                    a.close()  # one end closed: close the other, as a proxy does
                    b.close()
                    return


@contextlib.contextmanager
def relay_to(port: int) -> Iterator[Relay]:
    relay = Relay(port)
    try:
        yield relay
    finally:
        relay.close()
