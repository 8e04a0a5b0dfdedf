#!/usr/bin/env bash
# The README's main job: a real remote build on one machine, builder and
# client in separate Nix stores (tests/demo.rs says how). Run as root on
# Debian 12: it installs Nix and busybox if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nix >/dev/null || ! command -v busybox >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nix-bin busybox-static util-linux
fi
exec cargo test --release --locked --test demo
