#!/bin/sh
# Make (or finish) a Debian root with that release's Nix, for testing against a modern Nix:
# trixie has Nix 2.26, sid the newest line (2.34 when written).
# Idempotent: every step checks whether it is already done. Needs root and debootstrap.
#
# Usage: [DEBIAN_MIRROR=URL] make-debian-root.sh SUITE TARGET_DIR
#
# Result (about 370 MB): SUITE minbase + nix-bin, /etc/nix/nix.conf with `sandbox = false`,
# `substituters =` (offline) and nix-command + flakes, a nixbld group with 8 build users, and an
# unprivileged user `nixtest` (HOME /home/nixtest) for tests of untrusted daemon clients.
# Enter it with in-root.sh (pivot_root; never plain chroot, see there).
set -eu
[ $# -eq 2 ] || { echo "usage: make-debian-root.sh SUITE TARGET_DIR" >&2; exit 2; }
SUITE=$1
T=$2
HERE=$(cd "$(dirname "$0")" && pwd)
MIRROR=${DEBIAN_MIRROR:-}
if [ -z "$MIRROR" ]; then
  # First http(s) mirror of the host's apt sources (deb822 or one-line format), else Debian's CDN.
  MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -Eo 'https?://[^ ]*/debian/?' | grep -v security | head -n 1 || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
in_root() { "$HERE/in-root.sh" "$T" env DEBIAN_FRONTEND=noninteractive "$@"; }

if [ ! -e "$T/.debootstrap-done" ]; then
  command -v debootstrap >/dev/null || { echo "make-debian-root.sh: install debootstrap first" >&2; exit 2; }
  # A half-finished earlier attempt leaves a debootstrap dir behind; start over then.
  if [ -e "$T/debootstrap" ]; then rm -rf "$T"; fi
  mkdir -p "$T"
  debootstrap --variant=minbase "$SUITE" "$T" "$MIRROR"
  touch "$T/.debootstrap-done"
fi

if [ ! -x "$T/usr/bin/nix" ]; then
  # apt inside needs name resolution.
  cp -L /etc/resolv.conf "$T/etc/resolv.conf" 2>/dev/null || true
  # sid's Release files expire within days; a mirror snapshot serves them past that date.
  echo 'Acquire::Check-Valid-Until "false";' > "$T/etc/apt/apt.conf.d/99drv-thru-tests"
  in_root apt-get update -q
  in_root apt-get install -y -q --no-install-recommends nix-bin util-linux procps
  in_root apt-get clean
fi

mkdir -p "$T/etc/nix"
if [ ! -e "$T/etc/nix/nix.conf" ]; then
  printf 'sandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\n' > "$T/etc/nix/nix.conf"
fi
in_root sh -euc '
  getent group nixbld >/dev/null || groupadd -r nixbld
  for i in 1 2 3 4 5 6 7 8; do
    getent passwd nixbld$i >/dev/null ||
      useradd -r -g nixbld -G nixbld -d /var/empty -s /usr/sbin/nologin -c "Nix build user $i" nixbld$i
  done
  getent group nix-users >/dev/null || groupadd -r nix-users
  getent passwd nixtest >/dev/null || useradd -m -d /home/nixtest -s /bin/bash nixtest
'
"$HERE/in-root.sh" "$T" nix --version
