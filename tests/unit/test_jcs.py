"""RFC 8785 (JCS) as the audit hash's canonical form: saga_worker.audit.jcs against the RFC's
own examples (typed in from the RFC) and against an independent implementation (the
`rfc8785` package, used only here)."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from saga_worker.audit.jcs import JCSError, canonicalize, number

# RFC 8785 Appendix B: IEEE 754 bit patterns and their serialization.
RFC_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),  # -0
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]

# The awkward values of issue 14 and what JCS writes for each (Python's json.dumps writes
# the first three as 1e+16, -0.0 and 1e-07).
AWKWARD = [
    (1e16, "10000000000000000"),
    (-0.0, "0"),
    (1e-7, "1e-7"),
    (12.0, "12"),
    (1e21, "1e+21"),
    (0.1, "0.1"),
    (2**53 - 1, "9007199254740991"),
    (-(2**53) + 1, "-9007199254740991"),
]


def _double(bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(bits))[0]
    return value


@pytest.mark.parametrize(("bits", "expected"), RFC_NUMBERS)
def test_rfc_8785_appendix_b_numbers(bits: str, expected: str) -> None:
    x = _double(bits)
    assert number(x) == expected
    assert rfc8785.dumps(x).decode() == expected  # the independent implementation agrees


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_nan_and_infinity_are_refused(bits: str) -> None:
    with pytest.raises(JCSError):
        canonicalize({"x": _double(bits)})


@pytest.mark.parametrize(("value", "expected"), AWKWARD)
def test_awkward_numbers(value: float, expected: str) -> None:
    assert canonicalize(value) == expected == rfc8785.dumps(value).decode()


def test_rfc_8785_section_3_2_2_example() -> None:
    """The RFC's example input (section 3.2.2) and its canonical output, byte for byte."""
    source = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        ' "literals": [null, true, false]}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    value = json.loads(source)
    assert canonicalize(value) == expected
    assert rfc8785.dumps(value).decode() == expected


def test_rfc_8785_section_3_2_3_sorting_by_utf16_code_units() -> None:
    """The RFC's sorting example: the emoji (a surrogate pair, D83D DE00) sorts before
    U+FB33, where Python's code-point sort puts it last."""
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    order = ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    expected = "{" + ",".join(f"{_quoted(k)}:{_quoted(value[k])}" for k in order) + "}"
    assert canonicalize(value) == expected
    assert rfc8785.dumps(value).decode() == expected
    assert list(json.loads(json.dumps(value, sort_keys=True))) != order  # why v1 differed


def _quoted(text: str) -> str:
    return '"\\r"' if text == "\r" else f'"{text}"'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('quote " backslash \\', '"quote \\" backslash \\\\"'),
        ("\b\t\n\f\r", '"\\b\\t\\n\\f\\r"'),
        ("\x00\x01\x1f", '"\\u0000\\u0001\\u001f"'),
        ("\x7f \u2028 \u2029 / é 😀", '"\x7f \u2028 \u2029 / é 😀"'),
    ],
)
def test_string_escapes(text: str, expected: str) -> None:
    assert canonicalize(text) == expected == rfc8785.dumps(text).decode()


def test_lone_surrogates_and_non_json_values_are_refused() -> None:
    for bad in ("\ud800", {"\udfff": 1}, {1: "x"}, {"x": {1, 2}}, {"x": b"b"}, 10**400):
        with pytest.raises(JCSError):
            canonicalize(bad)


_KEYS = st.text(st.characters(codec="utf-8", categories=None), max_size=6) | st.sampled_from(
    ["\U0001f600", "\ufb33", "\ue000", "a", "A", "é"]
)
_SAFE_INTS = st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
_FINITE = st.floats(allow_nan=False, allow_infinity=False)
_JSON: Any = st.recursive(
    st.none() | st.booleans() | _SAFE_INTS | _FINITE | st.text(st.characters(codec="utf-8")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=20,
)


@given(_JSON)
def test_agrees_with_an_independent_implementation(value: Any) -> None:
    assert canonicalize(value) == rfc8785.dumps(value).decode()


@given(_FINITE)
def test_numbers_read_back_as_the_same_double(x: float) -> None:
    text = number(x)
    assert float(text) == x or (x == 0 and float(text) == 0)
    assert not math.isnan(float(text))
