"""ONNX exports of what the server publishes per model version (server side; needs torch and onnxscript).

The classifier (input ``x``, output ``logits``), the predictor theta^p (input ``z``, output ``logits``) and the
FedGen generator (inputs ``noise`` and ``labels``, output ``z``), all with a dynamic batch dimension. Exports
are byte-deterministic: the same weights give the same bytes in any process, and the initializers carry the
state-dict names (``features.0.weight``, ``features.1.running_mean``, ``predictor.weight``, ...), so a device
reads the weights back with `shared.protocol.onnx_load.state_from_onnx`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from shared.algorithm.models import Generator, SplitClassifier

if TYPE_CHECKING:
    import onnx

EXPORT_BATCH = 2  # example batch size for tracing; the exported batch dimension is dynamic anyway
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx",
                  "torch.utils._sympy", "onnxscript", "onnx_ir")


def export_classifier_onnx(model: SplitClassifier, state: Mapping[str, torch.Tensor],
                           image_shape: tuple[int, int, int] | None = None) -> bytes:
    """The classifier with `state` loaded, eval mode: ``x`` float32 [N, C, H, W] -> ``logits`` [N, classes].

    `image_shape` (C, H, W) defaults to the one the model was built for. The caller's model and state are
    not modified.
    """
    module = _eval_copy(model, state)
    example = torch.zeros(EXPORT_BATCH, *(image_shape or model.image_shape))
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
    key = _template_key(module, args, inputs, outputs, state)
    template = _TEMPLATES.get(key)
    if template is None:
        template = _shipped_template(key) or _fresh_export(module, args, inputs, outputs)
        _TEMPLATES[key], _TEMPLATE_WEIGHTS[key] = template, frozenset(state)
    proto = onnx.ModelProto()
    proto.CopyFrom(template)
    for tensor in proto.graph.initializer:
        if tensor.name in state:
            value = state[tensor.name].contiguous().cpu().numpy()
            if value.dtype.byteorder == ">":  # ONNX raw data is little-endian
                value = value.astype(value.dtype.newbyteorder("<"))
            tensor.raw_data = value.tobytes()
    return proto.SerializeToString(deterministic=True)


_TEMPLATES: dict[str, onnx.ModelProto] = {}
_TEMPLATE_WEIGHTS: dict[str, frozenset[str]] = {}  # the state-dict names `_export` writes into each template
# Graphs of the shipped architectures, exported ahead (`python -m shared.protocol.onnx_export` rewrites the
# folder), without their weights: the server's first export of a job then needs no torch.export (seconds of
# importing its compiler stack and tracing at every server start). tests/protocol/test_artifacts.py holds each to
# a fresh export, byte for byte; a template is keyed by the torch, onnx and onnxscript versions too, so other
# versions export afresh.
TEMPLATE_DIR = Path(__file__).parent / "onnx_templates"
_use_shipped = True
# what a fresh export's bytes depend on besides the module (metadata only: importing onnxscript costs seconds)
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # then a fresh export fails with the exporter's own message
        return "absent"


_EXPORTER_VERSIONS = (torch.__version__.split("+")[0], _version("onnx"), _version("onnxscript"))


def _template_key(module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str],
                  state: Mapping[str, torch.Tensor]) -> str:
    """A file-name-safe digest of what determines the exported graph (not the weights' values)."""
    parts = (*_EXPORTER_VERSIONS, type(module).__qualname__, tuple(inputs), tuple(outputs),
             tuple((str(a.dtype), tuple(a.shape)) for a in args),
             tuple((k, str(v.dtype), tuple(v.shape)) for k, v in state.items()))
    return f"{type(module).__qualname__.lower()}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:16]}"


def _shipped_template(key: str) -> onnx.ModelProto | None:
    path = TEMPLATE_DIR / f"{key}.onnx"
    if not _use_shipped or not path.is_file():
        return None
    import onnx

    return onnx.load_from_string(path.read_bytes())


def write_templates(directory: Path = TEMPLATE_DIR) -> list[Path]:
    """Export the graphs of the shipped architectures (each model on 1 x 28 x 28 images of 10 classes: its
    classifier and predictor; the default FedGen generator) and write them without their weights."""
    global _use_shipped
    from shared.algorithm.models import MODELS, build_model

    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.onnx"):
        old.unlink()
    written = []
    _TEMPLATES.clear()
    _use_shipped = False  # fresh exports only
    try:
        for name in MODELS:
            model = build_model(name, (1, 28, 28), 10)
            export_classifier_onnx(model, model.state_dict())
            export_predictor_onnx(model, model.state_dict())
        export_generator_onnx(Generator(10))
    finally:
        _use_shipped = True
    for key, proto in _TEMPLATES.items():
        bare = type(proto)()
        bare.CopyFrom(proto)
        for tensor in bare.graph.initializer:
            if tensor.name in _TEMPLATE_WEIGHTS[key]:
                tensor.ClearField("raw_data")  # written back by `_export`
        path = directory / f"{key}.onnx"
        path.write_bytes(bare.SerializeToString(deterministic=True))
        written.append(path)
    return written


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


if __name__ == "__main__":
    for written_path in write_templates():
        print(written_path)
