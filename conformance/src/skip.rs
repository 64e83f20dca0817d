//! Opening a device in a test: a device that does not open is a skip
//! line naming why, or a failure where the environment says the device
//! must exist (CI sets `HMM_REQUIRE_GPU=1` and `HMM_REQUIRE_ZERO_COPY=1`).
//! Here, not in the drivers: libraries print nothing themselves.

/// `Some(device)`, or `None` after a `skip: {what}: {error}` line on
/// stderr — unless the variable `require` is `1`, which makes it a test
/// failure.
pub fn open_or_skip<D, E: std::fmt::Display>(
    what: &str,
    require: &str,
    opened: Result<D, E>,
) -> Option<D> {
    match opened {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var(require).as_deref() != Ok("1"),
                "{require}=1 but {what}: {e}"
            );
            eprintln!("skip: {what}: {e}");
            None
        }
    }
}
