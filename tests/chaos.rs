//! The chaos soak (`examples/chaos.rs`) for a short time on PostgreSQL and on MariaDB:
//! replicas SIGKILLed and restarted, database connections cut, clients retrying through the
//! HTTP layer and the attribute; the run must end with every invariant holding (one answer
//! per key, one completed record, nothing left in progress, re-executions only for bodies in
//! flight at a kill or told their result was not recorded).
//!
//! `IDEM_CHAOS_SECONDS` sets how long each soak runs (60 by default); a longer run by hand:
//! `cargo run --release --example chaos -- --seconds 600` (see the README, "Evidence").

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::PathBuf;
use std::process::Command;

fn example_binary() -> PathBuf {
    // target/<profile>/deps/chaos-<hash> -> target/<profile>/examples/chaos
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("examples").join("chaos");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds examples; with `--test chaos` alone run `cargo build --example chaos` first",
        bin.display()
    );
    bin
}

/// Whether the database at `url` answers; outside CI a missing one skips the soak, loudly.
async fn reachable(what: &str, var: &str, url: &str) -> bool {
    let ok = if url.starts_with("mysql") {
        sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .map(drop)
    } else {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .map(drop)
    };
    match ok {
        Ok(()) => true,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{what} is not reachable at {url} ({e}); CI=true requires it")
        }
        Err(e) => {
            eprintln!(
                "SKIPPED: {what} is not reachable at {url} ({e}); set {var} or start it (scripts/services.sh)"
            );
            false
        }
    }
}

async fn soak(what: &str, var: &str, default: &str) {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_string());
    if !reachable(what, var, &url).await {
        return;
    }
    let seconds = std::env::var("IDEM_CHAOS_SECONDS").unwrap_or_else(|_| "60".into());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(example_binary())
            .args(["--store", &url, "--seconds", &seconds])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        report.contains("invariant violations: 0"),
        "the soak on {what} broke an invariant:\n{report}"
    );
    assert!(out.status.success(), "{what}: {:?}", out.status);
    // The soak did what it says: kills, cuts, re-executions after kills, answers.
    let figure = |label: &str| -> u64 {
        let at = report
            .find(label)
            .unwrap_or_else(|| panic!("no {label:?} in the report"));
        report[at + label.len()..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    assert!(figure("SIGKILLs:") > 0, "{report}");
    assert!(figure("database cuts:") > 0, "{report}");
    assert!(figure("answered:") > 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_on_postgres_keeps_every_invariant() {
    soak(
        "PostgreSQL",
        "IDEM_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_on_mariadb_keeps_every_invariant() {
    soak(
        "MariaDB",
        "IDEM_TEST_MYSQL_URL",
        "mysql://root@127.0.0.1:3306/test",
    )
    .await;
}
