//! A typed client refuses, at compile time, what the service does not declare.

#[test]
fn wrong_method_or_argument_type_does_not_compile() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
