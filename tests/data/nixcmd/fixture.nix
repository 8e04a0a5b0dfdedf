# Test derivations for src/nixcmd. No nixpkgs: every builder is the host's /bin/sh with
# PATH=/usr/bin:/bin, so the store that builds them needs `sandbox = false`.
# `salt` changes every store path, so a test can force fresh builds.
{ salt ? "", sleepSecs ? "30", system ? builtins.currentSystem }:
let
  # An input source, added like any `builtins.path`: content-addressed, `fixed:r:sha256`.
  src = builtins.path { path = ./src; name = "nixcmd-fixture-src"; };
  mk = name: script: attrs: derivation ({
    inherit name system salt;
    builder = "/bin/sh";
    args = [ "-euc" script ];
    PATH = "/usr/bin:/bin";
  } // attrs);
in rec {
  inherit src;

  # Log lines on stdout and stderr, two phase changes, reads the source.
  hello = mk "nixcmd-hello" ''
    echo '@nix {"action":"setPhase","phase":"unpackPhase"}' >&2
    echo "hello: stdout line"
    echo "hello: stderr line" >&2
    echo '@nix {"action":"setPhase","phase":"installPhase"}' >&2
    cat ${src}/input.txt > $out
  '' { };

  # Two outputs; its .drv refers to another .drv (hello's) and to a source.
  multi = mk "nixcmd-multi" ''
    mkdir -p $out $dev
    echo "multi uses ${hello} and ${src}" > $out/info
    echo "dev of $out" > $dev/info
  '' { outputs = [ "out" "dev" ]; };

  # Fails after logging; failDep depends on it.
  fail = mk "nixcmd-fail" ''
    echo "fail: some stdout"
    echo "fail: about to fail" >&2
    exit 3
  '' { };
  failDep = mk "nixcmd-fail-dep" ''
    cat ${fail} > $out
  '' { };

  # Output differs on every build, so `--check` reports it.
  nondet = mk "nixcmd-nondet" ''
    cat /proc/sys/kernel/random/uuid > $out
  '' { };

  # Ticks for sleepSecs seconds, with a child in a session of its own that would outlive a
  # kill of the builder's process group alone.
  slow = mk "nixcmd-slow" ''
    setsid sleep ${sleepSecs} &
    i=0
    while [ $i -lt ${sleepSecs} ]; do echo "slow: tick $i"; sleep 1; i=$((i+1)); done
    echo done > $out
  '' { };
}
