//! idem workspace: see README.md. This package only holds examples and workspace tests.
