# bnserve: the serving API and the training CLI in one image, with CPU-only torch.
#
#   docker build -t bnserve:latest .                 # torch from the PyTorch CPU index, the rest from PyPI
#   deploy/docker/build-image.sh bnserve:latest      # same, with this host's pip index/proxy and local wheels
#   docker run --rm -v bnserve-artifacts:/artifacts bnserve:latest python -m training --out /artifacts/mnist-bn
#   docker run --rm -p 127.0.0.1:8000:8000 -v bnserve-artifacts:/artifacts:ro bnserve:latest
#
# Offline torch: put the wheel in a directory of the build context and pass
#   --build-arg WHEELS_DIR=<that directory> --build-arg TORCH_INDEX_URL=
# Works with the classic builder and BuildKit alike (no BuildKit-only syntax).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
# Package-index settings (a mirror, a proxy); unset means pip's defaults. They exist only in this stage.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_FIND_LINKS
# The CPU-only torch index; empty skips it (offline builds take torch from WHEELS_DIR).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Must equal the pin in pyproject.toml (checked below): any other torch request pulls a multi-GB CUDA build.
ARG TORCH_REQUIREMENT=torch==2.13.0
# Wheels in this build-context directory are offered to pip first (--find-links); it may hold only .gitignore.
ARG WHEELS_DIR=deploy/docker/wheels
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Layers from the slowest-changing to the fastest: torch, then the other dependencies, then the code.
COPY ${WHEELS_DIR}/ /wheels/
RUN pip install --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_REQUIREMENT" \
 && python -c "import torch; assert torch.version.cuda is None, 'got a CUDA build of torch ' + torch.__version__"

# constraints.txt holds the exact versions the project is tested with (`make venv` uses it too).
COPY pyproject.toml constraints.txt /src/
RUN python -c "import os, sys, tomllib; \
deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; \
want = os.environ['TORCH_REQUIREMENT']; \
want in deps or sys.exit(f'pyproject.toml does not pin {want}: set the TORCH_REQUIREMENT build arg to its pin'); \
print(*deps, sep='\n')" > /tmp/requirements.txt \
 && pip install --find-links /wheels -c /src/constraints.txt -r /tmp/requirements.txt


FROM builder AS wheel
# The project itself as a wheel: code changes rebuild only this small layer, never the venv layer.
# (Build args are per stage: the wheel build fetches setuptools through the same index settings.)
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_FIND_LINKS
COPY model/ /src/model/
COPY training/ /src/training/
COPY service/ /src/service/
RUN pip wheel --no-deps --wheel-dir /dist /src


FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# tini is PID 1: it forwards SIGTERM to uvicorn (graceful drain) and reaps zombies, with or without --init.
# uvicorn re-raises SIGTERM after draining; `-e 143` reports that clean stop as exit status 0.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --system --gid 10001 bnserve \
 && useradd --system --uid 10001 --gid bnserve --home-dir /home/bnserve --create-home --shell /usr/sbin/nologin bnserve \
 && mkdir -p /artifacts /data \
 && chown bnserve:bnserve /artifacts /data
# /artifacts and /data belong to the service user, so named volumes mounted there start out writable by it.
COPY --from=builder /opt/venv /opt/venv
COPY --from=wheel /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-deps --no-index --no-cache-dir --disable-pip-version-check /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && /opt/venv/bin/pip check
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    BNSERVE_HOST=0.0.0.0 \
    BNSERVE_PORT=8000 \
    BNSERVE_ARTIFACT_DIR=/artifacts/mnist-bn \
    BNSERVE_DATA_DIR=/data
LABEL org.opencontainers.image.title="bnserve" \
      org.opencontainers.image.description="BatchNorm MNIST CNN serving with per-layer BN drift metrics (CPU torch)"
WORKDIR /home/bnserve
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('BNSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "-e", "143", "--"]
CMD ["python", "-m", "service"]
