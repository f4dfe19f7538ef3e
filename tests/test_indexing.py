"""Server-side indexing: numpy's basic indexing on torch tensors, negative steps included."""

from __future__ import annotations

import warnings
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import gradwire
from gradwire import errors
from gradwire._pb import trainer_pb2 as pb
from gradwire.fill import Fill
from gradwire.limits import MAX_INDEX_CHAIN
from gradwire.selector import parse_selector
from gradwire_server.errors import IndexOutOfRange, InvalidInput
from gradwire_server.indexing import Autograd, autograd_of, select

CASES = [
    "x[0]",
    "x[0][0][0]",
    "x[-1, -2]",
    "x[-4]",  # the first, counted from the end: -size is in range
    "x[0, :, 1:3]",
    "x[..., 0]",
    "x[1, ...]",
    "x[None]",
    "x[:, None, 0]",
    "x[::2]",
    "x[::-1]",
    "x[:, ::-2]",
    "x[3:0:-1, 1]",
    "x[5:1]",
    "x[-100:100]",
    "x[1:1]",
    "x[0:0:-1]",
    "x[..., ::-1][0]",
    "x[()]",
    "x[1, 2, 3, 4]",
    "x[:, :, :, -1:-4:-1]",
    # Steps far beyond any size: torch would overflow the stride (found by test_fuzz).
    "x[::4611686018427387904]",
    "x[1::9223372036854775807]",
    "x[::-4611686018427387904]",
    "x[:, -1:0:-9223372036854775807]",
    "x[:, :, 1:1:4611686018427387904]",
    # A slice of a dimension emptied by the key before: its step is clamped to at least 1.
    "x[1:1][::2]",
    "x[1:1][::-1]",
    "x[:, 2:2][:, ::-3]",
]


@pytest.mark.parametrize("text", CASES)
def test_select_matches_numpy(text: str) -> None:
    x = np.arange(4 * 3 * 5 * 6, dtype=np.float32).reshape(4, 3, 5, 6)
    chain = parse_selector(text).index
    got = select(torch.from_numpy(x), chain, "x")
    expected: Any = eval(text, {"x": x})
    np.testing.assert_array_equal(got.numpy(), expected)
    assert tuple(got.shape) == np.shape(expected)


def test_writable_select_is_a_view() -> None:
    x = torch.zeros(3, 4)
    select(x, parse_selector("x[1, ::2]").index, "x", writable=True).fill_(7)
    assert x[1].tolist() == [7, 0, 7, 0]


def test_writable_select_refuses_negative_steps() -> None:
    with pytest.raises(InvalidInput, match="negative slice steps can be read but not written"):
        select(torch.zeros(3), parse_selector("x[::-1]").index, "x", writable=True)


def test_out_of_range_names_the_dimension_and_size() -> None:
    with pytest.raises(IndexOutOfRange) as info:
        select(torch.zeros(16, 3), parse_selector("w[0][5]").index, "conv1.weight")
    message = info.value.message
    assert "index 5 is out of range for dimension 0 of conv1.weight[0] (size 3" in message
    with pytest.raises(IndexOutOfRange, match="index -17"):
        select(torch.zeros(16), parse_selector("w[-17]").index, "w")
    # In a key of several items, the dimension is the tensor's own, counted past the ones
    # the key's integers took and not counting new axes; the message names the valid range.
    for text in ["w[0, 5]", "w[None, 0, 5]", "w[0, None, 5]"]:
        with pytest.raises(IndexOutOfRange) as info:
            select(torch.zeros(16, 3), parse_selector(text).index, "w")
        assert info.value.message == (
            "index 5 is out of range for dimension 1 of w (size 3; valid: -3 to 2)"
        ), text
        assert info.value.metadata == {"index": "5", "dimension": "1", "size": "3"}, text


def test_too_many_indices_says_what_the_selection_has() -> None:
    """Said "it has 0 dimension(s) but 1 were indexed" of a selection that was already one
    value (found by a newcomer's walkthrough)."""
    with pytest.raises(InvalidInput) as caught:
        select(torch.zeros(2, 2), parse_selector("w[0, 0, 0]").index, "w")
    assert caught.value.message == (
        "too many indices for w: it has 2 dimensions, shape [2, 2], and 3 indices were given"
    )
    with pytest.raises(InvalidInput) as caught:
        select(torch.zeros(16, 3), parse_selector("w[0][0][0]").index, "w")
    assert caught.value.message == (
        "too many indices for w[0][0]: it is one value (no dimensions left to index), and 1 "
        "index was given"
    )
    with pytest.raises(InvalidInput, match=r"it has 1 dimension, shape \[3\], and 2 indices"):
        select(torch.zeros(3), parse_selector("w[0, 1]").index, "w")


def test_a_write_through_a_huge_step_writes_the_one_element_it_selects() -> None:
    x = torch.zeros(4, 3)
    part = select(x, parse_selector("x[1::4611686018427387904]").index, "x", writable=True)
    part.fill_(7.0)
    expected = torch.zeros(4, 3)
    expected[1] = 7.0
    assert torch.equal(x, expected)


def test_a_bound_past_minus_2_62_names_its_node_without_torch_s_warning() -> None:
    """torch warns "Truncating the start/stop/step of slice" of a bound of -2**63; the name is
    worked out with the bound brought within -2**62, selecting the same."""
    w = torch.nn.Parameter(torch.ones(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autograd_of(w, parse_selector("w[-9223372036854775808:]").index) == Autograd(
            True, "SliceBackward0"
        )


def test_new_axes_stop_at_the_most_dimensions_a_tensor_can_have() -> None:
    x = torch.zeros(2, 3)
    assert select(x, parse_selector("x[" + "None, " * 62 + "]").index, "x").dim() == 64
    for text in ["x[" + "None, " * 63 + "]", "x" + "[None]" * 63, "x[0]" + "[None]" * 64]:
        with pytest.raises(InvalidInput, match="more than 64 dimensions") as info:
            select(x, parse_selector(text).index, "x")
        assert info.value.reason == "BAD_INDEX"


def test_an_index_chain_longer_than_a_tensor_has_dimensions_is_refused(address: str) -> None:
    """Each Index of a chain is applied in turn, under the session's lock, and a chain cost
    nothing to send: a GetTensor of 3,000,000 empty Indexes (6 MB) took 13 s, the server
    1.5 GB higher, and another client's ZeroGrad waited seconds; a Watch reads its items'
    chains again at every update (a security review, seventy-sixth session)."""
    with grpc.insecure_channel(address) as channel:
        get = channel.unary_unary(
            "/gradwire.v1.Trainer/GetTensor",
            request_serializer=pb.GetTensorRequest.SerializeToString,
            response_deserializer=pb.GetTensorResponse.FromString,
        )
        whole = [pb.Index(items=[pb.IndexItem(slice=pb.Slice())])]
        at_limit = get(pb.GetTensorRequest(name="conv1.weight", index=whole * MAX_INDEX_CHAIN))
        assert list(at_limit.tensor.shape) == [16, 3, 3, 3]
        watch = channel.unary_stream(
            "/gradwire.v1.Trainer/Watch",
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=pb.WatchUpdate.FromString,
        )
        past = whole * (MAX_INDEX_CHAIN + 1)
        calls = [
            lambda: get(pb.GetTensorRequest(name="conv1.weight", index=past), timeout=30),
            lambda: get(pb.GetTensorRequest(name="conv1.weight", index=[pb.Index()] * 10**6)),
            lambda: next(
                watch(
                    pb.WatchRequest(items=[pb.WatchItem(name="conv1.weight", index=past)]),
                    timeout=30,
                )
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            error = errors.from_rpc_error(info.value)
            assert isinstance(error, errors.InvalidArgument), error
            assert error.reason == "BAD_INDEX"
            assert error.metadata == {"limit": str(MAX_INDEX_CHAIN)}
            assert f"at most {MAX_INDEX_CHAIN}" in error.message, error.message
            # What to do instead, not the bound alone.
            assert error.message.endswith(
                ": join them into one index, x[0, 1], or read the tensor and index it where you are"
            ), error.message
        # The count as it was sent, in thousands.
        with pytest.raises(grpc.RpcError) as million:
            get(pb.GetTensorRequest(name="conv1.weight", index=[pb.Index()] * 10**6))
        assert "bad index: a chain of 1,000,000 indexes (x[0][1]... is one per bracket)" in (
            million.value.details() or ""
        )
    # A TrainStep's fetch with such a chain too, refused before the step: nothing applied.
    with gradwire.connect(address) as client:
        before = client.list_tensors().version
        with pytest.raises(errors.InvalidArgument) as caught:
            client.train_step(
                Fill.ones(2, 3, 10, 10),
                Fill.ones(2, dtype="int64"),
                fetch=["conv1.weight" + "[:]" * (MAX_INDEX_CHAIN + 1)],
            )
        assert caught.value.reason == "BAD_INDEX"
        assert caught.value.metadata == {"limit": str(MAX_INDEX_CHAIN)}
        assert client.list_tensors().version == before
