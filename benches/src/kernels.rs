//! Every kernel the harness launches, behind one small trait.
//!
//! A backend joins the harness by implementing [`BenchKernels`]: three
//! kernels over `u32` words with wrapping arithmetic (so results are exact
//! on any device and verifiable bit for bit) and the number of words one
//! invocation handles. The `cpu` driver's implementation is below; a GPU
//! driver adds one `impl` with WGSL (or SPIR-V) sources for the same
//! argument layouts and nothing else in the harness changes.
//!
//! Argument layouts (`args`, 64-bit words; pointers are plain CPU
//! addresses, translated by the device's page table):
//!
//! | kernel | `args` | invocation `i` |
//! |---|---|---|
//! | [`gather`](BenchKernels::gather) | `[data, idx, out]` | `out[i] = data[idx[i]]` |
//! | [`saxpy`](BenchKernels::saxpy) | `[x, y, a, n, w]` | for `j` in `i*w .. min((i+1)*w, n)`: `y[j] = a*x[j] + y[j]` (wrapping) |
//! | [`chunk_sum`](BenchKernels::chunk_sum) | `[data, out, n, w]` | `out[i] = Σ data[j]` for `j` in `i*w .. min((i+1)*w, n)` (wrapping) |
//!
//! `w` is [`BenchKernels::words_per_invocation`]. All kernels follow the
//! replay contract: `gather` and `chunk_sum` make plain stores of values
//! computed from inputs they do not modify; `saxpy` reads `y[j]` before it
//! stores it, so a replayed invocation must not see its own earlier
//! stores. The `cpu` driver buffers an invocation's stores until it
//! completes; a GPU's stores before a fault are visible, so the WGSL
//! `saxpy` ([`WGSL_SAXPY`]) first touches every page its span covers —
//! `y` for writing (an atomic add of 0, which changes nothing), then `x`
//! for reading — and only then computes: after those probes nothing can
//! fault (an invalidation waits for the launch), so its real stores happen
//! exactly once.
//!
//! `saxpy` and `chunk_sum` declare their intent to write before their
//! first load: an atomic add of 0 on the words they will store (it has no
//! effect, so running it again on a replay is harmless). An invocation
//! stops at its first fault, so a store that faults after a span was
//! loaded and summed throws that work away and the replay does it again —
//! for `chunk_sum` over fresh output that was a second full pass over the
//! data. And a mirror maps read faults read-only until a region has been
//! written (`hmm_core::mirror`: pages only read need no twin), so a kernel
//! that read `y` before writing it would also fault once more per page.

use hmm_core::mirror::backend::{Backend, BackendError};
use hmm_driver_cpu::{CpuDevice, CpuKernel, Lane, LaneFault};
use hmm_driver_vulkan::{VulkanDevice, VulkanKernel};
use hmm_driver_wgpu::{WgpuDevice, WgpuKernel};

/// The kernels `hmm-bench` needs from a backend.
pub trait BenchKernels: Backend {
    /// Words of `u32` one invocation of `saxpy` and `chunk_sum` handles.
    /// The `cpu` driver uses a page (1024); a GPU driver may prefer fewer.
    fn words_per_invocation(&self) -> u32 {
        1024
    }
    /// `out[i] = data[idx[i]]`; `args = [data, idx, out]`.
    fn gather(&self) -> Result<Box<Self::Kernel>, BackendError>;
    /// `y = a*x + y` over `u32` (wrapping); `args = [x, y, a, n, w]`.
    fn saxpy(&self) -> Result<Box<Self::Kernel>, BackendError>;
    /// Wrapping sum of each `w`-word chunk; `args = [data, out, n, w]`.
    fn chunk_sum(&self) -> Result<Box<Self::Kernel>, BackendError>;
}

/// Words in a chunk of 1024 (one page) a `cpu` lane moves at once.
const LANE_CHUNK: usize = 1024;

/// The `[start, end)` words invocation `i` handles.
fn span(i: u32, n: u64, w: u64) -> (u64, u64) {
    let start = u64::from(i) * w;
    (start.min(n), (start + w).min(n))
}

/// Loads `out.len()` words at `va` through the lane.
fn load_words(lane: &mut Lane<'_>, va: u64, out: &mut [u32]) -> Result<(), LaneFault> {
    let mut bytes = [0u8; LANE_CHUNK * 4];
    let b = &mut bytes[..out.len() * 4];
    lane.load_bytes(va, b)?;
    for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
        *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

impl BenchKernels for CpuDevice {
    fn gather(&self) -> Result<Box<CpuKernel>, BackendError> {
        Ok(Box::new(CpuKernel::new(|lane, i| {
            let (data, idx, out) = (lane.args()[0], lane.args()[1], lane.args()[2]);
            let k = lane.load_u32(idx + u64::from(i) * 4)?;
            let v = lane.load_u32(data + u64::from(k) * 4)?;
            lane.store_u32(out + u64::from(i) * 4, v)
        })))
    }

    fn saxpy(&self) -> Result<Box<CpuKernel>, BackendError> {
        Ok(Box::new(CpuKernel::new(|lane, i| {
            let a = lane.args();
            let (x, y, s, n, w) = (a[0], a[1], a[2] as u32, a[3], a[4]);
            let (mut j, end) = span(i, n, w);
            if j < end {
                // Write intent first: `y` faults in writable, once.
                lane.atomic_add_u32(y + j * 4, 0)?;
                lane.atomic_add_u32(y + (end - 1) * 4, 0)?;
            }
            let mut xs = [0u32; LANE_CHUNK];
            let mut ys = [0u32; LANE_CHUNK];
            // Load everything this invocation reads before its first store.
            let mut chunks = Vec::new();
            while j < end {
                let len = (end - j).min(LANE_CHUNK as u64) as usize;
                load_words(lane, x + j * 4, &mut xs[..len])?;
                load_words(lane, y + j * 4, &mut ys[..len])?;
                let mut out = Vec::with_capacity(len * 4);
                for k in 0..len {
                    out.extend_from_slice(&s.wrapping_mul(xs[k]).wrapping_add(ys[k]).to_le_bytes());
                }
                chunks.push((y + j * 4, out));
                j += len as u64;
            }
            for (va, bytes) in chunks {
                lane.store_bytes(va, &bytes)?;
            }
            Ok(())
        })))
    }

    fn chunk_sum(&self) -> Result<Box<CpuKernel>, BackendError> {
        Ok(Box::new(CpuKernel::new(|lane, i| {
            let a = lane.args();
            let (data, out, n, w) = (a[0], a[1], a[2], a[3]);
            let (mut j, end) = span(i, n, w);
            // Write intent first: the output faults in before the loads.
            lane.atomic_add_u32(out + u64::from(i) * 4, 0)?;
            let mut buf = [0u32; LANE_CHUNK];
            let mut sum = 0u32;
            while j < end {
                let len = (end - j).min(LANE_CHUNK as u64) as usize;
                load_words(lane, data + j * 4, &mut buf[..len])?;
                sum = buf[..len].iter().fold(sum, |s, v| s.wrapping_add(*v));
                j += len as u64;
            }
            lane.store_u32(out + u64::from(i) * 4, sum)
        })))
    }
}

/// `gather` in WGSL against the shader library (`shaders/wgsl/hmm.wgsl`).
/// A faulted load returns 0 and drops every later access, so the store
/// happens only on the fault-free run.
pub const WGSL_GATHER: &str = r#"
fn hmm_kernel(i: u32) {
    let k = hmm_load_u32(hmm_index(hmm_arg_ptr(1u), i, 4u));
    let v = hmm_load_u32(hmm_index(hmm_arg_ptr(0u), k, 4u));
    hmm_store_u32(hmm_index(hmm_arg_ptr(2u), i, 4u), v);
}
"#;

/// `saxpy` in WGSL (`u32`, wrapping). `w` must be at most 1024 words, so
/// one invocation's span of `x` (and of `y`) covers at most two pages,
/// which the probes of its first and last words map before any store.
pub const WGSL_SAXPY: &str = r#"
fn hmm_kernel(i: u32) {
    let x = hmm_arg_ptr(0u);
    let y = hmm_arg_ptr(1u);
    let a = hmm_arg_u32(2u);
    let n = hmm_arg_u32(3u);
    let w = hmm_arg_u32(4u);
    let start = i * w;
    if start >= n {
        return;
    }
    let end = min(start + w, n);
    // Every access that can fault, before any store that changes a value:
    // y for writing first (adding 0 changes nothing), then x for reading.
    _ = hmm_atomic_add_u32(hmm_index(y, start, 4u), 0u);
    _ = hmm_atomic_add_u32(hmm_index(y, end - 1u, 4u), 0u);
    _ = hmm_load_u32(hmm_index(x, start, 4u));
    _ = hmm_load_u32(hmm_index(x, end - 1u, 4u));
    if hmm_faulted() {
        return;
    }
    var xs: array<u32, 64>;
    var ys: array<u32, 64>;
    for (var b = start; b < end; b += 64u) {
        let m = min(64u, end - b);
        for (var k = 0u; k < m; k++) {
            xs[k] = hmm_load_u32(hmm_index(x, b + k, 4u));
        }
        for (var k = 0u; k < m; k++) {
            ys[k] = hmm_load_u32(hmm_index(y, b + k, 4u));
        }
        for (var k = 0u; k < m; k++) {
            hmm_store_u32(hmm_index(y, b + k, 4u), a * xs[k] + ys[k]);
        }
    }
}
"#;

/// `chunk_sum` in WGSL (`u32`, wrapping): loads first, one store last.
pub const WGSL_CHUNK_SUM: &str = r#"
fn hmm_kernel(i: u32) {
    let data = hmm_arg_ptr(0u);
    let outp = hmm_index(hmm_arg_ptr(1u), i, 4u);
    let n = hmm_arg_u32(2u);
    let w = hmm_arg_u32(3u);
    // Write intent first (adding 0 changes nothing): the output faults in
    // before the loads, not after a whole span was summed.
    _ = hmm_atomic_add_u32(outp, 0u);
    let start = min(i * w, n);
    let end = min(start + w, n);
    var sum = 0u;
    for (var j = start; j < end; j++) {
        sum += hmm_load_u32(hmm_index(data, j, 4u));
        if hmm_faulted() {
            return;
        }
    }
    hmm_store_u32(outp, sum);
}
"#;

/// The WGSL kernels on a GPU driver whose `kernel(&str)` builds a
/// pipeline from WGSL against the shader library.
macro_rules! wgsl_bench_kernels {
    ($dev:ty, $kernel:ty) => {
        impl BenchKernels for $dev {
            fn words_per_invocation(&self) -> u32 {
                // At most 1024 (WGSL_SAXPY's probes cover two pages); a
                // page per invocation keeps the replay rounds of a dense
                // launch cheap.
                1024
            }

            fn gather(&self) -> Result<Box<$kernel>, BackendError> {
                self.kernel(WGSL_GATHER).map(Box::new)
            }

            fn saxpy(&self) -> Result<Box<$kernel>, BackendError> {
                self.kernel(WGSL_SAXPY).map(Box::new)
            }

            fn chunk_sum(&self) -> Result<Box<$kernel>, BackendError> {
                self.kernel(WGSL_CHUNK_SUM).map(Box::new)
            }
        }
    };
}

wgsl_bench_kernels!(WgpuDevice, WgpuKernel);
wgsl_bench_kernels!(VulkanDevice, VulkanKernel);

/// The CPU's answer for `chunk_sum` over `data` with chunks of `w` words.
pub fn chunk_sums(data: &[u32], w: usize) -> Vec<u32> {
    data.chunks(w)
        .map(|c| c.iter().fold(0u32, |s, v| s.wrapping_add(*v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wgsl_kernels_validate_against_the_library() {
        for (name, src) in [
            ("gather", WGSL_GATHER),
            ("saxpy", WGSL_SAXPY),
            ("chunk_sum", WGSL_CHUNK_SUM),
        ] {
            if let Err(e) = hmm_shaders::build(src) {
                panic!("{name}: {e}");
            }
        }
    }

    /// The WGSL kernels on a GPU device, against the CPU's answers (a
    /// span that straddles pages, faults in the middle of every round).
    fn wgsl_kernels_match_the_cpu<B: BenchKernels>(dev: B)
    where
        B::Kernel: Sized,
    {
        use std::sync::Arc;
        let host = Arc::new(hmm_core::cpu::host::HostSpace::new().unwrap());
        let m = hmm_core::mirror::Mirror::new(host, dev, Default::default()).unwrap();
        let n = 5000u32; // 4.9 spans of 1024 words: a short tail
        let x: Vec<u32> = (0..n).map(|j| j.wrapping_mul(0x9e37_79b9)).collect();
        let mut y: Vec<u32> = (0..n).map(|j| j ^ 0x5555).collect();
        let want: Vec<u32> = (0..n as usize)
            .map(|j| 7u32.wrapping_mul(x[j]).wrapping_add(y[j]))
            .collect();
        let w = m.backend().words_per_invocation();
        let k = m.backend().saxpy().unwrap();
        let args = [
            x.as_ptr() as u64,
            y.as_mut_ptr() as u64,
            7,
            u64::from(n),
            u64::from(w),
        ];
        m.launch(&k, n.div_ceil(w), args).unwrap();
        assert_eq!(y, want, "saxpy");
        let mut sums = vec![0u32; n.div_ceil(w) as usize];
        let k = m.backend().chunk_sum().unwrap();
        let args = [
            x.as_ptr() as u64,
            sums.as_mut_ptr() as u64,
            u64::from(n),
            u64::from(w),
        ];
        m.launch(&k, n.div_ceil(w), args).unwrap();
        assert_eq!(sums, chunk_sums(&x, w as usize), "chunk_sum");
        let idx: Vec<u32> = (0..100).map(|i| (i * 37) % n).collect();
        let mut out = vec![0u32; 100];
        let k = m.backend().gather().unwrap();
        let args = [
            x.as_ptr() as u64,
            idx.as_ptr() as u64,
            out.as_mut_ptr() as u64,
        ];
        m.launch(&k, 100, args).unwrap();
        let want: Vec<u32> = idx.iter().map(|&i| x[i as usize]).collect();
        assert_eq!(out, want, "gather");
    }

    #[test]
    fn wgsl_kernels_match_the_cpu_on_wgpu() {
        if let Some(dev) = hmm_driver_wgpu::test_device() {
            wgsl_kernels_match_the_cpu(dev);
        }
    }

    #[test]
    fn wgsl_kernels_match_the_cpu_on_vulkan() {
        if let Some(dev) = hmm_driver_vulkan::test_device() {
            wgsl_kernels_match_the_cpu(dev);
        }
    }

    #[test]
    fn chunk_sums_wrap_and_keep_the_short_tail() {
        assert_eq!(chunk_sums(&[u32::MAX, 2, 5], 2), vec![1, 5]);
    }
}
