//! Fault-service benchmark for any driver (issue #5's figures): dense
//! fault throughput, per-fault host cost at fault-batch sizes 1..1024, and
//! the cost of a replay round. Prints figures; asserts only correctness.
//!
//! `cargo run --release -p hmm --example fault_service -- [cpu|wgpu|auto] [pages] [resident]`
//!
//! `resident` (cpu driver): the pool is touched when the mirror is made,
//! as a GPU's device memory is allocated up front and as `hmm-bench`
//! does; by default each slot's first copy also pays the host page fault
//! that first touches the pool (about 0.6 µs per page on a 2-core VM,
//! issue 15's profile).

use std::time::Instant;

use hmm::{Device, MirrorConfig};

#[path = "common/touch.rs"]
mod touch;
use touch::TOUCH;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let want = hmm::parse_backend(a.first().map(String::as_str))?;
    let pages: usize = a.get(1).map_or(Ok(8192), |s| s.parse())?;
    let resident = match a.get(2).map(String::as_str) {
        None => false,
        Some("resident") => true,
        Some(other) => return Err(format!("unknown option {other:?} (want `resident`)").into()),
    };
    let words = pages * 1024;
    let src: Vec<u32> = (0..words as u32).collect();
    let expect = |out: &[u32]| {
        out.iter()
            .enumerate()
            .all(|(i, &v)| v as usize == i * 1024 + 7)
    };

    println!(
        "fault service, {pages} pages ({} MiB) read once each",
        (pages * 4096) >> 20
    );
    println!("| fault batch | first launch ms | resident launch ms | pages in (first/resident) | host µs per faulted page | pages/s | GB/s copied | submissions |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut note = String::new();
    let mut last_first = hmm::LaunchPhases::default();
    for batch in [1usize, 4, 16, 64, 256, 1024] {
        let opened = Device::open(want)?;
        note = opened.note.clone();
        let device = match opened.device {
            Device::Cpu(d) if resident => Device::Cpu(d.with_resident_pool()),
            d => d,
        };
        let cfg = MirrorConfig {
            fault_batch: batch,
            max_replays: 1 << 20,
            ..MirrorConfig::default()
        };
        let m = hmm::mirror(device, cfg)?;
        let k = m.backend().kernel(&TOUCH)?;
        let mut out = vec![0u32; pages];
        let t = Instant::now();
        let r1 = m.run(&k, pages as u32, (src.as_ptr().cast(), out.as_mut_ptr()))?;
        let first = t.elapsed().as_secs_f64();
        last_first = r1.phases;
        if !expect(&out) {
            return Err("wrong result after the faulting launch".into());
        }
        // (No CPU write to `out` in between: that would be invalidated and
        // fault again, which this launch is meant to exclude.)
        let t = Instant::now();
        let r2 = m.run(&k, pages as u32, (src.as_ptr().cast(), out.as_mut_ptr()))?;
        let resident = t.elapsed().as_secs_f64();
        if !expect(&out) {
            return Err("wrong result on the resident launch".into());
        }
        let service = (first - resident).max(0.0);
        let faulted = r1.pages_in as f64;
        println!(
            "| {batch} | {:.1} | {:.2} | {}/{} | {:.2} | {:.0} | {:.3} | {} |",
            first * 1e3,
            resident * 1e3,
            r1.pages_in,
            r2.pages_in,
            service / faulted * 1e6,
            faulted / service,
            faulted * 4096.0 / service / 1e9,
            r1.submissions
        );
    }
    // A replay round's fixed cost: a launch that faults nothing, with one
    // invocation, is one submission plus the sync points. Its output word
    // sits on a page of its own: on the heap it would share a page with
    // whatever this program allocates and writes between launches (the
    // stdout buffer), each launch's sync point would take that page as
    // CPU-written and drop its device copy, and every "resident" launch
    // would fault it back in — two rounds, not one.
    let opened = Device::open(want)?;
    let m = hmm::mirror(opened.device, MirrorConfig::default())?;
    let k = m.backend().kernel(&TOUCH)?;
    let mut page = memmap2::MmapMut::map_anon(4096)?;
    let out: &mut [u32] = bytemuck_words(&mut page);
    m.run(&k, 1, (src.as_ptr().cast(), out.as_mut_ptr()))?;
    let reps = 200;
    let mut floor = hmm::LaunchPhases::default();
    let mut rounds = 0u64;
    let t = Instant::now();
    for _ in 0..reps {
        let r = m.run(&k, 1, (src.as_ptr().cast(), out.as_mut_ptr()))?;
        floor += r.phases;
        rounds += u64::from(r.submissions);
    }
    println!(
        "one resident launch of 1 invocation (a replay round's floor): {:.1} µs",
        t.elapsed().as_secs_f64() / f64::from(reps) * 1e6
    );
    println!(
        "  its phases, mean of {reps} ({:.2} rounds each): {}",
        rounds as f64 / f64::from(reps),
        mean(floor, reps)
    );
    println!("the first launch at fault batch 1024, phases: {last_first}");
    println!("{note}");
    if resident {
        println!("pool: resident from the start (cpu driver; `resident`)");
    }
    Ok(())
}

/// Each phase of `sum` divided by `n`.
fn mean(sum: hmm::LaunchPhases, n: u32) -> hmm::LaunchPhases {
    hmm::LaunchPhases {
        sync_point: sum.sync_point / n,
        will_need: sum.will_need / n,
        submit: sum.submit / n,
        wait: sum.wait / n,
        read_back: sum.read_back / n,
        service: sum.service / n,
        copy_in: sum.copy_in / n,
        page_table: sum.page_table / n,
        write_back: sum.write_back / n,
    }
}

/// The mapping's bytes as words (an anonymous mapping is page aligned).
fn bytemuck_words(page: &mut memmap2::MmapMut) -> &mut [u32] {
    let (head, words, _) = {
        // SAFETY: any bit pattern is a valid `u32`; `align_to_mut` puts
        // only aligned, whole words in the middle slice.
        unsafe { page.align_to_mut::<u32>() }
    };
    assert!(head.is_empty(), "an anonymous mapping is page aligned");
    words
}
