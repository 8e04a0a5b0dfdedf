#!/usr/bin/env bash
# The project's test command (README "Development"): lints, then every test.
# On a fresh Debian 12 machine run it as root: it installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in nix nix-store busybox setpriv debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
# Multi-user tests run nix-daemon with build users from nix-setup-systemd.
getent group nixbld >/dev/null || missing+=(nixbld)
# The Python example's virtual environment (examples/python/).
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${missing[*]}; run as root once so tests/run.sh can install them" >&2
    exit 2
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    nix-bin nix-setup-systemd busybox-static util-linux debootstrap python3-venv
fi
if ! command -v buf >/dev/null; then
  npm install -g --no-fund --no-audit @bufbuild/buf@1
fi

# The Python example's packages from PyPI, pinned; the environment is made
# again only when its requirements change. tests/examples.rs uses it.
export DRV_THRU_PYTHON_VENV=${DRV_THRU_PYTHON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/drv-thru-tests/python-venv}
requirements=examples/python/requirements.txt
if ! cmp -s "$requirements" "$DRV_THRU_PYTHON_VENV/requirements.txt"; then
  python3 -m venv --clear "$DRV_THRU_PYTHON_VENV"
  "$DRV_THRU_PYTHON_VENV/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$DRV_THRU_PYTHON_VENV/requirements.txt"
fi

echo "== lint"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
buf lint

# drvthru.v1 only grows compatibly: proto/ against each parent commit's
# (both sides of a merge; none for the first commit). A shallow clone
# fetches the parents first, if it can.
if [[ $(git rev-parse --is-shallow-repository) == true ]]; then
  git fetch -q --deepen=1 || echo "== could not deepen this shallow clone" >&2
fi
parents=$(git rev-parse 'HEAD^@')
against=$(mktemp -d)
trap 'rm -rf "$against"' EXIT
for parent in $parents; do
  if git cat-file -e "$parent:proto" 2>/dev/null; then
    echo "== buf breaking against $(git log -1 --format='%h %s' "$parent")"
    mkdir "$against/$parent"
    git archive "$parent" proto | tar -x -C "$against/$parent"
    buf breaking --against "$against/$parent/proto"
  fi
done
[[ -n $parents ]] || echo "== skipping buf breaking: no parent commit here (the first commit?)"

# Modern Nix, Debian trixie's 2.26 and sid's newest, each in a root of its
# own (made once, then reused). The three-store tests put a builder on 2.26
# even when the client is on the host's Nix.
if [[ $(id -u) -eq 0 ]]; then
  for suite in trixie sid; do
    tests/nix/make-debian-root.sh "$suite" "/var/cache/drv-thru-tests/$suite"
  done
fi

echo "== tests (Nix $(nix --version | awk '{print $NF}'))"
cargo test --locked

# The end-to-end suite again against modern Nix.
if [[ $(id -u) -eq 0 ]]; then
  for suite in trixie sid; do
    root=/var/cache/drv-thru-tests/$suite
    echo "== integration tests (Nix $(tests/nix/in-root.sh "$root" nix --version | awk '{print $NF}'), Debian $suite)"
    DRV_THRU_TEST_NIX_ROOT=$root cargo test --locked --test integration
  done
else
  echo "== skipping the runs on modern Nix: they need root"
fi

# The benchmark, small: it must keep working; its timings are not checked.
if [[ $(id -u) -eq 0 ]]; then
  echo "== benchmark (small)"
  cargo bench --locked --bench transfer -- --size 8M --runs 1 --small-count 100 --clients 4
  echo "== benchmark over the emulated WAN (small)"
  cargo bench --locked --bench transfer -- --wan --size 8M --runs 1 --small-count 100 \
    --cases download,upload,small-up,small-down,closure
fi

# Every parser of outside bytes, fuzzed for a bounded number of inputs
# (fuzz/README.md). The instrumented build is kept beside the trixie root.
echo "== fuzzing (bounded)"
if [[ $(id -u) -eq 0 ]]; then
  export FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-/var/cache/drv-thru-tests/fuzz-target}
fi
fuzz/run.sh
