# FedGen round server: REST API (FastAPI/uvicorn) + MQTT round orchestration + SQL database client.
#
# Build from the repository root (the build context must be the root; see .dockerignore):
#   docker build -f docker/server.Dockerfile -t fedgen-server .
# Run (normally through compose.yaml):
#   docker run --rm -p 8000:8000 \
#     -e FEDGEN_BROKER_URL=mqtt://broker:1883 \
#     -e FEDGEN_DATABASE_URL=postgresql+psycopg://fedgen:PASSWORD@db:5432/fedgen \
#     -e FEDGEN_ADMIN_TOKEN=... fedgen-server
#
# linux/amd64 is the intended platform (the CPU wheel index below also serves linux/arm64).
# BASE_IMAGE: any Debian-like image with Python 3.11 and its venv module. The default is the official image a
# user pulls; `make compose-test` passes a local one built with mmdebstrap (docker/local/compose_test.py).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Everything is installed into a virtual environment, which works the same on the official image and on a
# Debian root file system (whose system Python refuses pip installs, PEP 668); its bin/ comes first on PATH.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/fedgen/bin:$PATH

# Wheels built on the host (`make compose-test` puts them in docker/wheels/): when there are any, the venv's
# pip.conf makes every install below take them alone, with no network; otherwise pip downloads as usual.
COPY docker/wheels/ /wheels/
RUN python3 -m venv /opt/fedgen \
 && if ls /wheels/*.whl >/dev/null 2>&1; then printf '[global]\nno-index = true\nfind-links = /wheels\n' \
        > /opt/fedgen/pip.conf; fi

# --- 1. PyTorch, CPU-only -------------------------------------------------------------------------------
# pyproject.toml pins torch==2.13.0; keep TORCH_VERSION equal to that pin (tests/test_compose.py checks).
# The x86_64 wheel on PyPI bundles CUDA (several GB the server never uses), so torch alone comes from
# PyTorch's CPU index (--index-url, not --extra-index-url: with both indexes pip could pick either build).
# Its `2.13.0+cpu` satisfies the `==2.13.0` pin, so step 2 keeps it instead of fetching PyPI's build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (With the offline pip.conf, no-index wins over --index-url: torch comes from /wheels.)
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app

# --- 2. the other dependencies of `.[server]`, read from pyproject.toml ---------------------------------
# A separate layer, so that editing the source does not re-download FastAPI, SQLAlchemy, ONNX, ...
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# --- 3. the project itself ------------------------------------------------------------------------------
# A regular (non-editable) install: the wheel carries the Alembic migrations and the broker configs inside
# server_api/ (setup.py), so nothing is read from /app at run time and the source is removed.
COPY setup.py ./
COPY migrations ./migrations
COPY broker ./broker
COPY shared ./shared
COPY server_api ./server_api
COPY edge_client ./edge_client
RUN pip install ".[server]" && pip check && rm -rf /app/* /opt/fedgen/pip.conf

# --- 4. runtime: unprivileged user, writable state only under /var/lib/fedgen ---------------------------
RUN groupadd --system --gid 10001 fedgen \
 && useradd --system --uid 10001 --gid fedgen --create-home --home-dir /home/fedgen --shell /usr/sbin/nologin fedgen \
 && mkdir -p /var/lib/fedgen/artifacts /etc/fedgen \
 && chown -R fedgen:fedgen /var/lib/fedgen

# Defaults of the env equivalents of `fedgen server` options (server_api/settings.py). The broker and
# database URLs and the admin token have no useful default inside a container: compose.yaml sets them.
ENV FEDGEN_HOST=0.0.0.0 \
    FEDGEN_PORT=8000 \
    FEDGEN_ARTIFACT_DIR=/var/lib/fedgen/artifacts \
    MPLCONFIGDIR=/tmp/matplotlib

USER fedgen
# Relative paths (e.g. the SQLite default, if no database URL is given) land in a writable directory.
WORKDIR /var/lib/fedgen
# Content-addressed artifact store (model states, ONNX files, uploads): keep it on a volume.
VOLUME ["/var/lib/fedgen/artifacts"]
EXPOSE 8000

# slim has no curl: probe /health with the interpreter that is there anyway. Any non-2xx answer or a
# connection error makes urlopen raise, i.e. exit status 1. start-period covers migrations + torch import.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["fedgen", "server"]
# Overridden by compose.yaml's `command:`; add e.g. `--job-file /etc/fedgen/job.json` when running by hand.
CMD ["--host", "0.0.0.0", "--port", "8000", "--artifacts", "/var/lib/fedgen/artifacts"]
