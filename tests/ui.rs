//! Compile tests: what `#[idempotent]` accepts, and the errors a user gets for what it does not.
//! Each `fail` case has its expected compiler output beside it (`.stderr`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
