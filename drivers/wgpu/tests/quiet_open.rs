//! Opening the wgpu driver's device prints nothing, even on a root shell
//! without `XDG_RUNTIME_DIR` (`hmm_conformance::quiet`).

#![allow(missing_docs)]

#[test]
fn opening_prints_nothing_without_xdg_runtime_dir() {
    hmm_conformance::quiet::opening_prints_nothing_without_xdg_runtime_dir(
        "opening_prints_nothing_without_xdg_runtime_dir",
        || hmm_driver_wgpu::WgpuDevice::open().is_ok(),
    );
}
