//! Shared by the model-based property tests.

use proptest::test_runner::Config;

/// A proptest configuration running `default` cases, or `PROPTEST_CASES`
/// when that is set — the knob for long fuzzing runs (CI uses the
/// defaults):
///
/// ```sh
/// PROPTEST_CASES=200000 cargo test -p hmm-core --release --test fault_records_model
/// ```
pub fn cases(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        ..Config::default()
    }
}
