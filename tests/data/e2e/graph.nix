# A derivation graph that needs nothing but a static busybox, which the
# tests copy into ./bb/bin/busybox. `salt` gives every test fresh store
# paths, so builders and clients start from nothing.
{ salt, blobMiB ? 8, sleepSecs ? 60, system ? "x86_64-linux" }:
let
  bbsrc = builtins.path { path = ./bb; name = "busybox-static"; };
  srcDir = builtins.path { path = ./src; name = "test-src"; };

  tools = derivation {
    name = "bb-tools";
    inherit system salt;
    builder = "${bbsrc}/bin/busybox";
    args = [ "sh" "-euc" ''
      ${bbsrc}/bin/busybox mkdir -p $out/bin
      ${bbsrc}/bin/busybox --install -s $out/bin
    '' ];
  };

  mk = name: script: attrs: derivation ({
    inherit name system salt;
    builder = "${tools}/bin/sh";
    args = [ "-euc" script ];
    PATH = "${tools}/bin";
  } // attrs);

  # Runs on the busybox source alone, so no build comes first.
  bare = name: script: attrs: derivation ({
    inherit name system salt;
    builder = "${bbsrc}/bin/busybox";
    args = [ "sh" "-euc" script ];
  } // attrs);
  bb = "${bbsrc}/bin/busybox";

  naps' = builtins.listToAttrs (map (i: {
    name = "nap${toString i}";
    value = bare "nap-${toString i}" ''
      echo "nap ${toString i}: sleeping"
      ${bb} sleep 3
      echo ${toString i} > $out
    '' { };
  }) [ 0 1 2 3 ]);

  big = i: bare "big-${toString i}" ''
    echo "big ${toString i}: built"
    echo ${toString i} > $out
  '' { requiredSystemFeatures = [ "big-parallel" ]; };
in
rec {
  inherit tools;

  # Two outputs; dev refers to out.
  lib = mk "testlib" ''
    mkdir -p $out/lib $dev/include
    echo "libdata" > $out/lib/libtest.txt
    echo "#define TESTLIB \"$out/lib/libtest.txt\"" > $dev/include/test.h
  '' { outputs = [ "out" "dev" ]; };

  # Incompressible data, so a large output really travels.
  blob = mk "blob" ''
    echo "blob: writing ${toString blobMiB} MiB"
    dd if=/dev/urandom of=$out bs=1048576 count=${toString blobMiB} 2>/dev/null
  '' { };

  # Small outputs enough for the client to import them from files rather
  # than over HTTP.
  parts = mk "parts" ''
    for o in $outputs; do eval "echo \"part $o\" > \$$o"; done
  '' { outputs = builtins.genList (i: "p${toString i}") 40; };

  # Several dependencies, an input source and text enough to be
  # fetched in more ranges than are in flight at once (so later ranges go on
  # from where earlier ones paused) and compressed in the builder's cache.
  app = mk "app" ''
    mkdir -p $out/bin $out/share
    cp ${srcDir}/hello.txt $out/share/hello.txt
    yes "compressible text for the builder's cache" | head -c 20000000 > $out/share/text.txt
    ln -s ${blob} $out/share/blob
    ln -s ${lib.dev}/include $out/share/include
    echo ${toString (map (o: parts.${o}) parts.outputs)} > $out/share/parts
    printf '#!%s\ncat %s %s/lib/libtest.txt\n' ${tools}/bin/sh $out/share/hello.txt ${lib} > $out/bin/app
    chmod +x $out/bin/app
    echo "app: built"
  '' { };

  # Prints a line a second, for time limits and cancellation.
  slow = mk "slow" ''
    i=0
    while [ $i -lt ${toString sleepSecs} ]; do echo "slow: tick $i"; sleep 1; i=$((i+1)); done
    echo done > $out
  '' { };

  # Silent for a long time, for cancellation of builds that print nothing.
  quiet = mk "quiet" ''
    sleep ${toString sleepSecs}
    echo done > $out
  '' { };

  # Evaluates only after a local build that sleeps (import from
  # derivation), for signals during evaluation.
  slowEval = import (derivation {
    name = "slow-eval";
    inherit system salt;
    builder = "${tools}/bin/sleep";
    args = [ (toString sleepSecs) ];
  });

  # The checksum of a large input source that the test building this writes
  # to ./big first: its upload is split into parts over several streams.
  checksum = mk "checksum" ''
    sha256sum ${builtins.path { path = ./big; name = "big-src"; }}/data.bin > $out
  '' { };

  # A copy of the large input source the test building this writes to
  # ./big first: as many bytes come back as went up.
  copy = mk "copy" ''
    cp ${builtins.path { path = ./big; name = "big-src"; }}/data.bin $out
  '' { };

  # Many small inputs (text files), each uploaded on its own.
  many = mk "many" ''
    cat ${toString (builtins.genList
      (i: builtins.toFile "many-${toString i}" "${salt} ${toString i}\n") 300)} | wc -l > $out
  '' { };

  # Trivial, and a new derivation for every nonce an impure evaluation
  # finds: a quick build that is never valid yet. drv-thru hands Nix only
  # a fixed set of variables, so the tests carry the nonce in NIX_PATH,
  # which nothing here looks up.
  fresh = mk "fresh" ''
    echo "${builtins.getEnv "NIX_PATH"}" > $out
  '' { };

  fail = mk "fail" ''
    echo "fail: some output"
    echo "fail: about to fail" >&2
    exit 3
  '' { };

  # Four independent 3-second builds and one that needs them all, for Nix's
  # scheduler to spread over several builders.
  naps = bare "naps" ''
    ${bb} cat ${toString (map (i: naps'.${"nap${toString i}"}) [ 0 1 2 3 ])} > $out
  '' { };

  # Builds only a machine that declares the big-parallel feature may take.
  big0 = big 0;
  big1 = big 1;
} // naps'
