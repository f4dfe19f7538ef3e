"""Where secrets come from: a bearer token from a file or the environment, and TLS's PEM
files, checked for what they should hold before gRPC is given them."""

from __future__ import annotations

import os
import re
import ssl
import stat
import warnings
from pathlib import Path
from typing import Literal

from gradwire.errors import GradwireWarning

#: The environment variable a token may come from, for `gradwire serve` and every client command.
TOKEN_ENV = "GRADWIRE_TOKEN"

#: The longest token taken. gRPC refuses a call whose headers pass 8 KiB, at random (more
#: often the further past), and every call past 16 KiB: a server started with a 9,000
#: character token refused 1 in 6 of the calls that carried it, and with 20,000 characters
#: all of them ("received metadata size exceeds hard limit"), its start taken without a word
#: (found by a review of running the server for others). Half of 8 KiB leaves room for the
#: other headers.
MAX_TOKEN_CHARS = 4096
#: The most a token file is read of: the token and white space around it. Read whole, a
#: device or a large file given by mistake (--token-file /dev/zero) filled the memory and
#: ended in a MemoryError's traceback.
MAX_TOKEN_FILE_BYTES = 64 * 1024


class PlaintextTokenWarning(GradwireWarning):
    """A bearer token sent without TLS to a server that is not on this machine (not a
    loopback address, localhost or a unix socket): anyone on the network path can read it,
    and use it. Given once per client, as it is made."""


class TokenFileWarning(GradwireWarning):
    """A token file that its group or other users can read or write (`--token-file`, on the
    server or a client): they can use the token in it, or change it."""


def load_token(token_file: Path | None, env: str = TOKEN_ENV) -> str | None:
    """The token from a file, else from `env` (surrounding white space stripped from
    either), checked (`check_token`); or None. A file, or a variable set, that holds white
    space only raises ValueError; an empty variable is no token.

    A file is preferred to a flag with the token itself, which other users could read in
    the process list. The variable is stripped as the file is: a secret ends in a newline
    as often as not, and kept, the server wanted a token no client could send (gRPC
    refused the header: "Invalid metadata") and a client's calls all failed INTERNAL.
    """
    if token_file is not None:
        data = _read(token_file, "--token-file", MAX_TOKEN_FILE_BYTES)
        if len(data) > MAX_TOKEN_FILE_BYTES:
            raise ValueError(
                f"--token-file {token_file}: it holds more than {MAX_TOKEN_FILE_BYTES:,} "
                "bytes: a token file holds the token alone, one line"
            )
        token = data.decode(errors="replace").strip()
        if not token:
            raise ValueError(f"the token file {token_file} is empty")
        token = check_token(token, f"the token in {token_file}")
        _warn_if_shared(token_file)
        return token
    given = os.environ.get(env, "")
    token = given.strip()
    if given and not token:
        # Taken for no token, where a file of white space is refused: a server started
        # wanting none, and a client sent none (found by a review of the CLI as a researcher).
        raise ValueError(
            f"${env} is empty (white space only): export the token itself, or unset it "
            f"(unset {env}) for no token"
        )
    return check_token(token, env) if token else None


def _warn_if_shared(token_file: Path) -> None:
    """TokenFileWarning when the token file (a plain file) may be read or written by its
    group or other users: it was taken without a word at -rw-r--r-- (a security review,
    sixty-second session). A warning, where ssh refuses a key so open: a server or a
    command that worked before goes on working. Not where files have no POSIX modes
    (Windows reports every file readable by all)."""
    if os.name != "posix":
        return
    try:
        mode = token_file.stat().st_mode
    except OSError:
        return
    shared = mode & 0o066  # read or write by the group or others (execute gives nothing)
    if not stat.S_ISREG(mode) or not shared:
        return
    said = [(verb, then) for verb, then, bits in _SHARING if shared & bits]
    who = " and ".join(
        name for name, bits in (("its group", 0o060), ("other users", 0o006)) if shared & bits
    )
    warnings.warn(
        f"--token-file {token_file} can be {' or '.join(verb for verb, _ in said)} by {who} "
        f"({stat.filemode(mode)}): they can {' and '.join(then for _, then in said)}; make it "
        f"yours alone: chmod 600 {token_file} (a mounted secret: its mode, such as "
        "Kubernetes' defaultMode 0400)",
        TokenFileWarning,
        stacklevel=3,
    )


#: What a token file's group or other users can do to it, what that lets them do, and the
#: mode's bits that allow it.
_SHARING = (("read", "use the token", 0o044), ("written", "put a token of their own in it", 0o022))


#: A value a gRPC header can carry, as a token or a session id: printable ASCII, spaces
#: inside only.
HEADER_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def check_token(token: str, what: str) -> str:
    """`token`, or ValueError naming `what` unless gRPC can send it in a header."""
    if not isinstance(token, str):
        raise TypeError(f"{what} must be a str, got {type(token).__name__}")
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(
            f"{what} is {len(token):,} characters long, past the {MAX_TOKEN_CHARS:,} a token may "
            "have: gRPC refuses calls whose headers pass 8 KiB, at random, and every one past "
            "16 KiB; use a shorter token (openssl rand -hex 32 makes one)"
        )
    if not HEADER_VALUE.fullmatch(token):
        odd = next((c for c in token if not " " <= c <= "~"), "a space at an end" if token else "")
        found = repr(odd) if len(odd) == 1 else odd or "nothing"
        raise ValueError(
            f"{what} is no token gRPC can send: one line of printable ASCII (letters, digits, "
            f"punctuation, spaces inside only) is needed, and it holds {found}"
        )
    return token


#: A PEM certificate block, its armour included.
_CERTIFICATES = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
#: What each kind of PEM block begins with ("-----BEGIN RSA PRIVATE KEY-----" too).
_MARKERS = {"certificate": b"-----BEGIN CERTIFICATE-----", "private key": b"PRIVATE KEY-----"}
#: How PEM marks a key protected by a passphrase: PKCS #8's, and OpenSSL's older headers.
_ENCRYPTED = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


def pem_bytes(data: bytes | str | None, what: str) -> bytes | None:
    """PEM data as gRPC takes it: bytes; a str (open(path).read()) encoded, where gRPC raised
    a TypeError from deep inside ("'in <string>' requires string as left operand"). Anything
    else raises TypeError naming `what`."""
    if isinstance(data, str):
        return data.encode()
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(
        f"{what} takes PEM as bytes or str (open(path, 'rb').read()), got {type(data).__name__}"
    )


def _described(data: bytes) -> str:
    """What a file that is not the PEM asked for holds, without its bytes: its first 24
    were shown, and a token file given as --tls-ca (the token beside it) put most of a
    secret on the terminal and in a CI job's log (found by a review of the CLI). A PEM
    block's first line names its kind and holds nothing secret: it is shown."""
    first = data.lstrip().split(b"\n", 1)[0].rstrip()
    if first.startswith(b"-----BEGIN ") and first.endswith(b"-----") and len(first) <= 80:
        return f"it holds {first.decode('ascii', errors='replace')}"
    kind = "text" if data.isascii() and all(b >= 32 or b in b"\t\r\n" for b in data) else "data"
    return f"it is {len(data):,} bytes of {kind} (not shown: it may be a secret, a token say)"


def check_pem(data: bytes | None, kind: Literal["certificate", "private key"], what: str) -> None:
    """Refuses (ValueError, naming `what`) PEM data that holds no `kind`. Empty, it was
    taken for none given, and the client connected without TLS, sending its token in
    plain text; not PEM, gRPC's C core logged lines of its own and failed every call
    ("Failed to create security handshaker"), which read as a server not answering (both
    found by a review of the CLI). A CA certificate is also parsed, as gRPC will."""
    if data is None:
        return
    if _MARKERS[kind] not in data:
        found = "it is empty" if not data.strip() else _described(data)
        if len(data) < 4096 and b"\n" not in data and os.path.isfile(data):
            # ca="ca.pem", as requests' verify= takes it: read as PEM, refused by its first
            # bytes alone (found by a review of the client's API as a researcher uses it).
            found = (
                f"it is a file's name: give its contents, open({data.decode(errors='replace')!r}, "
                "'rb').read()"
            )
        raise ValueError(f"{what} holds no {kind} in PEM (-----BEGIN ...-----): {found}")
    if kind == "private key" and any(sign in data for sign in _ENCRYPTED):
        # gRPC logged "Invalid private key." and the hint asked whether the key was the
        # certificate's (found by a review of the CLI); a server's is refused so too.
        raise ValueError(
            f"{what} is encrypted (protected by a passphrase), which gRPC cannot read: give "
            "it unencrypted (openssl pkey -in KEY -out PLAIN.key asks for the passphrase)"
        )
    if kind == "certificate":
        # The blocks alone: a bundle's comments may be UTF-8 (RHEL's ca-bundle.crt), which
        # OpenSSL skips and Python's cadata refuses (found by a review).
        blocks = b"\n".join(_CERTIFICATES.findall(data))
        if not blocks:  # Python takes an empty cadata for no certificate, without a word
            raise ValueError(f"{what} holds no whole certificate in PEM: it is cut short")
        try:
            ssl.create_default_context(cadata=blocks.decode("ascii"))
        except (ssl.SSLError, ValueError) as err:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"{what} is not a certificate in PEM: {err}") from None


def read_optional(
    path: Path | None, kind: Literal["certificate", "private key"], flag: str
) -> bytes | None:
    """A PEM file's bytes, checked to hold a `kind` (check_pem); None without a path."""
    if path is None:
        return None
    data = _read(path, flag)
    check_pem(data, kind, f"{flag} {path}")
    return data


def _read(path: Path, flag: str, limit: int | None = None) -> bytes:
    """The file's bytes (with `limit`, at most limit + 1 of them), or OSError naming the
    option it was given with and why it could not be read: "[Errno 2] No such file or
    directory: 'nope'" named neither (found by a review of the CLI)."""
    try:
        if limit is not None:
            with path.open("rb") as file:
                return file.read(limit + 1)
        return path.read_bytes()
    except OSError as err:
        why = err.strerror or str(err)
        if isinstance(err, IsADirectoryError):
            why = "it is a folder, not a file"
        raise OSError(f"{flag} {path}: cannot read it ({why})") from None
