"""The device's own ONNX reader (shared.protocol.onnx_wire) against the onnx package, and the lite runtime's
numpy generator (shared.protocol.onnx_load.WeightsGenerator) against onnxruntime and torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from shared.algorithm.models import Generator, build_model
from shared.protocol.errors import ValidationError
from shared.protocol.onnx_export import export_classifier_onnx, export_generator_onnx
from shared.protocol.onnx_load import OnnxGenerator, WeightsGenerator
from shared.protocol.onnx_wire import read_model

LIMIT = 64 * 2**20


@pytest.fixture(scope="module")
def generator_blob() -> tuple[Generator, bytes]:
    torch.manual_seed(3)
    generator = Generator(10)
    with torch.no_grad():  # statistics far from the initial (0, 1), so inference-mode BatchNorm matters
        generator.net[1].running_mean.normal_(0, 0.5)
        generator.net[1].running_var.uniform_(0.3, 3.0)
        generator.net[1].weight.uniform_(0.5, 1.5)
        generator.net[1].bias.normal_(0, 0.2)
    return generator.eval(), export_generator_onnx(generator)


@pytest.fixture(scope="module")
def classifier_blob() -> bytes:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10)
    return export_classifier_onnx(model, model.state_dict())


def weights_generator(blob: bytes, **overrides) -> WeightsGenerator:
    return WeightsGenerator(blob, **{"noise_dim": 32, "latent_dim": 32, "num_classes": 10, "hidden": 256,
                                     **overrides})


def test_reads_what_onnx_reads(classifier_blob, generator_blob) -> None:
    for blob in (classifier_blob, generator_blob[1]):
        reference = onnx.load_from_string(blob)
        model = read_model(blob, LIMIT)
        assert list(model.initializers) == [t.name for t in reference.graph.initializer]
        for proto in reference.graph.initializer:
            mine = model.initializers[proto.name]
            assert mine.dims == list(proto.dims) and mine.data_type == proto.data_type
            expected = numpy_helper.to_array(proto)
            got = mine.to_array()
            assert got.dtype == expected.dtype and np.array_equal(got, expected)
        assert [n.op_type for n in model.nodes] == [n.op_type for n in reference.graph.node]
        assert [n.inputs for n in model.nodes] == [list(n.input) for n in reference.graph.node]


def test_typed_fields_and_unpacked_encodings() -> None:
    """Tensors stored in float_data / int64_data / int32_data (not raw_data), as other exporters write them."""
    values = {"f": np.array([[1.5, -2.25], [0.0, 3e-8]], np.float32), "i": np.array([-3, 2**40], np.int64),
              "b": np.array([True, False, True])}
    tensors = [helper.make_tensor("f", TensorProto.FLOAT, [2, 2], values["f"].ravel().tolist()),
               helper.make_tensor("i", TensorProto.INT64, [2], values["i"].tolist()),
               helper.make_tensor("b", TensorProto.BOOL, [3], values["b"].tolist())]
    graph = helper.make_graph([], "g", [], [], tensors)
    model = read_model(helper.make_model(graph).SerializeToString(), LIMIT)
    for name, expected in values.items():
        got = model.initializers[name].to_array()
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name


def _with_external(where: str) -> bytes:
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/passwd")
    node = helper.make_node("Identity", ["x"], ["y"])
    initializers = []
    if where == "initializer":
        initializers.append(tensor)
    elif where == "constant":
        node = helper.make_node("Constant", [], ["y"], value=tensor)
    elif where == "subgraph":
        inner = helper.make_graph([helper.make_node("Constant", [], ["c"], value=tensor)], "inner", [], [])
        node = helper.make_node("If", ["x"], ["y"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializers)
    model = helper.make_model(graph)
    if where == "function":
        model.functions.append(helper.make_function("local", "f", ["a"], ["b"],
                                                    [helper.make_node("Constant", [], ["b"], value=tensor)],
                                                    [helper.make_opsetid("", 18)]))
    return model.SerializeToString()


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph", "function"])
def test_external_data_is_refused_wherever_it_hides(where: str) -> None:
    with pytest.raises(ValidationError, match="external data") as err:
        read_model(_with_external(where), LIMIT)
    assert err.value.reason == "bad_onnx"


def test_limits() -> None:
    with pytest.raises(ValidationError) as err:
        read_model(b"\x00" * 101, 100)
    assert err.value.reason == "too_large"
    graph = helper.make_graph([], "g", [], [])
    for _ in range(12):  # nested deeper than MAX_DEPTH through If branches
        graph = helper.make_graph([helper.make_node("If", ["c"], ["o"], then_branch=graph, else_branch=graph)],
                                  "g", [], [])
    with pytest.raises(ValidationError, match="nested deeper"):
        read_model(helper.make_model(graph).SerializeToString(), LIMIT)
    twice = helper.make_graph([], "g", [], [], [helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])] * 2)
    with pytest.raises(ValidationError, match="twice"):
        read_model(helper.make_model(twice).SerializeToString(), LIMIT)
    short = helper.make_graph([], "g", [], [], [TensorProto(name="w", dims=[3], data_type=1, float_data=[1.0])])
    with pytest.raises(ValidationError, match="does not fill"):
        read_model(helper.make_model(short).SerializeToString(), LIMIT).initializers["w"].to_array()
    # a length past the end, a length past the end, an 11-byte varint, a group
    for truncated in (b"\x3a", b"\x3a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11, b"\x3b\x00"):
        with pytest.raises(ValidationError):
            read_model(truncated, LIMIT)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_raise_only_validation_error(generator_blob, data) -> None:
    blob = bytearray(generator_blob[1])
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    for candidate in (bytes(blob), bytes(blob[:cut]), data.draw(st.binary(max_size=512))):
        try:
            model = read_model(candidate, LIMIT)
            for tensor in model.initializers.values():
                tensor.to_array()
            weights_generator(candidate)(np.zeros((2, 32), np.float32), np.array([0, 9]))
        except ValidationError:
            pass


def test_weights_generator_matches_onnxruntime_and_torch(generator_blob) -> None:
    generator, blob = generator_blob
    rng = np.random.default_rng(0)
    noise, labels = rng.random((257, 32), dtype=np.float32), rng.integers(0, 10, 257)
    mine = weights_generator(blob)(noise, labels)
    through_ort = OnnxGenerator(blob)(noise, labels)
    with torch.no_grad():
        through_torch = generator(torch.from_numpy(noise), torch.from_numpy(labels)).numpy()
    assert mine.shape == (257, 32) and mine.dtype == np.float32
    assert np.abs(through_torch).max() > 0.3 and through_torch.std(axis=0).mean() > 0.01  # non-trivial
    np.testing.assert_allclose(mine, through_ort, rtol=0, atol=1e-5)
    np.testing.assert_allclose(mine, through_torch, rtol=0, atol=1e-5)


def _generator_graph(blob: bytes, edit) -> bytes:  # noqa: ANN001
    model = onnx.load_from_string(blob)
    edit(model)
    return model.SerializeToString()


def test_weights_generator_refuses_what_it_cannot_evaluate_exactly(generator_blob) -> None:
    _, blob = generator_blob

    def extra_gemm(m):
        m.graph.node.append(helper.make_node("Gemm", ["z", "net.3.weight"], ["z2"], transB=1))

    def extra_tensor(m):
        m.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "net.9.weight"))

    def training_norm(m):
        next(n for n in m.graph.node if n.op_type == "BatchNormalization").attribute.append(
            helper.make_attribute("training_mode", 1))

    def negative_variance(m):
        var = next(t for t in m.graph.initializer if t.name == "net.1.running_var")
        var.CopyFrom(numpy_helper.from_array(-np.ones(256, np.float32), "net.1.running_var"))

    def infinite_weight(m):
        bias = next(t for t in m.graph.initializer if t.name == "net.3.bias")
        bias.CopyFrom(numpy_helper.from_array(np.full(32, np.inf, np.float32), "net.3.bias"))

    def untransposed(m):
        gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
        next(a for a in gemm.attribute if a.name == "transB").i = 0

    cases = {"extra_gemm": ("bad_onnx", extra_gemm), "extra_tensor": ("unexpected_tensor", extra_tensor),
             "training_norm": ("bad_onnx", training_norm), "negative_variance": ("bad_onnx", negative_variance),
             "infinite_weight": ("non_finite", infinite_weight), "untransposed": ("bad_onnx", untransposed)}
    for name, (reason, edit) in cases.items():
        with pytest.raises(ValidationError) as err:
            weights_generator(_generator_graph(blob, edit))
        assert err.value.reason == reason, name
    with pytest.raises(ValidationError) as err:  # the job's generator is wider than the file's
        weights_generator(blob, hidden=512)
    assert err.value.reason == "bad_shape"
    # the 400-byte "generator" whose Range would allocate 8e9 numbers: no weights, so nothing runs
    consts = [numpy_helper.from_array(np.array(v, dtype=np.int64), n)
              for n, v in (("zero", 0), ("limit", 8_000_000_000), ("one", 1))]
    hog = helper.make_graph([helper.make_node("Range", ["zero", "limit", "one"], ["r"]),
                             helper.make_node("Identity", ["noise"], ["z"])], "g", [], [], consts)
    with pytest.raises(ValidationError):
        weights_generator(helper.make_model(hog).SerializeToString())
    sampler = weights_generator(blob)
    with pytest.raises(ValueError, match="lie in"):
        sampler(np.zeros((2, 32), np.float32), np.array([0, 10]))
    with pytest.raises(ValueError, match="noise must have shape"):
        sampler(np.zeros((2, 31), np.float32), np.array([0, 1]))


def test_files_far_larger_than_their_weights_and_integer_bombs_are_refused(classifier_blob) -> None:
    """state_from_onnx reads at most twice the expected weights plus 1 MiB of file; packed integers beyond a
    tensor's declared size are refused before they become Python integers."""
    from shared.protocol.onnx_load import state_from_onnx

    model = onnx.load_from_string(classifier_blob)
    spec = {t.name: (tuple(t.dims), np.dtype(np.float32)) for t in model.graph.initializer if t.data_type == 1}
    assert set(state_from_onnx(classifier_blob, spec)) == set(spec)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(400_000, np.float32), "padding"))
    with pytest.raises(ValidationError) as err:
        state_from_onnx(model.SerializeToString(), spec)
    assert err.value.reason == "too_large"
    bomb = TensorProto(name="w", dims=[2], data_type=TensorProto.INT64, int64_data=list(range(200_000)))
    parsed = read_model(helper.make_model(helper.make_graph([], "g", [], [], [bomb])).SerializeToString(), LIMIT)
    with pytest.raises(ValidationError, match="more than 2 integers"):
        parsed.initializers["w"].to_array()


def test_a_file_of_tiny_fields_is_refused_before_it_costs_memory() -> None:
    """2 MB of empty nodes (2 bytes each, a million of them) is refused once the reader has built its budget of
    objects, holding a few MB, not the ~250 MB a million node objects would take."""
    import tracemalloc

    graph = b"\x0a\x00" * 1_000_000  # GraphProto.node, empty
    blob = b"\x3a" + _varint(len(graph)) + graph  # ModelProto.graph
    tracemalloc.start()
    try:
        with pytest.raises(ValidationError, match="more than"):
            read_model(blob, LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, peak


def test_unpacked_repeated_fields_and_packed_dims() -> None:
    """Encodings onnx's own writer never produces but a sender may: dims packed, float_data and int64_data as
    one field per element (fixed32 / varint)."""
    floats = b"".join(b"\x25" + np.float32(v).tobytes() for v in (1.5, -2.0))  # field 4, wire type 5
    name = b"\x42\x01f"
    tensor = b"\x0a\x01\x02" + b"\x10\x01" + floats + name  # dims packed [2], data_type FLOAT
    ints = b"\x38\x05" + b"\x38" + _varint((1 << 64) - 3) + b"\x42\x01i"  # int64_data 5, -3 (two's complement)
    itensor = b"\x08\x02" + b"\x10\x07" + ints  # dims [2] unpacked, INT64
    graph = b"\x2a" + _varint(len(tensor)) + tensor + b"\x2a" + _varint(len(itensor)) + itensor
    model = read_model(b"\x3a" + _varint(len(graph)) + graph, LIMIT)
    assert model.initializers["f"].to_array().tolist() == [1.5, -2.0]
    assert model.initializers["i"].to_array().tolist() == [5, -3]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
