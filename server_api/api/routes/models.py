"""``/jobs/{job_id}/model.onnx`` and ``/jobs/{job_id}/generator.onnx``: the latest version's ONNX files."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response

from server_api.api.deps import JobIdPath, ServicesDep, SessionDep, require_job
from server_api.api.errors import ApiError
from server_api.api.schemas import ErrorResponse
from server_api.db import queries
from server_api.db.store import ArtifactCorruptError, ArtifactNotFoundError, ArtifactStore

log = logging.getLogger("server_api.api")
router = APIRouter(tags=["models"])
ONNX_MEDIA_TYPE = "application/octet-stream"
ONNX_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {ONNX_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}, "description": "ONNX"},
    304: {"description": "not modified (If-None-Match matched the ETag)"},
    **{code: {"model": ErrorResponse} for code in (404, 422, 503)},
}


@router.get("/jobs/{job_id}/model.onnx", response_class=Response, responses=ONNX_RESPONSES,
            name="download_model")
def download_model(job_id: JobIdPath, request: Request, s: SessionDep, svc: ServicesDep) -> Response:
    """The model ONNX file of the job's latest model version; ETag = its sha256."""
    return _download(job_id, "model", request, s, svc.store)


@router.get("/jobs/{job_id}/generator.onnx", response_class=Response, responses=ONNX_RESPONSES,
            name="download_generator")
def download_generator(job_id: JobIdPath, request: Request, s: SessionDep, svc: ServicesDep) -> Response:
    """The generator ONNX file of the job's latest model version; ETag = its sha256."""
    return _download(job_id, "generator", request, s, svc.store)


def _download(job_id: str, kind: str, request: Request, s: SessionDep, store: ArtifactStore) -> Response:
    require_job(s, job_id)
    latest = queries.latest_version(s, job_id)
    if latest is None:
        raise ApiError(404, "no_model", f"job {job_id!r} has no model version yet")
    sha = latest.model_onnx_sha256 if kind == "model" else latest.generator_onnx_sha256
    if sha is None:
        raise ApiError(404, "no_generator", f"model version {latest.version} of job {job_id!r} has no generator")
    etag = f'"{sha}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Model-Version": str(latest.version)}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    try:
        data = store.get(sha)
    except ArtifactNotFoundError:
        log.error("job %s version %d: %s artifact %s missing from the store", job_id, latest.version, kind, sha)
        raise ApiError(404, "artifact_missing", f"the {kind} file of version {latest.version} is missing") from None
    except ArtifactCorruptError:
        log.error("job %s version %d: %s artifact %s is corrupt", job_id, latest.version, kind, sha)
        raise ApiError(500, "artifact_corrupt", f"the {kind} file of version {latest.version} is corrupt") from None
    headers["Content-Disposition"] = f'attachment; filename="{job_id}-v{latest.version}-{kind}.onnx"'
    return Response(content=data, media_type=ONNX_MEDIA_TYPE, headers=headers)
