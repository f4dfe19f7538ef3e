"""The remote model as attributes and indexing, with the tutorial's own shape:
`remote.conv1.weight.grad[0][0][0]` names exactly that slice, and fetches only it.

Nothing is fetched until a value is asked for (`numpy()`, `torch()`, `fetch()`, `repr`,
`np.asarray()`); `shape`, `len()` and iteration ask the server for the shape, and `dir()`
for the tensors' names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from numbers import Integral
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from gradwire import codec
from gradwire.display import format_read
from gradwire.selector import parse_selector
from gradwire.transfer import Progress

if TYPE_CHECKING:
    import torch

    from gradwire.client import Client
    from gradwire.results import TensorRead

__all__ = ["RemoteModel", "RemoteTensor"]


def _set_slot(
    view: object,
    slots: tuple[str, ...],
    attribute: str,
    value: Any,
    prefix: Callable[[], str],
    usable: Callable[[], str] | None = None,
) -> None:
    """A view's own slot set; any other attribute refused, pointing to set(): assigning
    remote.conv1.weight = x raised "'RemoteTensor' object has no attribute 'weight'".
    `prefix()`: the view's selector and a dot, asked only then (its slots may be unset);
    `usable()`: the view to call set() on where it is not the one written."""
    if attribute in slots:
        object.__setattr__(view, attribute, value)
        return
    written = f"remote.{prefix()}{attribute}"
    target = f"remote.{usable()}" if usable is not None else written
    raise AttributeError(f"{written} = ...: a view is written with set(): {target}.set(value)")


def _layer_numbers(names: list[str], under: str) -> set[int]:
    """The numbers of the layers right under module `under` ("" for the model itself) that
    the server lists tensors of: an nn.Sequential's or nn.ModuleList's, as model[0]."""
    prefix = f"{under}." if under else ""
    below = {n[len(prefix) :].split(".")[0] for n in names if n.startswith(prefix)}
    return {int(part) for part in below if part.isdigit()}


class RemoteTensor:
    """A name on the server and a chain of index keys: a lazy view of one tensor or slice."""

    __slots__ = ("_chain", "_client", "_name")

    def __init__(self, client: Client, name: str, chain: tuple[codec.IndexKey, ...] = ()) -> None:
        self._client = client
        self._name = name
        self._chain = chain

    def __getattr__(self, attribute: str) -> RemoteTensor:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        if self._chain:
            names = self._client.list_tensors().names()  # one ListTensors for both asks
            layer = self._layer(names)
            if layer is not None:  # remote.features[0].weight: a Sequential's layer
                return RemoteTensor(self._client, f"{layer}.{attribute}")
            # remote.conv1.weight[0].grad raised AttributeError("grad"), with no word of why.
            index = self.selector[len(self._name) :]
            moved = f"{self._name}.{attribute}"
            if not any(n == moved or n.startswith(f"{moved}.") for n in names):
                # A tensor's own attribute (w[0].dtype, .device, .T) was sent to a name the
                # server has not, remote.conv1.weight.dtype[0] (found by a review of the
                # client's API as a researcher uses it).
                raise AttributeError(
                    f"{self.selector}.{attribute}: a name's attributes come before its index, "
                    f"and the server has no tensor {moved!r} (client.list_tensors() lists "
                    "them); a view's shape is .shape, and .fetch() reads its values with "
                    "their dtype and device"
                )
            raise AttributeError(
                f"{self.selector}.{attribute}: a name's attributes come before its index; "
                f"write remote.{moved}{index}"
            )
        return RemoteTensor(self._client, f"{self._name}.{attribute}")

    def _layer(self, names: list[str] | None = None) -> str | None:
        """The module this view names when its index is a layer's number (or numbers) in an
        nn.Sequential or nn.ModuleList, as model.features[0] or model.features[-1] in
        PyTorch: "features.0" when the server has tensors under that name; else None. It was
        read as an index into a tensor "features" (found by a walkthrough as a researcher).
        Asks the server for the names, unless given: a number is a layer's only when the
        model says so."""
        numbers: list[int] = []
        for key in self._chain:
            if isinstance(key, bool) or not isinstance(key, Integral):
                return None
            numbers.append(int(key))
        if names is None:
            names = self._client.list_tensors().names()
        layer = self._name
        for number in numbers:
            layers = _layer_numbers(names, layer)
            if not layers:
                return None
            if number < 0:  # from the end, as Sequential counts (every layer is listed: its
                number += max(layers) + 1  # output, if not its parameters)
            if number not in layers:
                return None
            layer = f"{layer}.{number}"
        return layer

    def __getitem__(self, key: codec.IndexKey | str) -> RemoteTensor:
        if isinstance(key, str):
            # A ModuleDict's key that is no attribute name: remote.blocks["in-proj"].weight,
            # as model.blocks["in-proj"].weight in PyTorch. It raised "an index must be an
            # integer" (found by a walkthrough as a researcher).
            if self._chain:
                raise TypeError(
                    f"{self.selector}[{key!r}]: a name's parts come before its index; write "
                    f"remote[{f'{self._name}.{key}'!r}] and index that"
                )
            return RemoteTensor(self._client, f"{self._name}.{key}")
        codec.index_to_proto(key)  # refuse what is not basic indexing now, not at fetch time
        return RemoteTensor(self._client, self._name, (*self._chain, key))

    def __dir__(self) -> list[str]:
        """The view's own methods and the names right under it on the server (its weight, a
        weight's grad and delta): dir(), and a notebook's completion, listed the methods
        alone below the model (found by a review of the client's API as a researcher uses
        it). An indexed view has none (a name's attributes come before its index), but for
        a layer by its number (remote.features[0]: its weight)."""
        own = {name for name in dir(RemoteTensor) if not name.startswith("_")}
        names = self._client.list_tensors().names()
        layer = self._layer(names) if self._chain else self._name
        if layer is None:
            return sorted(own)
        prefix = f"{layer}."
        below = {n[len(prefix) :].split(".")[0] for n in names if n.startswith(prefix)}
        return sorted(own | below)

    @property
    def selector(self) -> str:
        """The text form, e.g. "conv1.weight.grad[0][0][0]"."""
        chain = [k if isinstance(k, tuple) else (k,) for k in self._chain]
        return self._name + codec.format_index(chain)

    # The value follows as_torch, as in Client.read.
    @overload
    def fetch(
        self, *, as_torch: Literal[False] = False, progress: Progress | None = None
    ) -> TensorRead[np.ndarray[Any, Any] | None]: ...

    @overload
    def fetch(
        self, *, as_torch: Literal[True], progress: Progress | None = None
    ) -> TensorRead[torch.Tensor | None]: ...

    @overload
    def fetch(
        self, *, as_torch: bool, progress: Progress | None = None
    ) -> TensorRead[np.ndarray[Any, Any] | torch.Tensor | None]: ...

    def fetch(self, *, as_torch: bool = False, progress: Progress | None = None) -> TensorRead[Any]:
        """GetTensor for this name and slice: values, version and shapes, as Client.read
        reads them (`as_torch`: the values as a torch tensor; `progress`: a callable told of
        the bytes as they come, as read's)."""
        return self._client._read(self._name, self._chain, as_torch=as_torch, progress=progress)

    def numpy(self) -> np.ndarray[Any, Any] | None:
        """The values as a numpy array; None when absent (a gradient before Backward)."""
        return self.fetch().value

    def torch(self) -> torch.Tensor | None:
        """The values as a CPU torch tensor in their own dtype; None when absent."""
        return self.fetch(as_torch=True).value

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The shape, fetched without the values; None when absent."""
        return self._client._read(self._name, self._chain, values=False).shape

    def __len__(self) -> int:
        """The first dimension, as torch's len(); one read of the shape, without values.
        Without it, iterating went on asking for w[0], w[1], ... for ever (Python's old
        protocol for a class with __getitem__ alone)."""
        shape = self.shape
        if shape is None:
            raise ValueError(f"{self.selector} is absent (None) on the server: it has no length")
        if not shape:  # torch.tensor(view) walks it as a sequence, and lands here
            raise TypeError(
                f"len() of a 0-d tensor ({self.selector}); for its value: .numpy(), .torch() "
                "or np.asarray(view)"
            )
        return shape[0]

    def __setattr__(self, attribute: str, value: Any) -> None:
        _set_slot(
            self,
            RemoteTensor.__slots__,
            attribute,
            value,
            lambda: f"{self.selector}.",
            lambda: self._with(attribute),
        )

    def _with(self, attribute: str) -> str:
        """How to write the view of `attribute` under this one: remote.conv1.weight[0]'s
        grad is remote.conv1.weight.grad[0], a name's attributes coming before its index
        (__getattr__); a layer's, remote.features[0].weight, as it is. The hint of
        `remote.conv1.weight[0].grad = x` named remote.conv1.weight[0].grad.set(value),
        which __getattr__ refuses."""
        if self._chain and self._layer() is None:
            return f"{self._name}.{attribute}{self.selector[len(self._name) :]}"
        return f"{self.selector}.{attribute}"

    def __bool__(self) -> bool:
        """True: a view is not its values (without this, bool() would call __len__, and read
        the shape)."""
        return True

    def __iter__(self) -> Iterator[RemoteTensor]:
        """The views self[0], self[1], ... along the first dimension (its length read once)."""
        return (self[i] for i in range(len(self)))

    def set(self, value: Any, *, progress: Progress | None = None) -> int:
        """Writes value (broadcast, cast) into this tensor or slice; returns the new version.
        `progress`: a callable told of the bytes as they go, as Client.set's."""
        return self._client._set(self._name, self._chain, value, progress)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray[Any, Any]:
        """numpy's protocol: the values read now, fresh memory of their own (read-only, as a
        read's may be, but with `copy=True`); a `dtype` other than theirs needs a copy,
        which `copy=False` refuses as numpy does. `copy` was ignored: np.array(remote,
        copy=True) could hand back a read-only array (found by a review)."""
        value = self.numpy()
        if value is None:
            raise ValueError(f"{self.selector} is absent (None) on the server")
        if dtype is not None and np.dtype(dtype) != value.dtype:
            if copy is False:
                raise ValueError(
                    f"{self.selector} holds {value.dtype}: as {np.dtype(dtype)} it needs a copy, "
                    "which copy=False forbids"
                )
            return value.astype(dtype)
        return value.copy() if copy and not value.flags.writeable else value

    def __repr__(self) -> str:
        """Torch's repr of the tensor on the server, printed from numpy (tensor_repr.py):
        torch is not imported for it, a bfloat16 tensor, read as float32, still says
        `dtype=torch.bfloat16`, and a parameter's slice ends `grad_fn=<SelectBackward0>`."""
        return format_read(self.fetch())


#: Where a served model's names are, for what iterates a RemoteModel.
_NAMES_ARE = (
    "its tensors' names are client.list_tensors().names(), its top-level names "
    "dir(client.remote); an nn.Sequential's layers are remote[0], remote[1], ..."
)


class RemoteModel:
    """The served model: `remote.conv1.weight`, `remote.output`, `remote["conv1.weight"]`."""

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getattr__(self, attribute: str) -> RemoteTensor:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return RemoteTensor(self._client, attribute)

    def __getitem__(self, selector: str | int) -> RemoteTensor:
        """remote["conv1.weight"], or a selector with its index: remote["conv1.weight[0]"]; an
        nn.Sequential's layer by number, remote[0].weight, as model[0].weight in PyTorch."""
        if isinstance(selector, Integral) and not isinstance(selector, bool):
            return RemoteTensor(self._client, self._layer(int(selector)))
        parsed = parse_selector(selector)  # type: ignore[arg-type]  # TypeError, saying why
        return RemoteTensor(self._client, parsed.name, parsed.index)

    def _layer(self, number: int) -> str:
        """The name of the model's layer `number` (an nn.Sequential served whole); one from
        the end, as model[-1] in PyTorch, found among the server's names. A negative number
        was taken for a selector, and refused as not a str (found by a review of the
        client)."""
        if number >= 0:
            return str(number)
        layers = _layer_numbers(self._client.list_tensors().names(), "")
        count = max(layers) + 1 if layers else 0
        if number < -count:
            raise IndexError(
                f"remote[{number}]: the served model has "
                + (f"{count} numbered layers (0 to {count - 1})" if count else "no numbered layers")
            )
        return str(number + count)

    def __setattr__(self, attribute: str, value: Any) -> None:
        _set_slot(self, RemoteModel.__slots__, attribute, value, str)

    def __iter__(self) -> Iterator[RemoteTensor]:
        """TypeError: without it, Python iterated by __getitem__, which takes any layer's
        number, so `list(remote)` and `"conv1" in remote` made remote[0], remote[1], ...
        for ever (found by a review of the client's API as a researcher uses it)."""
        raise TypeError(f"the remote model is not iterable: {_NAMES_ARE}")

    def __contains__(self, name: object) -> bool:
        """TypeError, as __iter__, saying where to look a name up."""
        raise TypeError(f"`in` the remote model: {_NAMES_ARE}")

    def __dir__(self) -> list[str]:
        names = self._client.list_tensors().names()
        return sorted({name.split(".")[0] for name in names})

    def __repr__(self) -> str:
        """Which client's model, without a call: a notebook showed `client.remote` as
        <gradwire.remote.RemoteModel object at 0x...> (found by a review of the client as a
        researcher uses it in a notebook)."""
        return f"<the model served to {self._client!r}: dir() lists its names>"
