"""What the server publishes per model version, and how a device reads it back.

* ONNX exports of the classifier (input ``x``, output ``logits``), of the predictor theta^p (input ``z``, output
  ``logits``) and of the FedGen generator (inputs ``noise`` and ``labels``, output ``z``), all with a dynamic
  batch dimension. Exports are byte-deterministic: the same weights give the same bytes in any process, and the
  initializers carry the state-dict names (``features.0.weight``, ``features.1.running_mean``,
  ``predictor.weight``, ...), so a device can read the weights back with `state_from_onnx`.
* A weight delta (new - old, float32, keyed by state-dict name) that a device holding the previous version
  applies with `apply_delta`; `make_delta` also returns the canonical new state (old + delta) that the server
  publishes, so the device's result hashes (`state_sha256`) exactly like the server's.
* `OnnxGenerator`: the generator as a `shared.local.LatentSampler` backed by onnxruntime.

Everything read here is untrusted: it is size-limited, and every failure surfaces as `ValidationError`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from shared.models import Generator, SplitClassifier
from shared.wire import DEFAULT_MAX_ABS_VALUE, ValidationError, check_names, check_values, encode_tensors, sha256_hex

if TYPE_CHECKING:  # imported lazily below: the exporters do not need onnxruntime, the readers not torch.onnx
    import onnx
    import onnxruntime

__all__ = [
    "DEFAULT_MAX_ONNX_BYTES", "OnnxGenerator", "apply_delta", "export_classifier_onnx",
    "export_generator_onnx", "export_predictor_onnx", "infer_image_shape", "make_delta", "parse_onnx",
    "state_from_onnx", "state_sha256",
]

DEFAULT_MAX_ONNX_BYTES = 64 * 1024 * 1024
EXPORT_BATCH = 2  # example batch size for tracing; the exported batch dimension is dynamic anyway
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx",
                  "torch.utils._sympy", "onnxscript", "onnx_ir")

Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


# ------------------------------------------------------------------------------------------------- export
def export_classifier_onnx(model: SplitClassifier, state: Mapping[str, torch.Tensor],
                           image_shape: tuple[int, int, int] | None = None) -> bytes:
    """The classifier with `state` loaded, eval mode: ``x`` float32 [N, C, H, W] -> ``logits`` [N, classes].

    `image_shape` (C, H, W) defaults to what `infer_image_shape` finds; pass it where it is known.
    The caller's model and state are not modified.
    """
    module = _eval_copy(model, state)
    shape = tuple(image_shape) if image_shape is not None else infer_image_shape(module)
    example = torch.zeros(EXPORT_BATCH, *shape)
    return _export(module, (example,), ["x"], ["logits"])


def export_predictor_onnx(model: SplitClassifier, state: Mapping[str, torch.Tensor]) -> bytes:
    """theta^p alone: ``z`` float32 [N, latent] -> ``logits``; initializers ``predictor.weight/bias``."""
    module = _eval_copy(model, state)
    wrapper = _PredictorOnly(module.predictor).eval()
    example = torch.zeros(EXPORT_BATCH, module.latent_dim)
    return _export(wrapper, (example,), ["z"], ["logits"])


def export_generator_onnx(generator: Generator) -> bytes:
    """The generator in eval mode (BatchNorm running statistics): ``noise`` float32 [N, noise_dim] and
    ``labels`` int64 [N] -> ``z`` float32 [N, latent]."""
    module = copy.deepcopy(generator).eval()
    noise = torch.zeros(EXPORT_BATCH, module.noise_dim)
    labels = torch.arange(EXPORT_BATCH, dtype=torch.int64) % module.num_classes
    return _export(module, (noise, labels), ["noise", "labels"], ["z"])


class _PredictorOnly(nn.Module):
    """Holds the predictor under the attribute name ``predictor`` so its parameters keep their state-dict names."""

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.predictor = predictor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.predictor(z)


def infer_image_shape(model: SplitClassifier) -> tuple[int, int, int]:
    """(C, H, W) of the images `model` takes, assuming square images: ``model.image_shape`` if the model has
    one; else, for a first Linear layer, C in (1, 3) with C*H*W = in_features; for a first Conv2d, the largest
    side of the first run of sides a forward pass accepts (28 for the reference CNN, which also takes 25..27).
    Pass `image_shape` to the exporters where it is known. ValueError if nothing fits."""
    explicit = getattr(model, "image_shape", None)
    if explicit is not None:
        return tuple(int(d) for d in explicit)  # type: ignore[return-value]
    model = copy.deepcopy(model).eval()  # trial forward passes must not touch the caller's BatchNorm stats
    layers = [m for m in model.features.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if layers and isinstance(layers[0], nn.Linear):
        for channels in (1, 3):
            side = round((layers[0].in_features / channels) ** 0.5)
            if channels * side * side == layers[0].in_features and _accepts(model, (channels, side, side)):
                return channels, side, side
    if layers and isinstance(layers[0], nn.Conv2d):
        channels, found = layers[0].in_channels, None
        for side in range(1, 1025):
            if _accepts(model, (channels, side, side)):
                found = side
            elif found is not None:
                break
        if found is not None:
            return channels, found, found
    raise ValueError("cannot infer the classifier's input shape; pass image_shape=(C, H, W)")


def _accepts(model: nn.Module, shape: tuple[int, int, int]) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
        return True
    except RuntimeError:
        return False


def _eval_copy(model: SplitClassifier, state: Mapping[str, torch.Tensor]) -> SplitClassifier:
    module = copy.deepcopy(model)
    module.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return module.eval()


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str]) -> bytes:
    """The ONNX bytes of `module`. The graph of an architecture is exported once (seconds) and kept; later
    exports of the same architecture copy it and write the new weights into its initializers (milliseconds).
    The result is byte-identical to a fresh export (tests/test_artifacts.py checks it)."""
    import onnx

    state = {k: v.detach() for k, v in module.state_dict().items()}
    key = (type(module).__qualname__, tuple(inputs), tuple(outputs),
           tuple((a.dtype, tuple(a.shape)) for a in args),
           tuple((k, v.dtype, tuple(v.shape)) for k, v in state.items()))
    template = _TEMPLATES.get(key)
    if template is None:
        template = _fresh_export(module, args, inputs, outputs)
        _TEMPLATES[key] = template
    proto = onnx.ModelProto()
    proto.CopyFrom(template)
    for tensor in proto.graph.initializer:
        if tensor.name in state:
            value = state[tensor.name].contiguous().cpu().numpy()
            if value.dtype.byteorder == ">":  # ONNX raw data is little-endian
                value = value.astype(value.dtype.newbyteorder("<"))
            tensor.raw_data = value.tobytes()
    return proto.SerializeToString(deterministic=True)


_TEMPLATES: dict[tuple, onnx.ModelProto] = {}


def _fresh_export(module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str],
                  outputs: list[str]) -> onnx.ModelProto:
    """torch.export-based ONNX export, not optimised (the onnxscript optimiser would fold BatchNorm into the
    convolutions and rename weights), with every batch dimension dynamic, normalised to be byte-stable."""
    batch = torch.export.Dim("N")
    dynamic = {name: {0: batch} for name in inputs}
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic, optimize=False, verbose=False, report=False)
    from onnx import numpy_helper

    proto = program.model_proto
    _strip_metadata(proto)
    for tensor in proto.graph.initializer:  # every weight as raw bytes, the form the template path writes
        if not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    return proto


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and log lines (not thread-safe: warnings filters are process-wide)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop what is not the computation: stack traces with absolute file paths, FX node dumps, doc strings,
    and the local build tag of the producer version ("2.13.0+cpu" -> "2.13.0")."""
    model.producer_version = model.producer_version.split("+")[0]
    model.doc_string = ""
    del model.metadata_props[:]
    _strip_graph(model.graph)
    for function in model.functions:
        del function.metadata_props[:]
        function.doc_string = ""
        for node in function.node:
            _strip_node(node)


def _strip_graph(graph: onnx.GraphProto) -> None:
    del graph.metadata_props[:]
    graph.doc_string = ""
    for info in (*graph.input, *graph.output, *graph.value_info):
        del info.metadata_props[:]
        info.doc_string = ""
    for tensor in graph.initializer:
        del tensor.metadata_props[:]
        tensor.doc_string = ""
    for node in graph.node:
        _strip_node(node)


def _strip_node(node: onnx.NodeProto) -> None:
    del node.metadata_props[:]
    node.doc_string = ""
    for attr in node.attribute:
        if attr.HasField("g"):
            _strip_graph(attr.g)
        for sub in attr.graphs:
            _strip_graph(sub)


# ------------------------------------------------------------------------------------------------- import
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
    except Exception as exc:  # noqa: BLE001 -- protobuf and onnx raise many types; none may escape
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
                    max_abs: float = DEFAULT_MAX_ABS_VALUE) -> dict[str, torch.Tensor]:
    """The tensors named in `expected` (name -> (shape, dtype)), read from the initializers of an ONNX model
    exported by this module, with the checks and `ValidationError` reasons of `shared.wire.decode_tensors`.

    Name policy: every expected name must be an initializer ('missing_tensor'). Other initializers are the
    exporter's graph constants and are ignored, unless their name lies in a namespace of the state (its first
    dotted component, e.g. ``features.`` or ``predictor.``): then the model holds parameters the expected state
    does not have, i.e. another architecture ('unexpected_tensor'). Pass only floating-point entries
    (e.g. `shared.models.shared_keys`): integer buffers such as ``num_batches_tracked`` are not in the export.
    """
    onnx_dtypes = {name: _onnx_dtype(dtype) for name, (_, dtype) in expected.items()}
    model = parse_onnx(blob, max_bytes)
    initializers = _initializers(model)
    _check_names(initializers, expected)
    result: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in expected.items():
        tensor = initializers[name]
        if tuple(tensor.dims) != tuple(shape):
            raise ValidationError("bad_shape", f"{name} has shape {tuple(tensor.dims)}, expected {tuple(shape)}")
        if tensor.data_type != onnx_dtypes[name]:
            raise ValidationError("bad_dtype", f"{name} has ONNX data type {tensor.data_type}, expected {dtype}")
        result[name] = _to_tensor(name, tensor, dtype, max_abs)
    return result


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found: dict[str, onnx.TensorProto] = {}
    for tensor in model.graph.initializer:
        if tensor.name in found:
            raise ValidationError("bad_onnx", f"initializer {tensor.name!r} appears twice")
        found[tensor.name] = tensor
    return found


def _check_names(initializers: Mapping[str, object], expected: Spec) -> None:
    missing = sorted(set(expected) - set(initializers))
    if missing:
        raise ValidationError("missing_tensor", f"missing tensors {missing}")
    namespaces = {name.split(".")[0] for name in expected}
    extra = sorted(n for n in set(initializers) - set(expected) if "." in n and n.split(".")[0] in namespaces)
    if extra:
        raise ValidationError("unexpected_tensor", f"unexpected tensors {extra}")


def _to_tensor(name: str, proto: onnx.TensorProto, dtype: torch.dtype, max_abs: float) -> torch.Tensor:
    from onnx import numpy_helper

    try:
        array = np.array(numpy_helper.to_array(proto), copy=True)
        tensor = torch.from_numpy(array).to(dtype)
    except Exception as exc:  # noqa: BLE001 -- inconsistent sizes, unsupported storage
        raise ValidationError("bad_onnx", f"{name}: unreadable tensor data ({type(exc).__name__})") from None
    check_values(name, tensor, max_abs)
    return tensor


_ONNX_DTYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6,
                torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.float64: 11}


def _onnx_dtype(dtype: torch.dtype) -> int:
    if dtype not in _ONNX_DTYPES:
        raise ValueError(f"state_from_onnx does not read {dtype} tensors")
    return _ONNX_DTYPES[dtype]


# ------------------------------------------------------------------------------------------------- sampler
class OnnxGenerator:
    """A `LatentSampler` backed by an onnxruntime session over an ONNX generator (see `export_generator_onnx`).

    The constructor checks the interface (``noise`` float [N, noise_dim], ``labels`` int64 [N] -> ``z`` float
    [N, latent], N dynamic) and runs the model once; anything else raises ValidationError('bad_onnx').
    """

    def __init__(self, blob: bytes, *, noise_dim: int | None = None, latent_dim: int | None = None,
                 num_classes: int | None = None, threads: int = 1, max_bytes: int = DEFAULT_MAX_ONNX_BYTES):
        parse_onnx(blob, max_bytes)  # size limit, and no external data before onnxruntime sees it
        self.num_classes = num_classes
        self._session = _make_session(blob, threads)
        self.noise_dim, self.latent_dim = _check_interface(self._session, noise_dim, latent_dim)
        self._smoke_test()

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if noise.dim() != 2 or noise.shape[1] != self.noise_dim:
            raise ValueError(f"noise must have shape [N, {self.noise_dim}], got {tuple(noise.shape)}")
        if labels.shape != (noise.shape[0],):
            raise ValueError(f"labels must have shape [{noise.shape[0]}], got {tuple(labels.shape)}")
        if self.num_classes is not None and labels.numel() and not (
                0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        feeds = {"noise": np.ascontiguousarray(noise.detach().cpu().numpy(), dtype=np.float32),
                 "labels": np.ascontiguousarray(labels.detach().cpu().numpy(), dtype=np.int64)}
        try:
            (z,) = self._session.run(["z"], feeds)
        except Exception as exc:  # noqa: BLE001 -- onnxruntime's error types vary by version
            raise ValidationError("bad_onnx", f"generator failed to run ({type(exc).__name__})") from None
        return torch.from_numpy(np.asarray(z, dtype=np.float32))

    def _smoke_test(self) -> None:
        n = 3
        labels = torch.arange(n, dtype=torch.int64) % (self.num_classes or 1)
        z = self(torch.full((n, self.noise_dim), 0.5), labels)
        if tuple(z.shape) != (n, self.latent_dim) or not torch.isfinite(z).all():
            raise ValidationError("bad_onnx", f"generator gave shape {tuple(z.shape)} or non-finite values")


def _make_session(blob: bytes, threads: int) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: a refused model is reported by ValidationError, not on stderr
    try:  # no fallback: it would retry the same CPU provider and print "EP Error" banners to stdout
        session = ort.InferenceSession(bytes(blob), sess_options=options, providers=["CPUExecutionProvider"],
                                       enable_fallback=0)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's error types vary by version
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


# ------------------------------------------------------------------------------------------------- deltas
def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """The hash a manifest's ``state_sha256`` carries: sha256 of the canonical safetensors encoding."""
    return sha256_hex(encode_tensors(state))


def make_delta(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(delta, canonical_new): delta = new - old and canonical_new = old + delta, both float32.

    old + (new - old) is not always new in floating point, so the server publishes canonical_new as the
    version: a device computing `apply_delta(old, delta)` then gets it bit for bit (same `state_sha256`).
    """
    _check_compatible(old, new, "new state", require_float32=False)
    delta: dict[str, torch.Tensor] = {}
    canonical: dict[str, torch.Tensor] = {}
    for name in old:
        base = old[name].detach().to(torch.float32)
        delta[name] = new[name].detach().to(torch.float32) - base
        canonical[name] = base + delta[name]
    return delta, canonical


def apply_delta(old: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """old + delta for float32 states with the same names and shapes; ValidationError otherwise
    ('missing_tensor', 'unexpected_tensor', 'bad_shape', 'bad_dtype', 'non_finite')."""
    _check_compatible(old, delta, "delta", require_float32=True)
    new = {name: old[name].detach() + delta[name].detach() for name in old}
    for name, tensor in new.items():
        if not torch.isfinite(tensor).all():
            raise ValidationError("non_finite", f"{name} is not finite after applying the delta")
    return new


def _check_compatible(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str,
                      require_float32: bool) -> None:
    check_names(other, base, what)
    for name, tensor in base.items():
        if tuple(other[name].shape) != tuple(tensor.shape):
            raise ValidationError("bad_shape", f"{what} {name} has shape {tuple(other[name].shape)}, "
                                               f"expected {tuple(tensor.shape)}")
        if require_float32 and (tensor.dtype != torch.float32 or other[name].dtype != torch.float32):
            raise ValidationError("bad_dtype", f"{name}: deltas apply to float32 only, got {tensor.dtype} "
                                               f"and {other[name].dtype}")
        if not (tensor.is_floating_point() and other[name].is_floating_point()):
            raise ValidationError("bad_dtype", f"{name} is not floating point")
