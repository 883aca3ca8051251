"""The edge client: announce, wait for selection, fetch the model (delta or full), train, upload until acked."""

from __future__ import annotations

import logging
import math
import platform
import queue
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from edge_client.data import LocalData, PartitionSpec
from edge_client.state import DeviceState
from shared.artifacts import OnnxGenerator, apply_delta, state_from_onnx, state_sha256
from shared.config import AlgorithmConfig
from shared.federation import client_start_state
from shared.local import evaluate, local_update, round_seed
from shared.models import SplitClassifier, build_model, shared_keys
from shared.mqtt import Message, MqttLink
from shared.protocol import (
    Manifest,
    Presence,
    Reassembler,
    RoundAnnouncement,
    Topics,
    UpdateHeader,
    decode_ack,
    decode_assignment,
    decode_chunk,
    decode_manifest,
    decode_round,
    encode_update,
    split_chunks,
)
from shared.wire import ValidationError, decode_tensors, encode_tensors, sha256_hex, tensor_spec

log = logging.getLogger("fedgen.edge")
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024


@dataclass
class EdgeOptions:
    broker: str
    job: str
    client_id: str
    state_dir: str
    partition: PartitionSpec | None = None
    data_loader: object = None  # callable(image_shape, num_classes) -> LocalData, for --data
    data_dir: str | None = None
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    retry_s: float = 10.0
    fetch_timeout_s: float = 60.0
    exit_when_finished: bool = True


class ArtifactError(Exception):
    """An artifact could not be fetched or failed its checks."""


class EdgeClient:
    def __init__(self, opts: EdgeOptions):
        self.opts = opts
        self.topics = Topics(opts.job)
        self.state = DeviceState(opts.state_dir)
        self.link = MqttLink(opts.broker, opts.client_id, clean_session=False, username=opts.username,
                             password=opts.password, tls_ca=opts.tls_ca,
                             will=(self.topics.presence(opts.client_id), Presence("offline").to_json()))
        self.deferred: deque[Message] = deque()
        self.manifest: Manifest | None = None
        self.round: RoundAnnouncement | None = None
        self.data: LocalData | None = None
        self.model: SplitClassifier | None = None
        self.cfg: AlgorithmConfig | None = None
        self.generator: tuple[str, OnnxGenerator] | None = None
        self.partition_index = self.state.meta.get("partition_index")
        self.finished = False

    # ------------------------------------------------------------------------------------------ main loop
    def run(self, max_seconds: float | None = None) -> int:
        topics = [self.topics.manifest, self.topics.round, self.topics.ack(self.opts.client_id),
                  self.topics.assignment(self.opts.client_id)]
        for topic in topics:
            self.link.subscribe(topic)
        self.link.on_connect(self._announce)
        self.link.start(wait=None)
        started, last_retry = time.monotonic(), 0.0
        try:
            while not (self.finished and self.opts.exit_when_finished and not self.state.meta["pending"]):
                if max_seconds is not None and time.monotonic() - started > max_seconds:
                    return 1
                msg = self._next_message(timeout=0.5)
                if msg is not None:
                    self._handle(msg)
                self._maybe_train()
                if self.state.meta["pending"] and time.monotonic() - last_retry > self.opts.retry_s:
                    self._send_pending()
                    last_retry = time.monotonic()
            return 0
        finally:
            self.link.stop()

    def _next_message(self, timeout: float) -> Message | None:
        if self.deferred:
            return self.deferred.popleft()
        try:
            return self.link.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _announce(self) -> None:
        """Presence (retained; the will replaces it with 'offline' if we vanish). Called on every connect."""
        device = {"platform": platform.platform(terse=True), "machine": platform.machine(),
                  "python": platform.python_version(), "torch": torch.__version__}
        if self.opts.partition is not None and self.opts.partition.index is None:
            device["partition_request"] = self.opts.partition.without_index()
        n = len(self.data.train_y) if self.data is not None else None
        self.link.publish(self.topics.presence(self.opts.client_id),
                          Presence("online", n, self.state.meta.get("version"), device).to_json(), retain=True)

    def _handle(self, msg: Message) -> None:
        try:
            if msg.topic == self.topics.manifest and msg.payload:
                self.manifest = decode_manifest(msg.payload)
            elif msg.topic == self.topics.round and msg.payload:
                self.round = decode_round(msg.payload)
                self.finished = self.round.status == "finished"
                if self.finished and self.state.meta["pending"]:
                    # the server closed every round: an unacknowledged update can no longer count anywhere
                    log.warning("%s: job finished; dropping %d unacknowledged update(s)", self.opts.client_id,
                                len(self.state.meta["pending"]))
                    for key in list(self.state.meta["pending"]):
                        self.state.acknowledged(key)
            elif msg.topic == self.topics.ack(self.opts.client_id):
                ack = decode_ack(msg.payload)
                if ack.idempotency_key in self.state.meta["pending"]:
                    level = logging.INFO if ack.status != "rejected" else logging.WARNING
                    log.log(level, "%s: update %s %s%s", self.opts.client_id, ack.idempotency_key[:8], ack.status,
                            f" ({ack.reason}: {ack.message})" if ack.reason else "")
                    self.state.acknowledged(ack.idempotency_key)
            elif msg.topic == self.topics.assignment(self.opts.client_id) and msg.payload:
                assignment = decode_assignment(msg.payload)
                if self.opts.partition and assignment.spec == self.opts.partition.without_index():
                    self.partition_index = assignment.index
                    self.state.meta["partition_index"] = assignment.index
                    self.state.save_meta()
        except ValidationError as exc:
            log.warning("%s: refused a message on %s: %s", self.opts.client_id, msg.topic, exc)

    # ------------------------------------------------------------------------------------------ a round
    def _maybe_train(self) -> None:
        ann, manifest = self.round, self.manifest
        if ann is None or manifest is None or ann.status != "open" or self.opts.client_id not in ann.selected:
            return
        round_key = f"{ann.round}.{ann.attempt}"
        if round_key in self.state.meta["done"] or round_key in self.state.meta["pending"].values():
            return
        if time.time() > ann.deadline or manifest.version != ann.version:
            return  # too late, or the manifest of this round's version has not arrived yet
        if not self._prepare(manifest):
            return
        try:
            global_state = self._ensure_version(manifest)
        except ArtifactError as exc:
            log.warning("%s: cannot get version %d: %s", self.opts.client_id, manifest.version, exc)
            return
        self._train_and_upload(ann, manifest, global_state, round_key)

    def _prepare(self, manifest: Manifest) -> bool:
        """Load the data and build the model once the job's settings are known."""
        if self.model is None:
            try:
                self.cfg = AlgorithmConfig.from_dict(manifest.algorithm)
                self.model = build_model(self.cfg.model, tuple(manifest.image_shape), manifest.num_classes)
            except (TypeError, ValueError) as exc:
                log.warning("%s: manifest of version %d has unusable settings (%s); waiting for another",
                            self.opts.client_id, manifest.version, exc)
                self.manifest, self.cfg = None, None
                return False
        if self.data is None:
            if self.opts.partition is not None:
                index = self.opts.partition.index if self.opts.partition.index is not None else self.partition_index
                if index is None:
                    return False  # waiting for the server's assignment
                self.data = self.opts.partition.load(index, manifest.seed, self.opts.data_dir)
            else:
                self.data = self.opts.data_loader(tuple(manifest.image_shape), manifest.num_classes)
            self._announce()
        return True

    def _train_and_upload(self, ann: RoundAnnouncement, manifest: Manifest, global_state: dict,
                          round_key: str) -> None:
        cfg, data = self.cfg, self.data
        own = self.state.load_tensors("own") if cfg.partial else None
        start = client_start_state(global_state, own, cfg.partial)
        check = evaluate(self.model, start, data.test_x, data.test_y) if len(data.test_y) else None
        sampler = self._generator(manifest) if cfg.uses_generator and manifest.generator else None
        began = time.perf_counter()
        result = local_update(self.model, start, data.train_x, data.train_y, cfg, ann.round,
                              round_seed(manifest.seed, ann.round, data.seed_key), sampler,
                              np.asarray(manifest.label_prior) if manifest.label_prior else None)
        metrics = {"train_loss": result.train_loss, "train_seconds": time.perf_counter() - began}
        if check is not None:
            metrics.update(test_correct=check.correct, test_count=check.count,
                           test_loss=check.loss_sum / max(1, check.count))
        if cfg.partial:
            self.state.save_tensors("own", result.state)
        if not all(torch.isfinite(t).all() for t in result.upload.values()):
            # e.g. a global model wrecked by poisoned updates: the server would refuse it (non_finite)
            log.warning("%s: training in round %d gave non-finite weights; not uploading", self.opts.client_id,
                        ann.round)
            self.state.meta["done"] = (self.state.meta["done"] + [round_key])[-1000:]
            self.state.save_meta()
            return
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        blob = encode_tensors(result.upload)
        header = UpdateHeader(job=self.opts.job, round=ann.round, attempt=ann.attempt, client=self.opts.client_id,
                              base_version=manifest.version, num_samples=result.num_samples,
                              label_counts=[int(c) for c in result.label_counts],
                              idempotency_key=uuid.uuid4().hex, tensors_sha256=sha256_hex(blob), metrics=metrics)
        self.state.save_pending(header.idempotency_key, round_key, encode_update(header, blob))
        log.info("%s: trained round %d (%d samples, loss %.3f); uploading", self.opts.client_id, ann.round,
                 result.num_samples, result.train_loss)
        self._send_pending()

    def _send_pending(self) -> None:
        chunk_size = self.manifest.chunk_size if self.manifest else 256 * 1024
        for key, envelope in self.state.pending().items():
            for chunk in split_chunks(envelope, stream=key, chunk_size=chunk_size):
                self.link.publish(self.topics.update(self.opts.client_id), chunk)

    # ------------------------------------------------------------------------------------------ the model
    def _ensure_version(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        """The shared state of `manifest.version`: kept, or old + delta, or read from the full ONNX; the result
        must hash to manifest.state_sha256 in every case."""
        template = self.model.state_dict()
        full_spec = tensor_spec({k: template[k] for k in shared_keys(template, partial=False)})
        shared = shared_keys(template, self.cfg.partial)
        held = self.state.load_tensors("global")
        if held is not None and self.state.meta.get("version") == manifest.version \
                and state_sha256(held) == manifest.state_sha256:
            return self._complete(held)
        if held is not None and manifest.delta and manifest.delta_base_version == self.state.meta.get("version"):
            try:
                delta = decode_tensors(self._fetch(manifest.delta.sha256, manifest.delta.size),
                                       tensor_spec(held), max_bytes=MAX_ARTIFACT_BYTES)
                new = apply_delta(held, delta)
                if state_sha256(new) != manifest.state_sha256:
                    raise ValidationError("state_hash", "delta applied to version "
                                          f"{manifest.delta_base_version} does not give the published state")
                return self._adopt(manifest, new)
            except (ValidationError, ArtifactError) as exc:
                log.warning("%s: refused the delta (%s); taking the full model", self.opts.client_id, exc)
        own = self.state.load_tensors("own") if self.cfg.partial else None
        ref = manifest.predictor if (self.cfg.partial and own is not None) else manifest.model
        blob = self._fetch(ref.sha256, ref.size)
        spec = {k: v for k, v in full_spec.items() if k in shared} if ref is manifest.predictor else full_spec
        try:
            state = state_from_onnx(blob, spec, max_bytes=MAX_ARTIFACT_BYTES)
        except ValidationError as exc:
            raise ArtifactError(f"model ONNX refused: {exc}") from exc
        if self.cfg.partial and own is None:  # a new device: its theta^f starts as the published initial one
            template = self.model.state_dict()
            self.state.save_tensors("own", {k: state.get(k, v) for k, v in template.items()})
        new = {k: state[k] for k in shared}
        if state_sha256(new) != manifest.state_sha256:
            raise ArtifactError("the full model does not hash to the manifest's state_sha256")
        return self._adopt(manifest, new)

    def _adopt(self, manifest: Manifest, shared_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.state.save_tensors("global", shared_state)
        self.state.meta["version"] = manifest.version
        self.state.save_meta()
        self._announce()
        return self._complete(shared_state)

    def _complete(self, shared_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full state dict for the model: shared entries plus (integer buffers, or theta^f in partial mode)
        the model's template values; client_start_state then substitutes the device's own theta^f."""
        template = {k: v.clone() for k, v in self.model.state_dict().items()}
        template.update(shared_state)
        return template

    def _generator(self, manifest: Manifest) -> OnnxGenerator | None:
        ref = manifest.generator
        if self.generator is not None and self.generator[0] == ref.sha256:
            return self.generator[1]
        try:
            sampler = OnnxGenerator(self._fetch(ref.sha256, ref.size), noise_dim=self.cfg.noise_dim,
                                    latent_dim=self.model.latent_dim, num_classes=self.model.num_classes)
        except (ValidationError, ArtifactError) as exc:
            log.warning("%s: refused the generator (%s); training without it this round", self.opts.client_id, exc)
            return None
        self.generator = (ref.sha256, sampler)
        return sampler

    def _fetch(self, sha: str, size: int) -> bytes:
        """Collect an artifact's retained chunks, reassemble it and check its sha256."""
        if size > MAX_ARTIFACT_BYTES:
            raise ArtifactError(f"artifact {sha[:12]} of {size} bytes exceeds {MAX_ARTIFACT_BYTES}")
        topic_filter = self.topics.artifact_chunks(sha)
        prefix = topic_filter[:-1]
        reassembler = Reassembler(max_payload=MAX_ARTIFACT_BYTES)
        self.link.subscribe(topic_filter)
        deadline = time.monotonic() + self.opts.fetch_timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    msg = self.link.inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                if not msg.topic.startswith(prefix):
                    self.deferred.append(msg)
                    continue
                if not msg.payload:
                    continue
                try:
                    payload = reassembler.add("server", decode_chunk(msg.payload, MAX_ARTIFACT_BYTES))
                except ValidationError as exc:
                    raise ArtifactError(f"artifact {sha[:12]}: {exc}") from exc
                if payload is not None:
                    if sha256_hex(payload) != sha or len(payload) != size:
                        raise ArtifactError(f"artifact {sha[:12]} does not match its sha256 or size")
                    return payload
            raise ArtifactError(f"artifact {sha[:12]} not complete within {self.opts.fetch_timeout_s} s")
        finally:
            self.link.unsubscribe(topic_filter)
