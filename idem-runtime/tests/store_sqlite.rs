//! The store conformance suite against SQLite (a fresh database file per test).

mod support;

idem_runtime::store_conformance_tests!(support::sqlite_store());
