//! RFC 6455 conformance: the Autobahn|Testsuite fuzzing client (cases 1–10; 12.* and 13.* are
//! permessage-deflate, which the server does not negotiate) against the opt-in echo route, which
//! runs through the same codec and connection machinery as WSE connections. Zero FAILED cases.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::Wse;

#[test]
fn autobahn_fuzzingclient_cases_1_to_10_pass() {
    // Case 9.* sends messages of up to 16 MiB; the limits are raised for the echo route's sake.
    let wse = Wse::start(&[
        "--cores",
        "2",
        "--echo-path",
        "/echo",
        "--max-message-size",
        "16777216",
        "--max-outbound-queue-bytes",
        "67108864",
    ]);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let report = root.join("target/autobahn");
    let output = Command::new(root.join("tests/conformance/autobahn.sh"))
        .args(["-x", "12.*,13.*", "-t", "600"])
        .arg(format!("ws://{}/echo", wse.ws))
        .arg(&report)
        .output()
        .expect("run tests/conformance/autobahn.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary = stdout.lines().last().unwrap_or_default().to_owned();
    assert!(
        output.status.success() && summary.ends_with(" 0 FAILED"),
        "autobahn: {summary}\n{stdout}\n{stderr}\nreport: {}",
        report.display()
    );
    eprintln!("{summary}");
}
