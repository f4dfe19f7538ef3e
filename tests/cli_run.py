"""The `gradwire` command run in-process through `main(argv, out, err)`, for the CLI tests."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradwire.cli import main


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Run = Callable[..., Result]


def run_main(*argv: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return Result(code, out.getvalue(), err.getvalue())
