"""On a CUDA device: the model lives there, slices are taken there, the replay keeps its lesson.

Skipped where there is no CUDA (conftest.py); run on a GPU machine with `pytest -m cuda`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

import gradwire
from gradwire.replay import replay
from gradwire_server.app import start
from gradwire_server.trainer import Trainer

pytestmark = pytest.mark.cuda


@pytest.fixture
def cuda_client() -> Iterator[gradwire.Client]:
    running = start(Trainer(device="cuda", seed=0), "127.0.0.1", 0)
    with gradwire.connect(f"127.0.0.1:{running.port}") as client:
        yield client
    running.stop(grace=None)


def test_model_lives_on_the_gpu(cuda_client: gradwire.Client) -> None:
    assert cuda_client.list_tensors().device.startswith("cuda")


def test_replay_on_cuda_keeps_the_lesson(cuda_client: gradwire.Client) -> None:
    for init in ("fill", "random"):
        result = replay(cuda_client, init=init, seed=0, write=lambda line: None)  # type: ignore[arg-type]
        assert result.output_shape == (8, 20)
        assert result.grad_before_backward is None and result.grad_after_zero is None
        assert result.identity_holds
    np.testing.assert_allclose(result.grad_slice, [-0.0269, -0.0349, -0.0181], atol=2e-3)


def test_slice_is_taken_on_the_device(cuda_client: gradwire.Client) -> None:
    cuda_client.reset(0)
    read = cuda_client.read("linear.weight[3, ::-100]")
    torch.manual_seed(0)
    from gradwire_server.models import Simple

    local = Simple().linear.weight.detach().numpy()
    np.testing.assert_array_equal(read.value, local[3, ::-100])
    assert read.full_shape == (20, 3200)
