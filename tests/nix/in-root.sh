#!/bin/sh
# Run a command inside a Debian root made by make-debian-root.sh (its own Nix), in a private
# mount namespace that vanishes when the command exits. The exit status is the command's.
#
# Usage: [NIXDIR=DIR] [BIND="DIR1 DIR2"] [PASSENV="VAR1 VAR2"] in-root.sh ROOT [cmd...]
#   ROOT     the root directory
#   NIXDIR   a host directory bound over the root's /nix (an independent store; created if missing)
#   BIND     host directories bound at the same path inside, so paths mean the same on both sides
#            (no spaces in these paths)
#   PASSENV  names of environment variables passed through; everything else is cleared
#   ETCDIR   a host directory whose upper/ is layered over the root's /etc (work/ beside it)
#   cmd      default: bash -l
#
# Needs root. It uses pivot_root rather than chroot(2): inside a chroot the kernel refuses
# CLONE_NEWUSER, so Nix 2.26 silently gives up its sandbox (sandbox-fallback) and builds in chroot
# stores fail.
set -eu
[ $# -ge 1 ] || { echo "usage: in-root.sh ROOT [cmd...]" >&2; exit 2; }
R=$(cd "$1" && pwd -P)
shift
[ -x "$R/usr/bin/env" ] || { echo "in-root.sh: $R is not a root file system" >&2; exit 2; }
[ $# -eq 0 ] && set -- /bin/bash -l
if [ -n "${NIXDIR:-}" ]; then mkdir -p "$NIXDIR"; NIXDIR=$(cd "$NIXDIR" && pwd -P); fi
# The command starts in the caller's directory when that is visible inside (a BIND dir).
export NIXDIR="${NIXDIR:-}" BIND="${BIND:-}" ETCDIR="${ETCDIR:-}" CALLER_PWD="$(pwd -P)"
# Put VAR=value in front of the command for each PASSENV variable that is set; `env` reads them.
for v in ${PASSENV:-}; do
  case $v in *[!A-Za-z0-9_]*) echo "in-root.sh: bad variable name '$v'" >&2; exit 2;; esac
  if eval "[ -n \"\${$v+y}\" ]"; then eval "set -- \"\$v=\$$v\" \"\$@\""; fi
done
exec unshare -m --propagation private sh -c '
  set -e
  R=$0
  mount --bind "$R" "$R"
  mount -t proc proc "$R/proc"
  mount --rbind /dev "$R/dev"
  mount --rbind /sys "$R/sys"
  mkdir -p "$R/nix" "$R/.oldroot"
  if [ -n "$NIXDIR" ]; then mount --bind "$NIXDIR" "$R/nix"; fi
  if [ -n "$ETCDIR" ]; then
    mount -t overlay overlay -o "lowerdir=$R/etc,upperdir=$ETCDIR/upper,workdir=$ETCDIR/work" "$R/etc"
  fi
  for d in $BIND; do
    d=$(cd "$d" && pwd -P)
    mkdir -p "$R$d"
    mount --rbind "$d" "$R$d"
  done
  cd "$R"
  pivot_root . .oldroot
  umount -l /.oldroot
  cd "$CALLER_PWD" 2>/dev/null || cd /
  exec /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" XDG_CACHE_HOME=/nix/var/xdg-cache \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
' "$R" "$@"
