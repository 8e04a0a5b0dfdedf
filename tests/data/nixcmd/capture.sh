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
missing=/nix/store/00000000000000000000000000000000-missing
src=$(nix-instantiate --eval --raw fixture.nix -A src 2>/dev/null || nix-instantiate --eval fixture.nix -A src | tr -d '"')
hello=$(nix-store -q --outputs "$(drv hello)")
if [ "$V" = 2.8 ]; then
  # 2.8 reads a .drv argument as "its outputs" unless --derivation is given, which in turn fails
  # for paths without a deriver: two calls.
  nix path-info --json "$missing" "$src" "$hello" > "path-info-$V.json"
  nix path-info --json --derivation "$(drv multi)" > "path-info-drv-$V.json"
  nix show-config --json > "show-config-$V.json"
else
  nix path-info --json "$missing" "$(drv multi)" "$src" "$hello" > "path-info-$V.json"
  nix config show --json > "config-show-$V.json"
  nix store info --json > "store-info-$V.json"
fi
