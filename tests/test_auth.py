"""Who gets in: bearer tokens (health exempt), TLS and mutual TLS, through real channels."""

from __future__ import annotations

import datetime
import functools
import io
import ipaddress
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import gradwire
from gradwire import errors
from gradwire._pb import trainer_pb2 as pb
from gradwire._pb import trainer_pb2_grpc as pb_grpc
from gradwire.cli import main
from gradwire.credentials import load_token
from gradwire_server.app import Running, start
from gradwire_server.auth import Refusals, TlsFiles
from gradwire_server.errors import InvalidInput
from gradwire_server.trainer import Trainer
from tests.cli_run import run_main
from tests.serve_process import serving

TOKEN = "correct horse battery staple"


@pytest.fixture
def guarded(trainer: Trainer) -> Iterator[Running]:
    running = start(trainer, "127.0.0.1", 0, token=TOKEN)
    yield running
    running.stop(grace=None)


def _address(running: Running) -> str:
    return f"127.0.0.1:{running.port}"


def test_calls_without_the_token_are_unauthenticated(guarded: Running) -> None:
    with gradwire.connect(_address(guarded)) as client:
        with pytest.raises(errors.Unauthenticated, match="this server needs a token") as info:
            client.list_tensors()
        assert info.value.reason == "NO_TOKEN"  # an ErrorInfo, as every other error has
        assert "gradwire.connect(token=...) in Python" in info.value.message  # not only CLI's
        with pytest.raises(errors.Unauthenticated):
            client.get("conv1.weight")
        with pytest.raises(errors.Unauthenticated):  # streamed calls too
            client._read_stream(pb.GetTensorRequest(name="conv1.weight"), as_torch=False)
        client.stream_above_bytes = 0
        with pytest.raises(errors.Unauthenticated):
            client.set("conv1.weight", np.zeros((16, 3, 3, 3), np.float32))
        assert client.health() == "SERVING"  # health checks need no token
    assert guarded.trainer.version == 0


def test_a_wrong_token_is_refused(guarded: Running) -> None:
    with (
        gradwire.connect(_address(guarded), token="guess") as client,
        pytest.raises(errors.Unauthenticated, match="not this server's") as info,
    ):
        client.step()
    assert info.value.reason == "BAD_TOKEN"


def test_refused_calls_are_logged_at_most_once_a_minute(
    guarded: Running, caplog: pytest.LogCaptureFixture
) -> None:
    # A client with the wrong token left no trace in the log at INFO (an operator's
    # walkthrough); one a call would let anyone who tries tokens flood it.
    caplog.set_level(logging.INFO, logger="gradwire_server.auth")
    with gradwire.connect(_address(guarded), token="guess") as client:
        for _ in range(3):
            with pytest.raises(errors.Unauthenticated):
                client.list_tensors()
    lines = [r for r in caplog.records if r.name == "gradwire_server.auth"]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
    assert (
        lines[0]
        .getMessage()
        .startswith(
            "refused a call without this server's token (BAD_TOKEN): "
            # The client's first: it reads the server's instance before its first call.
            "/gradwire.v1.Trainer/GetServerInfo from ipv4:127.0.0.1:"
        )
    )


def test_refusals_between_two_lines_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gradwire_server.auth")
    now = [0.0]
    refusals = Refusals(every_s=60.0, clock=lambda: now[0])
    refusals.note("NO_TOKEN", "/m", "peer-1")
    for t in (1.0, 30.0, 59.0):
        now[0] = t
        refusals.note("BAD_TOKEN", "/m", "peer-2")
    now[0] = 61.0
    refusals.note("BAD_TOKEN", "/n", "peer-3")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused a call without this server's token (NO_TOKEN): /m from peer-1; more are "
        "counted here at most once a minute",
        "refused 4 calls without this server's token in the last 61 s, the last (BAD_TOKEN): "
        "/n from peer-3",
    ]


def test_a_refusal_a_minute_after_the_last_line_is_logged_and_counted_as_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The minute is the least between two lines (not more), the seconds are since the
    last line (not since the clock's start), and one call is one call."""
    caplog.set_level(logging.INFO, logger="gradwire_server.auth")
    now = [100.0]
    refusals = Refusals(every_s=60.0, clock=lambda: now[0])
    refusals.note("NO_TOKEN", "/m", "peer-1")
    now[0] = 160.0
    refusals.note("BAD_TOKEN", "/n", "peer-2")
    assert [r.getMessage() for r in caplog.records][1:] == [
        "refused 1 call without this server's token in the last 60 s, the last (BAD_TOKEN): "
        "/n from peer-2"
    ]


def test_an_unknown_method_without_the_token_is_unimplemented(guarded: Running) -> None:
    """As without a token: which methods there are is no secret, and a refusal needs a
    handler to answer with."""
    with (
        grpc.insecure_channel(_address(guarded)) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        no_such: Any = channel.unary_unary("/gradwire.v1.Trainer/NoSuchMethod")
        no_such(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_right_token_opens_every_call(guarded: Running) -> None:
    with gradwire.connect(_address(guarded), token=TOKEN) as client:
        assert client.list_tensors().model == "Simple"
        client.fill_parameters(0.1)
        client.stream_above_bytes = 0
        client.chunk_bytes = 1000
        client.set("conv1.weight", np.full((16, 3, 3, 3), 0.5, np.float32))
        assert client.get("conv1.weight[0][0][0]").tolist() == [0.5, 0.5, 0.5]


def test_call_credentials_on_a_plaintext_channel_are_refused_by_the_client_itself(
    guarded: Running,
) -> None:
    """gRPC's call credentials, which send this very header (C++'s AccessTokenCredentials,
    Python's access_token_call_credentials), go only over TLS or gRPC's local credentials:
    on a plaintext channel the client library refuses the call before it leaves,
    UNAUTHENTICATED with no ErrorInfo. A C++ client built from trainer.proto took that for
    the server's refusal and looked for NO_TOKEN; the contract named only NO_TOKEN and
    BAD_TOKEN (found by a review of the .proto as the only contract, compiled and called
    from C++)."""
    root = Path(__file__).resolve().parents[1]
    contract = (root / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    assert "gRPC's call credentials that send it (C++'s AccessTokenCredentials" in said
    credentials = grpc.access_token_call_credentials(TOKEN)
    with grpc.insecure_channel(_address(guarded)) as channel:
        stub = pb_grpc.TrainerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ZeroGrad(pb.ZeroGradRequest(), credentials=credentials, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "sufficient security level" in info.value.details()
    assert "grpc-status-details-bin" not in dict(info.value.trailing_metadata() or ())
    local = grpc.composite_channel_credentials(grpc.local_channel_credentials(), credentials)
    with grpc.secure_channel(_address(guarded), local) as channel:
        assert pb_grpc.TrainerStub(channel).ZeroGrad(pb.ZeroGradRequest(), timeout=10).version
    assert guarded.trainer.version == 1  # the second call's alone


NOT_IT = "the token sent is not this server's"
HOW = "send 'authorization: Bearer <token>'"
NO_SCHEME = f"the authorization does not begin with 'Bearer ': {HOW}"
NO_TOKEN = f"no token after 'Bearer': {HOW}"


@pytest.mark.parametrize(
    ("header", "said"),
    [
        (f"Bearer {TOKEN}", None),
        (f"bearer {TOKEN}", None),  # an HTTP scheme's case does not count (RFC 7235)
        (f"BEARER  {TOKEN}", None),  # nor the spaces after it
        (f"Bearer {TOKEN} ", NOT_IT),  # the token is compared whole
        ("Bearer guess", NOT_IT),
        # Each said "the token sent is not this server's", of a token perhaps right (found by
        # a review of the contract from another language). Nothing of the header is quoted:
        # TOKEN's first word would read as a scheme.
        (f"Basic {TOKEN}", NO_SCHEME),
        (f"Bearer{TOKEN}", NO_SCHEME),
        (TOKEN, NO_SCHEME),
        ("Bearer ", NO_TOKEN),
        ("bearer   ", NO_TOKEN),
        ("Bearer", NO_TOKEN),
    ],
)
def test_the_token_s_scheme_is_read_as_http_reads_it(
    guarded: Running, header: str, said: str | None
) -> None:
    with grpc.insecure_channel(_address(guarded)) as channel:
        list_tensors = channel.unary_unary("/gradwire.v1.Trainer/ListTensors")
        call = functools.partial(
            list_tensors,
            pb.ListTensorsRequest().SerializeToString(),
            metadata=[("authorization", header)],
            timeout=10,
        )
        if said is None:
            assert pb.ListTensorsResponse.FromString(call()).model == "Simple"
            return
        with pytest.raises(grpc.RpcError) as info:
            call()
    error = errors.from_rpc_error(info.value)
    assert isinstance(error, errors.Unauthenticated) and error.reason == "BAD_TOKEN"
    assert error.message == said


@pytest.mark.parametrize("order", ["wrong first", "right first", "right twice"])
def test_authorization_given_twice_is_refused(guarded: Running, order: str) -> None:
    """Which of two tokens counts would be a guess: the last was read, so a right token sent
    after a wrong one (or after one a proxy added) got in."""
    right, wrong = f"Bearer {TOKEN}", "Bearer guess"
    tokens = {
        "wrong first": [wrong, right],
        "right first": [right, wrong],
        "right twice": [right, right],
    }[order]
    with grpc.insecure_channel(_address(guarded)) as channel:
        zero_grad = channel.unary_unary("/gradwire.v1.Trainer/ZeroGrad")
        with pytest.raises(grpc.RpcError) as info:
            zero_grad(
                pb.ZeroGradRequest().SerializeToString(),
                metadata=[("authorization", t) for t in tokens],
                timeout=10,
            )
    error = errors.from_rpc_error(info.value)
    assert isinstance(error, errors.Unauthenticated)
    assert (error.reason, error.message) == (
        "BAD_TOKEN",
        "authorization is given 2 times; send one token",
    )
    assert guarded.trainer.version == 0


def test_the_contract_says_how_go_refuses_call_credentials_on_a_plaintext_channel() -> None:
    """The test above holds for gRPC's C core (C++, Python); Go's grpc-go refuses sooner
    and in its own words: grpc.Dial with grpc.WithPerRPCCredentials of credentials that
    require transport security (oauth's) fails, "grpc: the credentials require transport
    level security", before any call, and a call given them with grpc.PerRPCCredentials is
    UNAUTHENTICATED, "transport: cannot send secure credentials on an insecure connection"
    (grpc-go 1.33, against this server). The contract quoted the C core's message alone, for
    a refused call, and a Go team met a failed Dial instead (found by a review of the .proto
    as the only contract, compiled and called from Go)."""
    root = Path(__file__).resolve().parents[1]
    contract = (root / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    assert "grpc.WithPerRPCCredentials" in said
    assert 'the Dial itself fails ("the credentials require transport level security")' in said
    assert "cannot send secure credentials on an insecure connection" in said


def test_reflection_needs_the_token_too(guarded: Running) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(_address(guarded)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_takes_the_token_from_a_file_or_the_environment(
    guarded: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = ["--target", _address(guarded)]
    err = io.StringIO()
    assert main(["list", *target], io.StringIO(), err) == 1
    assert err.getvalue().startswith("error: UNAUTHENTICATED:")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert main(["list", *target, "--token-file", str(token_file)], io.StringIO()) == 0
    monkeypatch.setenv("GRADWIRE_TOKEN", TOKEN)
    assert main(["list", *target], io.StringIO()) == 0
    empty = tmp_path / "empty"
    empty.write_text("\n")
    err = io.StringIO()
    assert main(["list", *target, "--token-file", str(empty)], io.StringIO(), err) == 2
    assert "is empty" in err.getvalue()


@pytest.mark.parametrize("command", ["list", "serve"])
def test_a_token_variable_of_white_space_only_is_refused_as_an_empty_file_is(
    guarded: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """GRADWIRE_TOKEN holding white space only was taken for no token, where a token file
    of white space only is refused: a client sent none, and a server started guarded by
    none (found by a review of the CLI as a researcher). A variable set empty is no token,
    as an unset one."""
    argv = ["serve", "--port", "0", "--device", "cpu"] if command == "serve" else ["list"]
    target = [] if command == "serve" else ["--target", _address(guarded)]
    monkeypatch.setenv("GRADWIRE_TOKEN", " \n")
    err = io.StringIO()
    assert main([*argv, *target], io.StringIO(), err) == 2
    assert err.getvalue() == (
        f"gradwire {command}: error: $GRADWIRE_TOKEN is empty (white space only): export the "
        "token itself, or unset it (unset GRADWIRE_TOKEN) for no token\n"
    )
    monkeypatch.setenv("GRADWIRE_TOKEN", "")
    assert load_token(None) is None
    token_file = _secret_file(tmp_path)  # a file given: the variable is not read
    monkeypatch.setenv("GRADWIRE_TOKEN", " ")
    assert load_token(token_file) == TOKEN


def test_a_wrong_token_from_the_environment_is_said_to_come_from_there(
    guarded: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale export of GRADWIRE_TOKEN: the error did not say where the token came from
    (found by a review of the CLI). A wrong --token-file names its file itself."""
    target = ["--target", _address(guarded)]
    monkeypatch.setenv("GRADWIRE_TOKEN", "not-" + TOKEN)
    err = io.StringIO()
    assert main(["list", *target], io.StringIO(), err) == 1
    assert err.getvalue().startswith("error: UNAUTHENTICATED:")
    assert "hint: the token came from $GRADWIRE_TOKEN" in err.getvalue()
    token_file = tmp_path / "token"
    token_file.write_text("not-" + TOKEN)
    err = io.StringIO()
    assert main(["list", *target, "--token-file", str(token_file)], io.StringIO(), err) == 1
    assert "hint:" not in err.getvalue()


@pytest.mark.parametrize(
    ("command", "flag"), [("list", "--token-file"), ("list", "--tls-ca"), ("serve", "--token-file")]
)
def test_a_file_that_cannot_be_read_is_named_with_its_option(
    tmp_path: Path, command: str, flag: str
) -> None:
    """ "[Errno 2] No such file or directory: 'nope'" named neither the option nor what was
    wrong with the file (found by a review of the CLI). The server's TLS files have their
    own check (TlsFiles.check)."""
    argv = ["--port", "0"] if command == "serve" else ["--target", "127.0.0.1:1"]
    unread = [
        (tmp_path / "nope", "No such file or directory"),
        (tmp_path, "it is a folder, not a file"),
    ]
    for path, why in unread:
        err = io.StringIO()
        assert main([command, *argv, flag, str(path)], io.StringIO(), err) == 2
        assert (
            err.getvalue() == f"gradwire {command}: error: {flag} {path}: cannot read it ({why})\n"
        )


def test_a_token_from_the_environment_is_stripped_as_one_from_a_file(
    trainer: Trainer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret ends in a newline as often as not. Kept in GRADWIRE_TOKEN, the server wanted
    a token no client could send, and a client with the same variable failed every call
    INTERNAL ("Invalid metadata"): a compose healthcheck never turned healthy."""
    monkeypatch.setenv("GRADWIRE_TOKEN", TOKEN + "\n")
    running = start(trainer, "127.0.0.1", 0, token=load_token(None))
    try:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        target = ["--target", _address(running)]
        assert main(["list", *target, "--token-file", str(token_file)], io.StringIO()) == 0
        assert main(["list", *target], io.StringIO()) == 0  # the variable, stripped
    finally:
        running.stop(grace=None)


def test_the_python_clients_token_is_stripped_as_one_from_a_file(
    trainer: Trainer, tmp_path: Path
) -> None:
    """`connect(token=open(path).read())`, the natural way to read the README's token file,
    raised ValueError for the file's last newline, where the command line drops it (found by
    a newcomer's walkthrough). White space around the token goes; white space alone is
    still refused rather than sent as no token at all."""
    running = start(trainer, "127.0.0.1", 0, token=TOKEN)
    try:
        token_file = tmp_path / "token"
        token_file.write_text(f" {TOKEN}\n")
        with gradwire.connect(_address(running), token=token_file.read_text()) as client:
            assert "conv1.weight" in client.list_tensors().names()
        with pytest.raises(ValueError, match=r"token= is no token gRPC can send: .* nothing"):
            gradwire.Client(_address(running), token="\n")
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize(
    ("token", "holds"),
    [("two\nlines", repr("\n")), ("caf\u00e9", repr("\u00e9")), ("tab\tbed", repr("\t"))],
)
def test_a_token_no_header_can_carry_is_refused_where_it_is_given(
    trainer: Trainer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str, holds: str
) -> None:
    """Refused where it is given, naming what is wrong: `serve` exits 2, the Python client
    raises ValueError when made. Taken, the server started wanting a token nobody could send,
    and a client failed every call INTERNAL ("Invalid metadata")."""
    said = f"is no token gRPC can send: one line of printable ASCII .* it holds {re.escape(holds)}"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    err = io.StringIO()
    argv = ["serve", "--port", "0", "--device", "cpu", "--token-file", str(token_file)]
    assert main(argv, io.StringIO(), err) == 2
    assert re.search(f"the token in {re.escape(str(token_file))} {said}", err.getvalue())
    monkeypatch.setenv("GRADWIRE_TOKEN", token)
    err = io.StringIO()
    assert main(["list", "--target", "127.0.0.1:1"], io.StringIO(), err) == 2
    assert re.search(f"GRADWIRE_TOKEN {said}", err.getvalue())
    with pytest.raises(ValueError, match=f"token= {said}"):
        gradwire.Client("127.0.0.1:1", token=token)
    with pytest.raises(ValueError, match=f"the server token {said}"):
        start(trainer, "127.0.0.1", 0, token=token)


def test_a_token_too_long_for_grpcs_headers_is_refused_where_it_is_given(
    trainer: Trainer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server started with a 20,000-character token took it without a word, and gRPC then
    refused every call that carried it ("received metadata size exceeds hard limit"); at
    9,000 characters, 1 call in 6, at random (found by a review of running the server for
    others). A token file is read only so far: /dev/zero filled the memory and ended in a
    MemoryError's traceback."""
    token = "a" * 4097
    said = "is 4,097 characters long, past the 4,096 a token may have"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    err = io.StringIO()
    argv = ["serve", "--port", "0", "--device", "cpu", "--token-file", str(token_file)]
    assert main(argv, io.StringIO(), err) == 2
    assert f"the token in {token_file} {said}" in err.getvalue()
    monkeypatch.setenv("GRADWIRE_TOKEN", token)
    err = io.StringIO()
    assert main(["list", "--target", "127.0.0.1:1"], io.StringIO(), err) == 2
    assert f"GRADWIRE_TOKEN {said}" in err.getvalue()
    with pytest.raises(ValueError, match=f"token= {said}"):
        gradwire.Client("127.0.0.1:1", token=token)
    with pytest.raises(ValueError, match=f"the server token {said}"):
        start(trainer, "127.0.0.1", 0, token=token)
    monkeypatch.delenv("GRADWIRE_TOKEN")
    endless = Path("/dev/zero")
    if endless.exists():
        err = io.StringIO()
        argv = ["serve", "--port", "0", "--device", "cpu", "--token-file", str(endless)]
        assert main(argv, io.StringIO(), err) == 2
        assert "--token-file /dev/zero: it holds more than 65,536 bytes" in err.getvalue()
    # A file of exactly 65,536 bytes (the token, then line ends) is read; one more is not.
    token_file.write_text("a" * 4096 + "\n" * (64 * 1024 - 4096))
    token_file.chmod(0o600)
    assert load_token(token_file) == "a" * 4096
    token_file.write_text("a" * 4096 + "\n" * (64 * 1024 - 4096 + 1))
    with pytest.raises(ValueError, match="holds more than 65,536 bytes"):
        load_token(token_file)
    with gradwire.Client("127.0.0.1:1", token="a" * 4096):  # the longest taken
        pass


def _shared(token_file: Path, mode: str, can: str) -> str:
    return (
        f"--token-file {token_file} can be {can} ({mode}): they can use the token; make it "
        f"yours alone: chmod 600 {token_file} (a mounted secret: its mode, "
        "such as Kubernetes' defaultMode 0400)"
    )


def test_a_token_file_others_can_read_or_write_is_warned_of(
    guarded: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token file at -rw-r--r-- was taken without a word (a security review, sixty-second
    session). Now a TokenFileWarning naming the file and `chmod 600`; the command says it as
    one line, and goes on. Execute bits give nothing away; no POSIX modes, nothing said."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    target = ["--target", _address(guarded)]
    for mode, shown, said in [
        (0o644, "-rw-r--r--", "read by its group and other users"),
        (0o604, "-rw----r--", "read by other users"),
        (0o640, "-rw-r-----", "read by its group"),
    ]:
        token_file.chmod(mode)
        err = io.StringIO()
        assert main(["list", *target, "--token-file", str(token_file)], io.StringIO(), err) == 0
        assert err.getvalue() == f"gradwire list: warning: {_shared(token_file, shown, said)}\n"
    token_file.chmod(0o622)
    with pytest.warns(gradwire.TokenFileWarning) as caught:
        assert load_token(token_file) == TOKEN
    assert str(caught[0].message) == (
        f"--token-file {token_file} can be written by its group and other users (-rw--w--w-): "
        f"they can put a token of their own in it; make it yours alone: chmod 600 {token_file} "
        "(a mounted secret: its mode, such as Kubernetes' defaultMode 0400)"
    )
    assert caught[0].filename == __file__  # the caller's line
    token_file.chmod(0o620)  # its group may write, not read
    with pytest.warns(
        gradwire.TokenFileWarning, match=r"can be written by its group \(-rw--w----\)"
    ):
        assert load_token(token_file) == TOKEN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in (0o600, 0o400, 0o711):
            token_file.chmod(mode)
            assert load_token(token_file) == TOKEN
        token_file.chmod(0o666)
        with monkeypatch.context() as windows:
            windows.setattr(os, "name", "nt")
            assert load_token(token_file) == TOKEN
        # Not a plain file: a pipe or a terminal (/dev/stdin at a prompt is crw--w----), whose
        # mode says nothing of who can read a token kept on disk.
        pipe = tmp_path / "pipe"
        os.mkfifo(pipe)
        pipe.chmod(0o666)
        writer = threading.Thread(target=pipe.write_text, args=(TOKEN + "\n",), daemon=True)
        writer.start()
        try:
            assert load_token(pipe) == TOKEN
        finally:
            writer.join(10)


def test_serve_logs_a_warning_for_a_token_file_others_can_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    with serving("--token-file", str(token_file)) as (_, log):
        pass
    (warning,) = [line for line in log.splitlines() if " WARNING " in line]
    said = _shared(token_file, "-rw-r--r--", "read by its group and other users")
    assert warning.endswith(f" WARNING gradwire.cli: {said}"), log


def test_a_token_file_s_white_space_and_odd_bytes_are_read_as_a_token_variable_s_are(
    tmp_path: Path,
) -> None:
    """A token file written on Windows ends in CRLF, and one made by hand may have spaces or
    a tab around the token: all of it goes, as around the variable's. Bytes that are not
    UTF-8 are refused as a token gRPC cannot send, naming what they were read as, not with
    Python's UnicodeDecodeError."""
    token_file = _secret_file(tmp_path)
    token_file.write_bytes(f" \t{TOKEN} \r\n".encode())
    assert load_token(token_file) == TOKEN
    token_file.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError) as refused:
        load_token(token_file)
    assert str(refused.value).startswith(f"the token in {token_file} is no token gRPC can send:")
    assert str(refused.value).endswith(f"it holds {chr(0xFFFD)!r}")


def test_a_token_variable_of_spaces_or_tabs_alone_is_refused_and_another_may_be_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """White space without a line end is no token either; and `env` names the variable
    read, stripped and checked as GRADWIRE_TOKEN is."""
    for blank in ("  ", "\t"):
        monkeypatch.setenv("GRADWIRE_TOKEN", blank)
        with pytest.raises(ValueError, match=r"^\$GRADWIRE_TOKEN is empty \(white space only\)"):
            load_token(None)
    monkeypatch.delenv("GRADWIRE_TOKEN")
    monkeypatch.setenv("GRADWIRE_TEST_TOKEN", f" {TOKEN}\n")
    assert load_token(None, env="GRADWIRE_TEST_TOKEN") == TOKEN
    assert load_token(None) is None
    monkeypatch.setenv("GRADWIRE_TEST_TOKEN", "two\nlines")
    with pytest.raises(ValueError, match=r"^GRADWIRE_TEST_TOKEN is no token gRPC can send"):
        load_token(None, env="GRADWIRE_TEST_TOKEN")


def test_a_token_file_others_can_both_read_and_write_is_warned_of_both(tmp_path: Path) -> None:
    token_file = _secret_file(tmp_path)
    token_file.chmod(0o606)
    with pytest.warns(gradwire.TokenFileWarning) as caught:
        assert load_token(token_file) == TOKEN
    assert str(caught[0].message).startswith(
        f"--token-file {token_file} can be read or written by other users (-rw----rw-): they "
        "can use the token and put a token of their own in it; make it yours alone: chmod 600 "
    )


def test_a_token_of_one_or_two_characters_or_any_printable_ascii_is_taken(
    trainer: Trainer,
) -> None:
    """What a header carries, at its edges: a token of one character, of two, with a space
    inside, and `!` and `~`, the first and last printable ASCII past the space."""
    for token in ("a", "ab", "!a b~"):
        running = start(trainer, "127.0.0.1", 0, token=token)
        try:
            with gradwire.connect(_address(running), token=token) as client:
                assert client.list_tensors().model == "Simple"
        finally:
            running.stop(grace=None)


@pytest.mark.parametrize(
    ("token", "holds"),
    [
        (" lead", "a space at an end"),
        ("trail ", "a space at an end"),
        ("de\x7fl", repr("\x7f")),  # DEL, past `~`: no printable ASCII, inside
        ("~~\t~", repr("\t")),  # the first character past printable ASCII, not a `~` before it
    ],
)
def test_a_server_token_with_a_space_at_an_end_or_a_control_character_is_refused(
    trainer: Trainer, token: str, holds: str
) -> None:
    """The server's token is taken as given, not stripped (the command line strips what it
    reads): a space at either end, which gRPC drops from a header, is refused, and so is
    DEL, naming what the token holds."""
    said = "the server token is no token gRPC can send: one line of printable ASCII "
    with pytest.raises(ValueError) as refused:
        start(trainer, "127.0.0.1", 0, token=token)
    assert str(refused.value).startswith(said)
    assert str(refused.value).endswith(f"and it holds {holds}")


def test_a_token_that_is_not_a_str_is_refused_naming_its_type() -> None:
    with pytest.raises(TypeError, match=r"^token= must be a str, got bytes$"):
        gradwire.Client("127.0.0.1:1", token=b"secret")  # type: ignore[arg-type]


# --- a token in plain text over the network --------------------------------------------------

#: A target naming the server on loopback, then an address off this machine (TEST-NET-1,
#: never routed): gRPC connects to the first, so calls are answered, and the target is not
#: loopback alone.
OFF_THE_MACHINE = "ipv4:127.0.0.1:{port},192.0.2.1:{port}"


def _secret_file(folder: Path, token: str = TOKEN) -> Path:
    """A token file only its owner can read, as the README makes it."""
    path = folder / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def test_a_token_sent_off_the_machine_without_tls_is_warned_of_once_and_sent(
    guarded: Running, tmp_path: Path
) -> None:
    """`connect(target, token=...)` to a host off this machine without TLS sent the token
    readable by anyone on the path, without a word (a security review, sixty-second
    session). Now a PlaintextTokenWarning, once per client, as it is made; the calls go on."""
    target = OFF_THE_MACHINE.format(port=guarded.port)
    with pytest.warns(gradwire.PlaintextTokenWarning) as caught:
        client = gradwire.connect(target, token=TOKEN, timeout=10)
    with client:
        for _ in range(3):
            assert client.list_tensors().model == "Simple"
    (warning,) = caught
    assert str(warning.message) == (
        f"the bearer token goes to {target} without TLS, in plain text: anyone on the network "
        "between can read it and use it, and read every tensor; connect with TLS (Python: "
        "tls=True, ca=...; the command: --tls, --tls-ca), or on a network you trust, ignore "
        "this warning"
    )
    assert warning.filename == __file__  # the line that made the client, not gradwire's
    err = io.StringIO()
    argv = ["list", "--target", target, "--token-file", str(_secret_file(tmp_path))]
    assert main(argv, io.StringIO(), err) == 0
    assert err.getvalue() == f"gradwire list: warning: {warning.message}\n"


@pytest.mark.parametrize(
    "target",
    ["localhost:50051", "127.0.0.1:1", "127.1.2.3:1", "[::1]:1", "dns:///localhost:1",
     "ipv4:127.0.0.1:1,127.0.0.2:1", "unix:/tmp/gradwire.sock", "unix-abstract:gradwire",
     # a host's name in any case, and IPv4's loopback written as IPv6 (which Python before
     # 3.13 takes for no loopback)
     "LocalHost:1", "[::ffff:127.0.0.1]:1"],
)  # fmt: skip
def test_a_token_to_this_machine_or_over_tls_is_not_warned_of(target: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradwire.Client(target, token=TOKEN).close()
        gradwire.Client("gpu-box:50051", token=TOKEN, tls=True).close()
        gradwire.Client("gpu-box:50051").close()  # no token, nothing to read


@pytest.mark.parametrize(
    "target",
    ["gpu-box:50051", "10.0.0.5:1", "[2001:db8::1]:1", "dns:///gpu-box:1", "xds:///gw",
     # one address of a list off the machine; a name with a path, a loopback host before it
     "ipv4:127.0.0.1:1,10.0.0.5:1", "[::1]/gw"],
)  # fmt: skip
def test_a_token_to_any_other_target_is_warned_of(target: str) -> None:
    with pytest.warns(gradwire.PlaintextTokenWarning, match=f"goes to {re.escape(target)} "):
        gradwire.Client(target, token=TOKEN).close()


def test_serve_warns_that_a_token_without_tls_crosses_the_network_in_plain_text(
    pki: Pki, tmp_path: Path
) -> None:
    """`serve --host 0.0.0.0 --token-file tok` without TLS said only that a token is
    required (a security review, sixty-second session), where a non-local host without a
    token is warned of. Under TLS, no warning."""
    token = ("--token-file", str(_secret_file(tmp_path)))
    with serving("--host", "0.0.0.0", *token) as (_, log):
        pass
    (warning,) = [line for line in log.splitlines() if " WARNING " in line]
    assert warning.endswith(
        "listening on 0.0.0.0 with a token but without TLS: the token crosses the network in "
        "plain text with every call, and anyone on the path can read it and use it (and read "
        "every tensor); serve TLS: --tls-cert and --tls-key"
    )
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with serving("--host", "0.0.0.0", *token, *tls) as (_, log):
        pass
    assert "plain text" not in log, log  # (the test CA's certificates expire in a day: warned)


# --- TLS ------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of these


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, server: bool = False,
    expired: bool = False, days: int = 1, names: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:  # valid for a day that has passed
        now -= datetime.timedelta(days=2)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        sans: list[x509.GeneralName] = []
        for text in names:  # a server's names: an IP address's SAN is of its own kind
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(text)))
            except ValueError:
                sans.append(x509.DNSName(text))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def make_pki(folder: Path, *, expired_client: bool = False) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate it
    signed (expired, with `expired_client`), and another CA, as PEM files in `folder`."""
    ca_key, other_key = _key(), _key()
    other = _cert("another CA", other_key, None, other_key, ca=True)
    ca = _cert("gradwire test CA", ca_key, None, ca_key, ca=True)
    server_key, client_key = _key(), _key()
    server = _cert("gradwire server", server_key, ca, ca_key, server=True)
    client = _cert("gradwire client", client_key, ca, ca_key, expired=expired_client)

    def write(name: str, data: bytes) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    pem = serialization.Encoding.PEM
    return Pki(
        ca=write("ca.pem", ca.public_bytes(pem)),
        server_cert=write("server.pem", server.public_bytes(pem)),
        server_key=write("server.key", pem_key(server_key)),
        client_cert=write("client.pem", client.public_bytes(pem)),
        client_key=write("client.key", pem_key(client_key)),
        other_ca=write("other-ca.pem", other.public_bytes(pem)),
    )


def test_tls(trainer: Trainer, pki: Pki) -> None:
    running = start(trainer, "127.0.0.1", 0, tls=TlsFiles(pki.server_cert, pki.server_key))
    try:
        with gradwire.connect(_address(running), ca=pki.ca.read_bytes()) as client:
            assert client.list_tensors().model == "Simple"
        with (  # no TLS: no answer
            gradwire.connect(_address(running), timeout=3) as plain,
            pytest.raises(errors.Unavailable),
        ):
            plain.list_tensors()
        args = ["list", "--target", _address(running), "--tls-ca", str(pki.ca)]
        assert main(args, io.StringIO()) == 0
        # Without --tls the CLI's hint said no server answered, and to start one.
        err, plain_args = io.StringIO(), ["list", "--target", _address(running), "--timeout", "3"]
        assert main(plain_args, io.StringIO(), err) == 1
        assert "closed the connection as it opened: it serves TLS (add --tls" in err.getvalue()
    finally:
        running.stop(grace=None)


def _last_line_against_a_server_with(
    trainer: Trainer, tmp_path: Path, host: str = "127.0.0.1", **cert: Any
) -> str:
    """`gradwire list` against a TLS server on `host` whose certificate `_cert` makes with
    `cert` (signed by a CA the client is given): the last line it writes to stderr, with
    the server's address written ADDRESS."""
    ca_key, key = _key(), _key()
    ca = _cert("gradwire test CA", ca_key, None, ca_key, ca=True)
    served = _cert("gradwire server", key, ca, ca_key, server=True, **cert)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "server.pem").write_bytes(served.public_bytes(pem))
    (tmp_path / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files = TlsFiles(tmp_path / "server.pem", tmp_path / "server.key")
    running = start(trainer, host, 0, tls=files)
    address = f"[{host}]:{running.port}" if ":" in host else f"{host}:{running.port}"
    try:
        err = io.StringIO()
        argv = ["list", "--target", address, "--tls-ca", str(tmp_path / "ca.pem")]
        assert main([*argv, "--timeout", "5"], io.StringIO(), err) == 1
        return err.getvalue().splitlines()[-1].replace(address, "ADDRESS")
    finally:
        running.stop(grace=None)


def test_a_server_certificate_that_has_expired_is_named_in_the_hint(
    trainer: Trainer, tmp_path: Path
) -> None:
    """The command said no server answered at the address, and to start one (found by a
    review of deployment)."""
    assert _last_line_against_a_server_with(trainer, tmp_path, expired=True) == (
        "hint: ADDRESS serves TLS with a certificate that has expired (or this machine's "
        "clock is wrong): the server needs a new one (gradwire serve --tls-cert, --tls-key)"
    )


def test_a_server_certificate_for_another_name_is_named_in_the_hint(
    trainer: Trainer, tmp_path: Path
) -> None:
    """A certificate that does not name the address the client dialled: the hint said no
    server answered there, and to start one (found by an operator's walkthrough)."""
    assert _last_line_against_a_server_with(trainer, tmp_path, names=("gpu-box",)) == (
        "hint: ADDRESS serves TLS with a certificate that does not name 127.0.0.1: connect "
        "by a name the certificate holds (its subject alternative names), or give the "
        "server a certificate that names 127.0.0.1"
    )


def test_a_server_certificate_for_another_name_names_an_ipv6_host_without_brackets(
    trainer: Trainer, tmp_path: Path
) -> None:
    """Dialled as [::1]:PORT, the hint names the host a certificate would hold, ::1, not
    the target's bracketed form, which no certificate's subject alternative names hold."""
    said = _last_line_against_a_server_with(trainer, tmp_path, host="::1", names=("gpu-box",))
    assert said == (
        "hint: ADDRESS serves TLS with a certificate that does not name ::1: connect by a "
        "name the certificate holds (its subject alternative names), or give the server a "
        "certificate that names ::1"
    )


def _valid_from(path: Path) -> datetime.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_before_utc


#: Who fails, by file: an expired server certificate fails the clients' checks, an expired
#: client CA the server's (a review found the CA's warning blaming the clients).
FAILING = {
    "--tls-cert": "clients refuse the handshake (their error: certificate has expired)",
    "--tls-client-ca": "the server refuses every client certificate it signed (clients see "
    "the connection closed)",
}


@pytest.mark.parametrize(
    ("after_issue", "warned", "ends"),
    [
        # Valid for a day, three days ago.
        (datetime.timedelta(days=3), "expired on ", "{failing}; "),
        # A day before it was made.
        (datetime.timedelta(days=-1), "is not valid before ", "Until then {failing}"),
        # Within EXPIRY_WARNING: hours, under a day (it said "in 0 days").
        (datetime.timedelta(hours=1), "expires on ", "in 23 hours: "),
        # Valid for a day, which ended 55 minutes ago.
        (datetime.timedelta(days=1, hours=1), "expired on ", "{failing}; "),
    ],
    ids=["expired", "not-yet-valid", "expiring", "just-expired"],
)
def test_a_certificate_s_dates_are_warned_of(
    pki: Pki, after_issue: datetime.timedelta, warned: str, ends: str
) -> None:
    """gRPC serves an expired certificate without a word, and every client then fails its
    handshake (found by a review of deployment): the server now says so at start."""
    now = _valid_from(pki.server_cert) + after_issue
    for files, flag, path in [
        (TlsFiles(pki.server_cert, pki.server_key), "--tls-cert", pki.server_cert),
        (TlsFiles(pki.server_cert, pki.server_key, pki.ca), "--tls-client-ca", pki.ca),
    ]:
        warnings = [w for w in files.date_warnings(now) if w.startswith(flag)]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"{flag} {path} {warned}")
        assert ends.format(failing=FAILING[flag]) in warnings[0]


def test_a_certificate_far_from_its_dates_is_not_warned_of(tmp_path: Path) -> None:
    key = _key()
    certificate = _cert("gradwire server", key, None, key, server=True, days=365)
    pem = serialization.Encoding.PEM
    (tmp_path / "server.pem").write_bytes(certificate.public_bytes(pem))
    files = TlsFiles(tmp_path / "server.pem", tmp_path / "unread.key")
    assert files.date_warnings() == []
    assert files.valid_until() == certificate.not_valid_after_utc


def test_a_certificate_is_warned_of_from_two_weeks_before_it_expires(tmp_path: Path) -> None:
    """EXPIRY_WARNING, 14 days: time to renew it, and no warning a month ahead at every
    start."""
    key = _key()
    certificate = _cert("gradwire server", key, None, key, server=True, days=30)
    (tmp_path / "server.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files = TlsFiles(tmp_path / "server.pem", tmp_path / "unread.key")
    after = certificate.not_valid_after_utc
    assert files.date_warnings(after - datetime.timedelta(days=15)) == []
    (warning,) = files.date_warnings(after - datetime.timedelta(days=13, hours=1))
    assert "expires on " in warning and "in 13 days: " in warning


@pytest.mark.parametrize(
    ("left", "said"),
    [
        (datetime.timedelta(days=2), "in 2 days: "),
        (datetime.timedelta(days=1, hours=1), "in 1 day: "),
        (datetime.timedelta(hours=1), "in 1 hour: "),
        (datetime.timedelta(minutes=59), "in less than an hour: "),
    ],
    ids=["days", "a-day", "an-hour", "under-an-hour"],
)
def test_the_time_a_certificate_has_left_is_said_in_days_or_hours(
    tmp_path: Path, left: datetime.timedelta, said: str
) -> None:
    key = _key()
    certificate = _cert("gradwire server", key, None, key, server=True, days=5)
    (tmp_path / "server.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files = TlsFiles(tmp_path / "server.pem", tmp_path / "unread.key")
    (warning,) = files.date_warnings(certificate.not_valid_after_utc - left)
    assert warning.startswith(f"--tls-cert {tmp_path / 'server.pem'} expires on ")
    assert said in warning


def test_the_dates_warned_of_are_the_server_certificate_s_not_its_chain_s(tmp_path: Path) -> None:
    """A server's own certificate comes first in its chain, before the CA's that last
    longer."""
    ca_key, key = _key(), _key()
    ca = _cert("gradwire test CA", ca_key, None, ca_key, ca=True, days=365)
    served = _cert("gradwire server", key, ca, ca_key, server=True)
    pem = serialization.Encoding.PEM
    (tmp_path / "chain.pem").write_bytes(served.public_bytes(pem) + ca.public_bytes(pem))
    files = TlsFiles(tmp_path / "chain.pem", tmp_path / "unread.key")
    assert files.valid_until() == served.not_valid_after_utc
    (warning,) = files.date_warnings()
    assert warning.startswith(f"--tls-cert {tmp_path / 'chain.pem'} expires on ")


def test_serve_warns_of_an_expired_certificate_at_start(tmp_path: Path) -> None:
    ca_key, key = _key(), _key()
    ca = _cert("gradwire test CA", ca_key, None, ca_key, ca=True)
    old = _cert("gradwire server", key, ca, ca_key, server=True, expired=True)
    pem = serialization.Encoding.PEM
    (tmp_path / "old.pem").write_bytes(old.public_bytes(pem))
    (tmp_path / "old.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    tls = ("--tls-cert", str(tmp_path / "old.pem"), "--tls-key", str(tmp_path / "old.key"))
    with serving(*tls) as (_, log):
        pass
    until = f"{old.not_valid_after_utc:%Y-%m-%d}"
    assert f"TLS on (any client; certificate valid until {until})" in log
    (warning,) = [line for line in log.splitlines() if " WARNING " in line]
    assert warning.endswith(
        f"--tls-cert {tmp_path / 'old.pem'} expired on {until} "
        f"{old.not_valid_after_utc:%H:%M} UTC: clients refuse the handshake (their error: "
        "certificate has expired); the server needs a new certificate, then a restart"
    )


def test_serve_with_tls_and_without_cryptography_says_the_dates_go_unchecked(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server without `cryptography` (read for the certificates' dates alone) stopped
    with a traceback, exit 1, once the model had loaded (a review of installing)."""
    (tmp_path / "cryptography").mkdir()
    (tmp_path / "cryptography" / "__init__.py").write_text("raise ImportError('not here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with serving(*tls) as (_, log):
        pass
    assert "TLS on (any client)" in log, log
    assert (
        "the certificates' dates are not checked: the cryptography package is not installed "
        "(gradwire's server extra has it)"
    ) in log


def test_mutual_tls_needs_a_client_certificate(trainer: Trainer, pki: Pki) -> None:
    files = TlsFiles(pki.server_cert, pki.server_key, client_ca=pki.ca)
    running = start(trainer, "127.0.0.1", 0, tls=files)
    try:
        ca = pki.ca.read_bytes()
        with (
            gradwire.connect(_address(running), ca=ca, timeout=3) as stranger,
            pytest.raises(errors.Unavailable),
        ):
            stranger.list_tensors()
        with gradwire.connect(
            _address(running), ca=ca, cert=pki.client_cert.read_bytes(),
            key=pki.client_key.read_bytes(),
        ) as member:  # fmt: skip
            assert member.list_tensors().model == "Simple"
    finally:
        running.stop(grace=None)


def test_a_client_certificate_without_tls_or_ca_is_sent_over_tls(address: str, pki: Pki) -> None:
    """cert= and key= alone make a TLS channel (the system's roots), as tls=True does: a
    plaintext server is not answered, where a plaintext channel would have dropped the
    certificate without a word."""
    with (
        gradwire.connect(
            address, cert=pki.client_cert.read_bytes(), key=pki.client_key.read_bytes(), timeout=3
        ) as client,
        pytest.raises(errors.Unavailable),
    ):
        client.list_tensors()


def test_serve_under_mutual_tls_does_not_say_anyone_can_drive_the_model(pki: Pki) -> None:
    """Without a token on a non-local address serve warned that anyone who reaches the port
    can drive and read the model, under mutual TLS too, where only clients with a
    certificate from the client CA get in (found by a review of running the server for
    others). Without the client CA the warning stands: any client gets in."""
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with serving("--host", "0.0.0.0", *tls, "--tls-client-ca", str(pki.ca)) as (_, log):
        pass
    assert "anyone who reaches this port" not in log, log
    # Said at INFO, as the row of docs/RELIABILITY.md says: a WARNING would still send an
    # operator whose alerting reads warnings looking for the hole.
    assert (
        " INFO gradwire_server: no bearer token: every client with a certificate from the "
        "client CA can drive and read the model"
    ) in log, log
    with serving("--host", "0.0.0.0", *tls) as (_, log):
        pass
    assert "without a token: anyone who reaches this port can drive and read the model" in log


def test_pem_given_as_str_is_taken(trainer: Trainer, pki: Pki) -> None:
    """ca=open("ca.pem").read(), a str, raised a TypeError from deep inside ("'in <string>'
    requires string as left operand, not bytes"); so did cert= and key= (found by a review
    of the client). Something neither bytes nor str is refused naming its argument."""
    files = TlsFiles(pki.server_cert, pki.server_key, client_ca=pki.ca)
    running = start(trainer, "127.0.0.1", 0, tls=files)
    try:
        with gradwire.connect(
            _address(running), ca=pki.ca.read_text(), cert=pki.client_cert.read_text(),
            key=memoryview(pki.client_key.read_bytes()),  # type: ignore[arg-type]  # bytes too
            timeout=10,
        ) as member:  # fmt: skip
            assert member.list_tensors().model == "Simple"
    finally:
        running.stop(grace=None)
    with pytest.raises(TypeError, match=r"ca= takes PEM as bytes or str .* got \w*Path"):
        gradwire.connect(_address(running), ca=pki.ca)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key= holds no private key in PEM"):
        gradwire.connect(_address(running), cert=pki.client_cert.read_text(), key="")


def test_pem_given_as_a_file_s_name_says_to_give_its_contents(pki: Pki) -> None:
    """ca="ca.pem", as requests' verify= takes it, was read as PEM text and refused saying
    only "it begins b'/tmp/.../ca.pem'" (found by a review of the client's API as a
    researcher uses it); a Path says what to do already (test_pem_given_as_str_is_taken)."""
    for given in ({"ca": str(pki.ca)}, {"cert": str(pki.client_cert), "key": str(pki.client_key)}):
        with pytest.raises(ValueError, match=r"holds no .* a file's name: give its contents"):
            gradwire.connect("127.0.0.1:1", **given)  # type: ignore[arg-type]


def test_serve_refuses_half_a_tls_setup(pki: Pki) -> None:
    err = io.StringIO()
    assert main(["serve", "--tls-cert", str(pki.server_cert)], io.StringIO(), err) == 2
    assert "needs both --tls-cert and --tls-key" in err.getvalue()
    err = io.StringIO()
    assert main(["serve", "--tls-client-ca", str(pki.ca)], io.StringIO(), err) == 2


def _encrypted_key(pki: Pki) -> TlsFiles:
    """The server's key protected by a passphrase, which gRPC cannot read."""
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    path = pki.server_key.with_name("encrypted.key")
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    return TlsFiles(pki.server_cert, path)


def _der_certificate(pki: Pki) -> TlsFiles:
    """The server's certificate in DER, not PEM."""
    certificate = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    path = pki.server_cert.with_name("server.der")
    path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    return TlsFiles(path, pki.server_key)


SWAPPED = "a file is not the PEM it should be: are the two swapped?"


@pytest.mark.parametrize(
    ("files", "said", "why"),
    [
        (  # not its key
            lambda p: TlsFiles(p.server_cert, p.client_key),
            "--tls-cert",
            "key values mismatch",  # OpenSSL's reason, in words
        ),
        (lambda p: TlsFiles(p.server_key, p.server_cert), "--tls-cert", SWAPPED),
        (
            lambda p: TlsFiles(p.server_cert, p.server_key, p.server_key),
            "--tls-client-ca",
            "no certificate or crl found",
        ),
        (
            lambda p: TlsFiles(p.server_cert, p.server_key.with_name("nope.key")),
            "--tls-cert",
            "no such file or directory",  # the system's reason, without its errno
        ),
        (_encrypted_key, "--tls-cert", "the key is encrypted with a passphrase"),
        (_der_certificate, "--tls-cert", SWAPPED),
    ],
    ids=["mismatched", "swapped", "ca-is-a-key", "missing", "encrypted-key", "not-pem"],
)
def test_bad_tls_files_are_named_not_taken_for_a_port_in_use(
    pki: Pki, trainer: Trainer, files: Any, said: str, why: str
) -> None:
    # gRPC only fails to bind with them: the server said the port was in use (found by a
    # review of the server as an operator runs it).
    with pytest.raises(InvalidInput) as refused:
        start(trainer, "127.0.0.1", 0, tls=files(pki))
    assert refused.value.reason == "BAD_TLS"
    assert refused.value.message.startswith(said)
    assert f" ({why}): give the " in refused.value.message
    assert "cannot listen" not in refused.value.message


def test_tls_files_below_openssl_s_security_level_are_not_refused(
    tmp_path: Path, trainer: Trainer
) -> None:
    # Python's OpenSSL refuses an RSA-1024 key at its default security level ("ee key too
    # small"; a SHA-1 signature too), which gRPC serves with: the check refused it as "not a
    # certificate and its key" (found by a review).
    key = rsa.generate_private_key(65537, 1024)
    cert = _cert("legacy", key, None, key)  # type: ignore[arg-type]  # an RSA key, on purpose
    cert_file, key_file = tmp_path / "legacy.pem", tmp_path / "legacy.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    running = start(trainer, "127.0.0.1", 0, tls=TlsFiles(cert_file, key_file))
    assert running.port > 0
    running.stop(grace=None)


@pytest.mark.parametrize(
    ("flag", "content", "said"),
    [
        ("--tls-ca", b"", "holds no certificate in PEM (-----BEGIN ...-----): it is empty"),
        (
            "--tls-ca",
            b"garbage\n",
            "holds no certificate in PEM (-----BEGIN ...-----): it is 8 bytes of text",
        ),
        ("--tls-ca", b"\n \n", "holds no certificate in PEM (-----BEGIN ...-----): it is empty"),
        (
            "--tls-ca",  # not ASCII inside: Python's UnicodeDecodeError, a ValueError
            b"-----BEGIN CERTIFICATE-----\n\xff\n-----END CERTIFICATE-----\n",
            "is not a certificate in PEM",
        ),
        (
            "--tls-ca",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "is not a certificate in PEM",
        ),
        ("--tls-cert", b"", "holds no certificate in PEM"),
        ("--tls-key", b"", "holds no private key in PEM"),
        (
            # gRPC's "Invalid private key." lines, and a hint asking whether the key was
            # the certificate's (found by a review of the CLI).
            "--tls-key",
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "is encrypted (protected by a passphrase), which gRPC cannot read",
        ),
        (
            "--tls-key",  # OpenSSL's older form: a plain marker, and a header that says so
            b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
            b"DEK-Info: AES-128-CBC,00\n\nMIIF\n-----END RSA PRIVATE KEY-----\n",
            "is encrypted (protected by a passphrase), which gRPC cannot read",
        ),
    ],
    ids=[
        "empty-ca",
        "garbage-ca",
        "blank-ca",
        "non-ascii-ca",
        "bad-ca",
        "empty-cert",
        "empty-key",
        "encrypted-key",
        "encrypted-traditional-key",
    ],
)
def test_tls_files_that_hold_nothing_usable_are_refused_before_connecting(
    address: str, pki: Pki, tmp_path: Path, flag: str, content: bytes, said: str
) -> None:
    """An empty file was taken for none given: the command connected to this plain-text
    server without TLS, its token with it, and succeeded. One that was not PEM got gRPC's
    own log lines and a hint that no server answered (both found by a review of the CLI)."""
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    pair = {"--tls-cert": str(pki.client_cert), "--tls-key": str(pki.client_key)}
    args = ["list", "--target", address, flag, str(bad)]
    if flag in pair:  # with the other half of the pair, good
        other = "--tls-key" if flag == "--tls-cert" else "--tls-cert"
        args += [other, pair[other], "--tls-ca", str(pki.ca)]
    err = io.StringIO()
    assert main(args, io.StringIO(), err) == 2
    assert f"{flag} {bad} {said}" in err.getvalue()
    keyword = {"--tls-ca": "ca", "--tls-cert": "cert", "--tls-key": "key"}[flag]
    given = {"cert": pki.client_cert.read_bytes(), "key": pki.client_key.read_bytes()}
    given[keyword] = content
    with pytest.raises(ValueError, match=f"{keyword}= "):
        gradwire.Client(address, **given)  # type: ignore[arg-type]


def test_a_ca_bundle_with_comments_and_crlf_is_taken(
    address: str, pki: Pki, tmp_path: Path
) -> None:
    """A bundle's UTF-8 comments (RHEL's ca-bundle.crt has them) made the check raise
    TypeError, where OpenSSL and gRPC take the file (found by a review of the change)."""
    bundle = tmp_path / "bundle.pem"
    pem = pki.ca.read_bytes()
    bundle.write_bytes("# Certificats de confiance, é\n".encode() + pem.replace(b"\n", b"\r\n"))
    with gradwire.Client(address, ca=bundle.read_bytes(), timeout=3) as client:
        assert client.target == address  # made: the TLS files are taken
    cut = tmp_path / "cut.pem"
    cut.write_bytes(pem[: len(pem) // 2])
    err = io.StringIO()
    assert main(["list", "--target", address, "--tls-ca", str(cut)], io.StringIO(), err) == 2
    assert f"--tls-ca {cut} holds no whole certificate in PEM: it is cut short" in err.getvalue()


def test_a_ca_bundle_with_comments_between_its_certificates_is_taken(
    address: str, pki: Pki
) -> None:
    """RHEL's ca-bundle.crt names each certificate in a UTF-8 comment above it, below a header
    of several lines: the check takes each block alone, so no comment between two ends up in
    what Python parses. PEM in a bytearray is taken as bytes are."""
    pem = pki.ca.read_bytes()
    header = "# A bundle of the X.509 certificates of public certificate authorities.\n" * 3
    bundle = f"{header}# Autorité A\n".encode() + pem + "# Autorité B\n".encode() + pem
    ca: Any = bytearray(bundle)
    with gradwire.Client(address, ca=ca, timeout=3) as client:
        assert client.target == address  # made: the TLS files are taken


def test_a_tls_file_that_is_no_pem_is_described_and_its_bytes_are_not_shown(
    address: str, tmp_path: Path
) -> None:
    """Its first 24 bytes were shown: a token file given as --tls-ca (it lies beside the
    certificates) put most of the token on the terminal, and in a CI job's log (found by
    a review of the CLI as a researcher uses it, from its --help)."""
    token = "s3cret-token-1234567890abcdef"
    with pytest.raises(ValueError) as refused:
        gradwire.Client(address, ca=f"{token}\n".encode())
    assert str(refused.value) == (
        "ca= holds no certificate in PEM (-----BEGIN ...-----): it is 30 bytes of text (not "
        "shown: it may be a secret, a token say)"
    )
    with pytest.raises(ValueError, match=r"it is 4 bytes of data \(not shown"):
        gradwire.Client(address, ca=b"\x30\x82\x01\xff")  # DER, not PEM
    # A PEM block of another kind is named by its first line, which holds no secret.
    with pytest.raises(ValueError, match=r": it holds -----BEGIN OPENSSH PRIVATE KEY-----$"):
        gradwire.Client(address, ca=b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n")
    # And the CLI's --tls-ca given the token file: the token is nowhere in what it prints.
    path = tmp_path / "token"
    path.write_text(f"{token}\n")
    result = run_main("list", "--target", address, "--tls-ca", str(path))
    assert result.code == 2 and "it is 30 bytes of text" in result.err, result.err
    assert "s3cret" not in result.err + result.out


def test_a_failed_handshake_is_in_grpc_s_own_log_at_info(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A client that fails its handshake never reaches gradwire's code, so gradwire's log has
    no line for it; gRPC's own log has, at INFO, which the README tells an operator to turn
    on (`GRPC_VERBOSITY=INFO gradwire serve ...`). This holds grpcio to that."""
    monkeypatch.setenv("GRPC_VERBOSITY", "INFO")
    port_file = tmp_path / "port"
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    args = (*tls, "--tls-client-ca", str(pki.ca), "--port-file", str(port_file))
    with serving(*args) as (process, _):
        port = int(port_file.read_text())
        ca = pki.ca.read_bytes()
        with (
            gradwire.connect(f"127.0.0.1:{port}", ca=ca, timeout=3) as stranger,
            pytest.raises(errors.Unavailable),
        ):
            stranger.list_tensors()
        process.terminate()  # the server stops, and its log ends
        assert process.stderr is not None
        rest = process.stderr.read()
        assert process.wait(timeout=60) == 0
    failed = [line for line in rest.splitlines() if "Handshake failed" in line]
    assert failed, rest  # a line per connection attempt: the client may try more than once
    assert all("PEER_DID_NOT_RETURN_A_CERTIFICATE" in line for line in failed), failed


def stalled_calls(channel: grpc.Channel, method: str, count: int) -> tuple[Any, list[Any]]:
    """`count` calls of the one-request `method`, opened and never sent their request (a
    slowloris): their headers reach the server, their message never comes. Returns the
    event that lets them go and their futures."""
    import threading

    release = threading.Event()

    def nothing() -> Iterator[bytes]:
        release.wait()
        yield from ()

    call = channel.stream_unary(method, request_serializer=bytes, response_deserializer=bytes)
    return release, [call.future(nothing(), timeout=60) for _ in range(count)]


def test_calls_without_the_token_hold_no_thread_while_their_request_is_awaited(
    trainer: Trainer,
) -> None:
    # gRPC waits for a one-request call's message on a thread of the server's pool: 30 calls
    # without the token, never sent their request, held all 20 threads (16 calls and 4
    # spare) until their callers let go; the owner's calls and health checks went unanswered
    # (found by a review of running the server for others, fifty-fourth session).
    running = start(trainer, "127.0.0.1", 0, token=TOKEN, max_concurrent=2)
    try:
        with grpc.insecure_channel(_address(running)) as channel:
            release, stalled = stalled_calls(channel, "/gradwire.v1.Trainer/GetServerInfo", 12)
            try:
                for future in stalled:  # refused at once, their request not awaited
                    assert future.exception(timeout=10).code() == grpc.StatusCode.UNAUTHENTICATED
            finally:
                release.set()
        with gradwire.connect(_address(running), token=TOKEN) as client:
            assert client.server_info().limits.max_concurrent == 2
    finally:
        running.stop(grace=None)
