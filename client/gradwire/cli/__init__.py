"""The `gradwire` command: parse arguments, call the Client, print the result (or JSON with --json).

One module a part: `parser` (every command and option), `command` (running one, its exit
codes and hints), `connection` (the Client from the options and the environment),
`arguments` (option values and tensors named on the command line), `output` (text and
JSON), `errors` (usage and command errors); the commands in `tensors`, `training`,
`state` and `serving`. The installed command starts at `gradwire_cli`, which sets gRPC's
log level before this package imports grpc. The exit codes are in `command`.
"""

from gradwire.cli.command import main, main_entry
from gradwire.cli.parser import build_parser

__all__ = ["build_parser", "main", "main_entry"]
