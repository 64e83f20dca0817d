//! The facade's `Device` forwards every backend hook to the driver it
//! wraps, the advice ones included: a hook it forgot would fall back to
//! the trait's do-nothing default and cost the driver its optimisation
//! without failing anything else (found: `read_back_with_next_launch`).

#![cfg(feature = "wgpu")]

use hmm::{Device, Driver, InOut, MirrorConfig};

hmm::kernel! {
    /// `p[i] = p[i] + 1`.
    const BUMP: bump(p: InOut<u32>)
        .wgsl(
            r#"
fn hmm_kernel(i: u32) {
    let q = hmm_index(args.p, i, 4u);
    hmm_store_u32(q, hmm_load_u32(q) + 1u);
}"#,
        )
        .cpu(|lane, i, (p,)| {
            let v = lane.load_u32(p.at(i))?;
            lane.store_u32(p.at(i), v + 1)
        });
}

#[test]
fn a_small_write_back_rides_on_the_launch_through_the_facade() {
    let opened = match Device::open(Some(Driver::Wgpu)) {
        Ok(o) => o,
        Err(e) => {
            if std::env::var("HMM_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("HMM_REQUIRE_GPU=1 but no wgpu device: {e}");
            }
            eprintln!("skip: no wgpu device: {e}");
            return;
        }
    };
    let m = hmm::mirror(opened.device, MirrorConfig::default()).expect("mirror");
    let k = m.backend().kernel(&BUMP).expect("kernel");
    let submissions = |m: &hmm::Mirror<Device>| match m.backend() {
        Device::Wgpu(d) => d.submissions(),
        _ => unreachable!("opened as wgpu"),
    };
    // One page of its own, touched only by the launches.
    let mut page = memmap2::MmapMut::map_anon(4096).expect("map");
    let words: &mut [u32] = bytemuck_words(&mut page);
    m.run(&k, 1024, (&mut *words,)).expect("first launch");
    for round in 2..6u32 {
        let before = submissions(&m);
        let r = m.run(&k, 1024, (&mut *words,)).expect("launch");
        assert_eq!(r.submissions, 1, "resident");
        assert_eq!(
            submissions(&m) - before,
            1,
            "the write-back of the one written page came back with the launch"
        );
        assert!(words.iter().all(|&w| w == round), "launch {round}'s data");
    }
}

fn bytemuck_words(page: &mut memmap2::MmapMut) -> &mut [u32] {
    let len = page.len() / 4;
    // SAFETY: the mapping is 4096 bytes, page aligned (so aligned for
    // u32), zero-initialised, and borrowed mutably for the slice's life.
    unsafe { std::slice::from_raw_parts_mut(page.as_mut_ptr().cast::<u32>(), len) }
}
