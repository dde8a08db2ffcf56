//! Misuse of `#[weir_sdk::transform]` is a clear compile error pointing at the mistake.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass_*.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}
