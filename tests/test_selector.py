"""selector: what people type parses to the index numpy would apply."""

from __future__ import annotations

import numpy as np
import pytest

from gradwire.codec import INT64_MAX, INT64_MIN
from gradwire.selector import MAX_SELECTOR_CHARS, Selector, SelectorError, parse_selector


@pytest.mark.parametrize(
    "text",
    [
        "x",
        "x[0]",
        "x[0][0][0]",
        "x[0, :, 1:3]",
        "x[-1]",
        "x[::2]",
        "x[::-1]",
        "x[1:-1, ..., 0]",
        "x[None, 0]",
        "x[...]",
        "x[:, None][0]",
        "x[ 1 : 3 , -2 ]",
        "x[+1]",
        "x[()]",
        "x[None:2]",  # a None bound, as Python writes an empty one
        "x[1:None:None]",
    ],
)
def test_parsed_index_selects_what_numpy_selects(text: str) -> None:
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    selector = parse_selector(text)
    got = x
    for key in selector.index:
        got = got[key]
    expected = eval(text, {"x": x})  # the same text, as Python reads it
    np.testing.assert_array_equal(got, expected)


def test_name_and_text_form() -> None:
    selector = parse_selector("conv1.weight.grad[0][0][0]")
    assert selector.name == "conv1.weight.grad"
    assert selector.index == ((0,), (0,), (0,))
    assert str(parse_selector("conv1.weight[0, :, 1:3]")) == "conv1.weight[0, :, 1:3]"
    assert parse_selector("x[newaxis]").index == ((None,),)
    # An nn.Sequential's layers are named by number (found by the nineteenth session's
    # review: "0.weight" was refused).
    assert parse_selector("0.weight[1, :2]") == Selector("0.weight", ((1, slice(None, 2)),))
    assert parse_selector("layers.10.bias").name == "layers.10.bias"
    # A ModuleDict's keys as given (found by the forty-fourth session's walkthrough as a
    # researcher: "blocks.in-proj.weight" was refused, and could not be read at all).
    assert parse_selector("blocks.in-proj.weight[0]") == Selector("blocks.in-proj.weight", ((0,),))
    assert parse_selector(" layer 1.ß.weight ").name == "layer 1.ß.weight"
    # spaces before the index are not the name's: names may hold spaces, so a name of
    # "conv1.weight " would be asked of the server, which has none such
    assert parse_selector("conv1.weight [0]") == Selector("conv1.weight", ((0,),))


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "expected a tensor name"),
        ("conv1..weight", r"^'conv1\.\.weight': expected a tensor name"),
        (".weight", "expected a tensor name"),
        ("conv1.weight]", "expected a tensor name"),
        ("conv1.\x01weight", "expected a tensor name"),
        ("conv1.\x7fweight", "expected a tensor name"),
        ("conv1.\x85weight", "expected a tensor name"),  # C1 control characters too
        ("conv1.weight[0", r"^'conv1\.weight\[0': the index is not valid Python: \S"),
        ("conv1.weight[a]", r"^'conv1\.weight\[a\]': 'a' is not an integer"),
        ("conv1.weight[1.5]", "not an integer"),
        ("conv1.weight[0].grad", "only \\[...\\] may follow"),
        ("conv1.weight[::0]", r"^'conv1\.weight\[::0\]': slice step cannot be zero"),
        ("conv1.weight[..., ...]", "single ellipsis"),
        ("conv1.weight[[0, 1]]", "not an integer"),
        ("conv1.weight[True]", "not an integer"),
        ("conv1.weight[-None]", r"^'conv1\.weight\[-None\]': a sign needs a number after it"),
        ("conv1.weight[1:+None]", "a sign needs a number after it"),
    ],
)
def test_bad_text_is_refused_with_the_reason(text: str, complaint: str) -> None:
    with pytest.raises(SelectorError, match=complaint):
        parse_selector(text)


def test_the_ends_of_int64_are_indices_and_past_them_is_refused() -> None:
    assert parse_selector(f"x[{INT64_MIN}]").index == ((INT64_MIN,),)
    assert parse_selector(f"x[{INT64_MAX}]").index == ((INT64_MAX,),)
    for past in (INT64_MIN - 1, INT64_MAX + 1):
        said = f"index {past} is outside the range of an index, int64's: {INT64_MIN} to {INT64_MAX}"
        with pytest.raises(SelectorError, match=said):
            parse_selector(f"x[{past}]")


def test_a_selector_of_the_most_characters_taken_is_parsed() -> None:
    longest = "x" * (MAX_SELECTOR_CHARS - 3) + "[0]"
    assert parse_selector(longest) == Selector("x" * (MAX_SELECTOR_CHARS - 3), ((0,),))
    with pytest.raises(SelectorError, match="1,025 characters") as caught:
        parse_selector("x" + longest)
    assert str(caught.value).startswith(repr("x" * 60) + "...: a selector of 1,025")  # its start
    with pytest.raises(SelectorError, match="1,025 characters"):  # spaces count too
        parse_selector(" " + longest)
