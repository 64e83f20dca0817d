//! `hmm::Device::open_zero_copy`: the zero-copy modes through the facade.

use hmm::{Device, Driver, In, InOut, MirrorConfig, OpenError};

hmm::kernel! {
    /// `y[i] = y[i] + x[i]`, for every driver.
    const ADD: add(x: In<u32>, y: InOut<u32>)
        .wgsl(
            r#"
fn hmm_kernel(i: u32) {
    let yp = hmm_index(args.y, i, 4u);
    hmm_store_u32(yp, hmm_load_u32(yp) + hmm_load_u32(hmm_index(args.x, i, 4u)));
}"#,
        )
        .cpu(|lane, i, (x, y)| {
            let v = lane.load_u32(y.at(i))? + lane.load_u32(x.at(i))?;
            lane.store_u32(y.at(i), v)
        });
}

#[test]
fn wgpu_has_no_zero_copy_mode() {
    // SAFETY: nothing is opened, so nothing can run.
    match unsafe { Device::open_zero_copy(Some(Driver::Wgpu)) } {
        Err(OpenError::NoZeroCopy("wgpu")) => {}
        other => panic!("expected NoZeroCopy, got {other:?}"),
    }
}

#[test]
fn the_cpu_driver_in_zero_copy_mode_writes_the_cpu_pages_in_place() {
    // SAFETY: the launch below runs on this thread's vectors, which are
    // neither freed nor touched until it returned.
    let opened = unsafe { Device::open_zero_copy(Some(Driver::Cpu)) }.expect("cpu zero-copy");
    assert!(opened.note.contains("zero-copy"), "{}", opened.note);
    let mirror = hmm::mirror(opened.device, MirrorConfig::default()).expect("mirror");
    let k = mirror.backend().kernel(&ADD).expect("kernel");
    let x: Vec<u32> = (0..50_000).collect();
    let mut y = vec![7u32; 50_000];
    let r = mirror.run(&k, 50_000, (&x, &mut y)).expect("launch");
    assert_eq!(
        r.pages_out, 0,
        "nothing written back: the device wrote y itself"
    );
    assert!(y.iter().enumerate().all(|(i, &v)| v == i as u32 + 7));
    // A CPU write is seen by the next launch with nothing invalidated.
    y.iter_mut().for_each(|v| *v = 1);
    let r = mirror.run(&k, 50_000, (&x, &mut y)).expect("launch");
    assert_eq!((r.faults, r.pages_in), (0, 0));
    assert!(y.iter().enumerate().all(|(i, &v)| v == i as u32 + 1));
}
