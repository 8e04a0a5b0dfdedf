#!/bin/sh
# Captures the fixtures of src/nixcmd from the Nix found on PATH, in a throwaway store.
# Run it as root in a private mount namespace with an empty directory bound over /nix:
#   Nix 2.8 (host):  unshare -m sh -c 'mount --bind "$(mktemp -d)" /nix && NIX_CONF_DIR=CONF ./capture.sh 2.8'
#   Nix 2.26:        NIXDIR=$(mktemp -d) BIND=$PWD tests/nix/in-root.sh ROOT sh -c "cd $PWD && ./capture.sh 2.26"
# where CONF/nix.conf (and the trixie root's /etc/nix/nix.conf) hold
#   sandbox = false / substituters = / experimental-features = nix-command flakes
# The *-config-* files are written whole and trimmed afterwards (see README.md).
set -eu
V=$1
cd "$(dirname "$0")"
salt=capture
drv() { nix-instantiate fixture.nix -A "$1" --argstr salt "$salt" 2>/dev/null; }
realise() { nix-store --realise "$@" --log-format internal-json -v > /dev/null || true; }
realise "$(drv hello)" 2> "realise-hello-$V.log"
realise "$(drv failDep)" 2> "realise-fail-$V.log"
realise "$(drv nondet)" 2> /dev/null
realise --check "$(drv nondet)" 2> "check-nondet-$V.log"
realise "$(drv multi)!dev" 2> "realise-multi-dev-$V.log"

nix build --dry-run --json --no-link -f fixture.nix --argstr salt "$salt" multi > "build-dry-run-$V.json" 2>/dev/null
if [ "$V" = 2.8 ]; then
  nix show-config --json > "show-config-$V.json"
else
  nix config show --json > "config-show-$V.json"
fi
