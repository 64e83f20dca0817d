//! The `wgpu` and `vulkan` Cargo features: a driver left out of the build
//! is refused by name with `OpenError::NotBuilt`, skipped (and named) by
//! `Device::open(None)`, and the cpu driver works alone.
//!
//! CI runs this file twice: with default features and with
//! `cargo test -p hmm --no-default-features`.

use hmm::{Device, Driver, MirrorConfig, OpenError};

mod common;
use common::ADD_ONE;

#[test]
fn is_built_follows_the_features() {
    assert!(Driver::Cpu.is_built());
    assert_eq!(Driver::Wgpu.is_built(), cfg!(feature = "wgpu"));
    assert_eq!(Driver::Vulkan.is_built(), cfg!(feature = "vulkan"));
    assert_eq!(Driver::Cpu.feature(), None);
    assert_eq!(Driver::Wgpu.feature(), Some("wgpu"));
    assert_eq!(Driver::Vulkan.feature(), Some("vulkan"));
}

#[test]
fn a_driver_left_out_is_not_built_by_name() {
    for d in [Driver::Wgpu, Driver::Vulkan] {
        if d.is_built() {
            continue;
        }
        match Device::open(Some(d)) {
            Err(OpenError::NotBuilt { driver, feature }) => {
                assert_eq!(driver, d.name());
                assert_eq!(Some(feature), d.feature());
                let msg = Device::open(Some(d)).unwrap_err().to_string();
                assert!(msg.contains(feature), "{msg}");
            }
            Err(e) => panic!("{}: expected NotBuilt, got {e}", d.name()),
            Ok(o) => panic!(
                "{}: opened a driver this build leaves out: {}",
                d.name(),
                o.note
            ),
        }
    }
    if !Driver::Vulkan.is_built() {
        // SAFETY: nothing is launched; the device is dropped at once.
        let r = unsafe { Device::open_zero_copy(Some(Driver::Vulkan)) };
        assert!(
            matches!(
                r,
                Err(OpenError::NotBuilt {
                    driver: "vulkan",
                    ..
                })
            ),
            "{r:?}"
        );
    }
}

#[test]
fn best_available_names_what_it_skipped() {
    let opened = Device::open(None).expect("the cpu driver always opens");
    for d in [Driver::Wgpu, Driver::Vulkan] {
        if !d.is_built() {
            assert_eq!(opened.device.driver(), Driver::Cpu, "{}", opened.note);
            assert!(
                opened.note.contains("not built"),
                "the note says why {} was skipped: {}",
                d.name(),
                opened.note
            );
        }
    }
}

#[test]
fn the_cpu_driver_runs_in_every_build() {
    let opened = Device::open(Some(Driver::Cpu)).unwrap();
    let mirror = hmm::mirror(opened.device, MirrorConfig::default()).unwrap();
    let kernel = mirror.backend().kernel(&ADD_ONE).unwrap();
    let mut v: Vec<u32> = (0..3000).collect();
    mirror.run(&kernel, 3000, (v.as_mut_ptr(),)).unwrap();
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32 + 1));
}
