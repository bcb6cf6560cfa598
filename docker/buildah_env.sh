# Sourced by docker/ngc_standin/build.sh and docker/build_image.sh: one buildah store for the
# stand-in base and the megaponder image, kept apart from any other buildah/podman store on the
# machine (a store is bound to one storage driver).
#
#   MEGAPONDER_IMAGE_STORE   the store (images, layers)          default /var/lib/megaponder-images
#   MEGAPONDER_IMAGE_CACHE   debootstrap's .debs, pip's wheels   default /var/cache/megaponder-images
#   MEGAPONDER_STORAGE_DRIVER  overlay (default) or vfs. overlay needs a kernel that mounts
#                            overlayfs for root (this machine does); vfs works everywhere but
#                            copies the whole tree for every container and commit (~1 min/GB).
# No daemon: buildah runs every step as a child of the calling shell, with chroot isolation
# (no user namespaces or runc needed; the build runs as root).
MEGAPONDER_IMAGE_STORE=${MEGAPONDER_IMAGE_STORE:-/var/lib/megaponder-images}
MEGAPONDER_IMAGE_CACHE=${MEGAPONDER_IMAGE_CACHE:-/var/cache/megaponder-images}
MEGAPONDER_STORAGE_DRIVER=${MEGAPONDER_STORAGE_DRIVER:-overlay}
# buildah keeps `RUN --mount=type=cache` folders (the Dockerfile's pip cache) and temporary
# blobs under TMPDIR: keep them with the other caches (a test's private TMPDIR, removed at its
# end, would throw the pip cache away after every build)
export TMPDIR=$MEGAPONDER_IMAGE_CACHE/tmp
mkdir -p "$TMPDIR"
export BUILDAH_ISOLATION=chroot

bah() {
    buildah --root "$MEGAPONDER_IMAGE_STORE/root" --runroot "$MEGAPONDER_IMAGE_STORE/run" \
        --storage-driver "$MEGAPONDER_STORAGE_DRIVER" "$@"
}

# sha256 (first 16 hex digits) over the named files' paths and contents
content_hash() {
    local f
    for f in "$@"; do
        printf '%s\0' "$f"
        sha256sum < "$f"
    done | sha256sum | cut -c1-16
}

need_root_and_tools() {
    if [ "$(id -u)" != 0 ]; then
        echo "error: building the image needs root (buildah with chroot isolation); run as root" >&2
        exit 2
    fi
    local missing=()
    for tool in "$@"; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
    if [ ${#missing[@]} -gt 0 ]; then
        if command -v apt-get >/dev/null 2>&1; then
            echo "installing ${missing[*]} from Debian's packages" >&2
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        else
            echo "error: ${missing[*]} not installed and no apt-get to install them" >&2
            exit 2
        fi
    fi
}
