"""Commands that run for a while: train (steps on the server, with a progress bar or a
JSON line per report) and watch (a tensor's updates as they happen), each stopped by Ctrl-C
or by its reader going away, saying where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import select
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from gradwire import rewatch
from gradwire.cli.connection import session_option
from gradwire.cli.errors import Interrupted, UsageError
from gradwire.cli.output import Output, emit, json_line, jsonable
from gradwire.cli.tensors import model_input, stats_json
from gradwire.client import Client
from gradwire.errors import (
    DeadlineExceeded,
    GradwireError,
    RemoteError,
    Unavailable,
)
from gradwire.fill import Fill
from gradwire.progress import (
    ProgressBar,
    WatchTable,
    format_loss,
)
from gradwire.selector import parse_selector


class _Stop:
    """What Ctrl-C (SIGINT) asks of a loop of steps: the first press sets it, for the loop to
    stop between two steps, the step under way finishing; a second raises KeyboardInterrupt
    at once. With `at_once` (a server-side run, whose call is cancelled as the interrupt
    unwinds it, and which stops between two of its own steps), the first raises it too. The
    loop looked only once its call came back: a server-side run went on to its last step,
    and a call to a server that had stopped answering waited for its deadline, a second
    Ctrl-C doing no more than the first (found by a review of watching training)."""

    def __init__(self, err: TextIO) -> None:
        self.event = threading.Event()
        self.at_once = False
        self._err = err

    def is_set(self) -> bool:
        return self.event.is_set()

    def __call__(self, signum: int, frame: object) -> None:
        if self.event.is_set() or self.at_once:
            self.event.set()
            raise KeyboardInterrupt
        self.event.set()
        self._err.write("\nstopping after this step (Ctrl-C again to stop at once)\n")


@contextlib.contextmanager
def _stop_on_interrupt(err: TextIO) -> Iterator[_Stop]:
    """A `_Stop` that Ctrl-C (SIGINT) sets inside the block, so a loop can stop between two
    steps, not inside one."""
    stop = _Stop(err)
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach only the main thread: nothing to install
        return
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _train_data(args: argparse.Namespace, client: Client) -> tuple[Fill, Fill, int]:
    """Random inputs and targets made on the server, shaped for the model it serves (as
    ListTensors describes it); new ones each step (seed + step); and the state version
    before the run."""
    model = client.list_tensors()
    sample_shape, dtype = model_input(model)
    integers = dtype is not None and not dtype.startswith(("float", "bfloat"))
    if integers and args.input_high is None:
        raise UsageError(
            f"{model.model} takes {dtype} inputs (ids, say): give --input-high N to draw "
            "them from 0..N-1 (N: its vocabulary's size, an Embedding's rows), or drive it "
            "with your own data from Python (Client.train_step or Client.train)"
        )
    if not integers and args.input_high is not None:
        raise UsageError(
            f"--input-high is for a model of integer inputs; {model.model} takes "
            f"{dtype or 'float32'}, drawn from a normal distribution"
        )
    # Given, each is taken as it is: `or` took --classes 0 and --input-shape '' for unset.
    shape = sample_shape if args.input_shape is None else args.input_shape
    outputs = args.classes if args.classes is not None else (model.outputs or 20)
    if model.loss == "mse" and args.classes is not None and args.classes != model.outputs:
        # The server's refusal of the target's shape named no option (a review of training
        # remotely): an mse model's targets are as wide as its output, no classes drawn.
        raise UsageError(
            f"--classes draws class labels, and {model.model} is a regression (mse) model, "
            f"its targets as wide as its {model.outputs or 'unknown'} outputs: leave "
            "--classes out"
        )
    if model.loss != "mse" and model.outputs and outputs > model.outputs:
        # The server's answer named a class in the target, which read like --targets, and
        # not --classes (found by a review of the CLI).
        raise UsageError(
            f"--classes {outputs} is more than {model.model}'s {model.outputs} outputs: its "
            f"labels run from 0 to {model.outputs - 1}; give --classes {model.outputs} or "
            "fewer, or leave it out"
        )
    if integers:
        x = Fill.randint(0, args.input_high, args.batch, *shape, seed=args.seed, dtype=dtype)
    else:
        x = Fill.normal(args.batch, *shape, seed=args.seed, dtype=dtype)
    target_seed = (args.seed + 1_000_003) % (1 << 64)  # a seed is a uint64
    if model.loss == "mse":
        return x, Fill.normal(args.batch, outputs, seed=target_seed), model.version
    return x, Fill.randint(0, outputs, args.batch, seed=target_seed), model.version


#: The reasons of a call refused because its session is gone: closed, expired or never there.
_SESSION_GONE = ("UNKNOWN_SESSION", "CLOSED")


def cmd_train(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    x, y, before = _train_data(args, client)
    bar = ProgressBar(sys.stderr if args.json else out, args.steps)
    done, loss = 0, float("nan")
    version: int | None = before if not args.server_side else None
    # The first step with a loss that is not finite (server-side, as the server counts it:
    # a progress every 5 steps said "by step 10" of a run that diverged at step 8, found by
    # a review of the CLI; from a server from before it counted, the first reported).
    diverged_at = None
    # An error that ended the run (the server stopping, say): raised after the summary.
    failed: RemoteError | None = None
    cut_in_a_step = False  # client-side, a second Ctrl-C came during a step
    with _stop_on_interrupt(getattr(args, "err", sys.stderr)) as stop:
        stop.at_once = args.server_side  # before the run starts: a press then ends it too
        if args.server_side:
            halt = not args.keep_going
            run = client.train(x, y, args.steps, every=args.every, stop_at_nonfinite=halt)
            try:
                for progress in run:
                    done, loss, version = progress.step, progress.loss, progress.version
                    if diverged_at is None and progress.first_nonfinite_step:
                        diverged_at = progress.first_nonfinite_step
                    elif diverged_at is None and not math.isfinite(loss):
                        diverged_at = done
                    bar.update(done, loss, progress.steps_per_s)
                    # A server from before stop_at_nonfinite runs on: closing the run stops
                    # it there.
                    if stop.is_set() or (halt and diverged_at is not None):
                        break
            except RemoteError as e:
                failed = e
            except KeyboardInterrupt:
                if not stop.is_set():  # not the handler's: raised before it was installed
                    raise
            finally:
                run.close()  # cancels the run on the server: it stops between two steps
        else:
            for k in range(args.steps):
                if stop.is_set():
                    break
                try:
                    result = client.train_step(x.reseeded(k), y.reseeded(k))
                except RemoteError as e:
                    failed = e
                    break
                except KeyboardInterrupt:
                    # Ctrl-C again, inside a step: stop at once, and sum up all the same.
                    # It ended the command "interrupted", with no word of the steps applied
                    # (a review of training remotely).
                    if not stop.is_set():
                        raise
                    cut_in_a_step = True
                    break
                done, loss, version = k + 1, result.loss, result.version
                if diverged_at is None and not math.isfinite(loss):
                    diverged_at = done
                halted = diverged_at == done and not args.keep_going
                if done % args.every == 0 or done == args.steps or halted:
                    bar.update(done, loss)
                if halted:  # it ran on, its steps wasted, until the end (found by a review)
                    break
    # A server-side run that the server ended (stopping, the session closed, a step
    # refused) says how many steps stay applied, and the version then: more than the last
    # progress it sent. The summary said that progress's, beside an error that said the
    # server's (found by a review of the CLI).
    reported = done  # the step whose loss `loss` is (0: none reported)
    if failed is not None and "steps_done" in failed.metadata:
        with contextlib.suppress(ValueError):
            done = max(done, int(failed.metadata["steps_done"]))
        with contextlib.suppress(KeyError, ValueError):  # an older server sends no version
            version = int(failed.metadata["version"])
    if failed is not None and done == 0:
        raise failed  # no step to sum up (a wrong --input-shape, say): the error says it all
    stopped = done < args.steps
    ran_on = False
    if args.server_side and stopped and failed is None:
        # The server ran on until it saw the stop: its steps after the last progress it sent
        # are applied too, so the version to report is the server's, not that progress's.
        with contextlib.suppress(GradwireError):
            now = client.list_tensors().version
            ran_on = now != version
            version = now
    data = {"steps": done, "asked": args.steps, "version": version}
    # The loss of the last step reported, and that step: not the last applied when the
    # server ended the run (none reported: no loss, where "nan" read as divergence).
    data["loss"], data["loss_step"] = (loss, reported) if reported else (None, None)
    data["stopped"] = stopped
    data["diverged_at"] = diverged_at
    # Ended by the divergence, not by Ctrl-C, the server or the steps asked for.
    halted = stopped and diverged_at is not None and not args.keep_going and failed is None
    data["stopped_at_nonfinite"] = halted and not stop.is_set()
    # Server-side, stopped by this client: the version moved after the last progress, the
    # server's steps past it (or another caller's changes) unreported. "steps" counted the
    # reported alone, unsaid (a review of clients and servers of different versions).
    data["ran_on"] = ran_on
    # A session closed or expired under the run: its steps went with it, which the text says
    # and `steps` alone did not (a review of checkpoints and sessions).
    data["session_gone"] = failed is not None and failed.reason in _SESSION_GONE
    counted = f"{done} step{'' if done == 1 else 's'}"
    steps = f"{counted} reported (the server may have run more before the stop reached it)"
    text = f"{'stopped after' if stopped else 'trained'} {steps if ran_on else counted}"
    if cut_in_a_step:  # not asked of the server: it holds the model until that step ends
        text += " (the step Ctrl-C cut into may yet be applied on the server)"
    if not reported:
        text += ": no loss reported"
    elif reported < done:
        text += f": loss {format_loss(loss)} at step {reported}, the last reported"
    else:
        text += f": loss {format_loss(loss)}"
    if version is not None:
        text += f", version {version}"
    if data["session_gone"] and not args.server_side:
        # Said as for steps that stay applied, the error after it naming no step (a review
        # of checkpoints and sessions); a server-side run's error says it (servicer.py).
        text += "; their session is closed or expired, and they are gone with it"
    if args.json:
        emit(out, args, data, text)
    else:
        bar.finish(text)
        if diverged_at is not None:
            halted_at = done if data["stopped_at_nonfinite"] else None
            out.write(_divergence_hint(client, diverged_at, halted_at, ran_on) + "\n")
    if failed is not None:
        raise failed
    if stop.is_set():
        raise Interrupted


def _divergence_hint(
    client: Client, step: int, halted_at: int | None = None, ran_on: bool = False
) -> str:
    """What to do about a loss that stopped being finite (by `step`): start again with a
    smaller lr. `halted_at`: the step the run was stopped at for it (not --keep-going):
    `step`, or, against a server from before Train's stop_at_nonfinite, the progress that
    showed it, the server perhaps running on until the stop reached it (`ran_on`: it did,
    the version having moved since)."""
    # The run's session, named in the commands: without it, copied, they reset and slowed
    # the default session, another user's model (a review of two researchers at once).
    on = session_option(client.session)
    lower = f"gradwire optimizer{on} --lr ... with a smaller learning rate"
    with contextlib.suppress(GradwireError):  # the hint is extra: never fail over it
        opt = client.list_tensors().optimizer
        # --keep-state: the lr alone. Without it, the other settings took their defaults,
        # momentum and weight decay dropped (found by a review of training remotely); a
        # Reset keeps the settings and starts the optimizer's state afresh.
        lower = (
            f"gradwire optimizer{on} --keep-state --lr {opt.lr / 10:g} (a tenth of lr "
            f"{opt.lr:g}, its other settings kept)"
        )
    stopped = ""
    if halted_at is not None and ran_on:  # "stopped there" of a run that went on (a review)
        stopped = (
            f"; the run was stopped once step {halted_at}'s progress showed it, the server "
            "running on until the stop reached it (--keep-going runs on)"
        )
    elif halted_at == step:
        stopped = "; the run stopped there (--keep-going runs on)"
    elif halted_at is not None:  # said "stopped there" of a run that went on (a review)
        stopped = (
            f"; the run was stopped at step {halted_at}, the first progress to show it "
            "(--keep-going runs on)"
        )
    return (
        f"the loss was no longer finite by step {step}: training diverged, and the parameters "
        f"may have too{stopped}. To start again: gradwire reset{on} (--seed N for seeded "
        f"weights), then {lower}"
    )


def _older(back: int, left: int) -> str:
    """What follows "the server is back, at version N" (`back`), up to "watching again":
    below `left`, the last update's before it went, the server came back from its last save
    (a crash) or from fresh weights, and the versions to come were shown before, of other
    states. Unsaid, the training lost went unnoticed (a review of restarts and recovery)."""
    if back >= left:
        return ":"
    behind = left - back
    return (
        f", {behind} version{'' if behind == 1 else 's'} before the last update it sent "
        f"({left}): it came back with an older state, and what was applied after its last "
        "save (or since it started, without one) is lost;"
    )


def cmd_watch(args: argparse.Namespace, client: Client, out: TextIO) -> None:
    stats = args.stats or not args.values
    if args.bins and not stats:  # dropped without a word (found by a review of the CLI)
        raise UsageError(
            "--bins draws histograms in the statistics, which --values alone leaves out: add "
            "--stats, or leave --bins out"
        )
    # As get --json writes them: two slices of one tensor share a name, not a selector.
    selectors = [str(parse_selector(text)) for text in args.selectors]
    seen, version = 0, None
    away = False  # the server went away (--reconnect), and no update has come since
    ended = False  # ... or it ended the watch, left unread, for a call (it went nowhere)

    def went_away(error: Unavailable) -> None:
        nonlocal away, ended
        away, ended = True, rewatch.ended_unread(error)
        # The version of the last update this watch showed: the server's may have moved on
        # since (a save between two updates). "after version N" read as the server's own
        # (a review of watching training remotely). There is one: this command's client
        # makes no call before its watch, so only a watch that had an update reconnects.
        # A watch suspended (Ctrl-Z) past UNREAD_S and ended for a call was said to have
        # lost a server that went nowhere (found by a review of this session's new features).
        what, then = (
            ("the server ended this watch", "")
            if ended
            else ("the server went away", " once it is back")
        )
        args.err.write(
            f"{what} ({rewatch.gist(error.message)}); the last update showed version "
            f"{version}; watching again{then} (Ctrl-C stops)\n"
        )

    try:
        # --duration is the whole command's, across the gaps of a watch reconnected.
        stream = client.watch(
            args.selectors,
            values=args.values,
            stats=stats,
            bins=args.bins,
            every_steps=args.every_steps,
            min_interval=args.interval,
            timeout=args.duration,
            reconnect=args.reconnect,
            on_lost=went_away if args.reconnect else None,
        )
    except ValueError as e:  # the client's checks of its arguments: 1,025 selectors was a
        raise UsageError(str(e)) from None  # traceback (found by a review of the CLI)
    table = WatchTable(out, args.selectors)
    with _ends_when_the_reader_goes(out, client.close) as gone:
        try:
            for update in stream:
                # Counted before it is shown: a Ctrl-C just after its line appears must count it.
                # `before`: the last update's version, the one before the server went if it did.
                before, seen, version = version, seen + 1, update.version
                if args.json:
                    out.write(json_line(_watch_json(update, selectors)))
                    out.flush()
                else:
                    table.show(update)
                if away and ended:
                    away = False
                    args.err.write(f"watching again, at version {update.version}\n")
                elif away:  # said after the update: on a terminal, drawing it clears the screen
                    away = False
                    args.err.write(
                        f"the server is back, at version {update.version}"
                        f"{_older(update.version, before or 0)} watching again\n"
                    )
                if args.count is not None and seen >= args.count:
                    break
        except DeadlineExceeded:
            if not seen:  # not even the first update: no server answered, or too short a time
                raise
            # --duration reached after an update: the watch ends as asked
        except Exception:
            if gone.is_set():  # the watch's call, cancelled for a reader gone
                raise BrokenPipeError from None  # exit 141, as for a reader gone at a write
            raise
        except KeyboardInterrupt:
            # Where it stopped, under the table (a --json reader has each update's version, and
            # lines of one shape): the last update on screen may be one of many alike.
            if not args.json:
                last = f": the last at version {version}" if seen else ""
                out.write(f"stopped after {seen} update{'' if seen == 1 else 's'}{last}\n")
            raise Interrupted from None  # nothing was changing
        finally:
            stream.close()


@contextlib.contextmanager
def _ends_when_the_reader_goes(out: TextIO, end: Callable[[], object]) -> Iterator[threading.Event]:
    """While inside, a reader of `out` that goes away (`gradwire watch loss | head -1`) calls
    `end` (the client's close, which cancels its calls) on a thread of its own, and sets
    the event returned: where `out` is this process's standard output and a pipe. A watch
    noticed only at its next write, which on an idle server, or with a large --every-steps,
    might never come: the command, and the server's place it held, lasted as long (found by
    a review of watching training). The thread is stopped, and waited for, on the way out.
    It interrupted the main thread at first, which could land after the watch had ended as
    asked (`--count 1 | head -1`): exit 130 for a command that had done its work (found by
    a review of that change)."""
    gone = threading.Event()
    try:
        fd = out.fileno() if isinstance(out, Output) else -1
        piped = fd >= 0 and stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (OSError, ValueError):
        piped = False
    if not piped:
        yield gone
        return
    wake, woken = os.pipe()  # written on the way out, to end the thread's wait at once
    poller = select.poll()
    poller.register(fd, 0)  # a pipe's write end reports POLLERR once it has no reader
    poller.register(wake, select.POLLIN)

    def wait() -> None:
        if any(ready == fd for ready, _ in poller.poll()):
            gone.set()
            end()

    thread = threading.Thread(target=wait, name="gradwire-reader", daemon=True)
    thread.start()
    try:
        yield gone
    finally:
        os.write(woken, b"x")
        thread.join()
        os.close(wake)
        os.close(woken)


def _watch_json(update: Any, selectors: Sequence[str]) -> dict[str, Any]:
    tensors = []
    for watched, selector in zip(update.tensors, selectors, strict=True):
        item: dict[str, Any] = {
            "name": watched.name,
            "selector": selector,
            "present": watched.present,
        }
        if watched.value is not None:
            item["dtype"] = watched.dtype  # as get --json says it: "bfloat16" read as floats
            item["value"] = jsonable(watched.value)
        if watched.stats is not None:
            item["stats"] = stats_json(watched.stats)
        tensors.append(item)
    return {
        "version": update.version,
        "cause": update.cause,
        "skipped": update.skipped,
        "steps": update.steps,
        "tensors": tensors,
    }
