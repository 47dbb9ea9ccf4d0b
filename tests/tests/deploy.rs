//! What an operator touches first: the systemd unit, the demo command from
//! the README, and the README's two commands themselves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gateway_tests::{gateway_bin, require_tool, run_with_timeout, TempDir};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `systemd-analyze verify` in a throwaway root holding the unit, our
/// binary at its `ExecStart` path, and the system's own units. Verify exits
/// 0 even for unknown keys or unparsable values (it only warns), so any
/// output at all is a failure too.
#[test]
fn systemd_unit_verifies() {
    require_tool("systemd-analyze");
    let root = TempDir::new("sd-root");
    let unit_src = repo_root().join("systemd/mcp-tls-gateway.service");
    let unit = std::fs::read_to_string(&unit_src).expect("unit file");
    assert!(unit.contains("Type=notify"), "the gateway speaks sd_notify");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart line");
    let exec_path = exec.split_whitespace().next().expect("ExecStart binary");
    // Every command the unit runs must exist in the scratch root: the
    // gateway (this build), and system tools (e.g. kill for ExecReload)
    // copied from this host.
    for line in unit.lines().filter(|l| l.starts_with("Exec")) {
        let Some((_, cmd)) = line.split_once('=') else {
            continue;
        };
        let path = cmd.trim_start_matches(['-', '@', '+', '!', ':']);
        let path = path.split_whitespace().next().expect("Exec binary");
        let dst = root.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        if path == exec_path {
            std::fs::copy(gateway_bin(), &dst).expect("copy gateway binary");
        } else {
            std::fs::copy(path, &dst).unwrap_or_else(|e| panic!("copy {path}: {e}"));
        }
    }
    let unit_dir = root.join("etc/systemd/system");
    std::fs::create_dir_all(&unit_dir).unwrap();
    std::fs::copy(&unit_src, unit_dir.join("mcp-tls-gateway.service")).unwrap();
    // The targets the unit orders itself against.
    let sys_units = root.join("lib/systemd/system");
    std::fs::create_dir_all(&sys_units).unwrap();
    for dir in ["/lib/systemd/system", "/usr/lib/systemd/system"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_file() {
                    let _ = std::fs::copy(&p, sys_units.join(e.file_name()));
                }
            }
        }
    }
    let out = run_with_timeout(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg("mcp-tls-gateway.service"),
        None,
        false,
        Duration::from_secs(60),
    );
    let text = format!("{}{}", out.stdout_str(), out.stderr_str());
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify warned:\n{text}"
    );
}

/// The README's first command, with flags that make it end by itself.
#[test]
fn demo_runs_end_to_end() {
    let dir = TempDir::new("demo");
    let out = run_with_timeout(
        Command::new(gateway_bin())
            .args([
                "demo",
                "--port",
                "0",
                "--traffic-secs",
                "1",
                "--exit-after",
                "0s",
                "--dir",
            ])
            .arg(dir.path()),
        None,
        false,
        Duration::from_secs(60),
    );
    let stdout = out.stdout_str();
    assert!(
        out.status.success(),
        "demo failed: {}\n{}\n{}",
        out.status,
        stdout,
        out.stderr_str()
    );
    assert!(stdout.contains("JSON-RPC requests answered"), "{stdout}");
    assert!(stdout.contains(" 0 errors"), "{stdout}");
    assert!(stdout.contains("400 Bad Request"), "{stdout}");
    assert!(stdout.contains("curl --cacert"), "{stdout}");
    assert!(stdout.contains("Stopped cleanly."), "{stdout}");
    for f in ["ca.pem", "chain.pem", "key.pem"] {
        assert!(dir.join(f).exists(), "demo wrote {f}");
    }
}

/// README promises exactly these two commands, and CI runs the second.
#[test]
fn readme_commands_match_ci() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("cargo run --release -p mcp-tls-gateway -- demo"));
    assert!(readme.contains("bash tests/run"));
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.contains("tests/run"),
        ".ci/run must run the README's test command"
    );
    assert!(root.join("tests/run").exists());
}
