//! The store conformance suite against a real PostgreSQL (`IDEM_TEST_POSTGRES_URL`), each
//! test on its own table.

mod support;

idem_runtime::store_conformance_tests!(optional: support::postgres_store());
