//! The smallest backend a driver developer would start from: a toy
//! "device" whose pool and page table are host vectors and whose kernels
//! are Rust closures that walk the page table in software. It implements
//! every method of [`Backend`] and then runs part of the generic
//! conformance suite on itself — the path a real driver follows
//! (`drivers/cpu` is the full-featured version of this file).
//!
//! `cargo run --release --example custom_backend`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use hmm::{HostSpace, InOut, Mirror, MirrorConfig, Typed};
use hmm_conformance::{self as conformance, TestKernel, TestKernels};
use hmm_core::mirror::backend::{
    Backend, BackendError, BackendInfo, DeviceConfig, DeviceToHost, HostToDevice, InvocationSet,
    Invocations, LaunchOutcome, PteLoc, PteWrite, RawFaultRecord, SubmissionId, FAULT_WRITE,
};
use hmm_core::mirror::format::{
    level_index, Pte, ACCESSED, DIRTY, ENTRIES, LEVELS, TABLE_PAGE_BYTES,
};

const PAGE: usize = TABLE_PAGE_BYTES as usize;

/// Device memory: the pool and the page table.
#[derive(Default)]
struct Memory {
    pool: Vec<u8>,
    table: Vec<u64>,
}

/// The toy device. Work runs synchronously inside `launch`, so every
/// submission is complete when `launch` returns.
#[derive(Default)]
struct ToyDevice {
    mem: Mutex<Memory>,
    outcomes: Mutex<HashMap<u64, LaunchOutcome>>,
    next: Mutex<u64>,
}

/// A kernel: per invocation, a closure over a [`ToyLane`].
type ToyKernel = dyn Fn(&mut ToyLane<'_>, u32) -> Option<()> + Send + Sync;

/// What a kernel sees: its arguments and translated memory.
struct ToyLane<'a> {
    mem: &'a mut Memory,
    args: &'a [u64],
    fault: Option<(u64, bool)>,
}

impl ToyLane<'_> {
    /// Walks the table; records a fault and returns `None` when unmapped.
    fn translate(&mut self, va: u64, write: bool) -> Option<usize> {
        let mut table = 0usize;
        for level in (1..=LEVELS).rev() {
            let i = table * ENTRIES + level_index(va, level);
            let e = Pte(self.mem.table[i]);
            if !e.valid() || (level == 1 && write && !e.writable()) {
                self.fault = Some((va, write));
                return None;
            }
            if level == 1 {
                self.mem.table[i] |= ACCESSED | if write { DIRTY } else { 0 };
                return Some(e.index() as usize * PAGE + (va as usize % PAGE));
            }
            table = e.index() as usize;
        }
        None
    }
    fn load_u32(&mut self, va: u64) -> Option<u32> {
        let at = self.translate(va, false)?;
        Some(u32::from_le_bytes(
            self.mem.pool[at..at + 4].try_into().ok()?,
        ))
    }
    fn store_u32(&mut self, va: u64, v: u32) -> Option<()> {
        let at = self.translate(va, true)?;
        self.mem.pool[at..at + 4].copy_from_slice(&v.to_le_bytes());
        Some(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// SAFETY: copy_to_device reads exactly 4096 bytes at each `src`, and
// copy_to_host writes exactly 4096 bytes at each `dst`, both before
// returning; kernels touch only the device's own vectors; the device sets
// only ACCESSED/DIRTY (under the memory lock, so no update is lost).
unsafe impl Backend for ToyDevice {
    type Kernel = ToyKernel;

    fn info(&self) -> BackendInfo {
        BackendInfo {
            driver: "toy".into(),
            device: "host vectors".into(),
            max_pool_slots: 1 << 16,
        }
    }

    fn init(&self, c: DeviceConfig) -> Result<(), BackendError> {
        let mut m = lock(&self.mem);
        m.pool = vec![0; c.pool_slots as usize * PAGE];
        m.table = vec![0; c.table_pages.max(1) as usize * ENTRIES];
        Ok(())
    }

    unsafe fn copy_to_device(&self, batch: &[HostToDevice]) -> Result<(), BackendError> {
        let mut m = lock(&self.mem);
        for c in batch {
            let at = c.slot.0 as usize * PAGE;
            // SAFETY: the caller guarantees `src` is readable for 4096 bytes.
            let src = unsafe { core::slice::from_raw_parts(c.src, PAGE) };
            m.pool[at..at + PAGE].copy_from_slice(src);
        }
        Ok(())
    }

    unsafe fn copy_to_host(&self, batch: &[DeviceToHost]) -> Result<(), BackendError> {
        let m = lock(&self.mem);
        for c in batch {
            let at = c.slot.0 as usize * PAGE;
            // SAFETY: the caller guarantees `dst` is writable for 4096
            // bytes and aliased by nothing; the pool is ours.
            unsafe { core::ptr::copy_nonoverlapping(m.pool[at..].as_ptr(), c.dst, PAGE) };
        }
        Ok(())
    }

    fn write_ptes(&self, batch: &[PteWrite]) -> Result<(), BackendError> {
        let mut m = lock(&self.mem);
        for w in batch {
            m.table[w.table.0 as usize * ENTRIES + usize::from(w.index)] = w.pte.0;
        }
        Ok(())
    }

    fn read_ptes(&self, locs: &[PteLoc], out: &mut Vec<Pte>) -> Result<(), BackendError> {
        let m = lock(&self.mem);
        out.extend(
            locs.iter()
                .map(|l| Pte(m.table[l.table.0 as usize * ENTRIES + usize::from(l.index)])),
        );
        Ok(())
    }

    fn clear_pte_bits(
        &self,
        locs: &[PteLoc],
        bits: u64,
        old: &mut Vec<Pte>,
    ) -> Result<(), BackendError> {
        let mut m = lock(&self.mem);
        for l in locs {
            let e = &mut m.table[l.table.0 as usize * ENTRIES + usize::from(l.index)];
            old.push(Pte(*e));
            *e &= !bits;
        }
        Ok(())
    }

    fn launch(
        &self,
        k: &ToyKernel,
        inv: Invocations<'_>,
        args: &[u64],
    ) -> Result<SubmissionId, BackendError> {
        // The outcome's set is bounded by the launch's universe (`n`, or
        // the replayed set's): at most n/8 bytes whatever faults.
        let (ids, universe): (Vec<u32>, u32) = match inv {
            Invocations::All(n) => ((0..n).collect(), n),
            Invocations::Only(v) => (v.iter().collect(), v.universe()),
        };
        let mut outcome = LaunchOutcome {
            incomplete: InvocationSet::new(universe),
            ..LaunchOutcome::default()
        };
        let mut m = lock(&self.mem);
        for i in ids {
            let mut lane = ToyLane {
                mem: &mut m,
                args,
                fault: None,
            };
            if k(&mut lane, i).is_none() {
                let (va, write) = lane.fault.unwrap_or((0, false));
                outcome.incomplete.insert(i);
                outcome.faults.push(RawFaultRecord {
                    invocation: i,
                    flags: if write { FAULT_WRITE } else { 0 },
                    addr_lo: va as u32,
                    addr_hi: (va >> 32) as u32,
                });
            }
        }
        let mut next = lock(&self.next);
        *next += 1;
        lock(&self.outcomes).insert(*next, outcome);
        Ok(SubmissionId(*next))
    }

    fn wait(&self, _: SubmissionId, _: Option<Duration>) -> Result<bool, BackendError> {
        Ok(true) // work ran inside launch
    }

    fn is_complete(&self, _: SubmissionId) -> bool {
        true
    }

    fn take_outcome(&self, id: SubmissionId) -> Result<LaunchOutcome, BackendError> {
        lock(&self.outcomes)
            .remove(&id.0)
            .ok_or(BackendError::UnknownSubmission(id))
    }
}

impl TestKernels for ToyDevice {
    fn test_kernel(&self, k: TestKernel) -> Result<Box<ToyKernel>, BackendError> {
        Ok(match k {
            TestKernel::CopyU32 => Box::new(|l: &mut ToyLane<'_>, i| {
                let off = u64::from(i) * 4;
                let v = l.load_u32(l.args[0] + off)?;
                l.store_u32(l.args[1] + off, v)
            }),
            TestKernel::FillU32 => Box::new(|l: &mut ToyLane<'_>, i| {
                l.store_u32(
                    l.args[0] + u64::from(i) * 4,
                    (l.args[1] as u32).wrapping_add(i),
                )
            }),
            TestKernel::IncrementU32 => Box::new(|l: &mut ToyLane<'_>, i| {
                let p = l.args[0] + u64::from(i) * 4;
                let v = l.load_u32(p)?;
                l.store_u32(p, v.wrapping_add(1))
            }),
            // Not needed by the scenarios run below; a real driver
            // implements every kernel and runs `conformance_tests!`.
            TestKernel::ListSum | TestKernel::GatherSum => {
                return Err(BackendError::Kernel(format!("{k:?}: not in the toy")))
            }
        })
    }
}

#[derive(Parser)]
struct Args {
    /// Accepted for symmetry with the other examples; this one always runs
    /// its own toy backend.
    #[arg(long, default_value = "toy")]
    backend: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.backend != "toy" {
        println!(
            "note: custom_backend always runs its own toy backend (--backend {} ignored)",
            args.backend
        );
    }
    println!("backend: toy (host vectors, software page walk)");
    // 1. Use it like any other device.
    let host = Arc::new(HostSpace::new()?);
    let mirror = Mirror::new(
        host,
        ToyDevice::default(),
        MirrorConfig {
            pool_slots: 256,
            table_pages: 64,
            ..MirrorConfig::default()
        },
    )?;
    // A backend's own kernels get typed parameters by declaring them: the
    // launch below is then checked by the compiler (`&mut v` passes the
    // Vec's data).
    let k: Typed<_, (InOut<u32>,)> =
        Typed::new(mirror.backend().test_kernel(TestKernel::IncrementU32)?);
    let mut v: Vec<u32> = (0..10_000).collect();
    mirror.run(&k, v.len() as u32, (&mut v,))?;
    if v.iter().enumerate().any(|(i, &x)| x != i as u32 + 1) {
        return Err("toy increment: wrong result".into());
    }
    println!(
        "toy device incremented {} words in place; counters:\n{}",
        v.len(),
        mirror.stats()
    );
    drop(mirror);

    // 2. Run scenarios of the generic conformance suite, as a real driver's
    //    tests do with `hmm_conformance::conformance_tests!`.
    conformance::open_close(ToyDevice::default());
    conformance::anon_read(ToyDevice::default());
    conformance::anon_write(ToyDevice::default());
    conformance::anon_read_prot(ToyDevice::default());
    conformance::eviction_under_a_small_pool(ToyDevice::default());
    conformance::dirty_pages_survive_eviction(ToyDevice::default());
    println!("custom_backend: the toy passes open_close, anon_read, anon_write, anon_read_prot, eviction_under_a_small_pool, dirty_pages_survive_eviction");
    Ok(())
}
