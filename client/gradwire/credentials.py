"""Where secrets come from for the CLI: a bearer token from a file or the environment."""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable a token may come from, for `gradwire serve` and every client command.
TOKEN_ENV = "GRADWIRE_TOKEN"


def load_token(token_file: Path | None, env: str = TOKEN_ENV) -> str | None:
    """The token from a file (surrounding white space stripped), else from `env`; or None.

    A file is preferred to a flag with the token itself, which other users could read in
    the process list.
    """
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"the token file {token_file} is empty")
        return token
    return os.environ.get(env) or None


def read_optional(path: Path | None) -> bytes | None:
    """A PEM file's bytes, or None without a path."""
    return None if path is None else path.read_bytes()
