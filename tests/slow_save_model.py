"""`gradwire serve --model tests.slow_save_model:SPEC`: a small model whose saves take two
seconds more, as a large model's do (a 5.6 GB state took 22 s): for the tests of a stop
whose save outlasts its grace period. Imported by the server process alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gradwire_server import checkpoint
from gradwire_server.models import TINY_MLP

SAVE_S = 2.0
_save = checkpoint.save


def _slow_save(path: Path, **kwargs: Any) -> int:
    time.sleep(SAVE_S)
    return _save(path, **kwargs)


checkpoint.save = _slow_save  # type: ignore[assignment]
SPEC = TINY_MLP
