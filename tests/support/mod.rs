//! What the workspace tests that run examples as processes share: the example's binary, as
//! built from the sources in this tree.
//!
//! `cargo test` builds the examples beside the tests, but `cargo test --test <name>` does
//! not, and would run whatever binary an earlier build left in `target/<profile>/examples`,
//! built from older sources. So a test asks for the binary here: if any source it is built
//! from is newer than the binary (or there is none), this runs `cargo build --example` with
//! the test's own cargo, profile and target directory first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

/// The freshly built binary of the example `name`.
pub(crate) fn example_binary(name: &str) -> PathBuf {
    // One build at a time within a test binary: tests run on threads, and two cargos would
    // only queue on cargo's own lock anyway.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());

    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let bin = profile_dir.join("examples").join(name);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    if built.is_some_and(|at| newest_source(root) <= at) {
        return bin;
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let target_dir = profile_dir.parent().expect("target/<profile>");
    let mut cmd = Command::new(cargo);
    // Without the variables cargo sets for the test it runs: build scripts that watch one
    // (`CARGO_PKG_NAME`, ..) would see it change and rebuild their crates, here and again
    // in the next `cargo test`.
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy();
        let set_for_the_test = [
            "CARGO_PKG_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
            "CARGO_MANIFEST_",
        ]
        .iter()
        .any(|p| var.starts_with(p))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*var);
        if set_for_the_test {
            cmd.env_remove(&*var);
        }
    }
    cmd.current_dir(root)
        .args(["build", "--example", name, "--target-dir"])
        .arg(target_dir);
    match profile_dir.file_name().and_then(|p| p.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("run {cmd:?} to build the example {name}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
    assert!(bin.exists(), "{cmd:?} built no {}", bin.display());
    bin
}

/// The last time a file the examples are built from changed.
fn newest_source(root: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut dirs: Vec<PathBuf> = [
        "examples",
        "src",
        "idem-runtime/src",
        "idem-macros/src",
        "idem-duration/src",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    for file in [
        "Cargo.toml",
        "Cargo.lock",
        "idem-runtime/Cargo.toml",
        "idem-macros/Cargo.toml",
        "idem-duration/Cargo.toml",
        // The README is the runtime crate's docs (`include_str!`): a change rebuilds it.
        "README.md",
    ] {
        newest = newest.max(modified(&root.join(file)));
    }
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                newest = newest.max(modified(&path));
            }
        }
    }
    newest
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
