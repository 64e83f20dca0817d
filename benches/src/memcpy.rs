//! The machine's `memcpy` bandwidth, measured in the same run: the
//! physical limit copy efficiency is judged against.

use std::time::Instant;

/// Median bandwidth, bytes per second, of copying `bytes` between two
/// resident buffers (large enough to miss the caches) with
/// `copy_from_slice` (`memcpy`), over `reps` copies.
pub fn bandwidth(bytes: usize, reps: usize) -> f64 {
    let src: Vec<u8> = (0..bytes).map(|i| (i * 131) as u8).collect();
    let mut dst = vec![1u8; bytes];
    dst.copy_from_slice(&src); // warm: both buffers resident
    let mut rates: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            bytes as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}
