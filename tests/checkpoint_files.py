"""Checkpoints rewritten by a test, as a tool that keeps gradwire's checksum would write them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from gradwire_server import checkpoint


def resave(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Writes `tensors` and `metadata` to `path` with the checksum taken again of them, so that
    a load gets past the checksum to the checks of what the file holds (each test that edits a
    checkpoint tests one of those; test_checkpoint.py tests the checksum itself)."""
    metadata = {**metadata, checkpoint.CHECKSUM: checkpoint.checksum(tensors, metadata)}
    save_file(tensors, str(path), metadata=metadata)
