//! `drv-thru serve --check-config`, as the NixOS module runs it when the
//! system is built: no root, no network, no data directory.

use std::{
    fs,
    os::unix::{fs::MetadataExt, fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::{Command, Output},
};

const CLIENT: &str = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";

/// Runs `serve --check-config` on `config` as an unprivileged user (nobody,
/// when the tests run as root), offline and without inherited settings.
fn check_config(dir: &Path, config: &str) -> Output {
    let file = dir.join("server.json");
    fs::write(&file, config).unwrap();
    // Readable by nobody, for the run as nobody below.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_drv-thru"));
    command
        .args(["serve", "--check-config"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .env_remove("DRV_THRU_DATA_DIR")
        .env("DRV_THRU_RELAY", "disabled");
    if fs::metadata("/proc/self").unwrap().uid() == 0 {
        command.uid(65534).gid(65534);
    }
    command.output().unwrap()
}

fn config(data_dir: &Path, max_build_time: &str) -> String {
    format!(
        r#"{{
  "data_dir": "{}",
  "listen": "0.0.0.0:7000",
  "cache_max_size": "50G",
  "trusted_clients": {{
    "alex": {{ "public_key": "{CLIENT}", "max_build_time": "{max_build_time}", "max_upload_bytes": "20G" }}
  }}
}}"#,
        data_dir.display()
    )
}

#[test]
fn a_good_config_passes_silently_without_touching_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let output = check_config(dir.path(), &config(&data_dir, "2h 30m"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.stdout.is_empty() && output.stderr.is_empty());
    assert!(!data_dir.exists(), "the check created the data directory");
}

#[test]
fn a_duration_the_server_refuses_fails_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let output = check_config(dir.path(), &config(&dir.path().join("data"), "5 parsecs"));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("invalid duration").count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("server.json")
            && stderr.contains(r#"invalid duration "5 parsecs""#),
        "{stderr}"
    );
}
