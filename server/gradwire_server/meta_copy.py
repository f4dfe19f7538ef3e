"""A copy of a model to run on meta tensors (shapes and dtypes, no memory, no arithmetic),
sharing nothing with the model that the run could change.

The trainer runs one such copy per input shape (`Trainer._meta_run`) to count a pass's
floating-point operations, learn its layers' output shapes and estimate its memory
(pass_memory.py), and one at build time to find the buffers a forward pass registers.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import numpy as np
import torch
from torch import nn

#: A lazy layer's tensors before its first call, with no shape to copy.
_UNINITIALIZED = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
#: Attributes whose own attributes `meta_copy` does not look into: copy.deepcopy keeps
#: classes, functions and Python modules as they are.
_NOT_WALKED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
#: numpy arrays larger than this are shared with a meta copy, not copied (a 400 MB lookup
#: table was copied for each input shape: a review); a smaller one, a counter the model moves
#: in place, is copied (shared, the run moved it too: a review of that change).
_SHARED_ARRAY_BYTES = 1 << 20
#: How deep `meta_copy` looks for tensors in a model's attributes (a list in a dict on an
#: object: three).
_META_DEPTH = 4


def meta_copy(model: nn.Module, own_hook: Callable[..., object]) -> nn.Module:
    """A copy of `model` to run on meta tensors, sharing nothing with it that the run could
    change: its parameters and buffers, and the tensors it keeps in its attributes (in the
    lists, tuples, sets, dicts, objects and layers there, `_META_DEPTH` levels down), are
    meta tensors of the same shapes and dtypes; numpy arrays over `_SHARED_ARRAY_BYTES` are
    shared; everything else is copied (copy.deepcopy), hooks too, but for those
    `_shared_hook` names. A run on the model itself, its tensors swapped for the run, left
    behind what its forward kept (a tensor cached in a list in a dict, a submodule made when
    first needed, a counter tensor moved in place), which later calls then failed on or
    computed with (the forty-fifth to forty-seventh sessions' reviews). Raises what
    copy.deepcopy raises for an attribute it cannot copy (a lock, an open file): the caller
    then does without the run. `own_hook`: the function of the caller's own forward hooks
    (functools.partial over it), which the copy shares, so that the caller hears of the
    copy's module outputs.
    """
    memo: dict[int, Any] = {}
    hooks: list[object] = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key.endswith("hooks") and isinstance(value, dict):
                hooks.extend(value.values())
            elif key != "_modules":  # each layer is walked as one of model.modules()
                _to_meta(value, memo, _META_DEPTH)  # _parameters and _buffers among them
    closures: list[tuple[types.FunctionType, types.FunctionType]] = []
    for hook in hooks:
        if _shared_hook(hook, own_hook):
            memo[id(hook)] = hook
        elif isinstance(hook, types.FunctionType) and hook.__closure__:
            copied = _empty_copy(hook)
            memo[id(hook)] = copied
            closures.append((hook, copied))
    # Filled once every hook is in the memo: a closure's contents (the model itself, for a
    # `lambda m, i, o: setattr(self, ...)`) hold the layers, and so the other hooks.
    for hook, copied in closures:
        for old, new in zip(hook.__closure__ or (), copied.__closure__ or (), strict=True):
            with suppress(ValueError):  # an empty cell stays empty
                new.cell_contents = copy.deepcopy(old.cell_contents, memo)
    return copy.deepcopy(model, memo)


def _shared_hook(hook: object, own_hook: Callable[..., object]) -> bool:
    """Whether a meta copy shares `hook` with the model rather than copying it: the caller's
    own (a partial over `own_hook`: the trainer's `_kept_output`), and a method of an object
    that is no layer (a recorder's, say: copied, it copied all it holds, a trainer and its
    locks included, and failed). A layer's method, a partial over a layer and a closure
    over one are copied with it (`_empty_copy`): shared, they wrote the copy's meta tensors
    into the model's own buffers (reviews)."""
    if isinstance(hook, functools.partial):
        return hook.func is own_hook
    return isinstance(hook, types.MethodType) and not isinstance(hook.__self__, nn.Module)


def _empty_copy(function: types.FunctionType) -> types.FunctionType:
    """`function` again, over empty cells for `meta_copy` to fill with copies of what its
    closure holds: copy.deepcopy keeps a function as it is, and so what its closure holds (a
    hook `lambda m, i, o: setattr(self, ...)` wrote into the model, not its copy)."""
    cells = tuple(types.CellType() for _ in function.__closure__ or ())
    copied = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, cells
    )
    copied.__kwdefaults__ = function.__kwdefaults__
    return copied


def _to_meta(value: object, memo: dict[int, Any], depth: int) -> None:
    """Notes in `memo` a meta tensor for each tensor in `value`, `depth` levels down, and
    `value` itself for a large numpy array (`meta_copy`). A function of its own, not a
    closure: a recursive closure holds itself, and so the memo and the copy it holds, until
    Python's cycle collector runs (copies of a model's data piled up: a review)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo and not isinstance(value, _UNINITIALIZED):
            meta = torch.empty_like(value, device="meta")
            if isinstance(value, nn.Parameter):
                meta = nn.Parameter(meta, requires_grad=value.requires_grad)
            memo[id(value)] = meta
    elif isinstance(value, np.ndarray):
        if value.nbytes > _SHARED_ARRAY_BYTES:
            memo[id(value)] = value
    elif not depth or isinstance(value, _NOT_WALKED):
        return
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _to_meta(item, memo, depth - 1)
    elif isinstance(value, dict):
        for item in value.values():
            _to_meta(item, memo, depth - 1)
    elif hasattr(value, "__dict__"):  # an object of the model's own, a layer held aside
        for item in vars(value).values():
            _to_meta(item, memo, depth - 1)
