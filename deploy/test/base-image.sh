#!/usr/bin/env bash
# Builds the local base image (no image registry is reachable here): a minimal Debian from Debian's
# own archive with debootstrap, imported into podman. The host's CA certificates go in too (this
# machine reaches PyPI and Debian through a TLS-inspecting egress proxy), so pip and apt work inside
# the build. Cached: does nothing when the image already exists. Usage: base-image.sh IMAGE [SUITE]
set -euo pipefail
image=${1:?image name}
suite=${2:-bookworm}
if podman image exists "$image"; then echo "base image $image: cached"; exit 0; fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/forgeline-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image $image: debootstrap --variant=minbase $suite (first build on this machine)"
debootstrap --variant=minbase --include=ca-certificates "$suite" "$root" "$mirror" >"$root.log" 2>&1 \
  || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# The host's extra CAs, kept across update-ca-certificates (which the image's apt-get may run).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# pip uses its own CA bundle unless told: point it at the system one (which holds the host's CAs).
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" --numeric-owner -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base image $image: built"
