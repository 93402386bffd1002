"""The byte formats: header pairs and property paths."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from forkgw.wasm.abi import decode_pairs, encode_pairs, pairs_size, split_path


def test_pairs_layout_matches_the_abi_example():
    data = encode_pairs([(b"a", b"1"), (b"b", b"22")])
    assert data == bytes.fromhex("02000000 01000000 01000000 01000000 02000000 6100 3100 6200 323200")


def test_empty_map_is_zero_bytes_and_both_empty_forms_decode():
    assert encode_pairs([]) == b""
    assert decode_pairs(b"") == []
    assert decode_pairs(b"\0") == []
    assert decode_pairs(struct.pack("<I", 0)) == []


def test_duplicate_keys_and_empty_values_survive():
    pairs = [(b"x", b""), (b"x", b"2"), (b"", b"v")]
    assert decode_pairs(encode_pairs(pairs)) == pairs


def test_malformed_pairs_are_rejected():
    good = encode_pairs([(b"ab", b"cd")])
    assert decode_pairs(good[:-1]) is None  # truncated
    assert decode_pairs(good[:3]) is None  # no count
    assert decode_pairs(good.replace(b"ab\0", b"abX")) is None  # missing NUL
    assert decode_pairs(struct.pack("<I", 0xFFFFFFFF)) is None  # absurd count
    assert decode_pairs(struct.pack("<III", 1, 0xFFFFFFFF, 0)) is None  # length past the end


@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=20)), max_size=30))
def test_pairs_roundtrip(pairs):
    data = encode_pairs(pairs)
    assert len(data) == pairs_size(pairs)
    assert decode_pairs(data) == pairs


@given(st.binary(max_size=200))
def test_decode_never_raises(data):
    decode_pairs(data)


def test_property_paths():
    assert split_path(b"request\0path") == (b"request", b"path")
    assert split_path(b"request.path") == (b"request", b"path")
    assert split_path(b"plugin_root_id") == (b"plugin_root_id",)
    assert split_path(b"plugin_root_id\0") == (b"plugin_root_id",)
    assert split_path(b"request.headers.x.y") == (b"request", b"headers", b"x.y")
    assert split_path(b"request\0headers\0x.y") == (b"request", b"headers", b"x.y")
    assert split_path(b"") == ()
