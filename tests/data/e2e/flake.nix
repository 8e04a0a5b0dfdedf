{
  description = "drv-thru end-to-end test graph (no nixpkgs, no inputs)";
  outputs = { self }:
    let
      graph = import ./graph.nix (import ./params.nix);
    in
    {
      packages.x86_64-linux = graph // { default = graph.app; };
    };
}
