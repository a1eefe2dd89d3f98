#!/usr/bin/env bash
# Build a Debian bookworm base image (python3 3.11, python3-venv, ca-certificates) from Debian's own packages
# with debootstrap, for machines that reach Debian's mirror but no container registry. Prints the image
# reference on its last line; pass it to the build as `--build-arg BASE_IMAGE=<ref>`.
#
# Cached outside the clone, keyed by the recipe (the rootfs function below and its variables): a tarball in
# $CACHE/images/ and a local podman image `localhost/vitserve-base:bookworm-<key>`. A second run imports the
# tarball if the image is gone and otherwise does nothing, so it is cheap to call before every build.
#
#   docker/base-image.sh              # build or reuse; prints localhost/vitserve-base:bookworm-<key>
#   docker/base-image.sh --print-ref  # only print the reference the recipe would produce
set -euo pipefail

SUITE=bookworm
MIRROR=${VITSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${VITSERVE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PACKAGES=python3,python3-venv,ca-certificates
CACHE=${VITSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vitserve}/images

# Everything that decides the image's content happens in here: its text (without comments, as `declare -f`
# prints it) is part of the cache key, so changing a step builds a new image instead of reusing a stale one.
make_rootfs() {
    local root=$1
    debootstrap --variant=minbase --include="$PACKAGES" --components=main "$SUITE" "$root" "$MIRROR"
    cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    # What debian:*-slim leaves out, for this install and every later one: docs, man pages, translations.
    cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
    cat >"$root/etc/apt/apt.conf.d/slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
    mount -t proc proc "$root/proc"
    chroot "$root" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get -y -q dist-upgrade && apt-get clean'
    umount "$root/proc"
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{man,info,lintian}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
        "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/root/.cache
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    # The stdlib's __pycache__ stays: a non-root container cannot write it, and every start would recompile.
    : >"$root/etc/resolv.conf"
    : >"$root/etc/hostname"
    "$root/usr/bin/python3" -c 'import sys, venv, ssl; assert sys.version_info[:2] == (3, 11), sys.version'
}

key=$( { declare -f make_rootfs; echo "$SUITE $MIRROR $SECURITY_MIRROR $PACKAGES $(uname -m)"; } | sha256sum | cut -c1-12)
ref=localhost/vitserve-base:$SUITE-$key
if [[ ${1:-} == --print-ref ]]; then
    echo "$ref"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # two builds on one machine share one base, built once
tarball=$CACHE/$SUITE-$key.tar.gz
if podman image exists "$ref"; then
    echo "$ref"
    exit 0
fi
if [[ ! -s $tarball ]]; then
    for tool in debootstrap podman; do
        command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install $tool)" >&2; exit 2; }
    done
    echo "building $ref with debootstrap (first run on this machine only; a few minutes)" >&2
    work=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'umount "$work/root/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
    # A fresh shell, because `set -e` does not apply inside a function called as the condition of an `if`.
    export SUITE MIRROR SECURITY_MIRROR PACKAGES
    if ! bash -euo pipefail -c "$(declare -f make_rootfs); make_rootfs \"\$1\"" _ "$work/root" >"$work/debootstrap.log" 2>&1; then
        tail -n 40 "$work/debootstrap.log" >&2
        exit 1
    fi
    tar --numeric-owner -C "$work/root" -czf "$work/rootfs.tar.gz" .
    mv "$work/rootfs.tar.gz" "$tarball"
fi
podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE + $PACKAGES" \
    "$tarball" "$ref" >/dev/null
echo "$ref"
