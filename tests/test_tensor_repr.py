"""tensor_repr (torch's repr without torch) against torch's own repr, tensor by tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradwire.tensor_repr import tensor_repr

SHAPES = [
    (),
    (1,),
    (3,),
    (6,),
    (7,),
    (20,),
    (200,),
    (1000,),  # the threshold: shown whole
    (1001,),
    (5000,),
    (2, 3),
    (7, 7),
    (3, 400),
    (400, 3),
    (40, 40),
    (6, 200),  # summarised, its six rows all shown
    (2, 3, 4),
    (8, 8, 20),
    (2, 1, 3, 3),
    (4, 1, 5, 5),
    (10, 3, 5, 5),
    (0,),
    (0, 3),
    (2, 0, 4),
]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTEGERS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def _floats(rng: np.random.Generator, shape: tuple[int, ...], kind: int) -> np.ndarray:
    n = int(np.prod(shape))
    if kind == 0:  # weights and gradients: small, of both signs
        values = rng.normal(0, 0.1, n)
    elif kind == 1:  # whole numbers, as a float tensor of counts holds
        values = rng.integers(-50, 50, n).astype(np.float64)
    elif kind == 2:  # magnitudes far apart: scientific notation
        values = rng.normal(0, 1, n) * 10.0 ** rng.integers(-9, 9, n)
    elif kind == 3:  # huge
        values = rng.normal(0, 1e9, n)
    elif kind == 4:  # zeros, with a few values
        values = np.zeros(n)
        values[rng.integers(0, max(n, 1), min(n, 3))] = rng.normal(0, 1, min(n, 3))
    elif kind == 5:  # close to 1, where rounding to 4 places matters
        values = 1 + rng.normal(0, 1e-3, n)
    else:  # ordinary, large
        values = rng.normal(0, 30, n)
    if n and rng.random() < 0.4:  # NaN, infinities and negative zero among them
        specials = np.array([np.nan, np.inf, -np.inf, -0.0])
        where = rng.integers(0, n, min(n, 4))
        values[where] = specials[rng.integers(0, 4, len(where))]
    return values.reshape(shape)


def _cases() -> list[torch.Tensor]:
    rng = np.random.default_rng(20261204)
    cases = []
    for shape in SHAPES:
        for dtype in FLOATS:
            for kind in range(7):
                values = torch.from_numpy(_floats(rng, shape, kind))
                cases.append(values.to(dtype))
        for dtype in INTEGERS:
            info = torch.iinfo(dtype)
            for high in (10, info.max):
                low = max(info.min, -high)
                values = rng.integers(low, high, shape, endpoint=True)
                cases.append(torch.from_numpy(np.asarray(values)).to(dtype))
        cases.append(torch.from_numpy(np.asarray(rng.random(shape) < 0.5)))
    # all NaN, all zero, one infinity, a single scalar of each kind
    cases += [
        torch.full((3,), float("nan")),
        torch.zeros(4, 2),
        torch.tensor([float("inf")]),
        torch.tensor(-0.0),
        torch.tensor(7),
        torch.tensor(True),
        torch.tensor(1e-5, dtype=torch.float64),
        # scientific notation's three edges, each just short of it
        torch.tensor([1.0, 1000.0]),
        torch.tensor([1e8]),
        torch.tensor([1e-4, 0.01], dtype=torch.float64),
        # nested so deep that one value fills a line
        torch.full((1,) * 35 + (3,), 2**62),
    ]
    return cases


def _cases_of(dtype: torch.dtype) -> list[tuple[torch.Tensor, np.ndarray, str]]:
    """The cases of `dtype`, each with the array the client reads and the dtype's name:
    bfloat16 comes to the client as float32, which holds each value exactly."""
    name = str(dtype).removeprefix("torch.")
    cases = [
        (tensor, tensor.float().numpy() if dtype == torch.bfloat16 else tensor.numpy(), name)
        for tensor in _cases()
        if tensor.dtype == dtype
    ]
    assert len(cases) >= 20
    return cases


@pytest.mark.parametrize("dtype", [*FLOATS, *INTEGERS, torch.bool])
def test_tensor_repr_is_torch_s_repr(dtype: torch.dtype) -> None:
    for tensor, array, name in _cases_of(dtype):
        assert tensor_repr(array, name) == repr(tensor), (tuple(tensor.shape), tensor)


@pytest.mark.parametrize("dtype", FLOATS)
def test_autograd_s_suffixes_are_torch_s(dtype: torch.dtype) -> None:
    """`grad_fn=<...>` after a tensor a node made, `requires_grad=True` after a leaf that
    requires grad, each on a line of its own where the last line has no room, as torch
    prints them, the dtype's suffix before them."""
    for tensor, array, name in _cases_of(dtype):
        leaf = tensor.clone().requires_grad_()
        assert tensor_repr(array, name, requires_grad=True) == repr(leaf), tensor
        made = leaf * 1  # the same values, and a node: MulBackward0
        assert tensor_repr(array, name, grad_fn="MulBackward0") == repr(made), tensor
        # A node's output requires grad too, and torch names its node alone.
        both = tensor_repr(array, name, grad_fn="MulBackward0", requires_grad=True)
        assert both == repr(made), tensor


def test_a_device_is_named_first_as_torch_names_it() -> None:
    """A tensor on a GPU prints `device='cuda:0'` before its other suffixes (torch's
    _str_intern appends it first); checked in order against torch's print of an empty
    tensor on the meta device, whose suffixes follow the same code (its body is `...`, one
    character longer than `[]`)."""
    array = np.array([1.0, 2.0], np.float64)
    assert tensor_repr(array, device="cuda:0") == (
        "tensor([1., 2.], device='cuda:0', dtype=torch.float64)"
    )
    assert tensor_repr(array, device="cuda:0", grad_fn="SelectBackward0") == (
        "tensor([1., 2.], device='cuda:0', dtype=torch.float64,\n       grad_fn=<SelectBackward0>)"
    )
    empty = tensor_repr(np.zeros((0, 3)), device="meta", grad_fn="MulBackward0")
    meta = repr(torch.empty(0, 3, device="meta", dtype=torch.float64, requires_grad=True) * 1)
    assert empty.replace("tensor([]", "tensor(...") == meta
    assert tensor_repr(array, device="") == repr(torch.from_numpy(array))  # the CPU's: none


def test_tensor_repr_takes_the_array_s_own_dtype_by_default() -> None:
    array = np.array([1.5, 2.0], np.float64)
    assert (
        tensor_repr(array)
        == repr(torch.from_numpy(array))
        == ("tensor([1.5000, 2.0000], dtype=torch.float64)")
    )
    assert tensor_repr([[1, 2], [3, 4]]) == "tensor([[1, 2],\n        [3, 4]])"


def test_format_tensor_prints_a_torch_tensor_as_its_own_repr_and_none_as_none() -> None:
    """display.format_tensor takes what a caller holds: None for an absent tensor, and a
    torch tensor, whose own repr says more than its values (its grad_fn, its device)."""
    from gradwire.display import format_tensor

    assert format_tensor(None) == "None"
    made = torch.ones(3, requires_grad=True) * 2
    assert format_tensor(made) == repr(made)
    assert "grad_fn=<MulBackward0>" in format_tensor(made)
    assert format_tensor(made.detach().numpy()) == "tensor([2., 2., 2.])"
    # A bfloat16 tensor's values, read as float32: the dtype given is the one printed.
    widened = torch.tensor([0.5, 2.0], dtype=torch.bfloat16)
    assert format_tensor(widened.float().numpy(), "bfloat16") == repr(widened)


def test_format_read_names_the_device_the_server_holds_the_tensor_on() -> None:
    """A read from a GPU server prints as torch prints the tensor there, device='cuda:0' after
    the values (its values, on this side, are a plain array on the CPU)."""
    from gradwire.display import format_read
    from gradwire.results import TensorRead

    read = TensorRead("w", 1, np.ones(2, np.float32), (2,), (2,), "float32", device="cuda:0")
    assert format_read(read) == "tensor([1., 1.], device='cuda:0')"


def test_format_read_of_a_read_without_values_says_so_rather_than_print_none() -> None:
    """A read made with values=False holds a shape and no values: printing it as torch would
    needs the values, and "None" (an absent tensor's print) would say the tensor is absent."""
    from gradwire.display import format_read
    from gradwire.results import TensorRead

    shape_only = TensorRead("w", 1, None, (2, 3), (2, 3), "float32")
    with pytest.raises(ValueError, match=r"values=False.*shape \(2, 3\).*values=True"):
        format_read(shape_only)
    assert format_read(TensorRead("w.grad", 1, None, None, None, None)) == "None"  # absent
