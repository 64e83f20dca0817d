//! A compute-only device opens silently (issue #18): on a root shell
//! without `XDG_RUNTIME_DIR`, a Vulkan instance with window-system surface
//! extensions made Mesa's device-select layer have libwayland print
//! `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` on
//! every open. The message comes from C code in the process, so the check
//! re-runs the calling test binary in a child without the variable and
//! reads the child's output.

use std::process::Command;

const CHILD: &str = "HMM_QUIET_OPEN_CHILD";

/// Called from the test named `test_name` (its exact name in the test
/// binary): in the child, runs `open` (which opens a device and says
/// whether it did); in the parent, runs the child without
/// `XDG_RUNTIME_DIR` and fails if it printed anything about it — or, with
/// `HMM_REQUIRE_GPU=1`, if it opened no device.
pub fn opening_prints_nothing_without_xdg_runtime_dir(
    test_name: &str,
    open: impl FnOnce() -> bool,
) {
    if std::env::var_os(CHILD).is_some() {
        println!("child opened: {}", open());
        return;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stdout}\n{stderr}");
    assert!(
        stdout.contains("child opened: "),
        "the child did not run the test: {stdout}\n{stderr}"
    );
    if std::env::var("HMM_REQUIRE_GPU").as_deref() == Ok("1") {
        assert!(
            stdout.contains("child opened: true"),
            "HMM_REQUIRE_GPU=1 but the child opened no device: {stdout}\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("XDG_RUNTIME_DIR") && !stdout.contains("XDG_RUNTIME_DIR"),
        "opening a device printed Vulkan-stack noise:\n{stderr}{stdout}"
    );
}
