//! Fixtures shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::ops::Deref;

use idem_runtime::store::SqliteStore;

/// A SQLite store in its own temporary directory, deleted when the fixture drops.
pub struct SqliteFixture {
    pub store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl Deref for SqliteFixture {
    type Target = SqliteStore;
    fn deref(&self) -> &SqliteStore {
        &self.store
    }
}

pub async fn sqlite_store() -> SqliteFixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("idem.db"))
        .await
        .expect("open sqlite");
    SqliteFixture { store, _dir: dir }
}
