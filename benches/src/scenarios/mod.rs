//! The scenarios, each generic over the backend, and what they share:
//! the context (host space, plan, progress), mirror construction,
//! interleaved repetitions, verification.

use std::error::Error;
use std::sync::Arc;

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::backend::BackendError;
use hmm_core::mirror::{Mirror, MirrorConfig, PinHandle};
use hmm_core::VaRange;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::Plan;
use crate::kernels::BenchKernels;
use crate::measure::{median, Sample};

pub mod churn;
pub mod cpu_writes;
pub mod dense;
pub mod iterate;
pub mod oversub;
pub mod setup;
pub mod sparse;

/// The zero-copy strategy: on-demand mirroring on a zero-copy device
/// (the device uses the CPU's own pages; nothing is copied).
pub const ZERO_COPY: &str = "zero-copy";

/// Any failure; a wrong kernel result is one ([`Wrong`]).
pub type Res<T> = Result<T, Box<dyn Error>>;

/// A device result that differs from the CPU's: the run fails.
#[derive(Debug)]
pub struct Wrong(pub String);

impl std::fmt::Display for Wrong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verification failed: {}", self.0)
    }
}

impl Error for Wrong {}

/// Fails with [`Wrong`] unless the device's `got` equals the CPU's `want`.
pub fn verify(what: &str, got: &[u32], want: &[u32]) -> Res<()> {
    if got.len() != want.len() {
        return Err(Box::new(Wrong(format!(
            "{what}: {} results, expected {}",
            got.len(),
            want.len()
        ))));
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        return Err(Box::new(Wrong(format!(
            "{what}: element {i} is {:#x}, the CPU says {:#x}",
            got[i], want[i]
        ))));
    }
    Ok(())
}

/// One line of the results: a scenario, a case, a strategy, its median sample.
#[derive(Clone, Debug)]
pub struct Row {
    /// Scenario name (`sparse`, `dense`, …).
    pub scenario: &'static str,
    /// The case within it (`1%`, `1.5x`, …).
    pub case: String,
    /// `mirror`, `mirror+prefetch`, `pin`, `pin-per-use`, `re-pin`, `pin-tiled`.
    pub strategy: &'static str,
    /// Backend driver name.
    pub backend: String,
    /// The median sample.
    pub sample: Sample,
    /// The working set: bytes the kernels touch that must be resident
    /// at once (the device-memory floor for on-demand mirroring).
    pub touched: u64,
    /// Repetitions behind the median.
    pub reps: usize,
}

/// What every scenario gets.
pub struct Ctx<'a, B: BenchKernels> {
    /// Makes a fresh device (one per mirror).
    pub make: &'a dyn Fn() -> Result<B, BackendError>,
    /// The CPU side, shared by every mirror of the run.
    pub host: Arc<HostSpace>,
    /// Sizes and counts.
    pub plan: &'a Plan,
    /// Backend driver name, for the rows.
    pub backend: String,
    /// Makes a fresh zero-copy device of the same driver, where the device
    /// has one (the `zero-copy` strategy).
    pub make_zc: Option<&'a dyn Fn() -> Result<B, BackendError>>,
}

impl<B: BenchKernels> Ctx<'_, B> {
    /// A mirror on a fresh device with `pool_slots` slots and a table
    /// large enough for buffers spread over `span` bytes of address space:
    /// a zero-copy device for the `zero-copy` strategy (its pool size is
    /// ignored), a copy-mode one for every other.
    pub fn mirror(&self, strategy: &str, pool_slots: u32, span: u64) -> Res<Mirror<B>> {
        let cfg = MirrorConfig {
            pool_slots,
            table_pages: pool_slots / 512 + (span >> 21) as u32 + 1024,
            fetch: self.plan.fetch,
            ..MirrorConfig::default()
        };
        let make = match (strategy, self.make_zc) {
            (ZERO_COPY, Some(z)) => z,
            (ZERO_COPY, None) => return Err("no zero-copy device for this driver".into()),
            _ => self.make,
        };
        Ok(Mirror::new(Arc::clone(&self.host), make()?, cfg)?)
    }

    /// `strategies`, plus [`ZERO_COPY`] where the driver has a zero-copy
    /// device.
    pub fn arms(&self, strategies: &[&'static str]) -> Vec<&'static str> {
        let mut v = strategies.to_vec();
        if self.make_zc.is_some() {
            v.push(ZERO_COPY);
        }
        v
    }

    /// A progress bar of `len` steps for `name` (hidden when stderr is not
    /// a terminal or `--no-progress`).
    pub fn bar(&self, name: &str, len: u64) -> ProgressBar {
        let bar = if self.plan.progress {
            ProgressBar::new(len)
        } else {
            ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
        };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_owned());
        bar
    }

    /// Runs each of `strategies` `plan.reps` times, interleaved in one
    /// process (the order alternates every repetition so neither strategy
    /// always runs on a warmer machine), and returns one row per strategy
    /// with the median sample.
    pub fn interleaved(
        &self,
        scenario: &'static str,
        case: &str,
        strategies: &[&'static str],
        touched: u64,
        bar: &ProgressBar,
        mut run: impl FnMut(&'static str) -> Res<Sample>,
    ) -> Res<Vec<Row>> {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); strategies.len()];
        for rep in 0..self.plan.reps {
            let order: Vec<usize> = if rep % 2 == 0 {
                (0..strategies.len()).collect()
            } else {
                (0..strategies.len()).rev().collect()
            };
            for k in order {
                bar.set_message(format!("{case} {}", strategies[k]));
                samples[k].push(run(strategies[k])?);
                bar.inc(1);
            }
        }
        Ok(strategies
            .iter()
            .zip(samples)
            .map(|(s, v)| Row {
                scenario,
                case: case.to_owned(),
                strategy: s,
                backend: self.backend.clone(),
                sample: median(v),
                touched,
                reps: self.plan.reps,
            })
            .collect())
    }
}

/// Pins every range (what a pinning user does before a launch).
pub fn pin_all<B: BenchKernels>(m: &Mirror<B>, ranges: &[VaRange]) -> Res<Vec<PinHandle>> {
    ranges.iter().map(|r| Ok(m.pin(*r)?)).collect()
}

/// Unpins every handle.
pub fn unpin_all<B: BenchKernels>(m: &Mirror<B>, pins: Vec<PinHandle>) -> Res<()> {
    for p in pins {
        m.unpin(p)?;
    }
    Ok(())
}

/// Pages (4 KiB) covering `bytes`.
pub fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(4096)
}

/// A deterministic pseudo-random generator (xorshift64*), so runs are
/// reproducible without a dependency.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    /// Next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// `k` distinct values of `0..n`, in random order (partial Fisher–Yates).
    pub fn distinct(&mut self, n: u64, k: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).collect();
        let k = k.min(n) as usize;
        for i in 0..k {
            let j = i + self.below(n - i as u64) as usize;
            v.swap(i, j);
        }
        v.truncate(k);
        v
    }
}

/// The value the harness stores at word `j` of buffer `salt`.
pub fn pattern(j: u64, salt: u64) -> u32 {
    (j.wrapping_add(salt << 32)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        >> 32) as u32
}

/// `VaRange` of a slice.
pub fn range_of<T>(v: &[T]) -> Res<VaRange> {
    Ok(VaRange::of_slice(v)?)
}

/// A zeroed `u32` buffer on pages of its own (4 KiB-aligned, a whole
/// number of pages). Kernel outputs live in these for both strategies:
/// a pinned range is written back whole pages at `unpin` (pinning keeps
/// no twin), so a pinned output sharing a page with other heap objects —
/// malloc's metadata included — would overwrite their newer bytes with
/// the pinned copy. A pinning user gives pinned buffers pages of their own.
pub struct PageBuf {
    ptr: std::ptr::NonNull<u32>,
    len: usize,
    layout: std::alloc::Layout,
}

impl PageBuf {
    /// `len` zeroed words.
    pub fn zeroed(len: usize) -> PageBuf {
        let bytes = (len.max(1) * 4).next_multiple_of(4096);
        let layout = std::alloc::Layout::from_size_align(bytes, 4096)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<u32>()));
        // SAFETY: `layout` has a non-zero size (at least one page).
        let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<u32>();
        let Some(ptr) = std::ptr::NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout)
        };
        PageBuf { ptr, len, layout }
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        // SAFETY: `ptr` points to an allocation of at least `len` zero-
        // initialised (hence valid) `u32`s that we own; shared borrow of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_draws_distinct_values_in_range() {
        let mut r = Rng::new(7);
        let mut v = r.distinct(1000, 100);
        assert_eq!(v.len(), 100);
        assert!(v.iter().all(|&x| x < 1000));
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), 100);
        assert_eq!(r.distinct(10, 50).len(), 10);
    }

    #[test]
    fn page_buf_is_page_aligned_and_zeroed() {
        let mut b = PageBuf::zeroed(1500);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[1499] = 3;
        assert_eq!(b.len(), 1500);
    }

    #[test]
    fn verify_reports_the_first_mismatch() {
        assert!(verify("x", &[1, 2], &[1, 2]).is_ok());
        let e = verify("x", &[1, 5], &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("element 1"), "{e}");
    }
}
