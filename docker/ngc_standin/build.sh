#!/usr/bin/env bash
# A CPU stand-in for the NGC PyTorch base image, built with buildah (no Docker daemon, no GPU):
#
#   docker/ngc_standin/build.sh          # prints the image name on its last line
#
# What it has, and why (docker/README.md, "Building on a CPU machine"):
# - Debian bookworm from debootstrap (minbase: no docs, no recommends) with Python 3, pip,
#   the Python headers and gcc, OpenMPI with mpicc (NGC ships HPC-X Open MPI);
# - "the image's torch": the project's torch pin as a CPU wheel (requirements/constraints.txt,
#   +cpu), and every other package of docker/ngc-packages.txt at the NGC version;
# - /etc/pip/constraint.txt pinning every installed package, and PIP_CONSTRAINT pointing at it,
#   as NGC images since 25.03 have: a requirement for another version of an installed package
#   fails with ResolutionImpossible, as it does on the real image.
#
# Cached: the image is tagged with a hash of its inputs (this script, packages.py, the NGC
# list, the torch pin) and not rebuilt while they are unchanged. debootstrap's and apt's .debs
# and pip's wheels are kept in $MEGAPONDER_IMAGE_CACHE, so a rebuild downloads nothing again.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=docker/buildah_env.sh
source "$REPO/docker/buildah_env.sh"

NGC_LIST=${NGC_LIST:-$REPO/docker/ngc-packages.txt}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# the project's torch pin, as the CPU build pip finds on the project's machines
TORCH_PIN=$(sed -n 's/^torch==\([^ #]*\).*/\1/p' "$REPO/requirements/constraints.txt")+cpu

log() { echo "[ngc-standin $(date +%T)] $*" >&2; }

need_root_and_tools buildah debootstrap
TAG="localhost/megaponder-ngc-standin:$( (content_hash "$HERE/build.sh" "$HERE/packages.py" \
        "$HERE/dpkg-nodoc.cfg" "$NGC_LIST"; echo "$TORCH_PIN $DEBIAN_MIRROR") | sha256sum | cut -c1-16)"
if bah inspect --type image "$TAG" >/dev/null 2>&1; then
    log "cached: $TAG"
    echo "$TAG"
    exit 0
fi

CACHE=$MEGAPONDER_IMAGE_CACHE
mkdir -p "$CACHE"/{debs,pip,wheels}
# the CPU torch wheel, fetched by this machine's pip (its configuration knows where it lies)
if ! ls "$CACHE/wheels/torch-${TORCH_PIN}-"*.whl >/dev/null 2>&1; then
    log "fetching torch==$TORCH_PIN"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$CACHE/wheels" "torch==$TORCH_PIN"
fi
requirements=$(python3 "$HERE/packages.py" install-list "$NGC_LIST" "$TORCH_PIN")

ctr=$(bah from scratch)
trap 'bah rm "$ctr" >/dev/null 2>&1 || true' EXIT
rootfs=$(bah mount "$ctr")
case "$rootfs" in
    "$MEGAPONDER_IMAGE_STORE"/*) ;;
    *) echo "error: buildah mounted the container at '$rootfs', not under $MEGAPONDER_IMAGE_STORE" >&2
       exit 1 ;;
esac

t0=$SECONDS
log "debootstrap bookworm into $rootfs"
debootstrap --variant=minbase --cache-dir="$CACHE/debs" bookworm "$rootfs" "$DEBIAN_MIRROR" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
log "debootstrap took $((SECONDS - t0)) s"
# no docs from any later apt install either (the one below, the Dockerfile's)
cp "$HERE/dpkg-nodoc.cfg" "$rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc"
find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright -delete
rm -rf "$rootfs/usr/share/man" "$rootfs/usr/share/info" "$rootfs/usr/share/locale"
echo "$requirements" > "$rootfs/tmp/ngc-requirements.txt"
bah umount "$ctr" >/dev/null

# the rest with apt inside (debootstrap's --include cannot resolve alternatives such as
# libltdl-dev's automake); gfortran comes with libopenmpi-dev (its Fortran wrappers), NGC has it too.
# NGC's Python is the system Python and pip installs into it: no PEP 668 lock.
t0=$SECONDS
bah run --volume "$CACHE/debs:/var/cache/apt/archives" "$ctr" -- sh -ec '
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-pip python3-dev \
        python-is-python3 gcc g++ libc6-dev openmpi-bin libopenmpi-dev ca-certificates >/dev/null
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/lib/python3*/EXTERNALLY-MANAGED'
log "apt took $((SECONDS - t0)) s"
# this machine's CA bundle (after apt, whose ca-certificates would regenerate it), so pip
# inside reaches the registry through the same TLS setup as here
rootfs=$(bah mount "$ctr")
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
bah umount "$ctr" >/dev/null

t0=$SECONDS
log "pip install $(echo "$requirements" | tr '\n' ' ')"
bah run --volume "$CACHE/pip:/root/.cache/pip" --volume "$CACHE/wheels:/wheels:ro" \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$ctr" -- \
    python -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        --find-links /wheels -r /tmp/ngc-requirements.txt
bah run "$ctr" -- python -m pip freeze --disable-pip-version-check > "$CACHE/standin-freeze.txt"
log "pip took $((SECONDS - t0)) s"

rootfs=$(bah mount "$ctr")
mkdir -p "$rootfs/etc/pip"
python3 "$HERE/packages.py" constraints "$NGC_LIST" "$CACHE/standin-freeze.txt" \
    > "$rootfs/etc/pip/constraint.txt"
rm -f "$rootfs/tmp/ngc-requirements.txt"
bah umount "$ctr" >/dev/null

bah config --env PIP_CONSTRAINT=/etc/pip/constraint.txt \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    --env LANG=C.UTF-8 --workingdir /workspace \
    --label org.opencontainers.image.description="CPU stand-in for nvcr.io/nvidia/pytorch (megaponder CI)" \
    --cmd /bin/bash "$ctr"
t0=$SECONDS
bah commit -q "$ctr" "$TAG" >/dev/null
log "commit took $((SECONDS - t0)) s"
echo "$TAG"
