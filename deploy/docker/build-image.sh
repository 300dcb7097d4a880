#!/usr/bin/env bash
# Build the bnserve image with this host's pip settings passed in as build args.
#
#   deploy/docker/build-image.sh [TAG] [extra `docker build` options...]    # TAG: $BNSERVE_IMAGE or bnserve:latest
#
# From `pip config list` (pip.conf files and PIP_* variables) and the proxy variables of this shell:
#   - http(s) index-url / extra-index-url / find-links and trusted-host become PIP_* build args;
#   - file:// indexes are left out (a build cannot see this host's disk), but torch wheels matching
#     $WHEELS_GLOB in local find-links directories (or in $WHEELS_FROM) are linked into deploy/docker/wheels/,
#     the WHEELS_DIR of the Dockerfile; with one staged, the PyPI CPU index is skipped (TORCH_INDEX_URL=);
#   - http_proxy/https_proxy/no_proxy become the predefined proxy build args (kept out of the image history).
# Nothing host-specific is written into committed files: it is all read here, at build time.
#
# Env: BASE_IMAGE, TORCH_INDEX_URL (override), WHEELS_FROM (dirs/files), WHEELS_GLOB, PIP_CMD.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STAGE="deploy/docker/wheels"
TAG="${1:-${BNSERVE_IMAGE:-bnserve:latest}}"
[ $# -gt 0 ] && shift
WHEELS_GLOB="${WHEELS_GLOB:-torch-2.13.0+cpu-*.whl}"
# The classic builder by default: it needs no buildx plugin, and it keeps its layer cache as untagged parent
# images, which survive `docker rmi --no-prune <tag>` (the e2e test relies on that). DOCKER_BUILDKIT=1 works too.
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"

log() { printf '[build-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

declare -A PIPCFG=()
read_pip_config() {  # PIPCFG[key]=value; PIP_* variables win over config files
    local pip_cmd="${PIP_CMD:-}" line keypart key variant value
    if [ -z "$pip_cmd" ]; then
        for pip_cmd in "python3 -m pip" "pip3" "pip" ""; do
            [ -n "$pip_cmd" ] && $pip_cmd --version >/dev/null 2>&1 && break
        done
    fi
    [ -n "$pip_cmd" ] || { log "no pip on this host: using pip's defaults in the build"; return 0; }
    while IFS= read -r line; do
        keypart="${line%%=*}"
        value="${line#*=}"
        value="${value#\'}"
        value="${value%\'}"
        key="${keypart##*.}"
        variant="${keypart%.*}"
        if [ "$variant" = ":env:" ] || [ -z "${PIPCFG[$key]:-}" ]; then
            PIPCFG[$key]="$value"
        fi
    done < <($pip_cmd config list 2>/dev/null || true)
}

urls_only() {  # the http(s) words of $1
    local word out=()
    for word in $1; do
        case "$word" in http://* | https://*) out+=("$word") ;; esac
    done
    echo "${out[*]:-}"
}

stage_wheels() {  # link matching wheels into $STAGE; prints how many
    local sources="${WHEELS_FROM:-}" src f n=0
    if [ -z "$sources" ]; then
        for src in ${PIPCFG[find-links]:-}; do
            src="${src#file://}"
            [ -d "$src" ] && sources+=" $src"
        done
    fi
    find "$ROOT/$STAGE" -maxdepth 1 -name '*.whl' -delete
    for src in $sources; do
        if [ -d "$src" ]; then
            # shellcheck disable=SC2086  # the glob is meant to expand
            set -- "$src"/$WHEELS_GLOB
        else
            set -- "$src"
        fi
        for f in "$@"; do
            [ -f "$f" ] || continue
            ln -f "$f" "$ROOT/$STAGE/" 2>/dev/null || cp -f "$f" "$ROOT/$STAGE/"
            log "staged wheel $(basename "$f")"
            n=$((n + 1))
        done
    done
    echo "$n"
}

main() {
    local args=() value staged t0=$SECONDS
    read_pip_config
    value="$(urls_only "${PIPCFG[index-url]:-}")"
    [ -n "$value" ] && args+=(--build-arg "PIP_INDEX_URL=$value")
    value="$(urls_only "${PIPCFG[extra-index-url]:-}")"
    [ -n "$value" ] && args+=(--build-arg "PIP_EXTRA_INDEX_URL=$value")
    value="$(urls_only "${PIPCFG[find-links]:-}")"
    [ -n "$value" ] && args+=(--build-arg "PIP_FIND_LINKS=$value")
    [ -n "${PIPCFG[trusted-host]:-}" ] && args+=(--build-arg "PIP_TRUSTED_HOST=${PIPCFG[trusted-host]}")
    for value in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [ -n "${!value:-}" ] && args+=(--build-arg "$value=${!value}")
    done
    staged="$(stage_wheels)"
    if [ -n "${TORCH_INDEX_URL+set}" ]; then
        args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    elif [ "$staged" -gt 0 ]; then
        args+=(--build-arg "TORCH_INDEX_URL=")
    fi
    [ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    # Log the build args by name only: index URLs may carry credentials.
    log "docker build -t $TAG (build args: $(printf '%s\n' "${args[@]}" | grep -v '^--build-arg$' | cut -d= -f1 | tr '\n' ' '))"
    nice -n 10 docker build "${args[@]}" -t "$TAG" "$@" "$ROOT"
    log "built $TAG in $((SECONDS - t0)) s, $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}')"
}

main "$@"
