# FedGen edge client: one device of the fleet (trains locally, talks to the server over MQTT only).
#
# Build from the repository root (the build context must be the root; see .dockerignore):
#   docker build -f docker/edge.Dockerfile -t fedgen-edge .
# For 64-bit ARM devices (Raspberry Pi 4/5 with a 64-bit OS, Jetson with an aarch64 userland), build
# natively on the device or cross-build with buildx (QEMU emulation is slow but works):
#   docker buildx build --platform linux/arm64 -f docker/edge.Dockerfile -t fedgen-edge:arm64 .
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/edge.Dockerfile -t REGISTRY/fedgen-edge --push .
# 32-bit ARM (armv7, Raspberry Pi OS 32-bit) is NOT supported: there are no torch wheels for it.
# On Jetson this image trains on the CPU; using its GPU needs NVIDIA's L4T PyTorch base instead.
#
# Installs `.[edge]` only: torch, onnxruntime, paho-mqtt (no FastAPI, SQLAlchemy, PostgreSQL driver).
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
# linux/arm64: PyPI's aarch64 wheel of torch is already CPU-only, so it comes from PyPI.
# linux/amd64: PyPI's x86_64 wheel bundles several GB of CUDA libraries, so torch alone comes from PyTorch's
#   CPU index (--index-url, so pip cannot pick the CUDA build from PyPI instead). Its `2.13.0+cpu`
#   satisfies the `==2.13.0` pin, so step 3 keeps it.
# TARGETARCH is set by BuildKit (default builder since Docker 23); empty under the legacy builder,
# which then takes the CPU index (that index also serves aarch64 wheels).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TARGETARCH
# (With the offline pip.conf, no-index wins over --index-url: torch comes from /wheels.)
RUN if [ "${TARGETARCH}" = "arm64" ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    else \
        pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /src

# --- 2. the other dependencies of `.[edge]`, read from pyproject.toml -----------------------------------
# A separate layer, so that editing the source does not re-download onnxruntime and paho-mqtt.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['edge']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# --- 3. the project itself ------------------------------------------------------------------------------
# Only the device-side packages: shared/ (algorithms, wire protocol, and the shipped mnist-subset dataset
# as package data, so no dataset volume is needed) and edge_client/. server_api/ is left out on purpose
# (tests/test_compose.py checks that edge_client does not import it). A regular (non-editable) install:
# nothing is read from /src at run time.
COPY setup.py ./
COPY shared ./shared
COPY edge_client ./edge_client
RUN pip install ".[edge]" && pip check && rm -f /opt/fedgen/pip.conf

# --- 4. runtime: unprivileged user, state on a volume ---------------------------------------------------
RUN groupadd --system --gid 10001 fedgen \
 && useradd --system --uid 10001 --gid fedgen --create-home --home-dir /home/fedgen --shell /usr/sbin/nologin fedgen \
 && mkdir -p /var/lib/fedgen-edge \
 && chown fedgen:fedgen /var/lib/fedgen-edge

# One CPU thread per device process by default: many replicas on one host would otherwise each start one
# thread per core and slow each other down. Raise it on a real device (e.g. 4 on a Raspberry Pi 4).
ENV OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1

USER fedgen
WORKDIR /var/lib/fedgen-edge
# edge-client's --state-dir (what the device must remember across restarts).
# Created owned by `fedgen`, so a fresh (anonymous or named) volume mounted here is writable.
VOLUME ["/var/lib/fedgen-edge"]

# The device needs no listening port and has no HTTP endpoint, hence no EXPOSE and no HEALTHCHECK.
ENTRYPOINT ["edge-client"]
# compose.yaml passes the real arguments; this default joins the demo job on a broker named `broker`.
CMD ["--broker", "mqtt://broker:1883", "--job", "demo", "--client-id", "auto", \
     "--partition", "mnist-subset:alpha=0.1:users=20:index=auto", "--state-dir", "/var/lib/fedgen-edge"]
