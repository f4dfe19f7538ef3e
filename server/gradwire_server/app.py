"""Build the gRPC server (limits, health, reflection) around a Trainer; serve until signalled."""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import resource
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, ParamSpec

import grpc
import torch
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

import gradwire
from gradwire._pb import trainer_pb2 as pb
from gradwire.limits import MAX_COUNT, ServerConnections
from gradwire.targets import loopback_host
from gradwire_server import allocator, checkpoint, openmp
from gradwire_server.auth import TlsFiles, TokenInterceptor, certificates_readable
from gradwire_server.devices import resolve_device
from gradwire_server.errors import InvalidInput
from gradwire_server.health_service import HealthServicer, add_to_server
from gradwire_server.metrics import CallInterceptor, Metrics, MetricsServer
from gradwire_server.models import SIMPLE, load_spec
from gradwire_server.pools import ServingPool
from gradwire_server.reflection_service import V1_SERVICE_NAME as REFLECTION_V1
from gradwire_server.reflection_service import ReflectionServicer
from gradwire_server.reflection_service import add_to_server as add_reflection
from gradwire_server.servicer import TrainerServicer, method_handlers
from gradwire_server.serving import ServingThread, start_watched
from gradwire_server.sessions import DEFAULT_IDLE_S, DEFAULT_MAX_SESSIONS, Sessions
from gradwire_server.trainer import ONE_THREAD_MAX_FLOPS, Trainer

log = logging.getLogger("gradwire_server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Trainer"].full_name
DEFAULT_GRACE_S = 5.0
#: Seconds past the grace period after which a stop still waiting says what it waits for.
STOP_NOTICE_S = 1.0
DEFAULT_MAX_CONCURRENT = 16
#: Threads beyond the call limit, so that health checks are answered when the limit is hit.
SPARE_THREADS = 4


class DeviceLost(RuntimeError):
    """`serve` stopped because the device failed in a way it does not recover from."""


SERVING_LOST = "stopped after gRPC's serving thread ended (see the log above)"


class ServingLost(RuntimeError):
    """`serve` stopped because gRPC's serving thread ended (serving.py): the server answered
    nothing more."""


@dataclass
class Running:
    """A started server: the grpc server, the port it bound, and its health servicer."""

    server: grpc.Server
    port: int
    health: HealthServicer
    trainer: Trainer
    servicer: TrainerServicer
    metrics: Metrics | None = None
    #: The port of the Prometheus HTTP endpoint (/metrics); None when metrics are off.
    metrics_port: int | None = None
    metrics_server: MetricsServer | None = None
    reflection: ReflectionServicer | None = None
    #: gRPC's serving thread; `serving.alive` is False once it has ended (serving.py).
    serving: ServingThread | None = None

    def stop(
        self,
        grace: float | None = DEFAULT_GRACE_S,
        save_to: Path | None = None,
        saving: Callable[[], None] | None = None,
    ) -> None:
        """Health turns NOT_SERVING first, then in-flight calls get `grace` seconds to finish.
        Open streams end at once rather than hold the whole grace period: Watches and
        Trains UNAVAILABLE with reason STOPPING (a second or two after the stop,
        UNAVAILABLE, if their client is not reading what they send), Calls streams once no
        call of theirs is in progress, health Watches once they have sent NOT_SERVING,
        reflection streams between two questions. Then, with `save_to`, the state the calls
        left is saved. Once gRPC's serving thread has ended (serving.py), no call can finish:
        none is waited for. `saving`: called as the save begins, once the call it waits for
        (a step the grace period cut off) has ended; not called without a save."""
        self.health.enter_graceful_shutdown()
        self.servicer.stop()
        if self.reflection is not None:
            self.reflection.stop()
        if self.serving is not None and not self.serving.alive:
            self._stop_without_serving()
        else:
            self._stop_serving(grace)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._save_and_close(save_to, saving)

    def _stop_serving(self, grace: float | None) -> None:
        """gRPC's own stop: new calls refused, those in progress given `grace` seconds."""
        try:
            stopped = self.server.stop(grace)
        except RuntimeError as err:
            # grpc starts a thread to cancel what is left once the grace period is over; one
            # that cannot start (memory exhausted, a limit on tasks) raised here and the
            # state went unsaved. The shutdown has begun: the grace period is waited out
            # here instead.
            log.warning(
                "could not start gRPC's thread for the grace period (%s): waiting for the "
                "calls in progress here",
                err,
            )
            if grace is not None:
                self.server.wait_for_termination(timeout=grace)
            stopped = self.server.stop(None)  # cancels what is left; at once if nothing is
        # Woken now and then to look at the serving thread: gRPC's stop is finished by it, so
        # one that ends during the grace period left this wait to last for ever.
        while not stopped.wait(SIGNAL_POLL_S):
            if self.serving is not None and not self.serving.alive:
                self._stop_without_serving()
                return
        if self.serving is not None:
            self.serving.forget()

    def _stop_without_serving(self) -> None:
        """The stop once gRPC's serving thread has ended: its own stop would wait for that
        thread for ever. The server stops listening (clients are refused rather than left
        waiting) and its calls are cancelled; no call starts any more, and one in progress
        finishes its work on the torch thread before the save (which takes the trainer's
        lock), its answer perhaps never sent."""
        log.warning("stopping without gRPC's serving thread: calls in progress are not waited for")
        try:
            self.server.stop(0)  # returns at once with a grace; starts a thread to cancel
        except RuntimeError as err:  # that thread could not start: listening has stopped
            log.warning("could not start gRPC's thread to cancel the calls in progress: %s", err)

    def _save_and_close(self, save_to: Path | None, saving: Callable[[], None] | None) -> None:
        try:
            if save_to is not None:
                began = time.monotonic()

                def beginning() -> None:
                    # Said as it begins, and how long it took: a large model's save took
                    # 22 s, past Docker's stop grace, said to be a call waited for (a review
                    # of serving a big model).
                    nonlocal began
                    if saving is not None:
                        saving()
                    log.info("saving state version %d to %s", self.trainer.version, save_to)
                    began = time.monotonic()

                try:
                    saved = self.trainer.save(save_to, began=beginning)
                except Exception as err:  # an OSError, or safetensors' own (a full disk)
                    lost = (
                        f"could not save state version {self.trainer.version} to {save_to}: {err}"
                    )
                    # A record of its own too: the caller's line (serve's) is outside the log,
                    # where a pipeline that alerts on errors did not see the training lost.
                    log.error("%s", lost)
                    raise OSError(lost) from err
                log.info(
                    "saved state version %d to %s (%s bytes in %.1f s)",
                    saved.version,
                    save_to,
                    f"{saved.bytes:,}",
                    time.monotonic() - began,
                )
        finally:  # a save that failed still lets the sessions and threads go
            sessions = self.servicer.sessions.open_count
            if sessions:  # said: their state goes with them, and nothing else tells
                kept = "; only the default session's state is saved" if save_to else ""
                log.info("closing the %d session(s) still open%s", sessions, kept)
            self.servicer.sessions.close_all()
            self.trainer.close()
            self.health.close()
            if self.reflection is not None:
                self.reflection.close()


def _address(host: str, port: int) -> str:
    """host:port as gRPC and people read it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_error(host: str, port: int) -> OSError | None:
    """Why gRPC could not listen on host:port, found by binding a socket first as gRPC binds
    its own (SO_REUSEADDR, and no SO_REUSEPORT, which start() turns off): gRPC itself says only
    "failed to bind", after a line of its own on stderr. None when one of the addresses the
    host names binds, as gRPC then listens there. A name that resolves to nothing gives
    getaddrinfo's error. Port 0 is probed too (the probe takes a free port and lets it go):
    a bad host with it went on to gRPC's own stderr line and a message that blamed the port."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:  # a name that resolves to nothing: say so
        return err
    except UnicodeError as err:  # "a..b", a label over 63 characters: a traceback before
        return socket.gaierror(socket.EAI_NONAME, f"no host has such a name: {err}")
    except OSError:
        return None
    first: OSError | None = None
    for family, kind, proto, _, sockaddr in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
            return None
        except OSError as err:
            first = first or err
    return first


def _cannot_listen(address: str, host: str, port: int, error: OSError | None) -> str:
    """What a person reads when the server cannot listen, and what to do about it."""
    if isinstance(error, socket.gaierror):
        why = f"the host name {host!r} resolves to no address ({error.strerror}); check --host"
    elif error is not None and error.errno == errno.EADDRINUSE:
        why = (
            f"port {port} is in use (another server on it?); choose another --port "
            "(0 picks a free one)"
        )
    elif error is not None and error.errno == errno.EADDRNOTAVAIL:
        why = f"{host} is not an address of this machine; choose another --host"
    elif error is not None and error.errno == errno.EACCES:
        why = f"port {port} needs privileges to listen on; choose one above 1023"
    else:
        why = (
            "the port is in use or the address is not this machine's; choose another --port "
            "(0 picks a free one) or --host"
        )
    return f"cannot listen on {address}: {why}"


def _listen(server: grpc.Server, host: str, port: int, tls: TlsFiles | None) -> int:
    """Binds `server` to host:port and returns the port bound (port 0: a free one), or
    raises OSError saying why it cannot and what to do."""
    address = _address(host, port)
    refused = _bind_error(host, port)
    if refused is not None:
        error = OSError(_cannot_listen(address, host, port, refused))
        error.errno = refused.errno  # for callers; the message alone is what a person reads
        raise error
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, tls.credentials())
    except RuntimeError:  # grpc says only "failed to bind"; say what to do about it
        bound = 0
    if bound == 0:
        raise OSError(_cannot_listen(address, host, port, None))
    return bound


def start(
    trainer: Trainer,
    host: str = "127.0.0.1",
    port: int = 0,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    *,
    token: str | None = None,
    tls: TlsFiles | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    session_idle_s: float = DEFAULT_IDLE_S,
    metrics_port: int | None = None,
    on_device_lost: Callable[[], None] | None = None,
    connections: ServerConnections = ServerConnections(),
    on_serving_lost: Callable[[], None] | None = None,
    state_dir: Path | None = None,
) -> Running:
    """Starts a server for `trainer` on host:port (0: a free port) and returns it running.

    `max_concurrent`: calls served at once; more are answered RESOURCE_EXHAUSTED (BUSY) at
    once, while a few threads stay free for refusals and health checks (health Watches and
    reflection streams, which stay open, wait on pools of their own, bounded too).
    `token`: every call but health checks must carry it as a bearer token. `tls`: serve
    TLS (mutual TLS when it names a client CA). `extra_handlers` serve other services beside
    it (the benchmark's bare-gRPC floor), outside the call log and metrics, which count
    gradwire's own services; the token applies to them too. `metrics_port`: serve
    Prometheus metrics over HTTP on host:metrics_port (0: a free port; None: no metrics).
    `on_device_lost`: called after a call fails with an error the device does not recover
    from, once health is NOT_SERVING (`serve` stops the server then).
    `connections`: its keepalive pings, the clients' pings it takes, how long a connection
    without calls stays open and how many stay open at once (limits.ServerConnections).
    `on_serving_lost`: called when gRPC's serving thread has ended, after a critical log line
    (serving.py): the server answers nothing more (`serve` saves and exits then).
    `state_dir`: where SaveCheckpoint writes and LoadCheckpoint reads checkpoints (None:
    both answer FAILED_PRECONDITION); `serve` also restores and saves its state there.
    """
    for name, value, least in [
        ("max_concurrent", max_concurrent, 1),
        ("max_sessions", max_sessions, 0),
    ]:
        if not least <= value <= MAX_COUNT:  # GetServerInfo's uint32 could not report it
            raise ValueError(f"{name} must be from {least} to {MAX_COUNT}, got {value}")
    if tls is not None:
        tls.check()  # gRPC would fail to bind, saying no more than for a port in use
    sessions = Sessions(trainer, max_sessions=max_sessions, idle_s=session_idle_s)
    services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    trainer_methods = pb.DESCRIPTOR.services_by_name["Trainer"].methods
    metrics = (
        None
        if metrics_port is None
        else Metrics(sessions, (f"/{SERVICE_NAME}/{method.name}" for method in trainer_methods))
    )
    # First: it counts and logs every call to these, those the token refuses too: reflection
    # under both its names (ListServices names v1alpha alone).
    counted = (*services, REFLECTION_V1)
    calls = CallInterceptor(metrics, counted)
    interceptors: list[grpc.ServerInterceptor] = [calls]
    if token:
        interceptors.append(TokenInterceptor(token))
    server = grpc.server(
        ServingPool(max_concurrent + SPARE_THREADS, thread_name_prefix="gradwire"),
        interceptors=interceptors,
        # SO_REUSEPORT (grpc's default) would let a second server share the port silently.
        options=[
            *connections.options(),
            ("grpc.so_reuseport", 0),
            # No compressed requests (identity alone; gRPC answers UNIMPLEMENTED, "Compression
            # algorithm 'gzip' is disabled"): gRPC decompresses a request whole, up to the
            # message limit, before any handler can refuse it, and health needs no token. A
            # 60 MiB health Check gzipped to 61 KB took the server 96 MB higher each, 20 at
            # once 1.4 GB, for 1.2 MB sent (a security review, seventy-sixth session).
            # gradwire's clients never compress a request.
            ("grpc.compression_enabled_algorithms_bitset", 1),
        ],
    )
    health_servicer = HealthServicer()

    def device_lost() -> None:
        log.critical(
            "the device reported an error it does not recover from (a device-side assert or "
            "an illegal memory access): every later call would fail; health is NOT_SERVING "
            "now, restart the server"
        )
        for service in ("", SERVICE_NAME):
            health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if on_device_lost is not None:
            on_device_lost()

    reflection_servicer = ReflectionServicer(services)
    servicer = TrainerServicer(
        trainer,
        max_concurrent,
        sessions,
        on_device_lost=device_lost,
        connections=connections,
        streams=(health_servicer.max_watches, reflection_servicer.max_streams),
        state_dir=state_dir,
    )
    servicer.observer = calls  # counts and logs the calls made on Calls streams
    if metrics is not None:
        metrics.watch_places(servicer.slots, servicer.sending)
    server.add_registered_method_handlers(SERVICE_NAME, method_handlers(servicer))
    server.add_generic_rpc_handlers(tuple(extra_handlers))
    add_to_server(health_servicer, server)
    add_reflection(reflection_servicer, server)
    # The metrics port first: a gRPC server never started keeps its port bound for the
    # life of the process, stop() or not, so a start refused for the metrics port after it
    # left a caller in this process no way to start on that port again (a review).
    metrics_server = None
    if metrics is not None and metrics_port is not None:
        metrics_server = MetricsServer(metrics.registry, host, metrics_port)
    try:
        bound = _listen(server, host, port, tls)
    except BaseException:
        if metrics_server is not None:
            metrics_server.stop()
        raise

    def serving_lost(error: BaseException) -> None:
        try:
            log.critical(
                "gRPC's serving thread ended (%s): this server answers no call again, health "
                "checks neither; %s",
                f"{type(error).__name__}: {error}" if str(error) else type(error).__name__,
                "stopping" if on_serving_lost is not None else "restart it",
                exc_info=error,
            )
        finally:  # out of memory again in the log's formatting: the stop still begins
            if on_serving_lost is not None:
                on_serving_lost()

    serving = start_watched(server.start, serving_lost)
    sessions.expire_in_background()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return Running(
        server,
        bound,
        health_servicer,
        trainer,
        servicer,
        metrics,
        None if metrics_server is None else metrics_server.port,
        metrics_server,
        reflection_servicer,
        serving,
    )


def _write_and_remove_a_file(folder: Path) -> None:
    """Writes a file in `folder` and removes it: OSError when the folder takes none (read
    only, another user's, not a folder), as a save or a port file would find later."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".gradwire-write-check-"):
        pass


def check_state_dir(state_dir: Path) -> None:
    """Refuses, at start, a state dir the stop could not save into (InvalidInput,
    BAD_STATE_DIR): it is made when missing, a file is written there and removed, as a save
    writes one and renames it, and its folder for unfinished saves is made
    (checkpoint.saving_folder, which refuses a link or a file there) and written to too.
    Its lock file is checked where it is opened, by `hold_state_dir` (`_lock_file`), next
    at start."""
    saving = None
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        _write_and_remove_a_file(state_dir)
        saving = checkpoint.saving_folder(state_dir)
        # Where a save writes first: one of another user's (a first run as root, the state
        # dir chown'ed without -R) passed this check, and the save at the stop failed, the
        # run's training lost (a review of running the server, as an operator).
        _write_and_remove_a_file(saving)
    except OSError as err:
        why, advice = err.strerror or str(err), "choose a folder this user can write to"
        if saving is not None:
            why += (
                f" in {checkpoint.SAVING}, where saves are written before they are renamed "
                "into place"
            )
        if isinstance(err, FileExistsError):
            why = "it is a file, not a folder"
        elif isinstance(err, NotADirectoryError) and not state_dir.is_dir():
            why = "a folder on its path is a file"
        elif isinstance(err, checkpoint.StateDirChanged):
            advice = "or choose another folder"
        raise InvalidInput(
            f"--state-dir {state_dir}: the state could not be saved there ({why}); {advice}",
            reason="BAD_STATE_DIR",
        ) from None


def write_port_file(port_file: Path, port: int) -> None:
    """Writes `port` to `port_file` whole at once: into a file of another name beside it,
    then renamed over it. Written in place, the file was there empty for a moment, and a
    reader waiting for it to appear (what a port file is for) could read no port."""
    partial = port_file.with_name(f".{port_file.name}.{os.getpid()}.partial")
    try:
        partial.write_text(f"{port}\n")
        os.replace(partial, port_file)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def forget_port(port_file: Path, port: int) -> None:
    """Removes the port file once the server no longer listens, if it still names `port`."""
    with contextlib.suppress(OSError, ValueError):
        if int(port_file.read_text()) == port:
            port_file.unlink()


def check_port_file(port_file: Path, host: str = "127.0.0.1") -> None:
    """Refuses, at start, a port file that could not be written once the server listens
    (InvalidInput, BAD_PORT_FILE): its folder must exist and take a file, which is written
    there and removed. Found only after binding, a read-only folder was a failed exit (1)
    where a missing one was refused as a usage error (2). A port file already there is
    removed: one left by a server that could not remove it (killed, or out of memory) named
    a dead port, and a reader waiting for the file took it for this server's until this one
    listened (found by a review of running the server for others). But not one naming a
    port in use on `host`, a running server's: a second start given its file and port
    removed it, then failed on the port in use, and the server went on with no file naming
    its port (a review of running the server, as an operator); this server's own replaces
    it once it listens."""
    folder = port_file.parent
    if not folder.is_dir():
        why = f"there is no folder {folder} to write it in"
    elif port_file.is_dir():
        why = "it is a folder; name a file"
    else:
        try:
            _write_and_remove_a_file(folder)
        except OSError as err:
            why = f"cannot write in {folder} ({err.strerror or err})"
        else:
            try:
                if not _names_a_port_in_use(port_file, host):
                    port_file.unlink(missing_ok=True)
                return
            except OSError as err:  # another user's, in a sticky folder such as /tmp
                why = f"cannot remove the file already there ({err.strerror or err})"
    raise InvalidInput(f"--port-file {port_file}: {why}", reason="BAD_PORT_FILE")


def _names_a_port_in_use(port_file: Path, host: str) -> bool:
    """Whether `port_file` names a port that something listens on at `host` (the server
    that wrote it, still running)."""
    try:
        port = int(port_file.read_text())
    except (OSError, ValueError):
        return False
    if not 0 < port < 65536:
        return False
    refused = _bind_error(host, port)
    return refused is not None and refused.errno == errno.EADDRINUSE


#: How often a wait of the main thread's wakes to run the handlers of signals received.
SIGNAL_POLL_S = 0.2


def wait_for(event: threading.Event) -> None:
    """event.wait(), waking every SIGNAL_POLL_S. Python runs signal handlers on the main
    thread, and a signal the kernel hands another thread (gRPC's, torch's) interrupts no
    wait of the main thread's: blocked in one wait for ever, serve missed a SIGTERM and ran
    on (seen once in CI, in a clone of the twenty-second session's work)."""
    while not event.wait(SIGNAL_POLL_S):
        pass


#: The signals that stop `serve` gracefully: SIGHUP too, which the terminal sends as it
#: closes (a dropped SSH session): it killed the server at once, its state unsaved.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)
#: Of those, a hang-up that the server's starter asked it to ignore (`nohup gradwire serve`
#: sets SIGHUP to SIG_IGN) stays ignored: the handler replaced nohup's, and the terminal
#: closing, or an SSH session ending, stopped a server started so as to outlive it (found by
#: a review of running the server for others).
HANGUP = getattr(signal, "SIGHUP", None)


def raise_open_files_limit() -> tuple[str, str] | None:
    """Raises this process's soft limit on open files to its hard limit, as Go's runtime
    does for its servers; returns (the new limit, the old) when it raised it, as words.

    Why: each client connection takes a file descriptor, token or not, and gRPC keeps one
    that spoke HTTP/2 until keepalive finds it dead, or for ever if it answers pings. Under
    a soft limit of 256 (systemd's default is 1,024) 300 connections that sent HTTP/2's
    preface and nothing more left every call unanswered until they closed, gRPC logging
    "File descriptor limit reached", though the hard limit was 20,000 (a review of running
    the server for others, fifty-fourth session)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as err:
        log.info("open files: up to %d, not raised to the hard limit: %s", soft, err)
        return None

    def words(limit: int) -> str:
        return "unlimited" if limit == resource.RLIM_INFINITY else f"{limit:,}"

    return words(hard), words(soft)


#: Open files a server keeps for itself beside its connections: the libraries it loads, its
#: listening sockets, a checkpoint being saved, the metrics port's connections (16 at most).
FILES_KEPT = 128


def connections_within_open_files(connections: ServerConnections) -> ServerConnections:
    """`connections` with its limit on connections lowered, and a warning logged, where this
    process's limit on open files leaves less room beside FILES_KEPT: at the limit the server
    could open no file of its own either. Unchanged when it fits, or asks for no limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    asked = connections.max_connections
    if not asked or soft == resource.RLIM_INFINITY or asked <= soft - FILES_KEPT:
        return connections
    room = max(1, soft - FILES_KEPT)
    log.warning(
        "--max-connections %s lowered to %s: this process may open %s files, %d of them kept "
        "for the server's own; raise the limit (ulimit -n, systemd's LimitNOFILE) for more",
        f"{asked:,}",
        f"{room:,}",
        f"{soft:,}",
        FILES_KEPT,
    )
    return replace(connections, max_connections=room)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The STOP_SIGNALS serve handles: all of them, but SIGHUP where it is ignored."""
    return tuple(
        s for s in STOP_SIGNALS if not (s == HANGUP and signal.getsignal(s) == signal.SIG_IGN)
    )


def starting_signals() -> list[signal.Signals]:
    """The stop signals said and taken while the server starts (exit_said_while_starting):
    all but Ctrl-C's SIGINT, which stays Python's KeyboardInterrupt."""
    return [s for s in stop_signals() if s != signal.SIGINT]


#: In a state dir: the lock its server holds, and that server's process id (followed by
#: STOPPING_MARK once its stop has begun).
LOCK_FILE = "gradwire.lock"
STOPPING_MARK = "stopping"


def _lock_file(state_dir: Path) -> Any:
    """LOCK_FILE in `state_dir`, opened for reading and writing (made when missing), or
    InvalidInput (BAD_STATE_DIR) where it is not a plain file of its own: opened through a
    link, or a second name (a hard link) of another file, the server wrote its process id
    into that file; a FIFO or a folder failed with words of its own (found by reviews of
    checkpoints)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_NONBLOCK", 0)  # a FIFO there: opened, not waited on
    path = state_dir / LOCK_FILE
    why = ""
    try:
        descriptor = os.open(path, flags, 0o644)
    except OSError as err:
        if path.is_symlink():
            why = "a link"
        elif path.is_dir():
            why = "a folder"
        else:
            why = f"a file that cannot be opened ({err.strerror or err})"
    else:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            why = "not a plain file"
        elif status.st_nlink > 1:
            why = f"a second name of another file ({status.st_nlink} names: a hard link)"
        if why:
            os.close(descriptor)
        else:
            return open(descriptor, "r+")
    raise InvalidInput(
        f"--state-dir {state_dir}: its lock file {LOCK_FILE} is {why}, where the server keeps "
        "a plain file of its own: remove it",
        reason="BAD_STATE_DIR",
    )


class _StateDirHold:
    """The lock `hold_state_dir` takes, and takes again in a state dir made again."""

    def __init__(self, state_dir: Path, fcntl: Any) -> None:
        self.state_dir, self._fcntl, self._handle = state_dir, fcntl, None
        self._keeping = threading.Lock()  # two sessions' saves at once (a thread each on a GPU)
        self.take()

    def take(self) -> None:
        handle = _lock_file(self.state_dir)
        try:
            self._fcntl.flock(handle, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            pid, _, stopping = holder.partition(" ")
            if pid.isdigit() and stopping == STOPPING_MARK:
                # Its stop and save under way: a new folder would start from fresh weights,
                # and exit 2 stopped a supervisor that retries only what may pass (a review
                # of restarts). Exit 1, as for a port a server still stopping holds.
                raise OSError(
                    f"--state-dir {self.state_dir} is held by gradwire server process {pid}, "
                    "which is stopping (saving its state there): start this one once that "
                    "process has exited"
                ) from None
            by = f"process {holder}" if holder.isdigit() else "another process"
            raise InvalidInput(
                f"--state-dir {self.state_dir} is in use by another gradwire server ({by}): "
                "each server needs a folder of its own, or one would overwrite the other's "
                "state",
                reason="BAD_STATE_DIR",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        if self._handle is not None:
            self._handle.close()  # the lock on the removed folder's file, which guards nothing
        self._handle = handle

    def stopping(self) -> None:
        """Marks the lock file as held by a server stopping, for a server started meanwhile
        on the folder to say so (`take`). Written over the process id, which it begins
        with, in the space the file has: on a full disk too; a mark that fails is left
        unmade, the stop going on."""
        with self._keeping, contextlib.suppress(OSError):
            if self._handle is not None:
                self._handle.seek(0)
                self._handle.write(f"{os.getpid()} {STOPPING_MARK}\n")
                self._handle.flush()

    def keep(self) -> None:
        """Before a save: takes the lock again where the state dir's lock file is no longer
        the one this server holds (the folder removed, or made again), making the folder
        again when it is gone; InvalidInput (BAD_STATE_DIR) where another server holds it."""
        with self._keeping:
            assert self._handle is not None
            try:
                same = os.path.samestat(
                    os.fstat(self._handle.fileno()), os.lstat(self.state_dir / LOCK_FILE)
                )
            except OSError:
                same = False
            if not same:
                log.warning(
                    "the state directory %s (or its lock file) was removed while the server "
                    "ran: made again for the save, its lock taken again",
                    self.state_dir,
                )
                self.state_dir.mkdir(parents=True, exist_ok=True)
                self.take()

    def __enter__(self) -> _StateDirHold:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()


def hold_state_dir(state_dir: Path) -> contextlib.AbstractContextManager[_StateDirHold | None]:
    """Holds `state_dir` for this server until the context ends (or the process does):
    another server given it is refused at start (InvalidInput, BAD_STATE_DIR), naming the
    process that holds it. An advisory lock (flock) on LOCK_FILE, which stays behind; none
    where the platform has no flock. A state dir removed while the server runs is made
    again by its next save (checkpoint.saving_folder), which takes the lock again there:
    without it, a second server could start on the folder made again (found by a review
    of checkpoints)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return contextlib.nullcontext()
    hold = _StateDirHold(state_dir, fcntl)
    return _held(hold)


@contextlib.contextmanager
def _held(hold: _StateDirHold) -> Iterator[_StateDirHold]:
    with hold, checkpoint.held_by(hold.state_dir, hold.keep):
        yield hold


def describe_device(device: torch.device, asked: str = "auto") -> str:
    """The device, for the log at start: a GPU's name; for the CPU, whether no GPU was
    found, when the server was left to choose (`asked`): not after `--device cpu`."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    note = "" if asked != "auto" or torch.cuda.is_available() else " (no CUDA device found)"
    return f"{device}{note}"


def describe_threads(one_thread_for_small_work: bool, device: torch.device) -> str | None:
    """How steps use torch's threads, for the log at start; None on a GPU without the flag."""
    if device.type != "cpu":
        if one_thread_for_small_work:
            return f"--one-thread-for-small-work changes nothing on {device}: steps run there"
        return None
    threads = torch.get_num_threads()
    if not one_thread_for_small_work:
        return f"steps run on torch's {threads} threads"
    if not openmp.available():
        return f"steps run on torch's {threads} threads (OpenMP runtime not found)"
    return (
        f"steps under {ONE_THREAD_MAX_FLOPS / 1e6:.1f} MFLOP run on one thread "
        f"(--one-thread-for-small-work), larger ones on torch's {threads}"
    )


_P = ParamSpec("_P")


def exit_said_while_starting(signum: int, frame: FrameType | None) -> None:
    """SIGTERM or SIGHUP before `serve` has its own handler (the model building, a state
    restoring): said, then taken as Python's default takes it, the process ending by the
    signal, as a supervisor expects of it. It ended so without a word, the operator left
    to guess whether the server had started (a review of running the server, as an
    operator). Ctrl-C keeps Python's KeyboardInterrupt, which the CLI says."""
    log.info(
        "%s received while starting, before listening: exiting; nothing was served or saved",
        signal.Signals(signum).name,
    )
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    # Still here: the kernel dropped it. The first process of a PID namespace (a container's,
    # Docker's CMD: PID 1) is sent no signal whose action is the default, and the server
    # went on to listen and serve after saying it exited, until `docker stop` killed it a
    # stop_grace_period later (found by a review of restarts). As a shell reports the end
    # by the signal.
    logging.shutdown()
    os._exit(128 + signum)


def _said_while_starting(serve: Callable[_P, None]) -> Callable[_P, None]:
    """`serve`, with a stop signal received before it handles them said in the log."""

    @functools.wraps(serve)
    def serving(*args: _P.args, **kwargs: _P.kwargs) -> None:
        before = {s: signal.signal(s, exit_said_while_starting) for s in starting_signals()}
        try:
            serve(*args, **kwargs)
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)

    return serving


@_said_while_starting
def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    device: str = "auto",
    seed: int | None = None,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    port_file: Path | None = None,
    grace: float = DEFAULT_GRACE_S,
    token: str | None = None,
    tls: TlsFiles | None = None,
    state_dir: Path | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    session_idle_s: float = DEFAULT_IDLE_S,
    ready: Callable[[Running], None] | None = None,
    metrics_port: int | None = None,
    model: str | None = None,
    model_folder: Path | None = None,
    keep_freed: bool = True,
    one_thread_for_small_work: bool = False,
    connections: ServerConnections = ServerConnections(),
) -> None:
    """Runs a server in the foreground until SIGTERM, SIGHUP or Ctrl-C, then stops it
    gracefully; a second signal exits at once.

    With `state_dir`, the state is restored from it at start (when a checkpoint is there)
    and saved to it at a graceful stop. `model`: "package.module:attr" naming a ModelSpec
    (see models.load_spec); None serves the tutorial's Simple; `model_folder`: a folder
    its module may be imported from, while it loads. `keep_freed`: keep the memory
    a step frees for the next one (allocator.py; the process's malloc settings change).
    `one_thread_for_small_work`: run small steps on one thread on the CPU (openmp.py).
    `connections`: as `start` takes them, the limit on connections lowered where the limit
    on open files leaves less room (connections_within_open_files).
    """
    if metrics_port and metrics_port == port:
        # The metrics server binds first, and gRPC was then refused its port "in use (another
        # server on it?)", exit 1 for a supervisor to retry: no retry could pass (a review of
        # running the server, as an operator).
        raise InvalidInput(
            f"--metrics-port {metrics_port} is the port gRPC listens on (--port): give the "
            "metrics another port (0 picks a free one)",
            reason="BAD_METRICS_PORT",
        )
    opened = raise_open_files_limit()
    if opened is not None:
        log.info("open files: up to %s, each client connection takes one (was %s)", *opened)
    connections = connections_within_open_files(connections)
    log.info(
        "oneDNN keeps at most %s compiled CPU kernels (%s)",
        allocator.limit_onednn_cache(),
        allocator.ONEDNN_CACHE_VARIABLE,
    )
    if not keep_freed:
        log.info("memory a step frees goes back to the system (--return-freed-memory)")
    elif allocator.keep_freed_memory():
        log.info("memory a step frees is kept for the next step")
    else:
        log.info("memory a step frees goes back to the system (malloc settings not available)")
    # What the stop will need, checked before anything is built: found at the stop, a
    # training run's state was lost (a state dir it could not write, a port file's folder).
    if state_dir is not None:
        check_state_dir(state_dir)
    # Held until the server has stopped and saved: two servers that shared one state dir
    # each saved there at their stop, the last to stop overwriting the other's training.
    with contextlib.nullcontext() if state_dir is None else hold_state_dir(state_dir) as hold:
        if state_dir is not None:
            removed, size = checkpoint.clear_unfinished(state_dir)
            if removed:
                log.info(
                    "removed %d unfinished checkpoint file(s), %s bytes, left in %s by a save "
                    "cut short",
                    removed,
                    f"{size:,}",
                    state_dir,
                )
        if port_file is not None:
            check_port_file(port_file, host)
        if tls is not None:
            tls.check()
        spec = SIMPLE if model is None else load_spec(model, model_folder)
        resolved = resolve_device(device)
        trainer = Trainer(
            spec, device=resolved, seed=seed, one_thread_for_small_work=one_thread_for_small_work
        )
        threads = describe_threads(one_thread_for_small_work, resolved)
        if threads is not None:
            log.info("%s", threads)
        saved = None if state_dir is None else state_dir / checkpoint.FILE_NAME
        if saved is not None and saved.exists():
            # --seed's initialisation replaced: said, or `serve --seed 3` on a state dir
            # read as weights seeded 3 (found by a review of restarts and recovery).
            replaced = "" if seed is None else f", in place of the weights --seed {seed} gave"
            log.info("restored state version %d from %s%s", trainer.load(saved), saved, replaced)
        elif saved is not None:
            # Said, so that a fresh volume and a wrong mount read apart (an operator's
            # walkthrough: only a restore was logged).
            log.info(
                "no saved state in %s: fresh weights, saved there at a graceful stop", state_dir
            )
        stop = threading.Event()
        lost = threading.Event()

        def device_lost() -> None:
            lost.set()
            stop.set()

        serving_lost = threading.Event()

        def no_serving() -> None:
            serving_lost.set()
            stop.set()

        # Signals received, counted in one step: a handler can run inside another (Python runs
        # a pending one between any two bytecodes), and two that both saw "none yet" would both
        # be taken for the first.
        received = itertools.count()
        stopped = threading.Event()  # the stop, and its save, done
        # How the stop ends, and how a second signal ends it, for the log.
        then_saved, unsaved = (
            (", then the state saved", ", unsaved") if saved is not None else ("", "")
        )

        # The port the server listens on once started, for the port file's removal.
        listening: int | None = None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if next(received):  # a second signal: the operator will not wait for the stop
                log.warning(
                    "%s received again: exiting now, without waiting for the calls in progress%s",
                    name,
                    "; the state is NOT saved"
                    if saved is not None and not stopped.is_set()
                    else "",
                )
                # As the graceful stop does: the file named a dead port after this exit, and
                # sent its next reader there (a review of running the server for others).
                if port_file is not None and listening is not None:
                    forget_port(port_file, listening)
                logging.shutdown()
                os._exit(128 + signum)
            log.info(
                "%s received: stopping (grace %.1fs; a step running then is finished%s; a second "
                "signal exits at once%s)",
                name,
                grace,
                then_saved,
                unsaved,
            )
            stop.set()

        # Installed before the server starts: once it says it listens (and writes the port
        # file) a supervisor may send SIGTERM at once, and with Python's default still in
        # place the process died of it, its state unsaved (a CI run under load).
        handled = stop_signals()
        previous = {s: signal.signal(s, on_signal) for s in handled}
        if HANGUP is not None and HANGUP not in handled:
            log.info(
                "SIGHUP is ignored, as it was at start (nohup): a terminal closing does not "
                "stop this server; SIGTERM or Ctrl-C do"
            )
        try:
            running = start(
                trainer,
                host,
                port,
                max_concurrent,
                token=token,
                tls=tls,
                max_sessions=max_sessions,
                session_idle_s=session_idle_s,
                metrics_port=metrics_port,
                on_device_lost=device_lost,
                connections=connections,
                on_serving_lost=no_serving,
                state_dir=state_dir,
            )
            listening = running.port
            if tls is not None:
                who = (
                    "clients with a certificate from the client CA"
                    if tls.client_ca
                    else "any client"
                )
                until = tls.valid_until()
                log.info(
                    "TLS on (%s%s)",
                    who,
                    f"; certificate valid until {until:%Y-%m-%d}" if until else "",
                )
                for warning in tls.date_warnings():
                    log.warning("%s", warning)
                if not certificates_readable():
                    log.warning(
                        "the certificates' dates are not checked: the cryptography package "
                        "is not installed (gradwire's server extra has it)"
                    )
            if token:
                log.info("a bearer token is required for every call but health checks")
                if tls is None and not loopback_host(host):
                    # As for a token missing below: the clients' token crossed the network
                    # readable by anyone on the path, without a word (a security review,
                    # sixty-second session). Said, not refused: a trusted network needs none.
                    log.warning(
                        "listening on %s with a token but without TLS: the token crosses the "
                        "network in plain text with every call, and anyone on the path can read "
                        "it and use it (and read every tensor); serve TLS: --tls-cert and "
                        "--tls-key",
                        host,
                    )
            elif tls is not None and tls.client_ca is not None:
                # Mutual TLS lets in only clients holding a certificate the client CA signed:
                # the warning below, which said anyone could, sent an operator whose access
                # control was in place looking for a hole (a review of running the server).
                log.info(
                    "no bearer token: every client with a certificate from the client CA can "
                    "drive and read the model"
                )
            elif not loopback_host(host):
                log.warning(
                    "listening on %s without a token: anyone who reaches this port can drive "
                    "and read the model; set --token-file or GRADWIRE_TOKEN",
                    host,
                )
            if port_file is not None:
                try:
                    write_port_file(port_file, running.port)
                except OSError as err:
                    running.stop(None)
                    raise OSError(
                        f"--port-file {port_file}: cannot write it: {err.strerror or err}"
                    ) from None
            # The instance: which server counted the state versions a caller read (one
            # started again counts afresh), for an operator matching refusals to restarts.
            log.info(
                "model %s on %s (gradwire %s, torch %s, instance %s)",
                trainer.spec.name,
                describe_device(resolved, device),
                gradwire.__version__,
                torch.__version__,
                running.servicer.instance_id,
            )
            # gRPC binds 0.0.0.0 (and ::) on both families: said, for an operator whose
            # firewall covers IPv4 only (found by a review of deployment), or IPv6 only: ::
            # was said to listen on "IPv6 too", and IPv4 went unmentioned (a review of
            # running the server for others).
            both = {"0.0.0.0": " (IPv6 too, where this machine has it)", "::": " (IPv4 too)"}
            also = both.get(host, "")
            log.info(
                "listening on %s%s (health and reflection on)", _address(host, running.port), also
            )
            if running.metrics_port is not None:
                log.info("metrics on http://%s/metrics", _address(host, running.metrics_port))
                if not loopback_host(host):
                    # The token guards gRPC alone: a non-local metrics port was opened to
                    # everyone without a word (a security review, sixty-second session).
                    log.warning(
                        "metrics on %s need no token: anyone who reaches that port reads this "
                        "server's metrics (call counts by method and status, the model version, "
                        "sessions open, memory); keep it behind a firewall that lets in your "
                        "scraper alone",
                        _address(host, running.metrics_port),
                    )
            # --log-level warning hid the only lines saying the ports 0 picked, and without
            # a port file nothing else said them (a review of running the server).
            picked = []
            if port == 0 and port_file is None:
                picked.append(f"listening on port {running.port}, picked by --port 0")
            if metrics_port == 0:
                picked.append(f"metrics on port {running.metrics_port}, picked by --metrics-port 0")
            if picked and not log.isEnabledFor(logging.INFO):
                log.warning(
                    "%s; the log level hides the other start lines (--port-file writes the "
                    "gRPC port to a file)",
                    "; ".join(picked),
                )
            try:
                if ready is not None:
                    ready(running)
                wait_for(stop)
            finally:
                if hold is not None:
                    hold.stopping()
                # A call still running past the grace period (a long step) holds the stop: the
                # state is saved after it. Said once, so that the operator knows what is being
                # waited for.
                waiting = threading.Timer(
                    grace + STOP_NOTICE_S,
                    log.warning,
                    (
                        "still stopping %.0fs after the grace period: a call in progress (a long "
                        "step?) is waited for%s; a second signal exits now%s",
                        STOP_NOTICE_S,
                        then_saved,
                        unsaved,
                    ),
                )
                waiting.daemon = True
                with contextlib.suppress(RuntimeError):  # no thread can start: the stop goes on
                    waiting.start()
                try:
                    # After a device error nothing is saved: the device's state can no longer
                    # be read. The notice is for calls waited for: the save is not one (its
                    # 22 s of a large model were said to be "a call in progress": a review).
                    running.stop(
                        grace, save_to=None if lost.is_set() else saved, saving=waiting.cancel
                    )
                    stopped.set()
                except OSError as err:  # the save failed
                    if not serving_lost.is_set():
                        raise
                    raise ServingLost(f"{SERVING_LOST}; {err}") from None
                finally:
                    waiting.cancel()
                    # The port is no one's now: a file naming it would send the next reader
                    # to a dead port (an operator's walkthrough). Left if it names another.
                    if port_file is not None:
                        forget_port(port_file, running.port)
                log.info("stopped at state version %d", trainer.version)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if serving_lost.is_set():
            kept = "" if saved is None or lost.is_set() else f"; the state is saved to {saved}"
            raise ServingLost(f"{SERVING_LOST}{kept}; restart the server")
        if lost.is_set():
            raise DeviceLost(
                "stopped after an error the device does not recover from (see the log above); "
                "a restart gets a fresh device context"
            )
