"""The edge client: announce, wait for selection, fetch the model (delta or full), train, upload until acked.

Everything it receives is untrusted: a message that does not decode, a manifest this device cannot train, an
artifact that fails its checks are refused with a logged reason, and the device waits for the next good one;
nothing received can end the process.
"""

from __future__ import annotations

import logging
import math
import platform
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from edge_client.data import load_partition
from edge_client.model_cache import MAX_ARTIFACT_BYTES, ArtifactError, ModelCache
from edge_client.runtime import Runtime, make_runtime
from edge_client.state import DeviceState, job_state_dir
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.schedule import round_seed
from shared.data.partition import PartitionSpec, UserData
from shared.fsutil import sha256_hex
from shared.mqtt import Message, MqttLink
from shared.protocol.errors import ValidationError
from shared.protocol.frames import Reassembler, decode_chunk, split_chunks
from shared.protocol.messages import (
    Manifest,
    Presence,
    RoundAnnouncement,
    UpdateHeader,
    decode_ack,
    decode_assignment,
    decode_manifest,
    decode_round,
    encode_update,
)
from shared.protocol.tensors import encode_tensors
from shared.protocol.topics import Topics

log = logging.getLogger("fedgen.edge")

DataLoader = Callable[[tuple[int, int, int], int], UserData]  # (image_shape, num_classes) -> the device's data


@dataclass
class EdgeOptions:
    broker: str
    job: str
    client_id: str
    state_dir: str
    partition: PartitionSpec | None = None
    partition_index: int | None = None  # None with a partition: ask the server (index=auto)
    data_loader: DataLoader | None = None  # for --data
    data_dir: str | None = None
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: tuple[str, str] | None = None  # (certificate, key) for the broker's certificate listener
    retry_s: float = 10.0
    fetch_timeout_s: float = 60.0
    exit_when_finished: bool = True
    runtime: str = "auto"
    threads: int = 1
    device: str = "auto"  # the torch runtime's: auto (cuda when available), cpu, cuda
    model: str | None = None  # the model this device runs, one of the job's (None: the job's default)
    # give up (exit 3) when nothing of the job arrives within this many seconds of connecting; None: wait forever
    job_wait_s: float | None = None


def device_config(job: AlgorithmConfig, model: str | None) -> AlgorithmConfig:
    """The job's settings as this device trains them: with the one model it runs (`model`, or the job's
    default). ValueError when the job does not allow `model`."""
    if model is None or model == job.model:
        return job
    if model not in job.allowed_models:
        raise ValueError(f"this device runs model {model!r}; the job allows {', '.join(job.allowed_models)}")
    return msgspec.structs.replace(job, model=model, models=msgspec.UNSET)


class EdgeClient:
    def __init__(self, opts: EdgeOptions, runtime: Runtime | None = None):
        self.opts = opts
        self.topics = Topics(opts.job)
        self.state = DeviceState(job_state_dir(opts.state_dir, opts.job))
        self.runtime = runtime or make_runtime(opts.runtime, opts.threads, opts.device)
        self.link = MqttLink(opts.broker, opts.client_id, clean_session=False, username=opts.username,
                             password=opts.password, tls_ca=opts.tls_ca, tls_cert=opts.tls_cert,
                             will=(self.topics.presence(opts.client_id), Presence("offline").to_json()))
        self.cache = ModelCache(self.state, self._fetch, opts.client_id)
        self.deferred: deque[Message] = deque()
        self.manifest: Manifest | None = None
        self.round: RoundAnnouncement | None = None
        self.data: UserData | None = None
        self.cfg: AlgorithmConfig | None = None
        self.partition_index = opts.partition_index if opts.partition_index is not None \
            else self.state.meta.get("partition_index")
        self.finished = False
        self.refused: dict[str, int] = {}  # refusals by reason
        self.last_refusal: str | None = None  # told to the server in the presence
        self._unusable: set[str] = set()  # (manifest, round) keys this device found it cannot train
        self.job_seen = False  # a manifest or round announcement of the job arrived
        self.end_reason: str | None = None  # why run() returned other than 0, for the operator

    # ------------------------------------------------------------------------------------------ main loop
    def run(self, max_seconds: float | None = None) -> int:
        topics = [self.topics.manifest, self.topics.round, self.topics.ack(self.opts.client_id),
                  self.topics.assignment(self.opts.client_id)]
        for topic in topics:
            self.link.subscribe(topic)
        self.link.on_connect(self._announce)
        self.link.start(wait=None)
        started, last_retry = time.monotonic(), 0.0
        self._connected_since: float | None = None
        try:
            while not (self.finished and self.opts.exit_when_finished and not self.state.meta["pending"]):
                if max_seconds is not None and time.monotonic() - started > max_seconds:
                    return 1
                if self._job_missing():
                    return 3
                msg = self._next_message(timeout=0.5)
                if msg is not None:
                    self._handle(msg)
                self._train_if_selected()
                if self.state.meta["pending"] and time.monotonic() - last_retry > self.opts.retry_s:
                    self._send_pending()
                    last_retry = time.monotonic()
            if self.round is not None and self.round.status != "finished":
                why = f" ({self.round.reason})" if self.round.reason else ""
                self.end_reason = f"job {self.opts.job} {self.round.status}{why}: this device stops"
                return 3
            return 0
        finally:
            self.link.stop()

    def _job_missing(self) -> bool:
        """True once the device has been connected for `job_wait_s` without a word of its job."""
        if self.job_seen or not self.opts.job_wait_s:
            return False
        if not self.link.connected.is_set():
            return False
        now = time.monotonic()
        if self._connected_since is None:
            self._connected_since = now
        if now - self._connected_since < self.opts.job_wait_s:
            return False
        self.end_reason = (f"job {self.opts.job} not found: nothing of it on the broker within "
                           f"{self.opts.job_wait_s:g} s of connecting (is the job created and the server "
                           "running? --job-wait 0 waits forever)")
        return True

    def _next_message(self, timeout: float) -> Message | None:
        if self.deferred:
            return self.deferred.popleft()
        try:
            return self.link.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _announce(self) -> None:
        """Presence (retained; the will replaces it with 'offline' if we vanish). Called on every connect."""
        device = {"platform": platform.platform(terse=True)[:256], "machine": platform.machine()[:256],
                  "python": platform.python_version(), "runtime": self.runtime.name,
                  self.runtime.name: self.runtime.version[:256]}
        if self.last_refusal:
            device["refused"] = self.last_refusal[:256]
        request = self.opts.partition if self.opts.partition is not None and self.opts.partition_index is None \
            else None
        n = len(self.data.train_y) if self.data is not None else None
        model = self.cfg.model if self.cfg is not None else msgspec.UNSET
        self.link.publish(self.topics.presence(self.opts.client_id),
                          Presence("online", n, self.state.meta.get("version"), device, request, model).to_json(),
                          retain=True)

    # ------------------------------------------------------------------------------------------ messages
    def _refuse(self, what: str, reason: str, message: str) -> None:
        """Log a refusal, count it, and tell the server (presence) when the reason is new."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.warning("%s: refused %s (%s): %s", self.opts.client_id, what, reason, message)
        summary = f"{what}: {reason}"
        if summary != self.last_refusal:
            self.last_refusal = summary
            self._announce()

    def _handle(self, msg: Message) -> None:
        """One received message; a bad one is refused and logged, never raised."""
        try:
            if msg.topic == self.topics.manifest and msg.payload:
                self.manifest = decode_manifest(msg.payload)
                self.job_seen = True
            elif msg.topic == self.topics.round and msg.payload:
                self._on_round(decode_round(msg.payload))
            elif msg.topic == self.topics.ack(self.opts.client_id) and msg.payload:
                self._on_ack(msg.payload)
            elif msg.topic == self.topics.assignment(self.opts.client_id) and msg.payload:
                self._on_assignment(msg.payload)
        except ValidationError as exc:
            self._refuse(f"a message on {msg.topic.rsplit('/', 1)[-1]}", exc.reason, f"{msg.topic}: {exc}")
        except Exception:  # a bug of this client: logged with its traceback, never the end of the device
            log.exception("%s: could not handle a message on %s", self.opts.client_id, msg.topic)

    def _on_round(self, announcement: RoundAnnouncement) -> None:
        if announcement.job != self.opts.job:
            raise ValidationError("unknown_job", f"round announcement of job {announcement.job}")
        self.round = announcement
        self.job_seen = True
        if announcement.job_ended and not self.finished:  # the CLI says it once more on exit, without -v
            log.info("%s: job %s %s", self.opts.client_id, announcement.job, announcement.status)
        self.finished = announcement.job_ended
        if self.finished and self.state.meta["pending"]:
            # the server closed every round: an unacknowledged update can no longer count anywhere
            log.warning("%s: job %s; dropping %d unacknowledged update(s)", self.opts.client_id,
                        announcement.status, len(self.state.meta["pending"]))
            for key in list(self.state.meta["pending"]):
                self.state.acknowledged(key)

    def _on_ack(self, payload: bytes) -> None:
        ack = decode_ack(payload)
        if ack.idempotency_key in self.state.meta["pending"]:
            level = logging.INFO if ack.status != "rejected" else logging.WARNING
            log.log(level, "%s: update %s %s%s", self.opts.client_id, ack.idempotency_key[:8], ack.status,
                    f" ({ack.reason}: {ack.message})" if ack.reason else "")
            self.state.acknowledged(ack.idempotency_key)

    def _on_assignment(self, payload: bytes) -> None:
        assignment = decode_assignment(payload)
        if self.opts.partition is None or self.opts.partition_index is not None \
                or assignment.spec != self.opts.partition:
            return
        if assignment.index is None:
            log.warning("%s: the server has no free partition for this device: %s", self.opts.client_id,
                        assignment.reason or "no reason given")
            return
        if not 0 <= assignment.index < self.opts.partition.users:
            raise ValidationError("bad_field", f"assigned partition index {assignment.index} outside "
                                               f"0..{self.opts.partition.users - 1}")
        self.partition_index = assignment.index
        self.state.meta["partition_index"] = assignment.index
        self.state.save_meta()

    # ------------------------------------------------------------------------------------------ a round
    def _train_if_selected(self) -> None:
        """`_maybe_train`, but whatever goes wrong in it is logged and that round skipped, never raised."""
        try:
            self._maybe_train()
        except Exception as exc:
            key = self._round_key()
            log.exception("%s: training failed%s", self.opts.client_id, f" in round {key}" if key else "")
            if key:
                self._unusable.add(key)
            self._refuse("training", type(exc).__name__.lower()[:64], str(exc))

    def _round_key(self) -> str | None:
        ann = self.round
        return f"{ann.round}.{ann.attempt}.v{self.manifest.version}" if ann and self.manifest else None

    def _maybe_train(self) -> None:
        ann, manifest = self.round, self.manifest
        if ann is None or manifest is None or ann.status != "open" or not ann.selects(self.opts.client_id):
            return
        round_key = f"{ann.round}.{ann.attempt}"
        if round_key in self.state.meta["done"] or round_key in self.state.meta["pending"].values() \
                or self._round_key() in self._unusable:
            return
        if time.time() > ann.deadline or manifest.version != ann.version:
            return  # too late, or the manifest of this round's version has not arrived yet
        if not self._prepare(manifest):
            return
        try:
            start = self.cache.ensure_version(manifest, self.runtime, self.cfg)
        except ArtifactError as exc:
            log.warning("%s: cannot get version %d: %s", self.opts.client_id, manifest.version, exc)
            return
        self._train_and_upload(ann, manifest, start, round_key)

    def _prepare(self, manifest: Manifest) -> bool:
        """Build the model and load the data once the job's settings are known; False to wait (for the
        partition assignment, or for a manifest this device can use)."""
        if self.cfg is None:
            try:
                cfg = device_config(manifest.config.algorithm, self.opts.model)
                self.runtime.prepare(cfg, manifest.image_shape, manifest.num_classes)
            except ValueError as exc:
                self._refuse("the manifest", "cannot_run", f"manifest of version {manifest.version} has settings "
                             f"this device cannot run ({exc}); waiting for another")
                self.manifest = None
                return False
            self.cfg = cfg
        if self.data is None:
            if self.opts.partition is not None and self.partition_index is None:
                return False  # waiting for the server's assignment
            try:
                self.data = self._load_data(manifest)
            except (ValueError, OSError) as exc:  # DataError and PartitionError are ValueErrors
                self._unusable.add(self._round_key())
                self._refuse("the job", "data_does_not_fit", f"this device's data does not fit job "
                             f"{manifest.job} ({exc}); waiting for another manifest")
                return False
            self._announce()
        return True

    def _load_data(self, manifest: Manifest) -> UserData:
        if self.opts.partition is not None:
            return load_partition(self.opts.partition, self.partition_index, manifest.config.seed,
                                  self.opts.data_dir)
        data = self.opts.data_loader(manifest.image_shape, manifest.num_classes)
        if tuple(data.train_x.shape[1:]) != tuple(manifest.image_shape) or data.num_classes != manifest.num_classes:
            raise ValueError(f"{data.train_x.shape[1:]} images of {data.num_classes} classes, the job has "
                             f"{manifest.image_shape} of {manifest.num_classes}")
        return data

    def _train_and_upload(self, ann: RoundAnnouncement, manifest: Manifest, global_state: dict[str, np.ndarray],
                          round_key: str) -> None:
        cfg, data = self.cfg, self.data
        start = dict(global_state)
        if cfg.partial:  # the device's own theta^f with the global theta^p
            own = self.state.load_tensors("own") or {}
            shared = set(self.runtime.shared_keys(partial=True))
            start.update({k: v for k, v in own.items() if k in start and k not in shared})
        check = self.runtime.evaluate(start, data.test_x, data.test_y) if len(data.test_y) else None
        sampler = None
        if cfg.uses_generator and manifest.generator is not None:
            template = self.runtime.template()
            latent = template["predictor.weight"].shape[1]
            sampler = self.cache.generator(manifest, self.runtime, cfg, latent, manifest.num_classes)
        began = time.perf_counter()
        result = self.runtime.train(start, data, ann.round, round_seed(manifest.config.seed, ann.round,
                                                                       data.seed_key),
                                    sampler, np.asarray(manifest.label_prior) if manifest.label_prior else None)
        metrics = {"train_loss": result.train_loss, "train_seconds": time.perf_counter() - began}
        if check is not None:
            metrics.update(test_correct=check.correct, test_count=check.count,
                           test_loss=check.loss_sum / max(1, check.count))
        if cfg.partial:
            self.state.save_tensors("own", result.state)
        if not all(np.isfinite(t).all() for t in result.upload.values()):
            # e.g. a global model wrecked by poisoned updates: the server would refuse it (non_finite)
            log.warning("%s: training in round %d gave non-finite weights; not uploading", self.opts.client_id,
                        ann.round)
            self.state.mark_done(round_key)
            return
        metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        blob = encode_tensors(result.upload)
        header = UpdateHeader(job=self.opts.job, round=ann.round, attempt=ann.attempt, client=self.opts.client_id,
                              base_version=manifest.version, num_samples=result.num_samples,
                              label_counts=result.label_counts, idempotency_key=uuid.uuid4().hex,
                              tensors_sha256=sha256_hex(blob), metrics=metrics,
                              model=cfg.model if manifest.config.algorithm.models is not msgspec.UNSET
                              else msgspec.UNSET)
        self.state.save_pending(header.idempotency_key, round_key, encode_update(header, blob))
        log.info("%s: trained round %d (%d samples, loss %.3f); uploading", self.opts.client_id, ann.round,
                 result.num_samples, result.train_loss)
        self._announce()
        self._send_pending()

    def _send_pending(self) -> None:
        chunk_size = self.manifest.config.chunk_size if self.manifest else 256 * 1024
        for key, envelope in self.state.pending().items():
            for chunk in split_chunks(envelope, stream=key, chunk_size=chunk_size):
                self.link.publish(self.topics.update(self.opts.client_id), chunk)

    # ------------------------------------------------------------------------------------------ artifacts
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
