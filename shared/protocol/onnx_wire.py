"""What a device reads of an untrusted ONNX file, straight from the protobuf wire format: the initializers
(name, shape, data type, data) and the nodes (operator, domain, numeric attributes), with tensors that point to
external data refused.

Why not the `onnx` package: a device only needs the weights of a model whose architecture it already knows, and
importing `onnx` costs ~17 MiB of resident memory and ~40 MB of install (protobuf, ml_dtypes) on a device that
may have 512 MB in all (docs/edge.md, bench/results/footprint.md). The reader is bounded: every length is checked
against the bytes that remain, nesting is limited to `MAX_DEPTH`, groups and unknown wire types are refused, and
every failure is a `ValidationError('bad_onnx')`. Field numbers are those of onnx.proto3 (ModelProto, GraphProto,
NodeProto, AttributeProto, TensorProto, SparseTensorProto, FunctionProto, TrainingInfoProto).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from shared.protocol.errors import ValidationError

MAX_DEPTH = 8  # graphs inside node attributes inside graphs ...
MAX_RANK = 64
MAX_OBJECTS = 100_000  # nodes, names, attributes, tensors and typed entries one file may make the reader build


class _Budget:
    """Counts what the reader builds, so that a small file of tiny fields cannot cost a device 100x its size."""

    def __init__(self, limit: int = MAX_OBJECTS):
        self.left = limit

    def take(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise ValidationError("bad_onnx", f"more than {MAX_OBJECTS} nodes, names and tensors")

# TensorProto.DataType -> numpy little-endian dtype, for the types a device reads
DATA_TYPES = {1: "<f4", 2: "u1", 3: "i1", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8"}
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


@dataclass
class WireTensor:
    """A TensorProto's name, dims, data type and data: raw_data, or the typed repeated field's encoded bytes,
    decoded only by `to_array` (so a tensor nobody asks for costs nothing, and a huge one is refused by its
    declared shape before any decoding)."""

    name: str = ""
    dims: list[int] = field(default_factory=list)
    data_type: int = 0
    raw: memoryview | None = None
    typed: list[tuple[int, int, object]] = field(default_factory=list)  # (field number, wire type, value)

    def to_array(self) -> np.ndarray:
        """The tensor as a numpy array of its own type; ValidationError('bad_onnx') when the data does not
        fill its shape or the type is not one a device reads."""
        if self.data_type not in DATA_TYPES:
            raise ValidationError("bad_onnx", f"{self.name}: unsupported ONNX data type {self.data_type}")
        if any(not 0 <= d <= 2**31 for d in self.dims):
            raise ValidationError("bad_onnx", f"{self.name}: a dimension outside 0..2^31 in {self.dims}")
        dtype, count = np.dtype(DATA_TYPES[self.data_type]), math.prod(self.dims)
        if self.raw is not None:
            if len(self.raw) != count * dtype.itemsize:
                raise ValidationError("bad_onnx", f"{self.name}: {len(self.raw)} bytes of data for shape {self.dims}")
            values = np.frombuffer(self.raw, dtype=dtype)
        elif self.data_type == 1:
            values = np.concatenate([_floats(w, v) for n, w, v in self.typed if n == 4] or [np.zeros(0, "<f4")])
        elif dtype.kind in "iub":  # integers and booleans travel as varints (float16 bits too: not read here)
            values = np.asarray(_ints([(w, v) for n, w, v in self.typed if n in (5, 7)], limit=count),
                                dtype=np.int64).astype(dtype)
        else:
            raise ValidationError("bad_onnx", f"{self.name}: {dtype} data must be raw_data here")
        if values.size != count:
            raise ValidationError("bad_onnx", f"{self.name}: its data does not fill shape {self.dims}")
        return values.reshape(self.dims).astype(dtype.newbyteorder("="), copy=True)


@dataclass
class WireNode:
    op_type: str = ""
    domain: str = ""
    inputs: list[str] = field(default_factory=list)
    attributes: dict[str, float | int] = field(default_factory=dict)  # the scalar (f / i) attributes
    has_subgraph: bool = False


@dataclass
class WireModel:
    """The main graph's initializers (by name, each once) and nodes; `functions`: how many local functions."""

    initializers: dict[str, WireTensor] = field(default_factory=dict)
    nodes: list[WireNode] = field(default_factory=list)
    functions: int = 0


def read_model(blob: bytes, max_bytes: int) -> WireModel:
    """Parse an untrusted ONNX model; ValidationError ('too_large', 'bad_onnx') when it is too big, malformed,
    names an initializer twice, or holds any tensor with external data (reading it would open files named by
    the sender)."""
    if len(blob) > max_bytes:
        raise ValidationError("too_large", f"ONNX model of {len(blob)} bytes exceeds {max_bytes}")
    model, graphs, budget = WireModel(), 0, _Budget()
    for number, wire, value in _fields(memoryview(blob)):
        if number == 7 and wire == _WIRE_LEN:  # graph
            graphs += 1
            _read_graph(value, model, 1, budget)
        elif number == 25 and wire == _WIRE_LEN:  # functions: nodes (field 7) may carry tensors too
            model.functions += 1
            for n, w, v in _fields(value):
                if n == 7 and w == _WIRE_LEN:
                    _read_node(v, 1, budget)
        elif number == 20 and wire == _WIRE_LEN:  # training_info: initialization / algorithm graphs
            for n, w, v in _fields(value):
                if n in (1, 2) and w == _WIRE_LEN:
                    _read_graph(v, WireModel(), 1, budget)
    if graphs != 1:
        raise ValidationError("bad_onnx", f"an ONNX model has one graph, this one has {graphs}")
    return model


def _read_graph(buf: memoryview, into: WireModel, depth: int, budget: _Budget) -> None:
    if depth > MAX_DEPTH:
        raise ValidationError("bad_onnx", f"graphs nested deeper than {MAX_DEPTH}")
    for number, wire, value in _fields(buf):
        if wire != _WIRE_LEN:
            continue
        if number == 1:
            into.nodes.append(_read_node(value, depth, budget))
        elif number == 5:
            tensor = _read_tensor(value, budget)
            if tensor.name in into.initializers:
                raise ValidationError("bad_onnx", f"initializer {tensor.name!r} appears twice")
            into.initializers[tensor.name] = tensor
        elif number == 15:
            _read_sparse(value, budget)


def _read_node(buf: memoryview, depth: int, budget: _Budget) -> WireNode:
    budget.take()
    node = WireNode()
    for number, wire, value in _fields(buf):
        if number == 1 and wire == _WIRE_LEN:
            budget.take()
            node.inputs.append(_text(value))
        elif number == 4 and wire == _WIRE_LEN:
            node.op_type = _text(value)
        elif number == 7 and wire == _WIRE_LEN:
            node.domain = _text(value)
        elif number == 5 and wire == _WIRE_LEN:
            _read_attribute(value, node, depth, budget)
    return node


def _read_attribute(buf: memoryview, node: WireNode, depth: int, budget: _Budget) -> None:
    budget.take()
    name, scalar = "", None
    for number, wire, value in _fields(buf):
        if number == 1 and wire == _WIRE_LEN:
            name = _text(value)
        elif number == 2 and wire == _WIRE_I32:
            scalar = struct.unpack("<f", value)[0]
        elif number == 3 and wire == _WIRE_VARINT:
            scalar = _signed(value)
        elif number in (5, 10) and wire == _WIRE_LEN:  # t, tensors
            _read_tensor(value, budget)
        elif number in (22, 23) and wire == _WIRE_LEN:  # sparse_tensor(s)
            _read_sparse(value, budget)
        elif number in (6, 11) and wire == _WIRE_LEN:  # g, graphs
            node.has_subgraph = True
            _read_graph(value, WireModel(), depth + 1, budget)
    if scalar is not None:
        node.attributes[name] = scalar


def _read_sparse(buf: memoryview, budget: _Budget) -> None:
    for number, wire, value in _fields(buf):
        if number in (1, 2) and wire == _WIRE_LEN:
            _read_tensor(value, budget)


def _read_tensor(buf: memoryview, budget: _Budget) -> WireTensor:
    budget.take()
    t = WireTensor()
    for number, wire, value in _fields(buf):
        if number == 1:
            t.dims.extend(_ints([(wire, value)], limit=MAX_RANK))
            if len(t.dims) > MAX_RANK:
                raise ValidationError("bad_onnx", f"a tensor of rank above {MAX_RANK}")
        elif number == 2 and wire == _WIRE_VARINT:
            t.data_type = value
        elif number == 8 and wire == _WIRE_LEN:
            t.name = _text(value)
        elif number == 9 and wire == _WIRE_LEN:
            t.raw = value
        elif number in (4, 5, 7):  # float_data, int32_data, int64_data
            budget.take()
            t.typed.append((number, wire, value))
        elif number == 13 or (number == 14 and wire == _WIRE_VARINT and value == 1):  # external_data / EXTERNAL
            raise ValidationError("bad_onnx", "ONNX models with external data are refused")
    return t


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one message: an int for varints, a memoryview otherwise."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValidationError("bad_onnx", "field number 0")
        if wire == _WIRE_VARINT:
            value, pos = _varint(buf, pos)
        elif wire in (_WIRE_I64, _WIRE_I32):
            size = 8 if wire == _WIRE_I64 else 4
            if pos + size > end:
                raise ValidationError("bad_onnx", "truncated fixed-width field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == _WIRE_LEN:
            size, pos = _varint(buf, pos)
            if size > end - pos:
                raise ValidationError("bad_onnx", "a length runs past the end of the message")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValidationError("bad_onnx", f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise ValidationError("bad_onnx", "truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
    raise ValidationError("bad_onnx", "varint longer than 10 bytes")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _ints(fields: list[tuple[int, object]], limit: int) -> list[int]:
    """The integers of repeated varint fields (packed or not), at most `limit` of them (ValidationError beyond:
    a few bytes of varints must not become millions of Python integers)."""
    out: list[int] = []
    for wire, value in fields:
        if wire == _WIRE_VARINT:
            out.append(_signed(value))
        elif wire == _WIRE_LEN:
            pos = 0
            while pos < len(value) and len(out) <= limit:
                v, pos = _varint(value, pos)
                out.append(_signed(v))
        else:
            raise ValidationError("bad_onnx", "integer field of the wrong wire type")
        if len(out) > limit:
            raise ValidationError("bad_onnx", f"more than {limit} integers where at most that many fit")
    return out


def _floats(wire: int, value: object) -> np.ndarray:
    if wire == _WIRE_I32:
        return np.frombuffer(value, dtype="<f4")
    if wire != _WIRE_LEN or len(value) % 4:
        raise ValidationError("bad_onnx", "float field of the wrong wire type or size")
    return np.frombuffer(value, dtype="<f4")


def _text(value: memoryview) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("bad_onnx", "a name is not UTF-8") from None
