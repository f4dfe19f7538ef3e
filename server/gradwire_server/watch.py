"""Subscriptions to a trainer's changes: told of each applied mutation, never in its way.

The trainer announces each mutation while it holds its lock; announcing only counts and wakes
(a few microseconds), so a subscriber that reads slowly never slows training. When it is ready,
the subscriber reads the state as it is then and learns how many updates it missed meanwhile.
"""

from __future__ import annotations

import threading


class Subscription:
    """One subscriber's count of updates due: after every mutation, or every Nth Step."""

    def __init__(self, every_steps: int = 0, steps: int = 0) -> None:
        self.every_steps = every_steps
        self._cond = threading.Condition(threading.Lock())
        self._due = 0
        self._steps = steps  # the step counter at the last announcement
        self._closed = False
        #: Set when no more updates will be read: closed, or the watcher's call ended. An
        #: Event of its own, so that `pause` sleeps through the updates `announce` signals.
        self._over = threading.Event()

    def announce(self, steps: int, reset: bool = False) -> None:
        """A mutation was applied; `steps` is the trainer's step counter after it. `reset`:
        the mutation was a Reset, due to every subscriber (the counter alone does not show
        one made before any Step: 0 before and after)."""
        with self._cond:
            if self.every_steps:
                before, self._steps = self._steps, steps
                reset = reset or steps < before
                if not reset and steps // self.every_steps == before // self.every_steps:
                    return
            self._due += 1
            self._cond.notify()

    def close(self) -> None:
        """No more updates: the model is gone (its session closed, or the server stopping)."""
        with self._cond:
            self._closed = True
            self._over.set()
            self._cond.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    def wait(self, timeout: float) -> bool:
        """Whether an update is due, waiting up to `timeout` seconds for one (none once the
        call has ended)."""
        with self._cond:
            if not (self._due or self._over.is_set()):
                self._cond.wait(timeout)
            return self._due > 0

    def pause(self, seconds: float) -> None:
        """Waits `seconds`, or less: until closed or the call ends. Updates falling due meanwhile
        do not wake it (a watcher's minimum interval: they are counted, not sent)."""
        self._over.wait(seconds)

    def end(self) -> None:
        """The watcher's call has ended (its reader cancelled it): a `wait` or `pause` under
        way returns now, and later ones do not wait. Kept as a flag, not a bare notify, so
        that an end that comes between the watcher's check and its wait is not lost."""
        with self._cond:
            self._over.set()
            self._cond.notify()

    def take(self) -> int:
        """The updates due, counted since the last call; called under the trainer's lock
        while reading the state, so that each counted update is one this read covers."""
        with self._cond:
            due, self._due = self._due, 0
            return due


class Subscriptions:
    """A trainer's subscribers. Announced to and closed under the trainer's lock; a
    subscriber is removed without it, under a lock of the set's own: a watch that ends (its
    server stopping, its reader gone) must not wait for a step in progress, which may take
    seconds (a review saw a stop reach a watch a whole 12 s step late)."""

    def __init__(self) -> None:
        self._all: set[Subscription] = set()
        self._lock = threading.Lock()

    def add(self, subscription: Subscription) -> None:
        with self._lock:
            self._all.add(subscription)

    def remove(self, subscription: Subscription) -> None:
        with self._lock:
            self._all.discard(subscription)

    def announce(self, steps: int, reset: bool = False) -> None:
        with self._lock:
            for subscription in self._all:
                subscription.announce(steps, reset)

    def close(self) -> None:
        with self._lock:
            for subscription in self._all:
                subscription.close()
            self._all.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._all)
