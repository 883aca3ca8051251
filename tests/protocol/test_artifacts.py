"""ONNX exports, reading weights back from them, the onnxruntime generator, and weight deltas (shared.artifacts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from shared.algorithm.models import Generator, SplitClassifier, build_model, shared_keys
from shared.fsutil import sha256_hex
from shared.protocol.delta import apply_delta, make_delta
from shared.protocol.errors import ValidationError
from shared.protocol.onnx_export import export_classifier_onnx, export_generator_onnx, export_predictor_onnx
from shared.protocol.onnx_load import OnnxGenerator, state_from_onnx
from shared.protocol.tensors import decode_tensors, encode_tensors, state_sha256, tensor_spec

REPO = Path(__file__).resolve().parents[2]
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
TOL = 1e-5


def seeded_model(name: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> tuple[SplitClassifier, dict]:
    """A model and a state with non-trivial BatchNorm statistics (so eval mode matters)."""
    torch.manual_seed(seed)
    model = build_model(name, IMAGE_SHAPE, num_classes)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in list(state.items()):
        if key.endswith("running_mean"):
            state[key] = torch.randn_like(value) * 0.1
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
    return model, state


def seeded_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    generator = Generator(NUM_CLASSES)
    generator.net[1].running_mean.normal_(0, 0.1)
    generator.net[1].running_var.uniform_(0.5, 1.5)
    return generator


def float_spec(state: dict[str, torch.Tensor], partial: bool = False) -> dict:
    return tensor_spec({k: state[k] for k in shared_keys(state, partial)})


def run_onnx(blob: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.fixture(scope="module")
def exports() -> dict[str, tuple]:
    """name -> (model, state, classifier ONNX, predictor ONNX), exported once per module."""
    out = {}
    for name in ("cnn", "mlp"):
        model, state = seeded_model(name)
        out[name] = (model, state, export_classifier_onnx(model, state), export_predictor_onnx(model, state))
    return out


@pytest.fixture(scope="module")
def generator_export() -> tuple[Generator, bytes]:
    generator = seeded_generator()
    return generator, export_generator_onnx(generator)


# ------------------------------------------------------------------------------------------------- exports
@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("batch", [1, 7])
def test_classifier_and_predictor_match_pytorch(exports, name: str, batch: int) -> None:
    model, state, classifier, predictor = exports[name]
    model.load_state_dict(state)
    model.eval()
    x = torch.randn(batch, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        z = model.features(x)
        expected = model(x)
    np.testing.assert_allclose(run_onnx(classifier, {"x": x.numpy()}), expected.numpy(), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(run_onnx(predictor, {"z": z.numpy()}), expected.numpy(), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_exports_are_valid_onnx_with_named_io(exports, name: str) -> None:
    _, _, classifier, predictor = exports[name]
    for blob, inp, width in ((classifier, "x", None), (predictor, "z", 32)):
        model = onnx.load_from_string(blob)
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == [inp]
        assert [o.name for o in model.graph.output] == ["logits"]
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch
        if width:
            assert dims[1].dim_value == width


def test_export_leaves_the_callers_model_alone() -> None:
    model, state = seeded_model("cnn")
    model.train()
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_state = {k: v.clone() for k, v in state.items()}
    export_classifier_onnx(model, state)
    export_predictor_onnx(model, state)
    assert model.training
    assert all(torch.equal(before_model[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before_state[k], v) for k, v in state.items())


def test_export_is_byte_deterministic_in_process(exports, generator_export) -> None:
    _, state, classifier, predictor = exports["cnn"]
    model, _ = seeded_model("cnn")
    assert export_classifier_onnx(model, state) == classifier
    assert export_predictor_onnx(model, state) == predictor
    generator, blob = generator_export
    assert export_generator_onnx(generator) == blob


_SUBPROCESS_EXPORT = """
import sys
from tests.protocol.test_artifacts import seeded_generator, seeded_model
from shared.protocol.onnx_export import export_classifier_onnx, export_generator_onnx, export_predictor_onnx
from shared.fsutil import sha256_hex
model, state = seeded_model("cnn")
print(sha256_hex(export_classifier_onnx(model, state)))
print(sha256_hex(export_predictor_onnx(model, state)))
print(sha256_hex(export_generator_onnx(seeded_generator())))
"""


def test_export_is_byte_deterministic_across_processes_and_quiet(exports, generator_export) -> None:
    _, _, classifier, predictor = exports["cnn"]
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_EXPORT], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=True)
    assert proc.stdout.split() == [sha256_hex(classifier), sha256_hex(predictor), sha256_hex(generator_export[1])]
    assert proc.stderr == ""  # no exporter warnings, progress lines or log records


# ------------------------------------------------------------------------------------------------- read back
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_state_from_onnx_recovers_the_state_exactly(exports, name: str) -> None:
    _, state, classifier, predictor = exports[name]
    for blob, partial in ((classifier, False), (predictor, True), (classifier, True)):
        spec = float_spec(state, partial)
        got = state_from_onnx(blob, spec)
        assert set(got) == set(spec)
        for key, array in got.items():
            assert array.dtype == state[key].numpy().dtype and np.array_equal(array, state[key].numpy()), key


def test_state_from_onnx_reads_the_generator(generator_export) -> None:
    generator, blob = generator_export
    state = {k: v for k, v in generator.state_dict().items() if v.is_floating_point()}
    got = state_from_onnx(blob, tensor_spec(state))
    assert all(np.array_equal(got[k], v.numpy()) for k, v in state.items())


def test_wrong_shape_is_bad_shape(exports) -> None:
    model, state = seeded_model("cnn", num_classes=5)
    blob = export_classifier_onnx(model, state)
    with pytest.raises(ValidationError) as err:
        state_from_onnx(blob, float_spec(exports["cnn"][1]))  # expects 10 classes
    assert err.value.reason == "bad_shape"


def test_nan_weights_are_non_finite() -> None:
    model, state = seeded_model("mlp")
    state["predictor.weight"][0, 0] = float("nan")
    blob = export_predictor_onnx(model, state)
    with pytest.raises(ValidationError) as err:
        state_from_onnx(blob, float_spec(state, partial=True))
    assert err.value.reason == "non_finite"


def test_absurd_values_wrong_dtype_and_names(exports) -> None:
    _, state, classifier, predictor = exports["cnn"]
    spec = float_spec(state)
    with pytest.raises(ValidationError) as err:
        state_from_onnx(predictor, float_spec(state, partial=True), max_abs=1e-3)
    assert err.value.reason == "absurd_magnitude"
    with pytest.raises(ValidationError) as err:
        state_from_onnx(classifier, {**spec, "features.9.weight": ((3,), np.float32)})
    assert err.value.reason == "missing_tensor"
    with pytest.raises(ValidationError) as err:  # a state-like initializer the spec lacks: another model
        state_from_onnx(classifier, {k: v for k, v in spec.items() if k != "features.7.bias"})
    assert err.value.reason == "unexpected_tensor"
    model = onnx.load_from_string(predictor)
    init = next(t for t in model.graph.initializer if t.name == "predictor.bias")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), "predictor.bias"))
    with pytest.raises(ValidationError) as err:
        state_from_onnx(model.SerializeToString(), float_spec(state, partial=True))
    assert err.value.reason == "bad_dtype"


def test_external_data_is_refused(exports) -> None:
    _, state, _, predictor = exports["cnn"]
    model = onnx.load_from_string(predictor)
    init = next(t for t in model.graph.initializer if t.name == "predictor.bias")
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value="/etc/passwd")
    with pytest.raises(ValidationError) as err:
        state_from_onnx(model.SerializeToString(), float_spec(state, partial=True))
    assert err.value.reason == "bad_onnx"


def test_oversized_onnx_is_too_large(exports) -> None:
    _, state, classifier, _ = exports["cnn"]
    with pytest.raises(ValidationError) as err:
        state_from_onnx(classifier, float_spec(state), max_bytes=len(classifier) - 1)
    assert err.value.reason == "too_large"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_garbage_bytes_raise_only_validation_error(exports, data: bytes) -> None:
    with pytest.raises(ValidationError):
        state_from_onnx(data, float_spec(exports["cnn"][1]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupted_onnx_raises_only_validation_error(exports, data) -> None:
    _, state, classifier, predictor = exports["cnn"]
    blob, spec = data.draw(st.sampled_from([(classifier, float_spec(state)),
                                            (predictor, float_spec(state, partial=True))]))
    corrupted = bytearray(blob)
    action = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if action == "truncate":
        corrupted = corrupted[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(blob) - 1))
            if action == "flip":
                corrupted[pos] ^= data.draw(st.integers(1, 255))
            else:
                corrupted[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        got = state_from_onnx(bytes(corrupted), spec)
    except ValidationError:
        return
    assert tensor_spec(got) == spec  # a corruption inside weight bytes may still decode: then it fits the spec


# ------------------------------------------------------------------------------------------------- generator
@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_generator_matches_torch(generator_export, batch: int) -> None:
    generator, blob = generator_export
    sampler = OnnxGenerator(blob, noise_dim=generator.noise_dim, latent_dim=generator.latent_dim,
                            num_classes=NUM_CLASSES)
    rng = torch.Generator().manual_seed(batch)
    noise = torch.rand(batch, generator.noise_dim, generator=rng)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=rng)
    generator.eval()
    with torch.no_grad():
        expected = generator(noise, labels)
    got = sampler(noise.numpy(), labels.numpy())
    assert got.dtype == np.float32 and got.shape == tuple(expected.shape)
    np.testing.assert_allclose(got, expected.numpy(), atol=TOL, rtol=TOL)


def test_onnx_generator_rejects_models_that_do_not_fit(exports, generator_export) -> None:
    _, _, classifier, _ = exports["cnn"]
    generator, blob = generator_export
    for bad in (classifier, b"not an onnx model", b""):
        with pytest.raises(ValidationError) as err:
            OnnxGenerator(bad)
        assert err.value.reason == "bad_onnx"
    with pytest.raises(ValidationError) as err:
        OnnxGenerator(blob, noise_dim=generator.noise_dim + 1)
    assert err.value.reason == "bad_onnx"
    with pytest.raises(ValidationError) as err:
        OnnxGenerator(blob, max_bytes=100)
    assert err.value.reason == "too_large"
    with pytest.raises(ValueError):
        OnnxGenerator(blob, num_classes=NUM_CLASSES)(np.random.rand(2, generator.noise_dim), np.array([0, 10]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8))
def test_corrupted_generator_is_refused_quietly(generator_export, capfd, flips) -> None:
    generator, blob = generator_export
    corrupted = bytearray(blob)
    for where, mask in flips:
        corrupted[int(where * len(blob))] ^= mask
    try:
        sampler = OnnxGenerator(bytes(corrupted), noise_dim=generator.noise_dim, latent_dim=generator.latent_dim)
    except ValidationError as err:
        assert err.reason == "bad_onnx"
    else:  # the flips hit weight bytes: still a generator of the right interface
        assert sampler(np.random.rand(2, generator.noise_dim), np.array([0, 1])).shape == (2, generator.latent_dim)
    out, err_text = capfd.readouterr()
    assert out == "" and err_text == ""  # no onnxruntime banners or log lines


# ------------------------------------------------------------------------------------------------- deltas
@st.composite
def state_pairs(draw) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(old, new): a few float32 tensors, new = old + an update of a drawn scale."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shapes = draw(st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3), min_size=1, max_size=5))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 3.0]))
    old, new = {}, {}
    for i, shape in enumerate(shapes):
        base = np.asarray(rng.uniform(-1, 1, size=shape), dtype=np.float32)
        old[f"layer{i}.weight"] = base
        new[f"layer{i}.weight"] = np.asarray(base + scale * rng.standard_normal(shape), dtype=np.float32)
    return old, new


@settings(max_examples=50, deadline=None)
@given(state_pairs())
def test_delta_roundtrip_is_bit_exact(pair) -> None:
    old, new = pair
    old_copy = {k: v.copy() for k, v in old.items()}
    delta, canonical = make_delta(old, new)
    assert all(np.array_equal(old[k], old_copy[k]) for k in old)  # inputs untouched
    wire = decode_tensors(encode_tensors(delta), tensor_spec(old))  # as a device receives it
    applied = apply_delta(old, wire)
    assert state_sha256(applied) == state_sha256(canonical)
    assert all(np.array_equal(applied[k], canonical[k]) for k in old)
    for key in old:
        assert np.allclose(canonical[key], new[key], rtol=1e-6, atol=1e-6), key
        bound = 2 * np.finfo(np.float32).eps * np.maximum(np.abs(old[key]), np.abs(new[key]))
        assert (np.abs(canonical[key] - new[key]) <= bound).all(), key  # a couple of ulps at most


def test_delta_mismatches_are_refused() -> None:
    old = {"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.float32)}
    delta, _ = make_delta(old, {"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.float32)})
    cases = {
        "missing_tensor": {"a": delta["a"]},
        "unexpected_tensor": {**delta, "c": np.zeros(1, np.float32)},
        "bad_shape": {**delta, "b": np.zeros(4, np.float32)},
        "bad_dtype": {**delta, "a": delta["a"].astype(np.float64)},
    }
    for reason, bad in cases.items():
        with pytest.raises(ValidationError) as err:
            apply_delta(old, bad)
        assert err.value.reason == reason
    with pytest.raises(ValidationError):
        make_delta(old, {"a": np.zeros(3, np.float32)})


def test_model_state_delta_matches_manifest_hash() -> None:
    _, old = seeded_model("cnn", seed=1)
    _, new = seeded_model("cnn", seed=2)
    old = {k: old[k].numpy() for k in shared_keys(old, partial=False)}
    new = {k: new[k].numpy() for k in shared_keys(new, partial=False)}
    delta, canonical = make_delta(old, new)
    blob = encode_tensors(delta)
    assert state_sha256(apply_delta(old, decode_tensors(blob, tensor_spec(old)))) == state_sha256(canonical)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_template_export_equals_a_fresh_export(name):
    """Exports after the first reuse the graph and swap the weights: the bytes must be what a fresh export
    of those weights gives."""
    from shared.protocol import onnx_export as artifacts

    torch.manual_seed(1)
    model = build_model(name, (1, 28, 28), 10)
    artifacts.export_classifier_onnx(model, model.state_dict(), image_shape=(1, 28, 28))  # fills the cache
    other = build_model(name, (1, 28, 28), 10)
    state = {k: (v + torch.randn_like(v) if v.is_floating_point() else v) for k, v in other.state_dict().items()}
    via_template = artifacts.export_classifier_onnx(model, state, image_shape=(1, 28, 28))
    artifacts._TEMPLATES.clear()
    fresh = artifacts.export_classifier_onnx(model, state, image_shape=(1, 28, 28))
    assert via_template == fresh
    generator = Generator(10, 32, 32).eval()
    artifacts.export_generator_onnx(generator)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(1.0)
    via_template = artifacts.export_generator_onnx(generator)
    artifacts._TEMPLATES.clear()
    assert via_template == artifacts.export_generator_onnx(generator)


# ------------------------------------------------------------------------------------------------- budgets
def _tiny_graph(nodes, initializers, outputs=("z",)) -> bytes:  # noqa: ANN001
    from onnx import TensorProto, helper

    noise = helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["N", 32])
    labels = helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"])
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 32]) for name in outputs]
    graph = helper.make_graph(nodes, "g", [noise, labels], outs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def test_small_onnx_files_that_would_allocate_a_lot_are_refused_before_they_run(generator_export) -> None:
    """A few hundred bytes can declare a Range of 10^10 numbers, an Expand to a huge shape, or weights far
    beyond the job's generator: each is refused by the budget of the job's generator before onnxruntime
    builds a session; the real generator passes it."""
    from onnx import helper

    from shared.protocol.onnx_load import check_budget, generator_budget, parse_onnx

    generator, blob = generator_export
    budget = generator_budget(generator.noise_dim, NUM_CLASSES, 256, generator.latent_dim)
    check_budget(parse_onnx(blob), budget)
    ints = lambda name, value: numpy_helper.from_array(np.array(value, dtype=np.int64), name)  # noqa: E731
    hostile = {
        "range": _tiny_graph([helper.make_node("Range", ["zero", "limit", "one"], ["r"]),
                              helper.make_node("Identity", ["noise"], ["z"])],
                             [ints("zero", 0), ints("limit", 10**10), ints("one", 1)]),
        "expand": _tiny_graph([helper.make_node("Expand", ["noise", "shape"], ["z"])],
                              [ints("shape", [10**6, 10**6, 32])]),
        "weights": _tiny_graph([helper.make_node("Add", ["noise", "w"], ["z"])],
                               [numpy_helper.from_array(np.zeros((100_000, 32), np.float32), "w")]),
        "function": None,
    }
    model = onnx.load_from_string(hostile["range"])
    model.functions.append(onnx.FunctionProto(name="f", domain="x"))
    hostile["function"] = model.SerializeToString()
    for name, data in hostile.items():
        assert len(data) < 20_000 or name == "weights", name
        with pytest.raises(ValidationError) as err:
            OnnxGenerator(data, noise_dim=32, latent_dim=32, num_classes=NUM_CLASSES, budget=budget)
        assert err.value.reason == "bad_onnx", name


# ------------------------------------------------------------------------------------------------- shipped graphs
def test_shipped_templates_are_current_and_export_byte_identically(tmp_path) -> None:
    """The graphs shipped in shared/protocol/onnx_templates/ are what this torch exports now, and exporting
    through them gives the bytes of a fresh export for other weights."""
    from shared.protocol import onnx_export as artifacts

    shipped = artifacts.TEMPLATE_DIR
    written = artifacts.write_templates(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in shipped.glob("*.onnx"))
    for path in written:
        assert path.read_bytes() == (shipped / path.name).read_bytes(), f"{path.name}: regenerate the templates"
    model, state = seeded_model("cnn", seed=7)
    generator = seeded_generator(seed=7)

    def exports() -> list[bytes]:
        artifacts._TEMPLATES.clear()
        return [artifacts.export_classifier_onnx(model, state), artifacts.export_predictor_onnx(model, state),
                artifacts.export_generator_onnx(generator)]

    through_shipped = exports()
    artifacts._use_shipped = False
    try:
        assert exports() == through_shipped
    finally:
        artifacts._use_shipped = True
        artifacts._TEMPLATES.clear()


def test_first_exports_of_a_process_need_no_torch_export() -> None:
    """With the shipped graphs a server's first export imports neither torch's exporter stack nor onnxscript."""
    code = ("import sys\n"
            "from shared.algorithm.models import Generator, build_model\n"
            "from shared.protocol.onnx_export import export_classifier_onnx, export_generator_onnx, "
            "export_predictor_onnx\n"
            "m = build_model('cnn', (1, 28, 28), 10)\n"
            "export_classifier_onnx(m, m.state_dict()); export_predictor_onnx(m, m.state_dict())\n"
            "export_generator_onnx(Generator(10))\n"
            "print(sorted(n for n in ('torch._dynamo', 'onnxscript', 'torch.onnx._internal.exporter') "
            "if n in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
