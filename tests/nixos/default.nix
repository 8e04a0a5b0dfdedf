# NixOS VM test of module.nix and the CLI: a builder and a client on the test
# VLAN, relays disabled, no network beyond it and no nixpkgs inside the VMs.
#
#   builder  services.drv-thru.server on a fixed UDP port, with pre-seeded keys
#            so the client's configuration can name them
#   client   services.drv-thru.client; the builder's signing key is only in the
#            import helper's allowlist, so users Nix does not trust import
#            outputs through the helper. The `trusted` specialisation adds the
#            builder to client.builders (builders.json + trusted-public-keys).
#
# Scenarios: a ticket build by an untrusted user (helper path), a user outside
# the helper group refused, and a trusted-client build with `--builder`.
#
# Run with `nix flake check` or `nix build .#checks.x86_64-linux.nixos`.
{ pkgs, drvThruModule }:
let
  inherit (pkgs) lib;
  system = pkgs.stdenv.hostPlatform.system;
  port = 7000;

  # Keys for this test only; they are public, never use them anywhere else.
  # Made with `nix-store --generate-binary-cache-key drv-thru-vmtest-builder sk pk`
  # and `drv-thru key show --key-file FILE` (which creates FILE and prints its id).
  builderSigningSecret = "drv-thru-vmtest-builder:GyR5VPdL9sK3OZIrrd/FOecjMx2aNK0sc8hWiywZZxo2wW9IY8vKgBNE0H71ksZd9f1QeYTLd47oVYwEqwz97A==";
  builderSigningPublic = "drv-thru-vmtest-builder:NsFvSGPLyoATRNB+9ZLGXfX9UHmEy3eO6FWMBKsM/ew=";
  builderIrohSecret = "8a4bb3971e771ca088ff6b7d706564f495214333c66f6889a055ee237e9f7aea";
  builderEndpointId = "23120631b30a2ad1076c919fad963e47bf6c005966efd2e2d182eb8d70af7925";
  aliceIrohSecret = "7caf70eb0d05fec4b5092254961fc14a1dfb5b5d6920e74e1602f628c6d94e0e";
  aliceEndpointId = "d15c7d5f5de18fe0baa33c09df30a51785b4fc8641581137a7b6fc6ae20ec880";

  # Input-free derivations: /bin/sh is the Nix sandbox's shell, so nothing
  # has to be uploaded or substituted. Each scenario has its own output, so
  # none is valid on the client beforehand.
  testFlake = pkgs.writeTextDir "flake.nix" ''
    {
      outputs = { self }:
        let
          trivial = name: derivation {
            inherit name;
            system = "${system}";
            builder = "/bin/sh";
            args = [ "-c" "echo built by drv-thru > $out" ];
          };
        in
        {
          packages.${system} = {
            ticket = trivial "drv-thru-vmtest-ticket";
            refused = trivial "drv-thru-vmtest-refused";
            trusted = trivial "drv-thru-vmtest-trusted";
          };
        };
    }
  '';

  offline = {
    nix.settings.substituters = lib.mkForce [ ];
  };
in
pkgs.testers.runNixOSTest {
  name = "drv-thru";

  nodes.builder = {
    imports = [
      drvThruModule
      offline
    ];

    users.users.admin = {
      isNormalUser = true;
      extraGroups = [ "wheel" ];
    };
    users.users.guest.isNormalUser = true;

    # The endpoint id must be known when the client is configured: use
    # secretKeyFile with a fixed key, and seed the signing key the server would
    # otherwise generate on first start. The key stays root's: the service
    # gets it as a systemd credential.
    environment.etc."drv-thru-test/iroh.key" = {
      text = builderIrohSecret;
      mode = "0400";
    };
    systemd.tmpfiles.rules = [
      "d /var/lib/drv-thru 0711 drv-thru drv-thru - -"
      "C /var/lib/drv-thru/signing-secret.key - - - - ${pkgs.writeText "signing-secret.key" builderSigningSecret}"
      "z /var/lib/drv-thru/signing-secret.key 0600 drv-thru drv-thru - -"
    ];

    services.drv-thru.server = {
      enable = true;
      listenPort = port;
      openFirewall = true;
      relay = "disabled";
      secretKeyFile = "/etc/drv-thru-test/iroh.key";
      trustedClients.alice.publicKey = aliceEndpointId;
    };
  };

  nodes.client =
    { nodes, ... }:
    {
      imports = [
        drvThruModule
        offline
      ];

      # alice is in the helper group (wheel), bob is not; Nix trusts neither.
      users.users.alice = {
        isNormalUser = true;
        extraGroups = [ "wheel" ];
      };
      users.users.bob.isNormalUser = true;

      environment.etc."drv-thru-test/flake".source = testFlake;
      environment.etc."drv-thru-test/alice.key".text = aliceIrohSecret;

      services.drv-thru.client = {
        enable = true;
        relay = "disabled";
        ticketHelper.trustedBuilderPublicKeys = [ builderSigningPublic ];
      };

      specialisation.trusted.configuration = {
        services.drv-thru.client.builders.builder = {
          endpointId = builderEndpointId;
          addrs = [ "${nodes.builder.networking.primaryIPAddress}:${toString port}" ];
          publicKey = builderSigningPublic;
        };
      };
    };

  testScript =
    { nodes, ... }:
    ''
      import shlex


      def as_user(user: str, command: str) -> str:
          # A login shell, so the module's session variables (DRV_THRU_RELAY) apply.
          return f"su - {user} -c {shlex.quote(command)}"


      def new_ticket(name: str) -> str:
          return builder.succeed(as_user("admin", f"drv-thru ticket create --name {name}")).strip()


      start_all()
      builder.wait_for_unit("drv-thru.service")
      builder.wait_for_file("/var/lib/drv-thru/admin.sock")
      client.wait_for_unit("drv-thru-import-helper.service")
      client.wait_for_file("/run/drv-thru/import-helper.sock")

      for user in ["alice", "bob"]:
          client.succeed(as_user(user, "cp -rL /etc/drv-thru-test/flake ~/flake && chmod -R u+w ~/flake"))
      client.succeed(as_user("alice", "install -D -m 0600 /etc/drv-thru-test/alice.key ~/.config/drv-thru/secret.key"))
      client.succeed(as_user("alice", "drv-thru key show") + " | grep -qx ${aliceEndpointId}")

      with subtest("builder secrets stay with the service user"):
          builder.succeed("test \"$(stat -c %a /var/lib/drv-thru)\" = 711")
          for secret in ["signing-secret.key", "ticket-secret.key"]:
              builder.succeed(f"test \"$(stat -c %a:%U /var/lib/drv-thru/{secret})\" = 600:drv-thru")
          builder.fail(as_user("admin", "cat /var/lib/drv-thru/signing-secret.key"))
          builder.succeed("grep -qxF ${lib.escapeShellArg builderSigningPublic} /var/lib/drv-thru/signing-public.key")
          builder.succeed("test \"$(stat -c %a:%U /etc/drv-thru-test/iroh.key)\" = 400:root")
          builder.succeed(as_user("admin", "drv-thru status") + " | grep -q ${builderEndpointId}")
          builder.fail("grep -E '^trusted-users.*drv-thru' /etc/nix/nix.conf")

      with subtest("the admin group manages the builder, other users do not"):
          builder.succeed(as_user("admin", "drv-thru status"))
          builder.succeed(as_user("admin", "drv-thru ticket list"))
          builder.fail(as_user("guest", "drv-thru ticket list"))

      with subtest("ticket build by an untrusted user, imported through the helper"):
          client.fail("grep -q drv-thru-vmtest-builder /etc/nix/nix.conf")
          ticket = new_ticket("alice")
          client.succeed(as_user("alice", f"drv-thru build --no-nom path:$HOME/flake#ticket --ticket {shlex.quote(ticket)}"))
          client.succeed("grep -qx 'built by drv-thru' /nix/store/*-drv-thru-vmtest-ticket")
          client.succeed("nix path-info --sigs /nix/store/*-drv-thru-vmtest-ticket | grep -q drv-thru-vmtest-builder:")
          builder.succeed("test -e /nix/store/*-drv-thru-vmtest-ticket")

      with subtest("a user outside the helper group cannot import"):
          client.succeed("test \"$(stat -c %a:%U:%G /run/drv-thru)\" = 750:root:wheel")
          client.fail(as_user("bob", "test -e /run/drv-thru/import-helper.sock"))
          ticket = new_ticket("bob")
          client.fail(as_user("bob", f"drv-thru build --no-nom path:$HOME/flake#refused --ticket {shlex.quote(ticket)}"))
          client.fail("test -e /nix/store/*-drv-thru-vmtest-refused")

      with subtest("trusted client builds by builder name, without a ticket"):
          client.succeed("${nodes.client.system.build.toplevel}/specialisation/trusted/bin/switch-to-configuration test")
          client.succeed("grep -q ${builderEndpointId} /etc/drv-thru/builders.json")
          client.succeed("grep -q drv-thru-vmtest-builder /etc/nix/nix.conf")
          client.succeed(as_user("alice", "drv-thru build --no-nom path:$HOME/flake#trusted --builder builder"))
          client.succeed("grep -qx 'built by drv-thru' /nix/store/*-drv-thru-vmtest-trusted")
          builder.succeed("test -e /nix/store/*-drv-thru-vmtest-trusted")
    '';
}
