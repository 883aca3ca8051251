"""Reading what the server publishes, on a device (numpy; onnx and onnxruntime for `OnnxGenerator`; no torch).

* `parse_onnx`: an untrusted ONNX model, size-limited, with external data refused.
* `state_from_onnx`: the weights of a published classifier or predictor, by state-dict name.
* `OnnxGenerator`: the FedGen generator as a `LatentSampler` (numpy in, numpy out) backed by onnxruntime (the
  torch runtime's; its graph is checked against the job's `GraphBudget` with onnx's shape inference first).
* `WeightsGenerator`: the same generator evaluated in numpy from the ONNX file's weights alone (the lite
  runtime's: no onnx, no onnxruntime, and no received graph is ever executed).

`state_from_onnx` and `WeightsGenerator` read the file with `shared.protocol.onnx_wire` (no onnx package).

Everything read here is untrusted: it is size-limited, and every failure surfaces as `ValidationError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shared.protocol.errors import ValidationError
from shared.protocol.onnx_wire import WireModel, read_model
from shared.protocol.tensors import DEFAULT_MAX_ABS_VALUE, check_values

if TYPE_CHECKING:  # imported lazily: importing onnx takes ~0.7 s, which a device pays only when it reads one
    import onnx
    import onnxruntime

DEFAULT_MAX_ONNX_BYTES = 64 * 1024 * 1024
GRAPH_ALLOWANCE = 1024 * 1024  # bytes an exported file may hold beyond twice its weights (graph, names, constants)

Spec = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def parse_onnx(blob: bytes, max_bytes: int = DEFAULT_MAX_ONNX_BYTES) -> onnx.ModelProto:
    """Parse an untrusted ONNX model: size limit, protobuf decoding, and no tensor with external data
    (reading it would open files named by the sender). ValidationError ('too_large', 'bad_onnx') otherwise."""
    if len(blob) > max_bytes:
        raise ValidationError("too_large", f"ONNX model of {len(blob)} bytes exceeds {max_bytes}")
    try:
        import onnx

        model = onnx.load_from_string(bytes(blob))
        external = _has_external_data(model.graph) or any(_nodes_have_external_data(f.node)
                                                           for f in model.functions)
    except Exception as exc:  # protobuf and onnx raise many types; none may escape
        raise ValidationError("bad_onnx", f"not an ONNX model ({type(exc).__name__})") from None
    if external:
        raise ValidationError("bad_onnx", "ONNX models with external data are refused")
    return model


def _has_external_data(graph: onnx.GraphProto) -> bool:
    tensors = [*graph.initializer, *(s.values for s in graph.sparse_initializer),
               *(s.indices for s in graph.sparse_initializer)]
    return any(_is_external(t) for t in tensors) or _nodes_have_external_data(graph.node)


def _nodes_have_external_data(nodes: Iterable[onnx.NodeProto]) -> bool:
    for node in nodes:
        for attr in node.attribute:
            tensors = [attr.t, *attr.tensors, attr.sparse_tensor.values, attr.sparse_tensor.indices]
            if any(_is_external(t) for t in tensors):
                return True
            if any(_has_external_data(g) for g in (attr.g, *attr.graphs)):
                return True
    return False


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == 1 or len(tensor.external_data) > 0  # 1 == TensorProto.EXTERNAL


def state_from_onnx(blob: bytes, expected: Spec, max_bytes: int = DEFAULT_MAX_ONNX_BYTES,
                    max_abs: float = DEFAULT_MAX_ABS_VALUE) -> dict[str, np.ndarray]:
    """The tensors named in `expected` (name -> (shape, dtype)), read from the initializers of an ONNX model
    exported by this module, with the checks and `ValidationError` reasons of `shared.protocol.tensors.decode_tensors`.

    Name policy: every expected name must be an initializer ('missing_tensor'). Other initializers are the
    exporter's graph constants and are ignored, unless their name lies in a namespace of the state (its first
    dotted component, e.g. ``features.`` or ``predictor.``): then the model holds parameters the expected state
    does not have, i.e. another architecture ('unexpected_tensor'). Pass only floating-point entries
    (e.g. `shared.algorithm.models.shared_keys`): integer buffers such as ``num_batches_tracked`` are not in the export.
    """
    return _state_from_model(read_model(blob, _weights_limit(expected, max_bytes)), expected, max_abs)


def _weights_limit(expected: Spec, max_bytes: int) -> int:
    """The file holds these weights and a graph: far more bytes than that is not this model (and costs parsing)."""
    weights = sum(_numel(shape) * np.dtype(dtype).itemsize for shape, dtype in expected.values())
    return min(max_bytes, 2 * weights + GRAPH_ALLOWANCE)


def _state_from_model(model: WireModel, expected: Spec, max_abs: float) -> dict[str, np.ndarray]:
    onnx_dtypes = {name: _onnx_dtype(dtype) for name, (_, dtype) in expected.items()}
    initializers = model.initializers
    _check_names(initializers, expected)
    result: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in expected.items():
        tensor = initializers[name]
        if tuple(tensor.dims) != tuple(shape):
            raise ValidationError("bad_shape", f"{name} has shape {tuple(tensor.dims)}, expected {tuple(shape)}")
        if tensor.data_type != onnx_dtypes[name]:
            raise ValidationError("bad_dtype", f"{name} has ONNX data type {tensor.data_type}, expected {dtype}")
        array = tensor.to_array()
        check_values(name, array, max_abs)
        result[name] = array
    return result


def _check_names(initializers: Mapping[str, object], expected: Spec) -> None:
    missing = sorted(set(expected) - set(initializers))
    if missing:
        raise ValidationError("missing_tensor", f"missing tensors {missing}")
    namespaces = {name.split(".")[0] for name in expected}
    extra = sorted(n for n in set(initializers) - set(expected) if "." in n and n.split(".")[0] in namespaces)
    if extra:
        raise ValidationError("unexpected_tensor", f"unexpected tensors {extra}")


_ONNX_DTYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int16): 5,
                np.dtype(np.int32): 6, np.dtype(np.int64): 7, np.dtype(np.bool_): 9, np.dtype(np.float16): 10,
                np.dtype(np.float64): 11}


def _onnx_dtype(dtype: np.dtype) -> int:
    if np.dtype(dtype) not in _ONNX_DTYPES:
        raise ValueError(f"state_from_onnx does not read {dtype} tensors")
    return _ONNX_DTYPES[np.dtype(dtype)]


class OnnxGenerator:
    """A `LatentSampler` backed by an onnxruntime session over an ONNX generator (see `export_generator_onnx`).

    The constructor checks the interface (``noise`` float [N, noise_dim], ``labels`` int64 [N] -> ``z`` float
    [N, latent], N dynamic) and runs the model once; anything else raises ValidationError('bad_onnx').
    """

    def __init__(self, blob: bytes, *, noise_dim: int | None = None, latent_dim: int | None = None,
                 num_classes: int | None = None, threads: int = 1, max_bytes: int = DEFAULT_MAX_ONNX_BYTES,
                 budget: GraphBudget | None = None):
        model = parse_onnx(blob, max_bytes)  # size limit, and no external data before onnxruntime sees it
        if budget is not None:  # before onnxruntime allocates anything
            check_budget(model, budget)
        self.num_classes = num_classes
        self._session = _make_session(blob, threads)
        self.noise_dim, self.latent_dim = _check_interface(self._session, noise_dim, latent_dim)
        self._smoke_test()

    def __call__(self, noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
        noise, labels = np.asarray(noise), np.asarray(labels)
        if noise.ndim != 2 or noise.shape[1] != self.noise_dim:
            raise ValueError(f"noise must have shape [N, {self.noise_dim}], got {tuple(noise.shape)}")
        if labels.shape != (noise.shape[0],):
            raise ValueError(f"labels must have shape [{noise.shape[0]}], got {tuple(labels.shape)}")
        if self.num_classes is not None and labels.size and not (
                0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        feeds = {"noise": np.ascontiguousarray(noise, dtype=np.float32),
                 "labels": np.ascontiguousarray(labels, dtype=np.int64)}
        try:
            (z,) = self._session.run(["z"], feeds)
        except Exception as exc:  # onnxruntime's error types vary by version
            raise ValidationError("bad_onnx", f"generator failed to run ({type(exc).__name__})") from None
        return np.asarray(z, dtype=np.float32)

    def _smoke_test(self) -> None:
        n = 3
        labels = np.arange(n, dtype=np.int64) % (self.num_classes or 1)
        z = self(np.full((n, self.noise_dim), 0.5, dtype=np.float32), labels)
        if tuple(z.shape) != (n, self.latent_dim) or not np.isfinite(z).all():
            raise ValidationError("bad_onnx", f"generator gave shape {tuple(z.shape)} or non-finite values")


class WeightsGenerator:
    """A `LatentSampler` that evaluates the FedGen generator (`shared.algorithm.models.Generator`: concat(noise,
    one-hot y) -> Gemm -> BatchNormalization (inference) -> Relu -> Gemm) in numpy, from the initializers of its
    published ONNX file, by the names and shapes the job's generator has.

    The file must look like that architecture: its initializers exactly the generator's eight tensors, its
    compute operators exactly two Gemm (alpha = beta = 1, weights transposed), one BatchNormalization
    (inference) and one Relu, its other operators only the one-hot encoding's (Constant, Cast, Unsqueeze, Range,
    Equal, Concat), and its latents for a test input finite; anything else is ValidationError ('bad_onnx' or a
    tensor reason). How the nodes are wired is not checked: the device computes the architecture's function
    from the weights. The graph itself is not executed, so no file can make the device allocate more than the
    generator's own weights and a batch's activations.
    """

    LAYOUT_OPS = frozenset({"Constant", "Cast", "Unsqueeze", "Range", "Equal", "Concat"})

    def __init__(self, blob: bytes, *, noise_dim: int, latent_dim: int, num_classes: int, hidden: int,
                 max_bytes: int = DEFAULT_MAX_ONNX_BYTES, max_abs: float = DEFAULT_MAX_ABS_VALUE):
        self.noise_dim, self.latent_dim, self.num_classes = noise_dim, latent_dim, num_classes
        f32 = np.dtype(np.float32)
        spec = {"net.0.weight": ((hidden, noise_dim + num_classes), f32), "net.0.bias": ((hidden,), f32),
                **{f"net.1.{k}": ((hidden,), f32) for k in ("weight", "bias", "running_mean", "running_var")},
                "net.3.weight": ((latent_dim, hidden), f32), "net.3.bias": ((latent_dim,), f32)}
        model = read_model(blob, _weights_limit(spec, max_bytes))
        extra = sorted(set(model.initializers) - set(spec))
        if extra:
            raise ValidationError("unexpected_tensor", f"the generator holds tensors it should not: {extra[:5]}")
        self.epsilon = self._check_graph(model)
        w = _state_from_model(model, spec, max_abs)
        if (w["net.1.running_var"] < 0).any():
            raise ValidationError("bad_onnx", "the generator's BatchNorm has a negative running variance")
        self._w0, self._b0, self._w3, self._b3 = w["net.0.weight"], w["net.0.bias"], w["net.3.weight"], w["net.3.bias"]
        self._bn = (w["net.1.running_mean"], w["net.1.running_var"], w["net.1.weight"], w["net.1.bias"])
        z = self(np.full((3, noise_dim), 0.5, dtype=np.float32), np.arange(3) % num_classes)
        if not np.isfinite(z).all():
            raise ValidationError("bad_onnx", "the generator's weights give non-finite latents")

    @classmethod
    def _check_graph(cls, model: WireModel) -> float:
        """The BatchNormalization's epsilon, after checking the operators are the generator's."""
        compute = [n for n in model.nodes if n.op_type not in cls.LAYOUT_OPS]
        ops = sorted(n.op_type for n in compute)
        if model.functions or any(n.has_subgraph or n.domain not in ("", "ai.onnx") for n in model.nodes) \
                or ops != ["BatchNormalization", "Gemm", "Gemm", "Relu"]:
            raise ValidationError("bad_onnx", f"not the FedGen generator's graph (operators {ops[:8]})")
        for gemm in (n for n in compute if n.op_type == "Gemm"):
            a = gemm.attributes
            if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0) != 0 \
                    or a.get("transB", 0) != 1:
                raise ValidationError("bad_onnx", f"a Gemm with attributes {a} is not the generator's Linear")
        norm = next(n for n in compute if n.op_type == "BatchNormalization").attributes
        epsilon = norm.get("epsilon", 1e-5)
        if not 1e-12 <= epsilon < 1 or norm.get("training_mode", 0) != 0:
            raise ValidationError("bad_onnx", f"BatchNormalization epsilon {epsilon}")
        return float(epsilon)

    def __call__(self, noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
        noise, labels = np.asarray(noise, dtype=np.float32), np.asarray(labels)
        if noise.ndim != 2 or noise.shape[1] != self.noise_dim:
            raise ValueError(f"noise must have shape [N, {self.noise_dim}], got {tuple(noise.shape)}")
        if labels.shape != (noise.shape[0],) or labels.dtype.kind not in "iu" or (labels.size and not (
                0 <= int(labels.min()) and int(labels.max()) < self.num_classes)):
            raise ValueError(f"labels must be integers of shape [{noise.shape[0]}] that lie in "
                             f"[0, {self.num_classes})")
        onehot = np.zeros((len(labels), self.num_classes), dtype=np.float32)
        onehot[np.arange(len(labels)), labels] = 1.0
        h = np.concatenate([noise, onehot], axis=1) @ self._w0.T + self._b0
        mean, var, weight, bias = self._bn
        h = (h - mean) / np.sqrt(var + np.float32(self.epsilon)) * weight + bias
        return np.maximum(h, np.float32(0)) @ self._w3.T + self._b3


GENERATOR_OPS = frozenset({"Cast", "Constant", "Gemm", "MatMul", "Add", "Mul", "Sub", "Div", "Unsqueeze", "Squeeze",
                           "Reshape", "Range", "Equal", "Concat", "BatchNormalization", "Relu", "Identity",
                           "OneHot", "Shape", "Gather", "Flatten", "Transpose"})


@dataclass(frozen=True)
class GraphBudget:
    """What an ONNX graph may hold and compute, from the job's model: at most `max_weights` numbers in its
    initializers and constants, and per sample (the one dynamic batch dimension) at most `max_width` numbers in
    any tensor it computes; only the operators in `ops`."""

    max_weights: int
    max_width: int
    ops: frozenset[str] = GENERATOR_OPS


def generator_budget(noise_dim: int, num_classes: int, hidden: int, latent_dim: int) -> GraphBudget:
    """The budget of the FedGen generator of a job: twice its parameters, four times its widest layer."""
    weights = (noise_dim + num_classes + 1) * hidden + 4 * hidden + (hidden + 1) * latent_dim
    return GraphBudget(2 * weights + 1024, 4 * max(noise_dim + num_classes, hidden, latent_dim, num_classes))


def check_budget(model: onnx.ModelProto, budget: GraphBudget) -> None:
    """ValidationError('bad_onnx') when the graph uses an operator outside the budget's list, nests graphs,
    holds more weights than the job's model could, or declares (or infers) tensors larger than its widest
    layer: a few-KB file must not make onnxruntime allocate hundreds of MiB."""
    import onnx

    if model.functions:
        raise ValidationError("bad_onnx", "graphs with local functions are refused")
    for node in model.graph.node:
        if node.op_type not in budget.ops or node.domain not in ("", "ai.onnx"):
            raise ValidationError("bad_onnx", f"operator {node.domain or 'ai.onnx'}.{node.op_type} is not expected "
                                              "in this model")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValidationError("bad_onnx", f"{node.op_type} carries a subgraph")
    weights = sum(_numel(t.dims) for t in model.graph.initializer)
    weights += sum(_numel(a.t.dims) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                   if a.type == onnx.AttributeProto.TENSOR)
    if weights > budget.max_weights:
        raise ValidationError("bad_onnx", f"{weights} weights, this job's model has room for {budget.max_weights}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises its own error types for inconsistent graphs
        raise ValidationError("bad_onnx", f"shape inference failed ({type(exc).__name__})") from None
    graph = inferred.graph
    for info in (*graph.input, *graph.output, *graph.value_info):
        shape = info.type.tensor_type.shape
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            raise ValidationError("bad_onnx", f"{info.name} has no known shape")
        fixed = [d.dim_value for d in shape.dim if d.HasField("dim_value")]
        unknown = [d for d in shape.dim if not d.HasField("dim_value")]
        if len(unknown) > 1 or (unknown and not unknown[0].dim_param):
            raise ValidationError("bad_onnx", f"{info.name} has a shape of unknown size")
        limit = budget.max_width if unknown else budget.max_weights  # per sample, or a whole constant
        if _numel(fixed) > limit:
            raise ValidationError("bad_onnx", f"{info.name} has {_numel(fixed)} numbers"
                                              f"{' per sample' if unknown else ''}, more than {limit}")


def _numel(dims: Iterable[int]) -> int:
    count = 1
    for d in dims:
        count *= max(0, int(d))
    return count


def _make_session(blob: bytes, threads: int) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    # fatal only, for the session and for onnxruntime's process-wide logger (the allocator reports an
    # impossible size there): a refused model is reported by ValidationError, never as a line on stderr
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    try:  # no fallback: it would retry the same CPU provider and print "EP Error" banners to stdout
        session = ort.InferenceSession(bytes(blob), sess_options=options, providers=["CPUExecutionProvider"],
                                       enable_fallback=0)
    except Exception as exc:  # onnxruntime's error types vary by version
        raise ValidationError("bad_onnx", f"onnxruntime refused the model ({type(exc).__name__})") from None
    session.disable_fallback()
    return session


def _check_interface(session: onnxruntime.InferenceSession, noise_dim: int | None,
                     latent_dim: int | None) -> tuple[int, int]:
    """Inputs ``noise`` and ``labels``, output ``z``, with the expected widths; returns (noise_dim, latent_dim)."""
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = {arg.name: arg for arg in session.get_outputs()}
    if set(inputs) != {"noise", "labels"} or set(outputs) != {"z"}:
        raise ValidationError("bad_onnx", f"expected inputs noise, labels and output z, got {sorted(inputs)} "
                                          f"-> {sorted(outputs)}")
    noise = _check_arg(inputs["noise"], "tensor(float)", 2, noise_dim)
    _check_arg(inputs["labels"], "tensor(int64)", 1, None)
    z = _check_arg(outputs["z"], "tensor(float)", 2, latent_dim)
    return noise, z


def _check_arg(arg: onnxruntime.NodeArg, type_name: str, rank: int, width: int | None) -> int:
    """Check one input/output: type, rank, dynamic batch dimension, fixed width (returned; 0 for rank 1)."""
    shape = list(arg.shape)
    if arg.type != type_name or len(shape) != rank or isinstance(shape[0], int):
        raise ValidationError("bad_onnx", f"{arg.name} is {arg.type} {shape}, expected {type_name} of rank "
                                          f"{rank} with a dynamic batch dimension")
    if rank == 1:
        return 0
    if not isinstance(shape[1], int) or shape[1] <= 0 or (width is not None and shape[1] != width):
        raise ValidationError("bad_onnx", f"{arg.name} has shape {shape}, expected width {width}")
    return shape[1]
