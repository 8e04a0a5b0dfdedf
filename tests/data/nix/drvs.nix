rec {
  simple = derivation { name = "t"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo hi > $out" ]; };
  multi = derivation {
    name = "multi"; system = "x86_64-linux"; builder = "/bin/sh";
    outputs = [ "out" "dev" "lib" ];
    args = [ "-c" "echo a > $out; echo b > $dev; echo c > $lib" ];
    weird = "quote \" backslash \\ newline \n tab \t cr \r end";
  };
  fixed = derivation {
    name = "fixed"; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo hi > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "sha256-mbQw7Z1ArBONBE8MZB/Sf8Lg3ll0LCJRYVJN0wt5d2g=";
  };
  fixedRec = derivation {
    name = "fixed-rec"; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo hi > $out" ];
    outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = "0000000000000000000000000000000000000000000000000000";
  };
  dependent = derivation {
    name = "dependent"; system = "x86_64-linux"; builder = "/bin/sh";
    src = ./hello.txt;
    args = [ "-c" "cat ${simple} ${multi.dev} $src > $out" ];
  };
}
