"""message.py without sockets: integers JSON cannot carry, topic names, reserved types."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.errors import PublishError, Refusal
from tether.message import INT_MAX, INT_MIN, check_integers, check_topic, prepare


def refused(body: bytes) -> bool:
    try:
        check_integers(body)
    except PublishError as exc:
        assert exc.refusal is Refusal.INVALID and "integer out of range" in exc.message
        return True
    return False


@pytest.mark.parametrize("literal", [
    "0", "-0", "7", "-7",
    str(2**63 - 1), str(2**63), str(2**64 - 1), str(-(2**63)),  # the edges, inside
    "1234567890123456789",  # 19 digits, inside
    "12345678901234567890123.0", "1.2345678901234567890123", "12345678901234567890123e0",
    "12345678901234567890123E-3", "-12345678901234567890123.5e+2",  # floats are floats
])
def test_integers_in_range_and_floats_pass(literal: str) -> None:
    body = f'{{"type":"x","payload":{{"n":{literal},"list":[{literal}]}}}}'.encode()
    orjson.loads(body)  # valid JSON
    assert not refused(body)


@pytest.mark.parametrize("literal", [
    str(2**64), str(-(2**63) - 1), "12345678901234567890123", "-12345678901234567890123",
    "9" * 300,  # larger still is infinity: orjson refuses it as invalid
])
def test_integers_out_of_range_are_refused(literal: str) -> None:
    for body in (f'{{"type":"x","payload":{literal}}}', f'[1.5, {literal}]', literal,
                 f'{{"a":"{literal}","b":{literal}}}'):
        assert isinstance(orjson.loads(body.encode()), (dict, list, float)), body
        assert refused(body.encode()), body


def test_out_of_range_is_exactly_what_orjson_would_change() -> None:
    """The rule is orjson's: a literal it reads as an int is carried, one it rounds is refused."""
    for n in (2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, -(10**19)):
        body = f'{{"n":{n}}}'.encode()
        changed = orjson.loads(body)["n"] != n or not isinstance(orjson.loads(body)["n"], int)
        assert refused(body) is changed, n
        assert (INT_MIN <= n <= INT_MAX) is not changed


@pytest.mark.parametrize("body", [
    b'{"type":"x","payload":"12345678901234567890123"}',  # digits in a string
    b'{"type":"x","12345678901234567890123":1}',  # in a key
    b'{"type":"x","payload":"a\\"12345678901234567890123\\"b"}',  # after escaped quotes
    b'{"type":"x","payload":"\\\\","n":"99999999999999999999999"}',  # after an escaped backslash
    b'{"type":"x","payload":"\xc3\xa912345678901234567890123"}',  # after a UTF-8 letter
    b'{"type":"x","payload":1.5,"s":"12345678901234567890123"}',  # a float beside them
])
def test_digits_inside_strings_never_count(body: bytes) -> None:
    orjson.loads(body)
    assert not refused(body)


@given(st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(INT_MIN, INT_MAX) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
))
def test_any_json_orjson_can_write_passes(value: object) -> None:
    assert not refused(orjson.dumps(value))


@given(st.integers(INT_MAX + 1, 10**300) | st.integers(-(10**300), INT_MIN - 1), st.text())
def test_any_integer_out_of_range_is_refused_wherever_it_is(n: int, text: str) -> None:
    body = orjson.dumps({"s": text, "k": [text, 1.5]})[:-1] + f',"n":[{n}]}}'.encode()
    orjson.loads(body)
    assert refused(body)


def test_the_python_api_refuses_integers_json_cannot_carry() -> None:
    """`Tether.publish` takes Python ints, which are exact: orjson refuses to write them."""
    with pytest.raises(PublishError) as err:
        prepare({"type": "x", "payload": 2**64})
    assert err.value.refusal is Refusal.INVALID
    assert orjson.loads(prepare({"type": "x", "payload": 2**64 - 1}).body)["payload"] == 2**64 - 1


# ---- topics and types


@pytest.mark.parametrize("topic", [" ", "  ", "a ", " a", "\u3000a", "a\u00a0", "\t"])
def test_blank_or_padded_topics_are_refused(topic: str) -> None:
    with pytest.raises(PublishError) as err:
        check_topic(topic)
    assert err.value.refusal is Refusal.INVALID
    with pytest.raises(PublishError):
        prepare({"type": "x", "topic": topic})


@pytest.mark.parametrize("topic", ["a", "a b", "*", "orders/eu-1", "é"])
def test_ordinary_topics_pass(topic: str) -> None:
    assert check_topic(topic) == topic


@pytest.mark.parametrize("kind", ["Connected", "PONG", "Error", "reSync", "SUBSCRIBED",
                                  "Unsubscribed", "connected"])
def test_reserved_types_are_refused_in_any_case(kind: str) -> None:
    with pytest.raises(PublishError) as err:
        prepare({"type": kind})
    assert err.value.refusal is Refusal.INVALID and "reserved" in err.value.message


@pytest.mark.parametrize("kind", ["connect", "pongs", "errors", "order"])
def test_other_types_pass(kind: str) -> None:
    assert prepare({"type": kind}).topic == "*"
