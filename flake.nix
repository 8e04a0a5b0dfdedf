{
  description = "drv-thru: peer-to-peer remote Nix builds over Iroh";

  # 26.05: Rust >= 1.91 (iroh's minimum) and still x86_64-darwin.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);

      mkDrvThru =
        pkgs:
        pkgs.rustPlatform.buildRustPackage {
          pname = "drv-thru";
          inherit (cargoToml.package) version;

          # Only what cargo reads, so README or module edits do not rebuild.
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./build.rs
              ./proto
              ./src
            ];
          };
          cargoLock.lockFile = ./Cargo.lock;

          # build.rs compiles the protos with protox: no protoc needed.
          nativeBuildInputs = [ pkgs.makeBinaryWrapper ];

          # The test suite needs a real Nix store, user namespaces and local
          # sockets, which the build sandbox does not offer; CI runs it.
          doCheck = false;

          # `nix` and `nom` go last on PATH: the system's Nix (on NixOS, the
          # module puts nix.package first) wins, these are the fallback.
          postInstall = ''
            wrapProgram $out/bin/drv-thru \
              --suffix PATH : ${
                lib.makeBinPath [
                  pkgs.nix
                  pkgs.nix-output-monitor
                ]
              }
          '';

          meta = {
            description = "Peer-to-peer remote Nix builds over Iroh, with one-time build tickets";
            homepage = "https://github.com/adeci/drv-thru";
            mainProgram = "drv-thru";
            platforms = lib.platforms.linux ++ lib.platforms.darwin;
          };
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        drv-thru = mkDrvThru pkgs;
        default = drv-thru;
      });

      apps = forAllSystems (
        pkgs:
        let
          app = {
            type = "app";
            program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.drv-thru}/bin/drv-thru";
            meta.description = "The drv-thru CLI (build, ticket, status, key)";
          };
        in
        {
          default = app;
          drv-thru = app;
        }
      );

      overlays.default = final: _prev: { drv-thru = mkDrvThru final; };

      # module.nix defaults `package` to pkgs.drv-thru (the overlay); through
      # the flake it defaults to the flake's own build instead.
      nixosModules.drv-thru =
        { lib, pkgs, ... }:
        {
          imports = [ ./module.nix ];
          services.drv-thru.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
      nixosModules.default = self.nixosModules.drv-thru;

      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
        in
        {
          package = self.packages.${system}.default;
        }
        // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
          nixos = import ./tests/nixos {
            inherit pkgs;
            drvThruModule = self.nixosModules.default;
          };
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.drv-thru ];
          packages = [
            pkgs.clippy
            pkgs.rustfmt
            pkgs.rust-analyzer
            pkgs.nix-output-monitor
            pkgs.nixfmt
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt);
    };
}
