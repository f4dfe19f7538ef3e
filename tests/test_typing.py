"""The client as a type-checked user's code sees it: mypy --strict over snippets a user
writes against the package (which ships py.typed), each asserting the types it is given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for the module's snippets: torch's and numpy's stubs read once."""
    return tmp_path_factory.mktemp("mypy-cache")


def check(snippet: str, tmp_path: Path, cache: Path) -> None:
    """Fails with mypy's output unless mypy --strict takes `snippet` as a user's module."""
    module = tmp_path / "users_module.py"
    module.write_text(snippet)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--ignore-missing-imports", "--cache-dir", str(cache), str(module)],
        env={**os.environ, "MYPYPATH": str(ROOT / "client")},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_get_is_an_array_or_with_as_torch_a_tensor(tmp_path: Path, cache: Path) -> None:
    # get() said `ndarray | Tensor | None` whatever as_torch was: a user's
    # `w: torch.Tensor | None = client.get(name, as_torch=True)`, or
    # `plot_array(client.get(name), ...)` once None was ruled out, was refused by mypy
    # --strict and pyright, the value known from the call (found by a review of the client
    # as a type-checked user's code sees it).
    check(
        """
from typing import Any, TypeAlias, assert_type

import numpy as np
import torch

import gradwire
from gradwire.plot import plot_array

Either: TypeAlias = np.ndarray[Any, Any] | torch.Tensor | None


def reads(client: gradwire.Client, flag: bool) -> None:
    assert_type(client.get("conv1.weight"), np.ndarray[Any, Any] | None)
    assert_type(client.get("conv1.weight", (0,), as_torch=False), np.ndarray[Any, Any] | None)
    assert_type(client.get("conv1.weight", as_torch=True), torch.Tensor | None)
    assert_type(client.get("conv1.weight", as_torch=flag), Either)
    weight = client.get("conv1.weight", out=np.empty((16, 3, 3, 3), np.float32))
    if weight is not None:
        plot_array(weight, "weight.png", name="conv1.weight")
    with client.pipeline() as p:
        array = p.get("conv1.weight")
        tensor = p.get("conv1.weight", as_torch=True)
        either = p.get("conv1.weight", as_torch=flag)
    assert_type(array.result(), np.ndarray[Any, Any] | None)
    assert_type(tensor.result(), torch.Tensor | None)
    assert_type(either.result(), Either)
    with client.batch() as b:
        batched = b.get("conv1.weight", as_torch=True)
    assert_type(batched.result(), torch.Tensor | None)
""",
        tmp_path,
        cache,
    )


def test_progress_takes_any_callable_of_two_ints(tmp_path: Path, cache: Path) -> None:
    # `progress=` of get, read, set and a remote view's fetch and set: a function, a lambda,
    # a bound method that returns something (a progress bar's update), each typed alike.
    check(
        """
from typing import Any

import numpy as np

import gradwire


class Bar:
    def update(self, done: int, total: int) -> bool:
        return done == total


def shown(done: int, total: int) -> None:
    print(done, total)


def moves(client: gradwire.Client, bar: Bar) -> None:
    value: np.ndarray[Any, Any] | None = client.get("linear.weight", progress=shown)
    client.get("linear.weight", as_torch=True, progress=bar.update)
    client.read("linear.weight", progress=lambda done, total: None)
    version: int = client.set("linear.weight", 0.5, progress=bar.update)
    client.remote.linear.weight.fetch(progress=shown)
    client.remote.linear.weight.set(value, progress=shown)
""",
        tmp_path,
        cache,
    )


def test_a_fill_takes_numpy_s_and_torch_s_dtypes(tmp_path: Path, cache: Path) -> None:
    # Fill's constructors take a dtype as a name, or as numpy's or torch's dtype, as their
    # docstrings say and as torch does, but were typed `str | None`: a type-checked user's
    # Fill.ones(8, dtype=torch.int64) was refused by mypy --strict and pyright (found by a
    # review of the client as a type-checked user's code sees it).
    check(
        """
import numpy as np
import torch

from gradwire import Fill

fills = [
    Fill.ones(8, dtype=torch.int64),
    Fill.zeros(8, 3, dtype=np.float32),
    Fill.constant(0.5, (8, 3), dtype=np.dtype("float64")),
    Fill.uniform(8, 3, low=-1, high=1, seed=1, dtype=torch.float16),
    Fill.normal(8, 3, std=2.0, dtype="bfloat16"),
    Fill.randint(0, 20, 8, seed=2, dtype=np.int32),
    Fill.ones(8),
]
""",
        tmp_path,
        cache,
    )


def test_what_watch_train_and_stats_give_is_named_by_gradwire(tmp_path: Path, cache: Path) -> None:
    # The results of the unary calls were exported from gradwire (gradwire.TensorRead), but
    # not what watch(), train() and stats() give, the README's WatchUpdate and
    # TrainProgress among them: a type-checked user's handler,
    # `def show(update: gradwire.WatchUpdate)`, was refused by mypy --strict ("Module has no
    # attribute") and pyright (found by a review of the client as a type-checked user's
    # code sees it).
    check(
        """
import gradwire


def show(update: gradwire.WatchUpdate) -> float | None:
    loss: gradwire.Watched = update["loss"]
    stats: gradwire.Stats | None = loss.stats
    histogram: gradwire.Histogram | None = stats.histogram if stats else None
    return histogram.low if histogram else None


def run(client: gradwire.Client) -> gradwire.TrainProgress | None:
    summary: gradwire.TensorStats = client.stats("loss")
    last = None
    for progress in client.train(gradwire.Fill.ones(8, 3), gradwire.Fill.ones(8), 10):
        last = progress
    print(summary)
    return last
""",
        tmp_path,
        cache,
    )
    import gradwire

    for name in ("WatchUpdate", "Watched", "Stats", "Histogram", "TensorStats", "TrainProgress"):
        assert name in gradwire.__all__ and getattr(gradwire, name).__module__ == "gradwire.updates"


def test_plot_histogram_takes_a_shape_as_any_sequence(tmp_path: Path, cache: Path) -> None:
    # plot_histogram's `shape` goes to the title alone (heading_of takes any sequence), but
    # was typed a tuple: a type-checked user's shape=[16, 3, 3, 3], or a torch.Size, was
    # refused by mypy --strict and pyright (found by a review of the client as a
    # type-checked user's code sees it).
    check(
        """
import torch

import gradwire
from gradwire.plot import PlotResult, plot_histogram


def draw(client: gradwire.Client, weight: torch.Tensor) -> list[PlotResult]:
    stats = client.stats("conv1.weight", bins=20).stats
    assert stats is not None
    return [
        plot_histogram(stats, "a.png", label="conv1.weight", shape=[16, 3, 3, 3]),
        plot_histogram(stats, "b.png", label="conv1.weight", shape=weight.shape),
    ]
""",
        tmp_path,
        cache,
    )


def test_open_session_s_optimizer_settings_are_typed(tmp_path: Path, cache: Path) -> None:
    # open_session() and a pipeline's set_optimizer() took their optimizer settings as
    # `**settings: Any`: an IDE showed no lr, momentum..., and mypy --strict and pyright took
    # open_session(learning_rate=1e-3) or lr="fast", refused only when run, where
    # Client.set_optimizer names each (found by a review of the client as a type-checked
    # user's code sees it).
    snippet = """
import gradwire


def run(client: gradwire.Client) -> None:
    with client.open_session(seed=0, optimizer="adam", lr=1e-3, beta1=0.9, eps=None) as mine:
        with mine.pipeline() as p:
            p.set_optimizer("sgd", lr=0.1, momentum=0.9, nesterov=True)
            p.set_optimizer(lr=0.01, keep_state=True)
"""
    check(snippet, tmp_path, cache)
    wrong = snippet.replace("lr=1e-3", "learning_rate=1e-3").replace("lr=0.1", 'lr="fast"')
    wrong = wrong.replace("nesterov=True", "nesterov=0.5")  # a flag, refused when run
    with pytest.raises(AssertionError) as refused:
        check(wrong, tmp_path, cache)
    assert 'Unexpected keyword argument "learning_rate"' in str(refused.value)
    assert 'Argument "lr" to "set_optimizer" of "Pipeline" has incompatible type "str"' in str(
        refused.value
    )
    assert (
        'Argument "nesterov" to "set_optimizer" of "Pipeline" has incompatible type "float"'
        in str(refused.value)
    )


#: A user's numbers as numpy gives them: a seed from np.arange, a count from an array's
#: size, a bound from a float32 array; each taken at run time (limits.whole and real).
NUMPY_NUMBERS = """
import numpy as np

import gradwire
from gradwire import Fill
from gradwire.replay import replay


def run(client: gradwire.Client) -> list[object]:
    seed, count, bound = np.int64(0), np.zeros(2).size, np.float32(1.0)
    done: list[object] = [client.reset(seed=seed), client.fill_parameters(bound / 10)]
    done += [client.stats("conv1.weight", bins=np.int64(4), low=-bound, high=bound).version]
    inputs, target = Fill.ones(2, 3, 10, 10), Fill.ones(2, dtype="int64")
    done += [p.step for p in client.train(inputs, target, np.int64(count), every=np.int64(1))]
    watch = client.watch(["loss"], every_steps=np.int64(1), bins=np.int64(2))
    done += [next(watch).version]
    watch.close()
    with client.pipeline() as p:
        reset, filled = p.reset(np.int64(0)), p.fill_parameters(bound)
        stats = p.stats("loss", bins=np.int64(2), low=np.float32(0), high=bound)
    with client.open_session(seed=seed, lr=bound / 10) as mine:
        done += [mine.session is not None, mine.set_optimizer(lr=bound, momentum=np.int64(0)).lr]
    return done + [reset.result(), filled.result(), stats.result().version]


def replayed(client: gradwire.Client) -> bool:
    return replay(client, init="random", seed=np.int64(1), write=lambda line: None).identity_holds
"""


def test_numpy_s_numbers_are_taken_as_typed(tmp_path: Path, cache: Path, client: Any) -> None:
    # A seed, a count of steps or bins, a bound, a fill value or an optimizer setting: each
    # is checked by limits.whole or limits.real, which take numpy's integers and floats
    # (np.int64 from np.arange, np.float32), but was typed int or float, which mypy
    # --strict and pyright refuse them for, as they did for expecting() (found by a review
    # of the client as a type-checked user's code sees it).
    check(NUMPY_NUMBERS, tmp_path, cache)
    namespace: dict[str, Any] = {}
    exec(compile(NUMPY_NUMBERS, "users_module.py", "exec"), namespace)
    assert namespace["run"](client)[3:5] == [1, 2]
    assert namespace["replayed"](client)


#: Index keys of numpy's integers, as a loop over np.arange or np.argmax gives them.
NUMPY_INDEXES = """
import numpy as np

import gradwire


def read(client: gradwire.Client) -> list[object]:
    first = np.int64(0)
    rows: list[object] = [client.remote.conv1.weight[i][0, 0].numpy() for i in np.arange(2)]
    return rows + [
        client.get("conv1.weight", first),
        client.get("conv1.weight", (first, slice(None), np.int32(1))),
        client.read("conv1.weight", (first, ..., None)).shape,
    ]
"""


def test_an_index_of_numpy_s_integers_is_taken_as_typed(
    tmp_path: Path, cache: Path, client: Any
) -> None:
    # An index key's integers may be numpy's (codec._as_int takes them), but IndexKey said
    # int: a type-checked user's remote.conv1.weight[i] for i in np.arange(...), or
    # get(name, np.int64(0)), was refused by mypy --strict and pyright (found by a review of
    # the client as a type-checked user's code sees it).
    check(NUMPY_INDEXES, tmp_path, cache)
    namespace: dict[str, Any] = {}
    exec(compile(NUMPY_INDEXES, "users_module.py", "exec"), namespace)
    rows = namespace["read"](client)
    assert [row.shape for row in rows[:2]] == [(3,), (3,)]
    assert rows[2].shape == (3, 3, 3) and rows[3].shape == (3, 3) and rows[4] == (3, 3, 3, 1)
    assert client.remote.conv1.weight[np.int64(1)][0, np.int32(2)].selector == (
        "conv1.weight[1][0, 2]"
    )


#: Fills made from numpy's numbers: a batch size from an array, seeds from np.arange.
NUMPY_FILLS = """
import numpy as np

from gradwire import Fill


def fills(batch: np.int64, bound: np.float32) -> list[Fill]:
    made = [Fill.uniform(batch, 3, low=-bound, high=bound, seed=s) for s in np.arange(2)]
    return made + [
        Fill.ones(batch, np.int64(3)),
        Fill.zeros((batch, 3)),
        Fill.constant(bound, batch, 3),
        Fill.normal(batch, 3, mean=bound, std=bound, seed=np.int64(7)),
        Fill.randint(np.int64(0), np.int64(20), batch, seed=np.uint64(2)),
    ]
"""


def test_a_fill_of_numpy_s_numbers_is_taken_as_typed(tmp_path: Path, cache: Path) -> None:
    # A Fill's dimensions, bounds and seed may be numpy's numbers (its checks, _dimensions,
    # limits.real and check_seed, take them), but were typed int and float: a type-checked
    # user's Fill.uniform(batch, 3, seed=s) for s in np.arange(n) was refused by mypy
    # --strict and pyright (found by a review of the client as a type-checked user's code
    # sees it).
    check(NUMPY_FILLS, tmp_path, cache)
    namespace: dict[str, Any] = {}
    exec(compile(NUMPY_FILLS, "users_module.py", "exec"), namespace)
    made = namespace["fills"](np.int64(8), np.float32(0.5))
    assert [fill.seed for fill in made] == [0, 1, 0, 0, 0, 7, 2]
    assert all(fill.shape == (8, 3) for fill in made[:-1]) and made[-1].shape == (8,)
    assert {type(fill.seed) for fill in made} == {int} and made[5].value == made[0].high == 0.5
    assert type(made[0].low) is float and made[-1].high == 20.0


#: A read's value as the call gives it: an array, a tensor with as_torch=True, None when
#: absent; a watched tensor's an array or None.
READ_VALUES = """
from typing import Any, TypeAlias, assert_type

import numpy as np
import torch

import gradwire

Array: TypeAlias = np.ndarray[Any, Any]
Either: TypeAlias = Array | torch.Tensor | None


def reads(client: gradwire.Client, flag: bool) -> list[object]:
    read = client.read("conv1.weight")
    assert_type(read, gradwire.TensorRead[Array | None])
    assert_type(client.read("conv1.weight", as_torch=True).value, torch.Tensor | None)
    assert_type(client.read("conv1.weight", (0,), as_torch=flag).value, Either)
    assert_type(client.remote.conv1.weight.fetch().value, Array | None)
    assert_type(client.remote.conv1.weight.fetch(as_torch=True).value, torch.Tensor | None)
    inputs, target = gradwire.Fill.ones(2, 3, 10, 10), gradwire.Fill.ones(2, dtype="int64")
    step = client.train_step(inputs, target, fetch=["conv1.weight.grad"])
    assert_type(step.fetched[0].value, Array | None)
    tensors = client.train_step(inputs, target, fetch=["loss"], as_torch=True).fetched
    assert_type(tensors[0].value, torch.Tensor | None)
    with client.pipeline() as p:
        piped = p.read("conv1.weight", as_torch=True)
        stepped = p.train_step(inputs, target, fetch=["loss"])
    with client.batch() as b:
        batched = b.read("conv1.weight")
    assert_type(piped.result().value, torch.Tensor | None)
    assert_type(stepped.result().fetched[0].value, Array | None)
    assert_type(batched.result().value, Array | None)
    watch = client.watch(["conv1.weight[0]"], values=True)
    watched = next(watch)["conv1.weight[0]"]
    watch.close()
    assert_type(watched.value, Array | None)
    total = read.value.sum() if read.value is not None else 0.0
    return [read, total, piped.result(), step, watched.value]


def bare(read: gradwire.TensorRead, step: gradwire.TrainStepResult) -> float:
    # Written bare, as before they were generic: the value is Any, as it was.
    return float(read.value.sum() + step.fetched[0].value.sum())
"""


def test_a_read_s_value_is_typed_as_the_call_gives_it(
    tmp_path: Path, cache: Path, client: Any
) -> None:
    # TensorRead.value and Watched.value were typed Any: a type-checked user's
    # client.read("w").value.sum() went unchecked and an IDE completed nothing, where get()
    # gave an array, or with as_torch=True a tensor (found by a review of the client as an
    # IDE and a type checker show it). A read is as it was at run time: its repr and its
    # pickle.
    import pickle

    import torch

    import gradwire

    check(READ_VALUES, tmp_path, cache)
    namespace: dict[str, Any] = {}
    exec(compile(READ_VALUES, "users_module.py", "exec"), namespace)
    read, total, piped, step, watched = namespace["reads"](client, False)
    assert type(read.value) is np.ndarray and read.value.shape == (16, 3, 3, 3)
    assert total == read.value.sum() and isinstance(piped.value, torch.Tensor)
    assert type(watched) is np.ndarray and watched.shape == (3, 3, 3)
    assert namespace["bare"](read, step) == pytest.approx(
        float(read.value.sum() + step.fetched[0].value.sum())
    )
    assert repr(read).startswith("TensorRead(name='conv1.weight', version=")
    again = pickle.loads(pickle.dumps(read))
    assert type(again) is gradwire.TensorRead and again.name == read.name
    assert np.array_equal(again.value, read.value) and again.shape == read.shape
    assert pickle.loads(pickle.dumps(step)).fetched[0].name == "conv1.weight.grad"


def test_every_public_class_has_a_docstring_an_ide_shows() -> None:
    # The errors, one class per status, and most results had none: an IDE's hover on
    # `except errors.NotFound` or a `ForwardResult` showed nothing (a dataclass's made-up
    # signature at best), where the README's "Errors" table says what raises each and what
    # to do (found by a review of the client as an IDE and a type checker show it).
    import ast
    import importlib
    import inspect
    import pkgutil
    import re

    import grpc

    import gradwire
    from gradwire import errors

    for found in pkgutil.iter_modules(gradwire.__path__, "gradwire."):
        module = importlib.import_module(found.name)
        public = set(getattr(module, "__all__", ()))
        bare = [
            node.name
            for node in ast.parse(inspect.getsource(module)).body
            if isinstance(node, ast.ClassDef) and node.name in public
            if not ast.get_docstring(node)
        ]
        assert not bare, f"{found.name}: {bare} have no docstring"
    # Each error's says the status it is raised for first, and names only the reasons the
    # contract gives (the README's table, the .proto's list).
    contract = (ROOT / "README.md").read_text() + (
        ROOT / "proto/gradwire/v1/trainer.proto"
    ).read_text()
    codes = {code.name for code in grpc.StatusCode}
    for cls in errors.RemoteError.__subclasses__():
        doc = cls.__doc__ or ""
        assert doc.startswith(f"{cls.code.name}: "), cls.__name__
        named = set(re.findall(r"\b[A-Z][A-Z_]{3,}\b", doc)) - codes
        assert all(reason in contract for reason in named), (cls.__name__, named)


#: Names and selectors as a user's code has them at hand: a generator, a dict's keys, a
#: filter over list_tensors().
ITERABLE_NAMES = """
import gradwire


def run(client: gradwire.Client) -> list[object]:
    listing = client.list_tensors()
    weights = (t.name for t in listing.tensors if t.kind == "parameter")
    wanted = {"conv1.weight.grad[0]": "first filter's gradient", "loss": "the loss"}
    inputs, target = gradwire.Fill.ones(2, 3, 10, 10), gradwire.Fill.ones(2, dtype="int64")
    done: list[object] = [client.fill_parameters(0.01, weights)]
    step = client.train_step(inputs, target, fetch=wanted.keys())
    done += [read.name for read in step.fetched]
    with client.pipeline() as p:
        stepped = p.train_step(inputs, target, fetch=map(str.strip, [" loss "]))
        filled = p.fill_parameters(0.02, filter(lambda n: n.endswith("bias"), listing.names()))
    watch = client.watch(s for s in wanted)
    update = next(watch)
    watch.close()
    return done + [stepped.result().fetched[0].name, filled.result(), update.tensors]
"""


def test_names_and_selectors_are_taken_from_any_iterable(
    tmp_path: Path, cache: Path, client: Any
) -> None:
    # watch's selectors, train_step's fetch and fill_parameters' names (a pipeline's too)
    # are read once, as a list (unary.tensor_names), but were typed Sequence[str]: a
    # type-checked user's watch(s for s in ...) or fetch=wanted.keys() was refused by
    # mypy --strict and pyright though it runs (found by a review of the client as an IDE
    # and a type checker show it).
    check(ITERABLE_NAMES, tmp_path, cache)
    namespace: dict[str, Any] = {}
    exec(compile(ITERABLE_NAMES, "users_module.py", "exec"), namespace)
    done = namespace["run"](client)
    assert done[1:3] == ["conv1.weight.grad", "loss"] and done[3] == "loss"
    assert [watched.selector for watched in done[5]] == ["conv1.weight.grad[0]", "loss"]
    assert done[4] > done[0] > 0
