//! The store conformance suite against the in-memory store.

idem_runtime::store_conformance_tests!(async { Box::new(idem_runtime::store::MemoryStore::new()) });
