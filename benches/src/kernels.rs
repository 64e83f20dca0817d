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
//! replay contract trivially: plain stores of values computed from inputs
//! the invocation does not modify (`saxpy` reads `y[j]` before it stores
//! it, and a replayed invocation re-reads the CPU's `y`, since its earlier
//! stores never became visible — the `cpu` driver buffers them, a GPU
//! driver must stop the invocation before its first store or the kernel
//! must load every input before storing; the WGSL versions should load
//! the whole chunk of `x` and `y` before the first store).

use hmm_core::mirror::backend::{Backend, BackendError};
use hmm_driver_cpu::{CpuDevice, CpuKernel, DeviceFault, Lane};

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
fn load_words(lane: &mut Lane<'_>, va: u64, out: &mut [u32]) -> Result<(), DeviceFault> {
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

/// The CPU's answer for `chunk_sum` over `data` with chunks of `w` words.
pub fn chunk_sums(data: &[u32], w: usize) -> Vec<u32> {
    data.chunks(w)
        .map(|c| c.iter().fold(0u32, |s, v| s.wrapping_add(*v)))
        .collect()
}
