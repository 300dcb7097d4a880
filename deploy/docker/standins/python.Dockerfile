# Local stand-in for python:3.11-slim, for hosts that cannot pull from a registry.
# Debian bookworm's python3 is CPython 3.11; python-is-python3 makes `python` resolve too.
ARG DEBIAN_BASE=bnserve-standin/debian:bookworm
FROM ${DEBIAN_BASE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && python3.11 -c "import ssl, venv, ensurepip" \
 && python --version
ENV LANG=C.UTF-8
LABEL org.opencontainers.image.description="local stand-in for python:3.11-slim (Debian bookworm python3)" \
      io.bnserve.standin="python:3.11-slim"
CMD ["python3"]
