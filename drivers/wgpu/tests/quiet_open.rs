//! A compute-only device opens silently: on a root shell without
//! `XDG_RUNTIME_DIR`, wgpu's default instance enabled the window-system
//! surface extensions and Mesa's device-select layer made libwayland print
//! `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` on
//! every open (issue #18). The message comes from C code in this process,
//! so the test re-runs itself in a child without the variable and reads
//! the child's stderr.

#![allow(missing_docs)]

use std::process::Command;

const CHILD: &str = "HMM_QUIET_OPEN_CHILD";

#[test]
fn opening_prints_nothing_without_xdg_runtime_dir() {
    if std::env::var_os(CHILD).is_some() {
        let opened = hmm_driver_wgpu::WgpuDevice::open();
        println!("child opened: {}", opened.is_ok());
        return;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "opening_prints_nothing_without_xdg_runtime_dir",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stdout}\n{stderr}");
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
