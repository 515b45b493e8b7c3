//! The Python package (`python/`, `wse_server.RustWSEServer` on the engine): built from source
//! with `pip install ./python` into `target/py-pkg` (rebuilt only when its or the engine's
//! sources change), then its pytest suite (`python/tests`) with real clients — `websockets` and
//! the published `wse-client` 2.5.1. Needs Python >= 3.12 on `PATH` or in pyenv.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[test]
fn python_package_builds_and_passes_its_pytest_suite() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let setup = Command::new(root.join("tests/python/package-venv.sh"))
        .output()
        .expect("run tests/python/package-venv.sh");
    assert!(
        setup.status.success(),
        "building the Python package failed ({}); needs Python >= 3.12 on PATH or in pyenv, and \
         a Rust toolchain:\n{}",
        setup.status,
        String::from_utf8_lossy(&setup.stderr)
    );
    let python = String::from_utf8(setup.stdout).unwrap().trim().to_owned();
    let built = started.elapsed();
    let out = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "python/tests",
        ])
        .current_dir(&root)
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "pytest python/tests failed:\n{report}"
    );
    eprintln!(
        "python package: built in {:.1?}, pytest in {:.1?}: {}",
        built,
        started.elapsed() - built,
        report.lines().last().unwrap_or("")
    );
}
