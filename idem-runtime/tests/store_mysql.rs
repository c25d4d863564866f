//! The store conformance suite against a real MySQL or MariaDB (`IDEM_TEST_MYSQL_URL`), each
//! test on its own table.

mod support;

idem_runtime::store_conformance_tests!(optional: support::mysql_store());
