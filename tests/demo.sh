#!/usr/bin/env bash
# The README's main job: a real remote build on one machine. A builder and a
# client get separate Nix stores (each a directory mounted over /nix in its
# own mount namespace, as two machines would have); the builder issues a
# ticket, and the client builds the example flake in tests/data/e2e through
# it and imports the signed output. Run as root on Debian 12 (it installs
# Nix and busybox if missing). Relays are off: everything stays on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if ! command -v nix >/dev/null || ! command -v busybox >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nix-bin busybox-static util-linux
fi
cargo build --release --locked
bin=$repo/target/release/drv-thru

work=$(mktemp -d /tmp/drv-thru-demo.XXXXXX)
builder_pid=
cleanup() {
  if [[ -n $builder_pid ]]; then
    kill "$builder_pid" 2>/dev/null || true
    wait "$builder_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"/{conf,builder,client,home} "$work/flake/bb/bin"
printf 'sandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\nbuild-users-group =\n' > "$work/conf/nix.conf"
cp -r tests/data/e2e/. "$work/flake/"
cp "$(command -v busybox)" "$work/flake/bb/bin/busybox"
echo "{ salt = \"demo-$(date +%s)\"; }" > "$work/flake/params.nix"

# in_store STORE CMD...: run CMD with STORE mounted at /nix. In a subshell
# (in the background, or in $(...)) CMD replaces it, so that `$!` is CMD's
# own pid and the cleanup's kill reaches it, not a shell that leaves it running.
in_store() {
  local store=$1; shift
  local run=(env NIX_CONF_DIR="$work/conf" XDG_CACHE_HOME=/nix/var/xdg-cache HOME="$work/home"
    XDG_CONFIG_HOME="$work/home/$store" DRV_THRU_RELAY=disabled
    unshare -m --propagation private sh -c 'mount --bind "$0" /nix && exec "$@"' "$work/$store" "$@")
  if [[ $BASHPID != "$$" ]]; then
    exec "${run[@]}"
  fi
  "${run[@]}"
}

echo "== starting a builder with its own store"
in_store builder "$bin" serve --data-dir "$work/data" --listen 127.0.0.1:0 2> "$work/builder.log" &
builder_pid=$!
for _ in $(seq 100); do grep -q "admin socket ready" "$work/builder.log" && break; sleep 0.1; done
grep "listening on\|signed with" "$work/builder.log" | sed 's/^.*INFO //'

echo "== issuing a ticket"
ticket=$(in_store builder "$bin" ticket create --data-dir "$work/data" --name demo)
echo "$ticket"

echo "== building path:$work/flake#app from the client's store through the ticket"
out=$(cd "$work" && in_store client "$bin" build "path:$work/flake#app" --ticket "$ticket" --no-nom)
echo "output: $out"

echo "== the output in the client's store, signed by the builder"
in_store client nix path-info --sigs "$out"
in_store client "$out/bin/app"
