//! Real-world clients (curl, openssl s_client) through the gateway to an
//! HTTP/1.1 MCP-like backend.  These tools are required: if missing, the
//! tests fail with a message saying to install them.

use std::process::Command;
use std::time::Duration;

use gateway_tests::backend::mcp_response_body;
use gateway_tests::{require_tool, run_with_timeout, Backend, Gateway, Pki};

const BODY: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#;

fn curl(pki: &Pki, port: u16, extra: &[&str]) -> (String, String) {
    require_tool("curl");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-v", "--http1.1", "--max-time", "20", "--cacert"])
        .arg(&pki.ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-H", "Content-Type: application/json", "-d", BODY])
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .arg(format!("https://localhost:{port}/mcp"));
    let out = run_with_timeout(&mut cmd, None, false, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "curl failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        out.stdout_str(),
        out.stderr_str()
    );
    (out.stdout_str(), out.stderr_str())
}

#[test]
fn curl_post_default_tls() {
    let pki = Pki::new();
    let backend = Backend::http();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let (stdout, stderr) = curl(&pki, gw.port(), &[]);
    let expected = format!(
        "{}\n200",
        mcp_response_body("POST", "/mcp", BODY.as_bytes())
    );
    assert_eq!(stdout, expected, "curl stderr:\n{stderr}");
    assert!(
        stderr.contains("SSL connection using TLSv1.3"),
        "expected TLS 1.3 by default; curl -v said:\n{stderr}"
    );
    assert_eq!(backend.stats().requests(), 1);
}

#[test]
fn curl_post_tls12() {
    let pki = Pki::new();
    let backend = Backend::http();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let (stdout, stderr) = curl(&pki, gw.port(), &["--tlsv1.2", "--tls-max", "1.2"]);
    let expected = format!(
        "{}\n200",
        mcp_response_body("POST", "/mcp", BODY.as_bytes())
    );
    assert_eq!(stdout, expected, "curl stderr:\n{stderr}");
    assert!(
        stderr.contains("SSL connection using TLSv1.2"),
        "expected TLS 1.2; curl -v said:\n{stderr}"
    );
}

#[test]
fn curl_hostname_mismatch_is_rejected() {
    // Negative control for the PKI: a name the certificate does not cover
    // must fail verification (proves curl really verifies against ca.pem).
    require_tool("curl");
    let pki = Pki::new();
    let backend = Backend::http();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let port = gw.port();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--max-time", "20", "--cacert"])
        .arg(&pki.ca)
        .args(["--resolve", &format!("not-localhost.test:{port}:127.0.0.1")])
        .arg(format!("https://not-localhost.test:{port}/mcp"));
    let out = run_with_timeout(&mut cmd, None, false, Duration::from_secs(30));
    assert!(
        !out.status.success(),
        "curl must reject a hostname mismatch; stdout: {}",
        out.stdout_str()
    );
    assert_eq!(backend.stats().requests(), 0);
}

#[test]
fn openssl_s_client_http_request() {
    require_tool("openssl");
    let pki = Pki::new();
    let backend = Backend::http();
    let gw = Gateway::start(&pki, &backend.arg(), &[]);
    let port = gw.port();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let expected_body = mcp_response_body("POST", "/mcp", BODY.as_bytes());
    for version_flag in [None, Some("-tls1_2"), Some("-tls1_3")] {
        let mut cmd = Command::new("openssl");
        cmd.arg("s_client")
            .args(["-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "localhost", "-CAfile"])
            .arg(&pki.ca)
            .args([
                "-verify_return_error",
                "-verify_hostname",
                "localhost",
                "-quiet",
            ]);
        if let Some(f) = version_flag {
            cmd.arg(f);
        }
        // -quiet implies -ign_eof: s_client exits when the server closes,
        // which happens because of `Connection: close`.
        let out = run_with_timeout(
            &mut cmd,
            Some(request.as_bytes()),
            false,
            Duration::from_secs(30),
        );
        let stdout = out.stdout_str();
        assert!(
            out.status.success(),
            "openssl s_client {version_flag:?} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            out.status,
            out.stderr_str()
        );
        assert!(
            stdout.starts_with("HTTP/1.1 200 OK\r\n"),
            "{version_flag:?}: unexpected stdout:\n{stdout}\n--- stderr ---\n{}",
            out.stderr_str()
        );
        assert!(
            stdout.ends_with(&expected_body),
            "{version_flag:?}: backend body missing from stdout:\n{stdout}"
        );
    }
    assert_eq!(backend.stats().requests(), 3);
}
