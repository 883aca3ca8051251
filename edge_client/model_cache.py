"""The device's copy of the published model: kept, brought up to date with a delta, or read from the full ONNX
file; and the FedGen generator, kept per sha256. Every result must hash to the manifest's `state_sha256`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
import numpy as np

from edge_client.runtime import Runtime
from edge_client.state import DeviceState
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.schedule import LatentSampler
from shared.protocol.delta import apply_delta
from shared.protocol.errors import ValidationError
from shared.protocol.messages import ArtifactRef, Manifest
from shared.protocol.onnx_load import state_from_onnx
from shared.protocol.tensors import decode_tensors, state_sha256, tensor_spec

log = logging.getLogger("fedgen.edge")
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024

Fetch = Callable[[str, int], bytes]  # (sha256, size) -> the artifact's bytes, checked; raises ArtifactError


class ArtifactError(Exception):
    """An artifact could not be fetched or failed its checks."""


class ModelCache:
    """The shared state of the current version, and the generator, of one job on one device."""

    def __init__(self, state: DeviceState, fetch: Fetch, client_id: str):
        self.state = state
        self.fetch = fetch
        self.client_id = client_id
        self._generator: tuple[str, LatentSampler] | None = None

    def ensure_version(self, manifest: Manifest, runtime: Runtime, cfg: AlgorithmConfig) -> dict[str, np.ndarray]:
        """The full state dict of `manifest.version` to train from: the shared entries of the version plus the
        model's other entries (integer buffers; in partial mode the device's own theta^f replaces them later).
        Raises ArtifactError."""
        template = runtime.template()
        shared = runtime.shared_keys(cfg.partial)
        held = self.state.load_tensors("global")
        if held is not None and self.state.meta.get("version") == manifest.version \
                and state_sha256(held) == manifest.state_sha256:
            return self._complete(template, held)
        if held is not None and manifest.delta and manifest.delta_base_version == self.state.meta.get("version"):
            try:
                return self._complete(template, self._adopt(manifest, self._apply_delta(manifest, held)))
            except (ValidationError, ArtifactError) as exc:
                log.warning("%s: refused the delta (%s); taking the full model", self.client_id, exc)
        own = self.state.load_tensors("own") if cfg.partial else None
        if own is not None and tensor_spec(own) != tensor_spec(template):
            log.warning("%s: the theta^f kept on this device is not of model %s; starting from the published "
                        "initial one", self.client_id, cfg.model)
            own = None
        if cfg.partial and own is None:  # a new device: its theta^f starts as the published initial one
            read = self._read_onnx(self._model_ref(manifest, cfg), template, runtime.shared_keys(partial=False))
            self.state.save_tensors("own", {k: read.get(k, v) for k, v in template.items()})
            if cfg.model != manifest.config.algorithm.model:  # that file's theta^p is the initial one
                read = self._read_onnx(manifest.predictor, template, shared)
        elif cfg.partial:
            read = self._read_onnx(manifest.predictor, template, shared)
        else:
            read = self._read_onnx(manifest.model, template, runtime.shared_keys(partial=False))
        new = {k: read[k] for k in shared}
        if state_sha256(new) != manifest.state_sha256:
            raise ArtifactError("the full model does not hash to the manifest's state_sha256")
        return self._complete(template, self._adopt(manifest, new))

    def _read_onnx(self, ref: ArtifactRef, template: dict[str, np.ndarray], keys: list[str]
                   ) -> dict[str, np.ndarray]:
        spec = tensor_spec({k: template[k] for k in keys})
        try:
            return state_from_onnx(self.fetch(ref.sha256, ref.size), spec, max_bytes=MAX_ARTIFACT_BYTES)
        except ValidationError as exc:
            raise ArtifactError(f"model ONNX refused: {exc}") from exc

    @staticmethod
    def _model_ref(manifest: Manifest, cfg: AlgorithmConfig) -> ArtifactRef:
        """The classifier of the model this device runs: the manifest's model, or (a job with several models)
        that model's entry in `models`."""
        if cfg.model == manifest.config.algorithm.model:
            return manifest.model
        if manifest.models is msgspec.UNSET or cfg.model not in manifest.models:
            raise ArtifactError(f"the manifest publishes no classifier of model {cfg.model!r}")
        return manifest.models[cfg.model]

    @property
    def generator_sha(self) -> str | None:
        """The sha256 of the generator held (None: none accepted yet)."""
        return self._generator[0] if self._generator else None

    def generator(self, manifest: Manifest, runtime: Runtime, cfg: AlgorithmConfig, latent_dim: int,
                  num_classes: int) -> LatentSampler | None:
        """The manifest's generator, or None (logged) when there is none or it is refused: the device then
        trains without it this round."""
        ref = manifest.generator
        if ref is None:
            return None
        if self._generator is not None and self._generator[0] == ref.sha256:
            return self._generator[1]
        try:
            sampler = runtime.load_generator(self.fetch(ref.sha256, ref.size), cfg, latent_dim, num_classes,
                                             MAX_ARTIFACT_BYTES)
        except (ValidationError, ArtifactError) as exc:
            log.warning("%s: refused the generator (%s); training without it this round", self.client_id, exc)
            return None
        self._generator = (ref.sha256, sampler)
        return sampler

    def _apply_delta(self, manifest: Manifest, held: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        delta = decode_tensors(self.fetch(manifest.delta.sha256, manifest.delta.size), tensor_spec(held),
                               max_bytes=MAX_ARTIFACT_BYTES)
        new = apply_delta(held, delta)
        if state_sha256(new) != manifest.state_sha256:
            raise ValidationError("state_hash", f"delta applied to version {manifest.delta_base_version} does "
                                                "not give the published state")
        return new

    def _adopt(self, manifest: Manifest, shared_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.state.save_tensors("global", shared_state)
        self.state.meta["version"] = manifest.version
        self.state.save_meta()
        return shared_state

    @staticmethod
    def _complete(template: dict[str, np.ndarray], shared_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**template, **shared_state}
