//! Helpers shared by this driver's integration tests.

use hmm_core::mirror::backend::{Backend, DeviceToHost};
use hmm_core::mirror::format::PoolSlot;
use hmm_driver_wgpu::WgpuDevice;

/// The words of pool slot `slot`, read back from the device with
/// `copy_to_host`. Call it with no launch in flight.
pub fn slot_words(d: &WgpuDevice, slot: PoolSlot) -> Vec<u32> {
    let mut page = vec![0u8; 4096];
    // SAFETY: `page` is 4096 writable, unaliased bytes; the caller has no
    // launch in flight.
    unsafe {
        d.copy_to_host(&[DeviceToHost {
            slot,
            dst: page.as_mut_ptr(),
        }])
    }
    .expect("copy out");
    page.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
