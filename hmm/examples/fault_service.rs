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
    // invocation, is one submission plus the sync points.
    let opened = Device::open(want)?;
    let m = hmm::mirror(opened.device, MirrorConfig::default())?;
    let k = m.backend().kernel(&TOUCH)?;
    let mut out = vec![0u32; 1];
    m.run(&k, 1, (src.as_ptr().cast(), out.as_mut_ptr()))?;
    let reps = 200;
    let t = Instant::now();
    for _ in 0..reps {
        m.run(&k, 1, (src.as_ptr().cast(), out.as_mut_ptr()))?;
    }
    println!(
        "one resident launch of 1 invocation (a replay round's floor): {:.1} µs",
        t.elapsed().as_secs_f64() / f64::from(reps) * 1e6
    );
    println!("{note}");
    if resident {
        println!("pool: resident from the start (cpu driver; `resident`)");
    }
    Ok(())
}
