#!/usr/bin/env bash
# Make a Docker engine answer, then build local stand-ins for the base images a registry would give us.
#
#   deploy/docker/build-standins.sh      # idempotent: an image tag that already exists is kept as it is
#
# 1. Installs Debian's docker.io, docker-compose and debootstrap if missing (root, apt-get), and starts
#    dockerd in the background (log: $DOCKERD_LOG) when no engine answers.
# 2. Builds $PYTHON_IMAGE (python:3.11-slim) from a debootstrap'ed Debian bookworm: its python3 is 3.11,
#    `python`/`python3.11` resolve, and it trusts this host's CAs in /usr/local/share/ca-certificates/.
# 3. Builds $PROMETHEUS_IMAGE (prom/prometheus:v2.42.0) from Debian's prometheus package, with the official
#    image's entrypoint, flags, config path, user and volume.
# On a host that can pull, the real images just need to be present: their tags are never rebuilt.
#
# Env: PYTHON_IMAGE, PROMETHEUS_IMAGE, DEBIAN_BASE (the debootstrap image), DEBIAN_SUITE (bookworm),
#      DEBIAN_MIRROR (default: this host's apt source for the suite), DOCKERD_LOG, DOCKERD_NICE (10).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON_IMAGE="${PYTHON_IMAGE:-python:3.11-slim}"
PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-prom/prometheus:v2.42.0}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
DEBIAN_BASE="${DEBIAN_BASE:-bnserve-standin/debian:${DEBIAN_SUITE}}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/bnserve-dockerd.log}"
# Local-only base images: the classic builder resolves FROM against the local image store, never a registry.
export DOCKER_BUILDKIT=0

log() { printf '[standins %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
have_compose() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }

install_tools() {
    local pkgs=()
    command -v docker >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
    have_compose || pkgs+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
    [ ${#pkgs[@]} -eq 0 ] && return 0
    is_root || die "missing ${pkgs[*]}; run as root (apt-get install) or install them yourself"
    command -v apt-get >/dev/null 2>&1 || die "missing ${pkgs[*]} and this is not a Debian-like host (no apt-get)"
    log "apt-get install ${pkgs[*]}"
    local apt=(apt-get install -y --no-install-recommends "${pkgs[@]}")
    if ! DEBIAN_FRONTEND=noninteractive nice -n 10 "${apt[@]}" >/dev/null; then
        nice -n 10 apt-get update -qq
        DEBIAN_FRONTEND=noninteractive nice -n 10 "${apt[@]}" >/dev/null
    fi
}

start_engine() {
    docker info >/dev/null 2>&1 && return 0
    local started=0
    if ! pgrep -x dockerd >/dev/null; then  # else it may still be starting: wait for it below
        is_root || die "no Docker engine answers and only root can start dockerd"
        log "starting dockerd (log: $DOCKERD_LOG)"
        # Own session, so dockerd outlives this script and the test that called it. Niced: builds and
        # containers inherit it and leave the CPU to interactive work on a shared machine.
        setsid nohup nice -n "${DOCKERD_NICE:-10}" dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
        started=1
    fi
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && { log "engine is up ($(docker version -f '{{.Server.Version}}'))"; return 0; }
        sleep 1
    done
    [ "$started" -eq 1 ] && { tail -n 15 "$DOCKERD_LOG" >&2 || true; }
    die "no Docker engine answers within 60 s: $(docker info 2>&1 | grep -v '^ *$' | tail -n 1)"
}

# The first deb URI of this host's apt sources that carries $DEBIAN_SUITE (one-line and deb822 formats).
host_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$DEBIAN_SUITE" '
            $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                          if ($(i + 1) == suite) { print $i; exit } }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$DEBIAN_SUITE" -v RS= '
            { types = uris = suites = ""; enabled = "yes"; n = split($0, lines, "\n")
              for (j = 1; j <= n; j++) {
                  if (lines[j] ~ /^[ \t]*#/ || index(lines[j], ":") == 0) continue
                  key = tolower(substr(lines[j], 1, index(lines[j], ":") - 1))
                  val = " " substr(lines[j], index(lines[j], ":") + 1) " "
                  gsub(/[ \t]+/, " ", val)
                  if (key == "types") types = val; else if (key == "uris") uris = val
                  else if (key == "suites") suites = val; else if (key == "enabled") enabled = val }
              if (types ~ / deb / && suites ~ (" " suite " ") && enabled !~ /no/) {
                  split(uris, u, " "); print u[1]; exit } }' "$f"
    done
}

build_debian_base() {
    image_exists "$DEBIAN_BASE" && { log "cached: $DEBIAN_BASE"; return 0; }
    is_root || die "debootstrap needs root"
    local mirror="${DEBIAN_MIRROR:-$(host_mirror | head -n 1)}"
    [ -n "$mirror" ] || die "no apt source for $DEBIAN_SUITE in /etc/apt/sources.list*; set DEBIAN_MIRROR"
    rootfs="$(mktemp -d /var/tmp/bnserve-rootfs.XXXXXX)"  # global: the EXIT trap needs it
    # debootstrap mounts proc/sys (and may bind /dev) inside the rootfs: unmount before deleting, and never
    # let rm cross into another file system.
    cleanup_rootfs() {
        grep -o " $rootfs/[^ ]*" /proc/mounts | sort -r | xargs -r -n 1 umount -l 2>/dev/null || true
        rm -rf --one-file-system "$rootfs"
    }
    trap cleanup_rootfs EXIT
    log "debootstrap $DEBIAN_SUITE from $mirror (minutes on a cold cache)"
    nice -n 10 debootstrap --variant=minbase --include=ca-certificates "$DEBIAN_SUITE" "$rootfs" "$mirror" \
        >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
    rm -f "$rootfs.log"
    # Trust this host's CAs (a TLS-intercepting proxy may sit between the build and PyPI).
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
    chroot "$rootfs" update-ca-certificates >/dev/null
    # As in Debian's official images: package scripts must not start daemons during a build, and apt keeps
    # neither downloaded .debs nor its binary caches in image layers.
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
    chmod 755 "$rootfs/usr/sbin/policy-rc.d"
    local clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
    printf 'DPkg::Post-Invoke { "%s"; };\nAPT::Update::Post-Invoke { "%s"; };\n%s\n' "$clean" "$clean" \
        'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' >"$rootfs/etc/apt/apt.conf.d/docker-clean"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    grep -o " $rootfs/[^ ]*" /proc/mounts | sort -r | xargs -r -n 1 umount -l 2>/dev/null || true
    log "docker import -> $DEBIAN_BASE"
    tar --numeric-owner --one-file-system -C "$rootfs" -c . \
        | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
            --message "debootstrap $DEBIAN_SUITE minbase from $mirror" - "$DEBIAN_BASE" >/dev/null
    cleanup_rootfs
    trap - EXIT
}

build_standin() {  # tag dockerfile
    local tag="$1" dockerfile="$2" ctx
    image_exists "$tag" && { log "cached: $tag"; return 0; }
    log "building $tag from $(basename "$dockerfile")"
    ctx="$(mktemp -d)"  # the stand-ins need no files: an empty context
    if ! nice -n 10 docker build --build-arg "DEBIAN_BASE=$DEBIAN_BASE" -t "$tag" -f "$dockerfile" "$ctx" \
        >"$ctx.log" 2>&1; then
        tail -n 40 "$ctx.log" >&2
        rm -rf "$ctx"
        die "building $tag failed (log: $ctx.log)"
    fi
    rm -rf "$ctx" "$ctx.log"
}

main() {
    local t0=$SECONDS
    install_tools
    start_engine
    have_compose || die "neither 'docker compose' nor 'docker-compose' works"
    # Two callers at once would both debootstrap; the second waits and then finds the tags cached.
    exec 9>/var/tmp/bnserve-standins.lock
    flock 9
    if ! image_exists "$PYTHON_IMAGE" || ! image_exists "$PROMETHEUS_IMAGE"; then
        build_debian_base
    fi
    build_standin "$PYTHON_IMAGE" "$HERE/standins/python.Dockerfile"
    build_standin "$PROMETHEUS_IMAGE" "$HERE/standins/prometheus.Dockerfile"
    log "ready in $((SECONDS - t0)) s: $PYTHON_IMAGE, $PROMETHEUS_IMAGE"
}

main "$@"
