# NixOS module for drv-thru.
#
# services.drv-thru.server: the builder, a hardened `drv-thru serve` service
#   running as its own system user (never a Nix trusted user).
# services.drv-thru.client: the CLI, /etc/drv-thru/builders.json, the builder
#   signing keys Nix trusts, nix.buildMachines entries that offload Nix's own
#   builds, and the root import helper that lets users who are not trusted
#   by Nix import outputs signed by allowlisted builders.
#
# Convention for option declarations (tests/module_options.rs relies on it to
# compare this file with the option table in README.md without evaluating Nix):
#   * a comment line `# option-prefix: PATH` gives the full attribute path of
#     the options declared after it, up to the next such line; options of a
#     submodule use `<name>` for the attribute name;
#   * every option is declared on a line that starts with `NAME = lib.mkOption {`,
#     `NAME = lib.mkEnableOption` or `NAME = lib.mkPackageOption`, and those
#     three functions are used nowhere else.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib) types;

  cfg = config.services.drv-thru;
  serverCfg = cfg.server;
  clientCfg = cfg.client;
  helperCfg = cfg.client.ticketHelper;

  jsonFormat = pkgs.formats.json { };

  # The CLI's built-in defaults; the module only exports variables when an
  # option moves something away from them.
  defaultDataDir = "/var/lib/drv-thru";
  helperSocket = "/run/drv-thru/import-helper.sock";

  serverUser = "drv-thru";
  serverGroup = "drv-thru";

  # --- value checks, reported by assertions so a typo fails the rebuild -----
  # The server's values are checked by the binary itself (checkedConfigFile
  # below); these cover the client's, which no config file of the binary's
  # holds, and what the module itself relies on.

  matches = regex: value: builtins.match regex value != null;
  # `drv-thru key show` and `drv-thru status` print endpoint ids as hex.
  isEndpointId = matches "[0-9a-fA-F]{64}";
  # Nix's `NAME:BASE64` public key format.
  isSigningKey = matches "[A-Za-z0-9._-]+:[A-Za-z0-9+/]+={0,2}";
  signingKeyName = key: lib.head (lib.splitString ":" key);
  isHttpUrl = matches "https?://[^[:space:]]+";
  isRelay = value: value == "default" || value == "disabled" || isHttpUrl value;
  isSocketAddr = matches "([0-9.]+|[[][0-9A-Fa-f:.]+[]]):[0-9]+";
  isAbsolutePath = lib.hasPrefix "/";
  isStoreFile = lib.hasPrefix "${builtins.storeDir}/";
  # Builder names go verbatim into machine lines (`remote-store=NAME`).
  isBuilderName = matches "[A-Za-z0-9._-]+";
  # Systems and features are comma-separated in machine lines.
  isMachineListItem = item: matches "[A-Za-z0-9._+-]+" item && item != "-";

  # Sandboxing both services share; each adds what sets it apart.
  commonHardening = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
  };

  # --- server ---------------------------------------------------------------

  # StateDirectory= only covers /var/lib; other data directories are created
  # by tmpfiles and made writable explicitly.
  stateDirectory = lib.removePrefix "/var/lib/" serverCfg.dataDir;
  dataDirIsStateDirectory =
    lib.hasPrefix "/var/lib/" serverCfg.dataDir && stateDirectory != "";
  # Admins reach DATA_DIR/admin.sock by path, so the directory must be
  # traversable by them. 0711 lets anyone traverse but nobody list; every
  # secret in it is 0600 (drv-thru refuses to start otherwise) and the socket
  # is 0660 with the admin group.
  dataDirMode = if serverCfg.adminGroup == null then "0700" else "0711";

  listenAddress =
    if lib.hasInfix ":" serverCfg.listenAddress then
      "[${serverCfg.listenAddress}]:${toString serverCfg.listenPort}"
    else
      "${serverCfg.listenAddress}:${toString serverCfg.listenPort}";

  # A key in dataDir is the server's own, created on first start. One the
  # admin provides (sops-nix, agenix, …) reaches the service as a systemd
  # credential, so it can stay root's: systemd copies it into the service's
  # credentials directory (%d), readable by the service user alone.
  secretKeyIsCredential = !(lib.hasPrefix "${serverCfg.dataDir}/" serverCfg.secretKeyFile);
  secretKeyCredential = "secret-key";

  serverSettings = lib.recursiveUpdate (
    {
      data_dir = serverCfg.dataDir;
      # A credential's path is only known to systemd; ExecStart passes it.
      secret_key_file = if secretKeyIsCredential then null else serverCfg.secretKeyFile;
      listen = if serverCfg.listenPort == null then null else listenAddress;
      relay = serverCfg.relay;
      admin_group = serverCfg.adminGroup;
      max_concurrent_builds = serverCfg.maxConcurrentBuilds;
      output_cache_max_parallel_fills = serverCfg.outputCacheMaxParallelFills;
      recent_builds_limit = serverCfg.recentBuildsLimit;
      max_connections = serverCfg.maxConnections;
      max_unauthenticated_connections = serverCfg.maxUnauthenticatedConnections;
      max_connections_per_client = serverCfg.maxConnectionsPerClient;
      max_sessions_per_client = serverCfg.maxSessionsPerClient;
      max_sessions_per_ticket = serverCfg.maxSessionsPerTicket;
      max_sessions = serverCfg.maxSessions;
      authentication_timeout = serverCfg.authenticationTimeout;
      session_idle_timeout = serverCfg.sessionIdleTimeout;
      trusted_clients = lib.mapAttrs (_: client: {
        public_key = client.publicKey;
        max_build_time = client.maxBuildTime;
        max_upload_bytes = client.maxUploadBytes;
      }) serverCfg.trustedClients;
      # Written even when null: null means no limit, a missing field the
      # binary's default.
      cache_max_size = serverCfg.cacheMaxSize;
    }
  ) serverCfg.settings;

  serverConfigFile = jsonFormat.generate "drv-thru-server.json" serverSettings;

  # The binary checks the config when the system is built, with the parser
  # and messages it uses at start, so a value it would refuse (say a
  # maxBuildTime of "5 parsecs") fails the rebuild instead of the service.
  # A package built for another platform cannot run here; its config is
  # checked when the service starts.
  checkedConfigFile =
    if pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform then
      pkgs.runCommand "drv-thru-server.json" { } ''
        ${cfg.package}/bin/drv-thru serve --check-config ${serverConfigFile} ${lib.escapeShellArgs serverCfg.extraArgs} || {
          echo "services.drv-thru.server: drv-thru refuses the config generated from these options (the file above, merged with settings and extraArgs)" >&2
          exit 1
        }
        cp ${serverConfigFile} $out
      ''
    else
      serverConfigFile;

  # --- client ---------------------------------------------------------------

  buildersFile = jsonFormat.generate "drv-thru-builders.json" {
    builders = lib.mapAttrs (_: builder: {
      endpoint_id = builder.endpointId;
      endpoint_id_file = builder.endpointIdFile;
      ticket_file = builder.ticketFile;
      relay_url = builder.relayUrl;
      addrs = builder.addrs;
      public_key = builder.publicKey;
      systems = builder.systems;
      max_jobs = builder.maxJobs;
      speed_factor = builder.speedFactor;
      supported_features = builder.supportedFeatures;
      mandatory_features = builder.mandatoryFeatures;
    }) clientCfg.builders;
  };

  # Builders Nix's own scheduler offloads to. For host `localhost` Nix runs
  # no ssh: it starts `drv-thru --stdio --store NAME` as root and speaks
  # its worker protocol over the pipe (the same line `drv-thru machines`
  # prints).
  offloadBuilders = lib.filterAttrs (_: builder: builder.offload) clientCfg.builders;
  buildMachines = lib.mapAttrsToList (name: builder: {
    protocol = "ssh-ng";
    hostName = "localhost?remote-program=${cfg.package}/bin/drv-thru&remote-store=${name}";
    systems = if builder.systems != null then builder.systems else [ pkgs.stdenv.hostPlatform.system ];
    inherit (builder)
      maxJobs
      speedFactor
      supportedFeatures
      mandatoryFeatures
      ;
  }) offloadBuilders;

  # Keys every user's Nix accepts (nix.settings.extra-trusted-public-keys).
  globallyTrustedKeys = lib.unique (
    lib.filter (key: key != null) (
      lib.mapAttrsToList (_: builder: builder.publicKey) clientCfg.builders
    )
    ++ lib.mapAttrsToList (_: builder: builder.publicKey) clientCfg.trustedBuilders
  );
  # Keys the import helper accepts on behalf of users Nix does not trust.
  helperKeys = lib.unique (globallyTrustedKeys ++ helperCfg.trustedBuilderPublicKeys);

  helperAllowlist = pkgs.writeText "drv-thru-import-helper-keys" (
    ''
      # Builder signing keys the drv-thru import helper accepts, one per line.
      # Generated by the NixOS module from services.drv-thru.client.builders,
      # client.trustedBuilders and client.ticketHelper.trustedBuilderPublicKeys.
    ''
    + lib.concatMapStrings (key: key + "\n") helperKeys
  );

  # Every key Nix will be told to trust, with where it came from, for the
  # name-clash assertion: Nix keeps one key per name, so two different keys
  # with the same name would silently make one builder unverifiable.
  namedKeys =
    lib.mapAttrsToList (name: builder: {
      key = builder.publicKey;
      origin = "client.builders.${name}.publicKey";
    }) (lib.filterAttrs (_: builder: builder.publicKey != null) clientCfg.builders)
    ++ lib.mapAttrsToList (name: builder: {
      key = builder.publicKey;
      origin = "client.trustedBuilders.${name}.publicKey";
    }) clientCfg.trustedBuilders
    ++ lib.optionals helperCfg.enable (
      map (key: {
        inherit key;
        origin = "client.ticketHelper.trustedBuilderPublicKeys";
      }) helperCfg.trustedBuilderPublicKeys
    );
  validNamedKeys = lib.filter (entry: isSigningKey entry.key) namedKeys;
  keyNameClashes = lib.filter (
    entry:
    lib.any (
      other: signingKeyName other.key == signingKeyName entry.key && other.key != entry.key
    ) validNamedKeys
  ) validNamedKeys;

  # --- submodules -----------------------------------------------------------

  trustedClientModule = {
    # option-prefix: services.drv-thru.server.trustedClients.<name>
    options = {
      publicKey = lib.mkOption {
        type = types.str;
        description = ''
          The client's Iroh endpoint id, as printed by `drv-thru key show` on
          the client. Connections from this key may build without a ticket.
        '';
      };
      maxBuildTime = lib.mkOption {
        type = types.str;
        default = "30m";
        example = "2h";
        description = ''
          Wall-clock limit of one build by this client: numbers with units,
          e.g. `90s`, `30m`, `2h 30m`, `7days`.
        '';
      };
      maxUploadBytes = lib.mkOption {
        type = types.str;
        default = "20G";
        example = "50G";
        description = ''
          Input bytes (NAR size) one build session of this client may upload:
          a number of bytes, optionally with a unit; `20G` and `20GiB` mean
          20 GiB, `20GB` means 20·10⁹ bytes.
        '';
      };
    };
  };

  builderModule =
    { config, ... }:
    {
      # option-prefix: services.drv-thru.client.builders.<name>
      options = {
        endpointId = lib.mkOption {
          type = types.nullOr types.str;
          default = null;
          description = ''
            The builder's Iroh endpoint id (`drv-thru status` on the builder
            prints it). Set exactly one of this and `endpointIdFile`, or
            neither to take it from `ticketFile`.
          '';
        };
        endpointIdFile = lib.mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "/run/secrets/drv-thru-leviathan-endpoint-id";
          description = ''
            A file holding the builder's endpoint id, read by the CLI at build
            time, for deployments that keep builder addresses out of the Nix
            store. It must be readable by the users who run `drv-thru build`.
            Set exactly one of this and `endpointId`, or neither to take
            it from `ticketFile`.
          '';
        };
        ticketFile = lib.mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "/run/secrets/drv-thru-farm-ticket";
          description = ''
            A file holding a ticket for this builder (`drvthru…`), presented
            instead of trusted-client access; the endpoint id, addresses and
            signing key then come from the ticket unless set here. Every
            build takes one of its uses and the client cannot see how many
            are left, so create it with `--unlimited` (or plenty of `--uses`).
            Read as root by Nix's daemon when it offloads, and by the users
            who run `drv-thru build --builder`: keep it mode 0600, owned by
            whoever uses it.
          '';
        };
        relayUrl = lib.mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "https://relay.example.org";
          description = "A relay through which the builder can be reached; `null` uses address lookup.";
        };
        addrs = lib.mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "192.0.2.10:7000" ];
          description = ''
            Direct `IP:PORT` addresses of the builder (its `server.listenPort`),
            tried before relays. Needed when relays are disabled.
          '';
        };
        publicKey = lib.mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "drv-thru-leviathan-1a2b3c4d:base64…";
          description = ''
            The builder's Nix signing key (`/var/lib/drv-thru/signing-public.key`
            on the builder). It is added to `nix.settings.extra-trusted-public-keys`,
            so every user's Nix accepts paths it signed, and to the import
            helper's allowlist. Required unless `ticketFile` is set (the
            ticket carries the key, but only drv-thru reads it).
          '';
        };
        offload = lib.mkOption {
          type = types.bool;
          default = config.systems != null;
          defaultText = lib.literalExpression "systems != null";
          description = ''
            Whether Nix's own scheduler sends builds here (`nix build`,
            `nixos-rebuild`, …): the builder becomes a `nix.buildMachines`
            entry and `nix.distributedBuilds` is turned on. Defaults to on
            once `systems` is set, so a builder meant only for
            `drv-thru build --builder` stays out of Nix's way. The builder
            must trust this machine's key (`sudo drv-thru key show --machine`)
            or `ticketFile` must hold a ticket.
          '';
        };
        systems = lib.mkOption {
          type = types.nullOr (types.listOf types.str);
          default = null;
          example = [
            "x86_64-linux"
            "i686-linux"
          ];
          description = ''
            Systems Nix may build there. `null` means this machine's system
            (`pkgs.stdenv.hostPlatform.system`).
          '';
        };
        maxJobs = lib.mkOption {
          type = types.ints.positive;
          default = 1;
          description = "Builds Nix runs there at once (its `server.maxConcurrentBuilds` is a good value).";
        };
        speedFactor = lib.mkOption {
          type = types.ints.positive;
          default = 1;
          description = "Nix prefers builders with a higher speed factor when several have free slots.";
        };
        supportedFeatures = lib.mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [
            "big-parallel"
            "kvm"
          ];
          description = "System features a derivation may require (`requiredSystemFeatures`) and still be built there.";
        };
        mandatoryFeatures = lib.mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "benchmark" ];
          description = "System features a derivation must require to be built there at all.";
        };
      };
    };

  trustedBuilderModule = {
    # option-prefix: services.drv-thru.client.trustedBuilders.<name>
    options = {
      publicKey = lib.mkOption {
        type = types.str;
        description = ''
          A builder's Nix signing key. It is added to
          `nix.settings.extra-trusted-public-keys` and to the import helper's
          allowlist, for builders reached through tickets or a per-user
          `~/.config/drv-thru/builders.json`.
        '';
      };
    };
  };
in
{
  # option-prefix: services.drv-thru
  options.services.drv-thru = {
    package = lib.mkPackageOption pkgs "drv-thru" {
      extraDescription = ''
        The flake's `nixosModules.default` sets this to the flake's own
        package. The package's wrapper appends `nix` and `nom` to `PATH`; the
        services put `nix.package` in front of them.
      '';
    };

    # option-prefix: services.drv-thru.server
    server = {
      enable = lib.mkEnableOption "the drv-thru builder service (`drv-thru serve`)";

      dataDir = lib.mkOption {
        type = types.str;
        default = defaultDataDir;
        description = ''
          State directory: the Iroh key, the signing keys, tickets, the admin
          socket and the signed output cache. Paths under `/var/lib` are a
          systemd `StateDirectory`; others are created by tmpfiles. The
          directory is mode 0711 when `adminGroup` is set (admins must reach
          `admin.sock`), else 0700; the secrets in it are 0600 and owned by
          the `drv-thru` user. When it is not the default, the module exports
          `DRV_THRU_DATA_DIR` so `drv-thru ticket` and `drv-thru status` find it.
        '';
      };

      secretKeyFile = lib.mkOption {
        type = types.str;
        default = "${serverCfg.dataDir}/secret.key";
        defaultText = lib.literalExpression ''"''${config.services.drv-thru.server.dataDir}/secret.key"'';
        description = ''
          The builder's Iroh secret key (its identity, i.e. its endpoint id).
          Created on first start when it does not exist inside `dataDir`. A
          file elsewhere (e.g. from sops-nix or agenix) must already exist;
          systemd hands it to the service as a credential (`LoadCredential`),
          so it may stay owned by root and readable by root alone. Never a
          Nix store path.
        '';
      };

      listenAddress = lib.mkOption {
        type = types.str;
        default = "0.0.0.0";
        example = "::";
        description = "IP address the builder's UDP (QUIC) socket binds when `listenPort` is set.";
      };

      listenPort = lib.mkOption {
        type = types.nullOr types.port;
        default = null;
        example = 7000;
        description = ''
          UDP port for Iroh (QUIC) connections. `null` lets Iroh pick free
          ports on all interfaces; clients then reach the builder through
          relays and hole punching. A fixed port lets clients dial it
          directly (`client.builders.<name>.addrs`) and lets `openFirewall`
          open it.
        '';
      };

      openFirewall = lib.mkOption {
        type = types.bool;
        default = false;
        description = "Whether to open `listenPort` (UDP) in the NixOS firewall. Requires `listenPort`.";
      };

      relay = lib.mkOption {
        type = types.str;
        default = "default";
        example = "disabled";
        description = ''
          Iroh relays: `default` (n0's public relays and address lookup),
          `disabled` (direct addresses only, for LANs and offline networks),
          or the URL of a self-hosted relay.
        '';
      };

      adminGroup = lib.mkOption {
        type = types.nullOr types.str;
        default = "wheel";
        description = ''
          Members of this group may run `drv-thru ticket …` and
          `drv-thru status` on the builder (through `DATA_DIR/admin.sock`,
          which the server checks by peer credentials). `null` allows only
          root. The group is created if it does not exist. To hand the socket
          to the group, the service keeps `CAP_CHOWN` (only its writable
          state and cache directories can be affected).
        '';
      };

      maxConcurrentBuilds = lib.mkOption {
        type = types.ints.positive;
        default = 1;
        description = "Builds that run at once; further requests wait in a queue.";
      };

      maxConnections = lib.mkOption {
        type = types.ints.positive;
        default = 256;
        description = ''
          Authenticated Iroh connections (trusted clients, and clients that
          made an authorized call) served at once; further ones are refused.
        '';
      };

      maxUnauthenticatedConnections = lib.mkOption {
        type = types.ints.positive;
        default = 32;
        description = ''
          Iroh connections that have not authenticated yet, served at once
          besides `maxConnections` (and as many handshakes), so strangers
          cannot take clients' slots.
        '';
      };

      maxConnectionsPerClient = lib.mkOption {
        type = types.ints.positive;
        default = 8;
        description = "Iroh connections one client endpoint id may hold at once.";
      };

      maxSessionsPerClient = lib.mkOption {
        type = types.ints.positive;
        default = 8;
        description = "Build sessions one client endpoint id may hold open (or being admitted) at once.";
      };

      maxSessionsPerTicket = lib.mkOption {
        type = types.ints.positive;
        default = 8;
        description = ''
          Build sessions one ticket may have open at once (client keys are
          free to make, so the per-client cap alone does not bound a ticket).
        '';
      };

      maxSessions = lib.mkOption {
        type = types.ints.positive;
        default = 64;
        description = "Build sessions the builder holds open at once, all clients together.";
      };

      sessionIdleTimeout = lib.mkOption {
        type = types.str;
        default = "5m";
        description = ''
          How long an admitted build session may wait without starting its
          build or making upload progress before it is ended, e.g. `"5m"`.
        '';
      };

      authenticationTimeout = lib.mkOption {
        type = types.str;
        default = "20s";
        description = ''
          How long a new connection has to make its first authorized call
          (trusted clients need none) before it is closed, e.g. `"20s"`.
        '';
      };

      outputCacheMaxParallelFills = lib.mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = ''
          Entries of the signed output cache compressed and signed in
          parallel; `null` picks a value from the CPU count.
        '';
      };

      recentBuildsLimit = lib.mkOption {
        type = types.ints.positive;
        default = 20;
        description = "Finished builds kept for `drv-thru status`.";
      };

      cacheMaxSize = lib.mkOption {
        type = types.nullOr types.str;
        default = "20G";
        example = "50G";
        description = ''
          Size limit of the signed output cache in `dataDir/cache`, written
          like `trustedClients.<name>.maxUploadBytes`; the least recently
          used entries are pruned beyond it. `null` keeps it unbounded.
        '';
      };

      trustedClients = lib.mkOption {
        type = types.attrsOf (types.submodule trustedClientModule);
        default = { };
        example = lib.literalExpression ''
          {
            alex = {
              publicKey = "client-iroh-endpoint-id";
              maxBuildTime = "30m";
              maxUploadBytes = "20G";
            };
          }
        '';
        description = ''
          Clients that may build without a ticket, by a name shown in
          `drv-thru status`. Ticket builds are unaffected.
        '';
      };

      settings = lib.mkOption {
        type = types.attrsOf jsonFormat.type;
        default = { };
        example = {
          max_connections = 64;
        };
        description = ''
          Raw entries merged over the JSON config the module generates, for
          settings without an option. The system build runs
          `drv-thru serve --check-config` on the result, which rejects
          unknown keys and bad values, so a typo fails the rebuild instead
          of being ignored.
        '';
      };

      extraArgs = lib.mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "-v" ];
        description = "Extra command-line arguments for `drv-thru serve`; they override the generated config.";
      };
    };

    # option-prefix: services.drv-thru.client
    client = {
      enable = lib.mkEnableOption "the drv-thru client: the CLI, `/etc/drv-thru/builders.json`, trusted builder keys and (by default) the import helper";

      relay = lib.mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "disabled";
        description = ''
          Relay mode of the CLI for all users (`DRV_THRU_RELAY` in login
          sessions): `default`, `disabled` or a relay URL. `null` leaves the
          CLI's default (n0's public relays).
        '';
      };

      narFetches = lib.mkOption {
        type = types.nullOr (types.ints.between 1 16);
        default = null;
        description = ''
          NAR parts the CLI moves at once, each over a QUIC stream of its
          own, for output downloads and input uploads (`DRV_THRU_NAR_FETCHES`
          in login sessions; the `--nar-fetches` flag). One stream carries
          about its window divided by the round-trip time, so long links want
          several. `null` leaves the CLI's choice: one stream on paths under
          5 ms round trip, four beyond.
        '';
      };

      compress = lib.mkOption {
        type = types.enum [
          "auto"
          "always"
          "never"
        ];
        default = "auto";
        description = ''
          Whether the CLI compresses NAR transfers (inputs up, outputs down)
          with zstd on the fly (`DRV_THRU_COMPRESS` in login sessions; the
          `--compress` flag). `auto` does when the link is slower than the
          machine's compressor, never on loopback.
        '';
      };

      builders = lib.mkOption {
        type = types.attrsOf (types.submodule builderModule);
        default = { };
        example = lib.literalExpression ''
          {
            leviathan = {
              endpointIdFile = "/run/secrets/drv-thru-leviathan-endpoint-id";
              addrs = [ "192.0.2.10:7000" ];
              publicKey = "drv-thru-leviathan-1a2b3c4d:base64…";
            };
          }
        '';
        description = ''
          Named builders for `drv-thru build --builder NAME`, written to
          `/etc/drv-thru/builders.json` (a user's
          `~/.config/drv-thru/builders.json` overrides entries of the same
          name). Their signing keys are trusted by Nix for every user. Those
          with `offload` (on once `systems` is set) also take the builds of
          Nix's own scheduler, as `nix.buildMachines` entries.
        '';
      };

      trustedBuilders = lib.mkOption {
        type = types.attrsOf (types.submodule trustedBuilderModule);
        default = { };
        example = lib.literalExpression ''
          { other.publicKey = "drv-thru-other-5e6f7a8b:base64…"; }
        '';
        description = ''
          Builders whose signed outputs Nix accepts for every user, without
          a system-wide address entry.
        '';
      };

      # option-prefix: services.drv-thru.client.ticketHelper
      ticketHelper = {
        enable = lib.mkOption {
          type = types.bool;
          default = clientCfg.enable;
          defaultText = lib.literalExpression "config.services.drv-thru.client.enable";
          description = ''
            Whether to run the import helper: a root service that imports
            outputs signed by an allowlisted builder key for users Nix does
            not trust (`nix copy` from the CLI's loopback cache, signatures
            required). It accepts only allowlisted keys, loopback cache URLs
            and exact store paths. Its socket is
            `${helperSocket}`, reachable by `group` only.
          '';
        };

        group = lib.mkOption {
          type = types.str;
          default = "wheel";
          description = ''
            Group whose members may use the import helper. The group is
            created if it does not exist.
          '';
        };

        trustedBuilderPublicKeys = lib.mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "drv-thru-leviathan-1a2b3c4d:base64…" ];
          description = ''
            Builder signing keys the import helper accepts in addition to
            those of `builders` and `trustedBuilders`. Unlike those, they are
            not added to Nix's trusted keys: only members of `group` can
            import paths they signed, through the helper.
          '';
        };
      };
    };
  };

  config = lib.mkMerge [
    (lib.mkIf (serverCfg.enable || clientCfg.enable) {
      environment.systemPackages = [ cfg.package ];
    })

    (lib.mkIf serverCfg.enable {
      # The binary checks the values (checkedConfigFile); these are the
      # module's own rules: dataDir names the StateDirectory and decides
      # whether secretKeyFile is a credential, which systemd loads by
      # absolute path.
      assertions = [
        {
          assertion = isAbsolutePath serverCfg.dataDir && !(lib.hasSuffix "/" serverCfg.dataDir);
          message = "services.drv-thru.server.dataDir must be an absolute path without a trailing slash, not \"${serverCfg.dataDir}\".";
        }
        {
          assertion = isAbsolutePath serverCfg.secretKeyFile && !(isStoreFile serverCfg.secretKeyFile);
          message = "services.drv-thru.server.secretKeyFile must be an absolute path outside the world-readable Nix store, not \"${serverCfg.secretKeyFile}\".";
        }
        {
          assertion = serverCfg.openFirewall -> serverCfg.listenPort != null;
          message = "services.drv-thru.server.openFirewall needs a fixed services.drv-thru.server.listenPort.";
        }
      ];

      warnings =
        lib.optional (lib.elem serverUser (config.nix.settings.trusted-users or [ ]))
          "services.drv-thru: the drv-thru user is in nix.settings.trusted-users. drv-thru does not need it, and it makes the network-facing service root-equivalent; remove it.";

      users.users.${serverUser} = {
        isSystemUser = true;
        group = serverGroup;
        description = "drv-thru builder service";
        home = "/var/empty";
      };
      users.groups = {
        ${serverGroup} = { };
      } // lib.optionalAttrs (serverCfg.adminGroup != null) { ${serverCfg.adminGroup} = { }; };

      networking.firewall.allowedUDPPorts = lib.mkIf (
        serverCfg.openFirewall && serverCfg.listenPort != null
      ) [ serverCfg.listenPort ];

      environment.sessionVariables = lib.mkIf (serverCfg.dataDir != defaultDataDir) {
        DRV_THRU_DATA_DIR = serverCfg.dataDir;
      };

      systemd.tmpfiles.rules = lib.mkIf (!dataDirIsStateDirectory) [
        "d ${serverCfg.dataDir} ${dataDirMode} ${serverUser} ${serverGroup} - -"
      ];

      systemd.services.drv-thru = {
        description = "drv-thru remote Nix builder";
        documentation = [ "https://github.com/adeci/drv-thru" ];
        wantedBy = [ "multi-user.target" ];
        # Tickets carry the builder's current addresses, so start once the
        # network is configured; builds go through the Nix daemon.
        wants = [ "network-online.target" ];
        requires = [ "nix-daemon.socket" ];
        after = [
          "network-online.target"
          "nix-daemon.socket"
        ];
        path = [ config.nix.package ];
        environment = {
          # nix writes its caches (and may create ~/.local/state/nix) under
          # HOME; with ProtectSystem=strict only the service's own
          # directories are writable, so point both at the cache directory.
          HOME = "/var/cache/drv-thru";
          XDG_CACHE_HOME = "/var/cache/drv-thru";
          # The server runs `nix` subcommands; enable them for this service
          # only instead of changing the builder's global Nix settings.
          NIX_CONFIG = "extra-experimental-features = nix-command";
        };
        serviceConfig = commonHardening // {
          # The builder says READY=1 once both its Iroh endpoint and its
          # admin socket accept, so units ordered after it (and
          # `systemctl start`) wait for a builder that answers.
          Type = "notify";
          # Every connection, NAR stream, upload and cache entry holds
          # files; systemd's default soft limit of 1024 is below what the
          # connection budgets alone allow.
          LimitNOFILE = 16384;
          ExecStart = lib.concatStringsSep " " (
            [
              (utils.escapeSystemdExecArgs [
                "${cfg.package}/bin/drv-thru"
                "serve"
                "--config"
                "${checkedConfigFile}"
              ])
            ]
            # Unescaped: %d is systemd's specifier for the credentials
            # directory, which escaping would turn into a literal "%d".
            ++ lib.optional secretKeyIsCredential "--secret-key-file %d/${secretKeyCredential}"
            ++ lib.optional (serverCfg.extraArgs != [ ]) (utils.escapeSystemdExecArgs serverCfg.extraArgs)
          );
          User = serverUser;
          Group = serverGroup;
          CacheDirectory = "drv-thru";
          CacheDirectoryMode = "0700";
          UMask = "0077";
          Restart = "on-failure";
          RestartSec = "5s";

          # Sandboxing. Deliberately absent: PrivateUsers (peer credentials
          # on admin.sock would map to nobody) and ProtectProc=invisible
          # (the admin check reads the caller's /proc/PID/status for its
          # supplementary groups).
          # CAP_CHOWN only to hand admin.sock to the admin group; under
          # ProtectSystem=strict it reaches nothing but the service's own
          # writable directories.
          CapabilityBoundingSet = if serverCfg.adminGroup == null then [ "" ] else [ "CAP_CHOWN" ];
          AmbientCapabilities = if serverCfg.adminGroup == null then [ "" ] else [ "CAP_CHOWN" ];
          RemoveIPC = true;
          # @resources stays allowed: nix raises its stack limit with
          # setrlimit. @chown is re-allowed for admin.sock (see above).
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
            "@chown"
          ];
          # NETLINK: Iroh watches interfaces and routes to learn its
          # direct addresses.
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
            "AF_NETLINK"
          ];
        }
        // lib.optionalAttrs secretKeyIsCredential {
          LoadCredential = "${secretKeyCredential}:${serverCfg.secretKeyFile}";
        }
        // (
          if dataDirIsStateDirectory then
            {
              StateDirectory = stateDirectory;
              StateDirectoryMode = dataDirMode;
            }
          else
            { ReadWritePaths = [ serverCfg.dataDir ]; }
        );
      };
    })

    (lib.mkIf clientCfg.enable {
      assertions =
        [
          {
            assertion = clientCfg.relay == null || isRelay clientCfg.relay;
            message = "services.drv-thru.client.relay must be null, \"default\", \"disabled\" or an http(s) relay URL, not \"${toString clientCfg.relay}\".";
          }
          {
            assertion = keyNameClashes == [ ];
            message =
              "services.drv-thru.client: Nix trusts one signing key per key name, but these options give different keys the same name: "
              + lib.concatMapStringsSep ", " (entry: "${entry.origin} (${entry.key})") keyNameClashes
              + ". Keep one of them, or give the builders distinct key names.";
          }
        ]
        ++ lib.concatLists (
          lib.mapAttrsToList (name: builder: [
            {
              assertion = isBuilderName name;
              message = "services.drv-thru.client.builders.\"${name}\": a builder name may hold only letters, digits and . _ - (it goes into Nix's machine lines).";
            }
            {
              assertion =
                !(builder.endpointId != null && builder.endpointIdFile != null)
                && (builder.endpointId != null || builder.endpointIdFile != null || builder.ticketFile != null);
              message = "services.drv-thru.client.builders.${name}: set exactly one of endpointId and endpointIdFile, or a ticketFile.";
            }
            {
              assertion =
                builder.ticketFile == null
                || (isAbsolutePath builder.ticketFile && !(isStoreFile builder.ticketFile));
              message = "services.drv-thru.client.builders.${name}.ticketFile must be an absolute path outside the world-readable Nix store, not \"${toString builder.ticketFile}\".";
            }
            {
              assertion = lib.all isMachineListItem (
                lib.optionals (builder.systems != null) builder.systems
                ++ builder.supportedFeatures
                ++ builder.mandatoryFeatures
              );
              message = "services.drv-thru.client.builders.${name}: systems and features may hold only letters, digits and . _ + - (they are comma-separated in Nix's machine lines).";
            }
            {
              assertion = builder.endpointId == null || isEndpointId builder.endpointId;
              message = "services.drv-thru.client.builders.${name}.endpointId must be the builder's endpoint id (64 hexadecimal characters, printed by `drv-thru status` on the builder), not \"${toString builder.endpointId}\".";
            }
            {
              assertion =
                builder.endpointIdFile == null
                || (isAbsolutePath builder.endpointIdFile && !(isStoreFile builder.endpointIdFile));
              message = "services.drv-thru.client.builders.${name}.endpointIdFile must be an absolute path outside the Nix store (use endpointId for a value that may be public), not \"${toString builder.endpointIdFile}\".";
            }
            {
              assertion = builder.relayUrl == null || isHttpUrl builder.relayUrl;
              message = "services.drv-thru.client.builders.${name}.relayUrl must be an http(s) URL, not \"${toString builder.relayUrl}\".";
            }
            {
              assertion = lib.all isSocketAddr builder.addrs;
              message = "services.drv-thru.client.builders.${name}.addrs must be IP:PORT addresses (IPv6 as [ADDR]:PORT), not ${builtins.toJSON builder.addrs}.";
            }
            {
              assertion =
                if builder.publicKey == null then builder.ticketFile != null else isSigningKey builder.publicKey;
              message = "services.drv-thru.client.builders.${name}.publicKey must be a Nix signing key NAME:BASE64 (the builder's /var/lib/drv-thru/signing-public.key), not \"${toString builder.publicKey}\"; only a builder with a ticketFile may leave it unset.";
            }
          ]) clientCfg.builders
        )
        ++ lib.mapAttrsToList (name: builder: {
          assertion = isSigningKey builder.publicKey;
          message = "services.drv-thru.client.trustedBuilders.${name}.publicKey must be a Nix signing key NAME:BASE64 (the builder's /var/lib/drv-thru/signing-public.key), not \"${builder.publicKey}\".";
        }) clientCfg.trustedBuilders;

      # `drv-thru build` evaluates flake installables with the user's Nix.
      # The extra-* forms add to NixOS's defaults instead of replacing them
      # (a plain trusted-public-keys definition would drop cache.nixos.org).
      nix.settings.extra-experimental-features = [
        "nix-command"
        "flakes"
      ];
      nix.settings.extra-trusted-public-keys = lib.mkIf (globallyTrustedKeys != [ ]) globallyTrustedKeys;

      environment.etc."drv-thru/builders.json" = lib.mkIf (clientCfg.builders != { }) {
        source = buildersFile;
      };

      nix.buildMachines = buildMachines;
      nix.distributedBuilds = lib.mkIf (offloadBuilders != { }) true;

      environment.sessionVariables =
        lib.optionalAttrs (clientCfg.relay != null) { DRV_THRU_RELAY = clientCfg.relay; }
        // lib.optionalAttrs (clientCfg.narFetches != null) {
          DRV_THRU_NAR_FETCHES = toString clientCfg.narFetches;
        }
        // lib.optionalAttrs (clientCfg.compress != "auto") { DRV_THRU_COMPRESS = clientCfg.compress; };
    })

    (lib.mkIf helperCfg.enable {
      assertions = [
        {
          assertion = clientCfg.enable;
          message = "services.drv-thru.client.ticketHelper.enable needs services.drv-thru.client.enable (the helper trusts the client's builder keys).";
        }
        {
          assertion = lib.all isSigningKey helperCfg.trustedBuilderPublicKeys;
          message = "services.drv-thru.client.ticketHelper.trustedBuilderPublicKeys must hold Nix signing keys NAME:BASE64 (a builder's /var/lib/drv-thru/signing-public.key); these are not: ${
            builtins.toJSON (lib.filter (key: !(isSigningKey key)) helperCfg.trustedBuilderPublicKeys)
          }.";
        }
      ];

      users.groups.${helperCfg.group} = { };

      systemd.services.drv-thru-import-helper = {
        description = "drv-thru import helper (signed builder outputs for untrusted Nix users)";
        documentation = [ "https://github.com/adeci/drv-thru" ];
        wantedBy = [ "multi-user.target" ];
        requires = [ "nix-daemon.socket" ];
        after = [ "nix-daemon.socket" ];
        path = [ config.nix.package ];
        environment = {
          # Import through the daemon, which checks the signatures; the
          # helper itself never writes to /nix.
          NIX_REMOTE = "daemon";
          # `nix copy` keeps a binary-cache database under XDG_CACHE_HOME.
          HOME = "/var/cache/drv-thru-import-helper";
          XDG_CACHE_HOME = "/var/cache/drv-thru-import-helper";
        };
        serviceConfig = commonHardening // {
          Type = "simple";
          ExecStart = utils.escapeSystemdExecArgs [
            "${cfg.package}/bin/drv-thru"
            "import-helper"
            "--socket"
            helperSocket
            "--trusted-public-key-file"
            "${helperAllowlist}"
          ];
          # Root so the daemon treats its imports as trusted; the allowlist
          # and the daemon's signature check are what limit them.
          User = "root";
          Group = helperCfg.group;
          # /run/drv-thru is root:GROUP 0750, so only the group reaches the
          # socket whatever mode it has; UMask keeps other bits off anyway.
          RuntimeDirectory = "drv-thru";
          RuntimeDirectoryMode = "0750";
          CacheDirectory = "drv-thru-import-helper";
          CacheDirectoryMode = "0700";
          UMask = "0007";
          Restart = "on-failure";
          RestartSec = "5s";

          # Root without capabilities: it only talks to the daemon socket,
          # its own socket and the CLI's loopback cache.
          CapabilityBoundingSet = [ "" ];
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
            "@chown"
          ];
          # No PrivateNetwork: the cache it imports from is the CLI's
          # loopback HTTP server in the host's network namespace. IP
          # traffic is limited to loopback instead.
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
          ];
          IPAddressDeny = "any";
          IPAddressAllow = "localhost";
        };
      };
    })
  ];
}
