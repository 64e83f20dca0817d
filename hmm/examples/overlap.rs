//! Overlap of device and CPU work with a non-blocking launch
//! (`Mirror::scope`): a kernel of calibrated duration and independent CPU
//! work of about the same duration, run one after the other (blocking
//! launch, then the CPU work) and overlapped (submit, CPU work, wait).
//! Prints both wall times and their ratio; checks the kernel's result.
//! The CPU work never touches the kernel's memory.
//!
//! `cargo run --release -p hmm --example overlap -- [cpu|wgpu|vulkan|auto] [ms]`
//!
//! On a machine whose "device" runs on the same CPU cores (the cpu driver,
//! lavapipe) the two compete for the cores, and the ratio shows what is
//! left of the overlap; a discrete GPU overlaps fully (ratio near 2 when
//! both halves take the same time).

use std::time::{Duration, Instant};

use hmm::{Device, In, InOut, MirrorConfig};

hmm::kernel! {
    /// `out[i] = f^iters(src[i])` for a cheap integer mix `f`. Its duration
    /// grows linearly with `iters`.
    const SPIN: spin(src: In<u32>, out: InOut<u32>, iters: u32)
        .wgsl(r#"
fn hmm_kernel(i: u32) {
    var x = hmm_load_u32(hmm_index(args.src, i, 4u));
    for (var j = 0u; j < args.iters; j = j + 1u) {
        x = x * 1664525u + 1013904223u;
        x = x ^ (x >> 13u);
    }
    hmm_store_u32(hmm_index(args.out, i, 4u), x);
}"#)
        .cpu(|lane, i, (src, out, iters)| {
            let x = lane.load_u32(src.at(i))?;
            lane.store_u32(out.at(i), mix(x, iters))
        });
}

fn mix(mut x: u32, iters: u32) -> u32 {
    for _ in 0..iters {
        x = x.wrapping_mul(1664525).wrapping_add(1013904223);
        x ^= x >> 13;
    }
    x
}

/// Invocations per launch.
const N: usize = 1 << 16;

/// The CPU's share: `rounds` passes of the same mix over a buffer of its
/// own (never the kernel's).
fn cpu_work(buf: &mut [u32], rounds: u32) {
    for _ in 0..rounds {
        for v in buf.iter_mut() {
            *v = mix(*v, 8);
        }
    }
    std::hint::black_box(buf);
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let want = hmm::parse_backend(a.first().map(String::as_str))?;
    let target = Duration::from_millis(a.get(1).map_or(Ok(200), |s| s.parse())?);
    let opened = Device::open(want)?;
    let note = opened.note.clone();
    let m = hmm::mirror(opened.device, MirrorConfig::default())?;
    let k = m.backend().kernel(&SPIN)?;
    let src: Vec<u32> = (0..N as u32).collect();
    let mut out = vec![0u32; N];

    // Calibrate the kernel: a first launch faults its pages in; resident
    // launches then time the device alone.
    let time_launch = |iters: u32, out: &mut [u32]| -> Result<Duration, hmm::MirrorError> {
        let t = Instant::now();
        m.run(&k, N as u32, (&src, out, iters))?;
        Ok(t.elapsed())
    };
    time_launch(1, &mut out)?;
    let mut iters = 16u32;
    let mut device = time_launch(iters, &mut out)?;
    while device < target / 4 && iters < 1 << 24 {
        iters *= 4;
        device = time_launch(iters, &mut out)?;
    }
    let scale = target.as_secs_f64() / device.as_secs_f64();
    iters = ((f64::from(iters) * scale) as u32).max(1);
    device = time_launch(iters, &mut out)?;

    // Calibrate the CPU work to the device's time.
    let mut other = vec![7u32; 1 << 16];
    let t = Instant::now();
    cpu_work(&mut other, 16);
    let per_round = t.elapsed().as_secs_f64() / 16.0;
    let rounds = ((device.as_secs_f64() / per_round) as u32).max(1);
    let t = Instant::now();
    cpu_work(&mut other, rounds);
    let cpu = t.elapsed();

    // Best of `reps` for each of the four: device alone, CPU alone, one
    // after the other, overlapped (the cores may be shared: minima are
    // the least disturbed runs).
    let reps = 5;
    let (mut device, mut cpu) = (device, cpu);
    let mut blocking = Duration::MAX;
    let mut overlapped = Duration::MAX;
    for _ in 0..reps {
        device = device.min(time_launch(iters, &mut out)?);

        let t = Instant::now();
        cpu_work(&mut other, rounds);
        cpu = cpu.min(t.elapsed());

        let t = Instant::now();
        m.run(&k, N as u32, (&src, &mut out, iters))?;
        cpu_work(&mut other, rounds);
        blocking = blocking.min(t.elapsed());

        let t = Instant::now();
        m.scope(|s| {
            // `src` and `out` stay borrowed until the scope ends: the CPU
            // work cannot touch them.
            let p = s.run(&k, N as u32, (&src, &mut out, iters));
            cpu_work(&mut other, rounds);
            p.wait()
        })?;
        overlapped = overlapped.min(t.elapsed());
    }
    if !(0..N).step_by(997).all(|i| out[i] == mix(i as u32, iters)) {
        return Err("wrong kernel result".into());
    }

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("{note}");
    println!(
        "kernel: {N} invocations x {iters} iterations, {:.1} ms alone; CPU work {:.1} ms alone (sum {:.1}, max {:.1})",
        ms(device),
        ms(cpu),
        ms(device + cpu),
        ms(device.max(cpu))
    );
    println!(
        "blocking (launch, then CPU work): {:.1} ms; non-blocking (submit, CPU work, wait): {:.1} ms; ratio {:.2} (best of {reps})",
        ms(blocking),
        ms(overlapped),
        blocking.as_secs_f64() / overlapped.as_secs_f64()
    );
    Ok(())
}
