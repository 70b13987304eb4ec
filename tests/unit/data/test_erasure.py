"""Erasure coding: any k of k+m fragments give back the chunk, byte for byte."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfs.erasure import Scheme, choose_scheme, decode, encode, encode_some

SCHEMES = ["ec4+2", "ec2+1", "copy1", "copy2", "copy3"]


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=5000), name=st.sampled_from(SCHEMES))
def test_any_k_fragments_decode(data: bytes, name: str) -> None:
    scheme = Scheme.parse(name)
    fragments = encode(scheme, data)
    assert len(fragments) == scheme.total
    assert len({len(f) for f in fragments}) == 1, "fragments are equal-sized"
    for chosen in itertools.combinations(range(scheme.total), scheme.k):
        assert decode(scheme, {i: fragments[i] for i in chosen}, len(data)) == data


def test_code_is_systematic() -> None:
    scheme = Scheme.parse("ec4+2")
    data = bytes(range(256)) * 40
    fragments = encode(scheme, data)
    assert b"".join(fragments[:4])[: len(data)] == data


def test_too_few_fragments_is_a_clear_error() -> None:
    scheme = Scheme.parse("ec4+2")
    fragments = encode(scheme, b"x" * 100)
    with pytest.raises(ValueError, match="needs 4 fragments to decode, only 3"):
        decode(scheme, {0: fragments[0], 4: fragments[4], 5: fragments[5]}, 100)


@pytest.mark.parametrize(
    ("nodes", "scheme"),
    [(1, "copy1"), (2, "copy2"), (3, "ec2+1"), (5, "ec2+1"), (6, "ec4+2"), (12, "ec4+2")],
)
def test_scheme_follows_node_count(nodes: int, scheme: str) -> None:
    assert choose_scheme(nodes).name == scheme


@pytest.mark.parametrize("bad", ["ec0+2", "raid5", "copy0", "ec4+", ""])
def test_unknown_scheme_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="erasure scheme"):
        Scheme.parse(bad)


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3000),
    name=st.sampled_from(SCHEMES),
    wanted=st.sets(st.integers(0, 5), min_size=1),
)
def test_encode_some_matches_encode(data: bytes, name: str, wanted: set[int]) -> None:
    scheme = Scheme.parse(name)
    every = encode(scheme, data)
    wanted = {i for i in wanted if i < scheme.total} or {0}
    assert encode_some(scheme, data, wanted) == {i: every[i] for i in wanted}
