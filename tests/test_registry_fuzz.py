"""Fuzzing with hypothesis: the registry's reference parser, and the safetensors header parser every patch and
model read goes through. Neither may raise anything but its own one-line error, or allocate by what a
hostile header claims."""

from __future__ import annotations

import json
import re
import struct
import tracemalloc
import uuid

import fsspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splice.errors import CheckpointError
from splice.registry.refs import MAX_NAME_LENGTH, Ref, RefError, check_alias, check_name, parse_ref
from splice.tensors.checkpoint import Checkpoint, read_safetensors_header
from splice.tensors.safetensors import SAFETENSORS_DTYPES

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")

names = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,99}\Z")
aliases = names.filter(lambda a: not a.isdigit() and a != "sha256")
versions = st.integers(min_value=1, max_value=10**18 - 1)
digests = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map(lambda h: f"sha256:{h}")


# -- refs ------------------------------------------------------------------------------------------


@FUZZ
@given(
    st.one_of(
        st.text(),
        st.text(alphabet="abcAZ09.-_@/:\\ \x00\n", max_size=40),
        st.builds(lambda n, s: f"{n}@{s}", names, st.text(max_size=80)),
    )
)
def test_parse_ref_raises_only_ref_errors(text):
    try:
        ref = parse_ref(text)
    except RefError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 400
        return
    assert NAME.fullmatch(ref.name) and len(ref.name) <= MAX_NAME_LENGTH
    assert str(ref) == text  # whatever parses is canonical


@FUZZ
@given(names, st.one_of(st.none(), versions, aliases, digests))
def test_valid_refs_round_trip(name, selector):
    if selector is None:
        text, expected = name, Ref(name)
    elif isinstance(selector, int):
        text, expected = f"{name}@{selector}", Ref(name, version=selector)
    elif selector.startswith("sha256:"):
        text, expected = f"{name}@{selector}", Ref(name, digest=selector)
    else:
        text, expected = f"{name}@{selector}", Ref(name, alias=selector)
    assert parse_ref(text) == expected
    assert str(parse_ref(text)) == text


@FUZZ
@given(st.text(max_size=120))
def test_check_name_accepts_exactly_the_rule(text):
    valid = bool(NAME.fullmatch(text)) and len(text) <= MAX_NAME_LENGTH
    try:
        assert check_name(text) == text
        assert valid
    except RefError:
        assert not valid
    if valid:
        if text.isdigit() or text == "sha256":
            with pytest.raises(RefError):
                check_alias(text)
        else:
            assert check_alias(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "../x",
        "/abs",
        "A",
        "a/b",
        "..",
        "",
        ".",
        "a@",
        "a@0",
        "a@007",
        "a@-1",
        "a@sha256:" + "A" * 64,
        "a@sha256:" + "0" * 63,
        "a@b@c",
        "a@123abc/x",
        "a@" + "1" * 19,
        "x" * 101,
        "a\x00",
        "a\nb",
    ],
)
def test_bad_refs(text):
    with pytest.raises(RefError):
        parse_ref(text)


# -- safetensors headers ---------------------------------------------------------------------------

dtype_codes = st.one_of(
    st.sampled_from(sorted(SAFETENSORS_DTYPES)),
    st.text(max_size=6),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
dims = st.one_of(
    st.integers(min_value=-2, max_value=5),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=2),
    st.none(),
)
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5))


@st.composite
def tensor_entries(draw):
    entry = {}
    if draw(st.booleans()):
        entry["dtype"] = draw(dtype_codes)
    if draw(st.integers(0, 4)):
        entry["shape"] = draw(
            st.one_of(st.lists(dims, max_size=4), json_leaves, st.just([2**64, 0]), st.just([0, 2**63]))
        )  # no bytes, absurd dims
    if draw(st.integers(0, 4)):
        entry["data_offsets"] = draw(
            st.one_of(
                st.lists(dims, min_size=0, max_size=3),
                st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list),
                json_leaves,
            )
        )
    return draw(st.one_of(st.just(entry), json_leaves, st.lists(json_leaves, max_size=3)))


@st.composite
def safetensors_files(draw):
    """A safetensors-shaped file: a header length (honest, or anything), a header, and some data."""
    kind = draw(st.sampled_from(["structured", "garbage-json", "bytes", "nested"]))
    if kind == "structured":
        header = draw(st.dictionaries(st.text(max_size=8), tensor_entries(), max_size=4))
        if draw(st.booleans()):
            header["__metadata__"] = draw(
                st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), json_leaves)
            )
        body = json.dumps(header).encode()
    elif kind == "garbage-json":
        body = draw(
            st.one_of(
                st.text(max_size=60).map(str.encode),
                st.recursive(
                    json_leaves,
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                    max_leaves=8,
                ).map(lambda v: json.dumps(v).encode()),
            )
        )
    elif kind == "nested":
        depth = draw(st.integers(min_value=1, max_value=200_000))
        body = b'{"a":' + b"[" * depth
    else:
        body = draw(st.binary(max_size=80))
    data = draw(st.binary(max_size=96))
    length = draw(
        st.one_of(
            st.just(len(body)),
            st.integers(min_value=0, max_value=2**64 - 1),
            st.integers(min_value=0, max_value=len(body) + len(data) + 8),
        )
    )
    prefix = struct.pack("<Q", length)
    cut = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=8 + len(body) + len(data))))
    raw = prefix + body + data
    return raw if cut is None else raw[:cut]


@pytest.fixture(scope="module")
def memory_dir():
    fs = fsspec.filesystem("memory")
    root = f"/fuzz-{uuid.uuid4().hex[:8]}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def check_parsed(tensors, size: int) -> None:
    spans = sorted((info.start, info.end) for info in tensors.values())
    for (start, end), following in zip(spans, spans[1:] + [(size, size)]):
        assert 8 <= start <= end <= size and end <= following[0]
    for info in tensors.values():
        assert info.end - info.start == info.nbytes
        assert all(type(d) is int and d >= 0 for d in info.shape)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(raw=safetensors_files())
def test_header_parser_raises_only_checkpoint_errors_and_allocates_little(raw, memory_dir):
    fs, root = memory_dir
    path = f"{root}/tensors.safetensors"
    fs.pipe_file(path, raw)
    tracemalloc.start()
    try:
        tensors = read_safetensors_header(fs, path, root, shard_name="tensors.safetensors")
    except CheckpointError as exc:
        assert "\n" not in str(exc).strip()
        tensors = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 16 * len(raw) + (4 << 20), f"parsing a {len(raw)}-byte file allocated {peak} bytes"
    if tensors is not None:
        check_parsed(tensors, len(raw))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(raw=safetensors_files())
def test_checkpoint_open_raises_only_checkpoint_errors(raw, memory_dir):
    fs, root = memory_dir
    directory = f"{root}/patch-{uuid.uuid4().hex[:6]}"
    fs.pipe_file(f"{directory}/tensors.safetensors", raw)
    try:
        checkpoint = Checkpoint.open(f"memory://{directory}", weights_file="tensors.safetensors")
    except CheckpointError as exc:
        assert "\n" not in str(exc).strip()
        return
    check_parsed(checkpoint.tensors, len(raw))
    for name in checkpoint.tensors:  # every tensor the header admits can be read, bounded by the file
        tensor = checkpoint.read(name)
        assert tensor.numel() * tensor.element_size() == checkpoint.tensors[name].nbytes
    fs.rm(directory, recursive=True)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": {"x": 1}, "shape": [1], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [false, true]}}',
        b'{"a":' + b"[" * 100_000,
        b'{"a": {"dtype": "F32", "shape": [1000000000000000000000000000000, 0], "data_offsets": [0, 0]}}',
        b'{"a\\nb": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    ],
)
def test_header_parser_regressions(body, memory_dir):
    """Found by the fuzzer: unhashable dtypes (TypeError), booleans taken for integers, deep nesting
    (RecursionError), dimensions past int64 in an empty tensor (a TypeError when read), a tensor name
    with a newline (a two-line error message) — each now a one-line CheckpointError."""
    fs, root = memory_dir
    path = f"{root}/regression.safetensors"
    fs.pipe_file(path, struct.pack("<Q", len(body)) + body + b"\0" * 4)
    with pytest.raises(CheckpointError):
        read_safetensors_header(fs, path, root)
