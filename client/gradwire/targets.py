"""A server's address as a client is given it (`host:port`, `unix:/path`, `dns:///host`),
checked before gRPC sees it and given gradwire's port where it names a host alone: gRPC
would try 443, and its resolver fails what it cannot read with words that say nothing of
what to write instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re

#: Where a client connects when given no target.
DEFAULT_TARGET = "localhost:50051"


def with_default_port(target: str) -> str:
    """`target` with gradwire's port (50051) when it names a host alone: gRPC would try 443.
    Targets with a scheme or a path ("unix:/run/gw.sock", "dns:///host") are left as given.
    A port that is not a number from 1 to 65535 (or "http" or "https", which gRPC takes for
    80 and 443) raises ValueError: gRPC would take 70000 for port 4464 and -1 for 65535, and
    connect to whatever listens there; so does white space around the target, no host
    before the port (":50051") and a path after it ("localhost:50051/v1"), which gRPC
    fails in its resolver, as if no server answered."""
    port = DEFAULT_TARGET.rpartition(":")[2]
    # gRPC's resolver refused these with words of its own, which said nothing of what to
    # write instead (found by a review of the CLI).
    if not isinstance(target, str):  # None went on to "'NoneType' object has no attribute"
        raise TypeError(f"the target is a str, host:port such as localhost:50051; got {target!r}")
    if not target.strip():
        raise ValueError("the target is empty: expected host:port, such as localhost:50051")
    # ' localhost:50051' went to gRPC, whose resolver failed it UNAVAILABLE, "Misformatted
    # domain name", as if no server answered (found by a review of the CLI as a researcher).
    # A socket's path may end in a space.
    path = target.startswith(("unix:", "unix-abstract:"))
    if target != (target.lstrip() if path else target.strip()):
        raise ValueError(
            f"bad target {target!r}: white space around it (copied with it?); give host:port "
            "without spaces, such as localhost:50051"
        )
    if target.lower().startswith(("http://", "https://", "grpc://", "grpcs://")):
        raise ValueError(
            f"bad target {target!r}: gRPC targets take no URL scheme; give host:port (and "
            "TLS with its own options: tls=True, --tls)"
        )
    # Schemes whose addresses gRPC checks itself, or that have no port.
    if target.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")):
        return target
    # gRPC failed these in its resolver, UNAVAILABLE, exit 1 as if no server answered; after
    # dns: or passthrough: (and an authority, "dns://8.8.8.8:53/") too (a review of the fix).
    endpoint = _endpoint(target)
    pathed = _PATH_AFTER_PORT.match(endpoint)
    if pathed is not None:
        given = target[: len(target) - len(endpoint)] + endpoint[: pathed.start(1)]
        raise ValueError(
            f"bad target {target!r}: a path after host:port ({pathed[1]!r}); gRPC targets "
            f"take none: give host:port, such as {given}"
        )
    if "/" in target and not target.startswith(_PORTED_SCHEMES):
        return target  # xds:///svc:grpc: a name of the scheme's own, not host:port (a review)
    address = target.rpartition("/")[2]  # dns:///gpu-box:7000: the address after the path
    if "/" not in target:
        with contextlib.suppress(ValueError):  # ::1, a bare IPv6 address
            if ipaddress.ip_address(target).version == 6:
                return f"[{target}]:{port}"
        if ":" not in target or (target.startswith("[") and "]:" not in target):  # [::1]
            return f"{target}:{port}"
    if "/" not in address and address.startswith("dns:"):  # dns:host:port, without slashes
        address = address[len("dns:") :]
    # A host (a name, IPv4 or a bracketed IPv6 address) and what follows its colon: it must
    # be a port, or a name gRPC takes for one ("host:http"). A name it does not take
    # ("localhost:abc") failed in its resolver, UNAVAILABLE, as if no server answered (found
    # by a review of the CLI as a researcher). A bare IPv6 address, or one of gRPC's schemes
    # ("xds:svc"), is gRPC's to read.
    found = _HOST_AND_PORT.fullmatch(address)
    if found is not None and not found[1]:
        raise ValueError(
            f"bad target {target!r}: no host before the port; give host:port, such as "
            f"localhost:{found[2]}"
        )
    # gRPC's native resolver reads a service's name for its port ("host:ssh", 22), where its
    # default one (c-ares) takes http and https alone (a review of the check).
    native = os.environ.get("GRPC_DNS_RESOLVER", "").strip().lower() == "native"
    if (
        found is not None
        and found[1] not in _SCHEMES
        and found[2] not in _NAMED_PORTS
        and not (native and found[2][:1].isalpha())
        and not (found[2].isascii() and found[2].isdigit() and 1 <= int(found[2]) <= 65535)
    ):
        raise ValueError(
            f"bad port {found[2]!r} in target {target!r}: expected host:port with a port "
            "from 1 to 65535"
        )
    return target


#: A host (a name, IPv4, a bracketed IPv6 address) and what follows its one colon.
_HOST_AND_PORT = re.compile(r"(\[[^\]]*\]|[^:\[\]]*):([^:]*)")

#: host:port and a path after it ("localhost:50051/v1"): the path, from its slash.
_PATH_AFTER_PORT = re.compile(r"(?:\[[^\]]*\]|[^:/\[\]]+):\d+(/.*)", re.DOTALL)

#: The names gRPC's default resolver takes for a port (80 and 443); it fails any other, "ssh"
#: included (its native resolver, GRPC_DNS_RESOLVER=native, takes the system's names).
_NAMED_PORTS = ("http", "https")

#: The schemes whose address after the path is host:port, to be checked as one.
_PORTED_SCHEMES = ("dns:", "passthrough:")

#: gRPC's schemes that with_default_port leaves alone, which a target written without
#: slashes puts where a host would be ("xds:svc").
_SCHEMES = ("xds", "google-c2p", "passthrough")


def loopback_host(host: str) -> bool:
    """Whether `host` (a name or an address, an IPv6 one bracketed or not) is this machine's
    loopback: `localhost`, 127.0.0.0/8 or ::1 (::ffff:127.0.0.1 too). What is sent there
    never crosses a network; anything else may, a name of this machine's own included."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # Python before 3.13 takes ::ffff:127.0.0.1 for no loopback
    return address.is_loopback


def loopback_target(target: str) -> bool:
    """Whether a client's `target` (as with_default_port leaves it) reaches this machine
    alone: a unix socket, or hosts that are all loopback (`loopback_host`), written as
    host:port or after dns:, passthrough:, ipv4: or ipv6: (each address of a list). A scheme
    of another kind (xds:) is taken for one that may leave the machine."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith(("ipv4:", "ipv6:")):
        addresses = target.partition(":")[2].split(",")
        return all(loopback_host(_host_of(address)) for address in addresses)
    endpoint = _endpoint(target)
    return "/" not in endpoint and loopback_host(_host_of(endpoint))


def _endpoint(target: str) -> str:
    """`target` after its dns: or passthrough: scheme and authority ("dns://8.8.8.8:53/"),
    if any: host:port, perhaps with a path after it."""
    for scheme in _PORTED_SCHEMES:
        if target.startswith(scheme):
            endpoint = target[len(scheme) :]
            return endpoint[2:].partition("/")[2] if endpoint.startswith("//") else endpoint
    return target


def _host_of(address: str) -> str:
    """The host of host:port, [v6]:port or a bare address or name."""
    if address.startswith("["):
        return address[: address.find("]") + 1]
    with contextlib.suppress(ValueError):  # a bare IPv6 address, whose colons are its own
        return str(ipaddress.ip_address(address))
    return address.rpartition(":")[0] if ":" in address else address
