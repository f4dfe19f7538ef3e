"""The committed generated code is exactly what scripts/gen_protos.py makes from proto/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "client" / "gradwire" / "_pb"


def test_generated_code_is_in_sync(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} are stale: run `make protos` and commit the result"


def test_an_rpc_without_its_servicer_method_stops_the_import_naming_it(tmp_path: Path) -> None:
    # docs/DEVELOPING.md: "servicer.py does not import without it". Only the calls a Calls
    # stream carries were checked: an rpc on no session (as GetServerInfo) without its
    # method let servicer.py import, and `gradwire serve` died at start with
    # "AttributeError: 'TrainerServicer' object has no attribute 'Ping'" (found by a review
    # of the fifty-fourth session's changes).
    import shutil

    for folder in ("client", "server", "proto", "scripts"):
        shutil.copytree(
            ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    proto = tmp_path / "proto" / "gradwire" / "v1" / "trainer.proto"
    served = "  rpc GetServerInfo(GetServerInfoRequest) returns (GetServerInfoResponse);\n"
    text = proto.read_text()
    assert served in text
    proto.write_text(
        text.replace(
            served, served + "  rpc Ping(GetServerInfoRequest) returns (GetServerInfoResponse);\n"
        )
    )
    subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "gen_protos.py")],
        check=True,
        capture_output=True,
    )
    imported = subprocess.run(
        [sys.executable, "-c", "import gradwire_server.servicer"],
        env={"PYTHONPATH": f"{tmp_path / 'client'}:{tmp_path / 'server'}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode != 0
    assert "rpc Ping, which TrainerServicer lacks: add a method Ping" in imported.stderr, (
        imported.stderr[-2000:]
    )


def test_the_contract_says_which_protoc_takes_its_optional_fields() -> None:
    """trainer.proto marks fields `optional` (proto3's explicit presence), which protoc takes
    without a flag only from 3.15: 3.12 to 3.14, what Ubuntu 22.04 and Debian 11 package,
    refuse the file unless given --experimental_allow_proto3_optional, and older ones refuse
    it outright. The file said nothing of it, and a C++ team generating code with their
    distribution's protoc met the refusal first (found by a review of the .proto as the only
    contract, compiled and called from C++)."""
    from google.protobuf import descriptor_pb2

    from gradwire._pb import trainer_pb2

    file = descriptor_pb2.FileDescriptorProto()
    trainer_pb2.DESCRIPTOR.CopyToProto(file)
    optional = [
        f"{message.name}.{field.name}"
        for message in file.message_type
        for field in message.field
        if field.proto3_optional
    ]
    assert "Slice.start" in optional and "ResetRequest.seed" in optional
    contract = (ROOT / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    assert "need protoc 3.15 or newer" in said
    assert "--experimental_allow_proto3_optional" in said


def test_the_service_comment_points_generated_code_at_the_file_s_conventions(
    tmp_path: Path,
) -> None:
    """The conventions every call shares (the metadata keys, errors and their ErrorInfo,
    limits) are the comment at the top of trainer.proto, before `syntax`: attached to no
    element, so no generator carries it. Java's javadoc of TrainerGrpc said only "The
    training step, driven remotely.", and the RPCs' "see Errors at the top of this file"
    pointed nowhere a Java team reading their IDE could follow (found by a review of the
    .proto as the only contract, compiled and called from Java)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "trainer.pb"
    proto = ROOT / "proto"
    args = ["protoc", f"-I{proto}", "--include_source_info", f"--descriptor_set_out={out}"]
    assert protoc.main([*args, "gradwire/v1/trainer.proto"]) == 0
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    (service,) = [i for i, each in enumerate(file.service) if each.name == "Trainer"]
    # Path [6, i]: the file's service i, whose leading comment generators carry.
    (location,) = [
        where for where in file.source_code_info.location if list(where.path) == [6, service]
    ]
    said = " ".join(location.leading_comments.split())
    for key in ("gradwire-session", "gradwire-request-id", "gradwire-expected-version"):
        assert f'"{key}"' in said, said
    assert "grpc-status-details-bin" in said, said
    assert "top of gradwire/v1/trainer.proto" in said, said


#: What protoc-gen-go generates on every message: a field of one of these Go names is
#: renamed with an underscore (google.golang.org/protobuf/compiler/protogen).
GO_MESSAGE_METHODS = {
    "Reset",
    "String",
    "ProtoMessage",
    "Marshal",
    "Unmarshal",
    "ExtensionRangeArray",
    "ExtensionMap",
    "Descriptor",
}


def _go_renamed(file: Any) -> list[tuple[str, str, bool]]:
    """(message, Go field name, in a oneof) for each field protoc-gen-go renames, as its
    protogen does: Go names in field order, each made unique against the message's methods
    and the getters before it."""
    renamed = []
    for message in file.message_type:
        used = {name: False for name in GO_MESSAGE_METHODS}
        for field in message.field:
            camel = "".join(part[:1].upper() + part[1:] for part in field.name.split("_"))
            name = camel
            while name in used or used.get("Get" + name):
                name += "_"
            used[name] = False
            used["Get" + name] = True
            if name != camel:
                oneof = field.HasField("oneof_index") and not field.proto3_optional
                renamed.append((message.name, name, oneof))
    return renamed


def test_the_contract_names_the_go_fields_protoc_gen_go_renames() -> None:
    """protoc-gen-go renames a field whose Go name clashes with a generated method: the
    Calls stream's `reset` case is CallRequest_Reset_ (field Reset_, getter GetReset_()),
    and a Go client written from the contract's names, CallRequest_Reset, did not compile
    (found by a review of the .proto as the only contract, compiled and called from Go)."""
    from google.protobuf import descriptor_pb2

    from gradwire._pb import trainer_pb2

    file = descriptor_pb2.FileDescriptorProto()
    trainer_pb2.DESCRIPTOR.CopyToProto(file)
    renamed = _go_renamed(file)
    assert ("CallRequest", "Reset_", True) in renamed
    contract = (ROOT / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    for message, name, oneof in renamed:
        assert (f"{message}_{name}" if oneof else f"{message}.{name}") in said, (message, name)


def test_the_contract_says_its_go_package_is_published_nowhere() -> None:
    """go_package names gradwire.dev/gen/go/gradwire/v1, where no Go module is published:
    a Go team that imported that path from a module of its own had the go command look for
    it on the network and fail. The contract now says so and how to map the file into the
    team's own module, protoc-gen-go's M option, which a Go build of the generated code
    took (found by a review of the .proto as the only contract, compiled and called from
    Go)."""
    from gradwire._pb import trainer_pb2

    go_package = trainer_pb2.DESCRIPTOR.GetOptions().go_package
    path = go_package.split(";")[0]
    assert path == "gradwire.dev/gen/go/gradwire/v1"
    contract = (ROOT / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    assert f"names {path} (package {go_package.split(';')[1]})" in said
    assert "publishes no Go module" in said
    assert f"--go_opt=M{trainer_pb2.DESCRIPTOR.name}=" in said


def test_the_contract_says_which_go_protobuf_runs_its_go_code() -> None:
    """Debian 12's golang-google-grpc-dev (grpc-go 1.33) depends on golang/protobuf 1.3 or
    1.5 and apt takes 1.3, whose codec cannot marshal what protoc-gen-go 1.28 makes: a Go
    client of this contract built from Debian's packages panicked on its first call,
    "protobuf tag not enough fields in GetServerInfoResponse.state", and ran once
    golang-github-golang-protobuf-1-5-dev replaced it (found by a review of the .proto as
    the only contract, compiled and called from Go)."""
    from gradwire._pb import trainer_pb2

    # The field the panic names: protoc-gen-go's unexported `state`, on a message that is.
    assert "GetServerInfoResponse" in trainer_pb2.DESCRIPTOR.message_types_by_name
    contract = (ROOT / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    said = " ".join(line.strip("/ ") for line in contract.splitlines())
    assert "needs github.com/golang/protobuf 1.4 or newer" in said
    assert "install golang-github-golang-protobuf-1-5-dev" in said


def test_the_contract_names_the_fields_it_retyped_before_its_record_began() -> None:
    """The contract said nothing gradwire.v1 published was ever retyped; the copies of
    2026-11-30 had ServerLimits.max_histogram_bins uint32 (int32 since 2026-12-01) and,
    for one commit, SessionInfo.version uint64 (int64), both before proto/published.txtpb's
    first record (2026-12-02). The same varint on the wire, so code generated from those
    copies reads the same values (an 11-30 client against this server, in a review of
    clients and servers of different versions): the contract says so."""
    from gradwire._pb import trainer_pb2

    int32, int64 = 5, 3  # FieldDescriptorProto's TYPE_INT32, TYPE_INT64
    limits = trainer_pb2.ServerLimits.DESCRIPTOR.fields_by_name["max_histogram_bins"]
    session = trainer_pb2.SessionInfo.DESCRIPTOR.fields_by_name["version"]
    assert (limits.type, session.type) == (int32, int64)
    contract = (ROOT / "proto" / "gradwire" / "v1" / "trainer.proto").read_text()
    readme = (ROOT / "README.md").read_text()
    for text in (contract, readme):
        said = " ".join(line.strip("/ ") for line in text.splitlines()).replace("`", "")
        assert "Two fields were retyped before that record began (2026-12-02)" in said
        assert "ServerLimits.max_histogram_bins (uint32 until 2026-12-01)" in said
        assert "SessionInfo.version (uint64 until 2026-11-30)" in said
