//! How a mirror is sized ([`MirrorConfig`]), what a launch reports
//! ([`LaunchReport`]) and the advice users give ([`Advice`]).

use std::time::Duration;

use crate::cpu::chunk::DEFAULT_CHUNK_SIZES;

/// How a mirror is sized and behaves.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// Device pool size in 4 KiB slots (default 65536 = 256 MiB).
    pub pool_slots: u32,
    /// Device page-table budget in 4 KiB table pages (default 4096).
    pub table_pages: u32,
    /// Region sizes tried on a device fault, largest first (default
    /// 2 MiB, 64 KiB, 4 KiB).
    pub chunk_sizes: Vec<u64>,
    /// Faults serviced per batch (default 256, UVM's).
    pub fault_batch: usize,
    /// Replays of one launch before giving up (default 1000).
    pub max_replays: u32,
    /// Bound on one run's fault-retry loop (default 1 s).
    pub retry_timeout: Duration,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            pool_slots: 65536,
            table_pages: 4096,
            chunk_sizes: DEFAULT_CHUNK_SIZES.to_vec(),
            fault_batch: 256,
            max_replays: 1000,
            retry_timeout: Duration::from_secs(1),
        }
    }
}

/// What one launch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchReport {
    /// Device submissions (1 + replays).
    pub submissions: u32,
    /// Valid faults serviced.
    pub faults: u64,
    /// Pages copied in while servicing them (a zero-copy device: pages
    /// mapped, nothing copied).
    pub pages_in: u64,
    /// Dirty pages written back at the end.
    pub pages_out: u64,
    /// CPU-written pages invalidated at the start (sync point).
    pub cpu_written_pages: u64,
}

/// Advice on how a range is used ([`Mirror::advise`](super::Mirror::advise)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// Mostly read, by several devices: read faults map read-only copies on
    /// every mirror that wants one; a write collapses them.
    ReadMostly,
    /// Forget earlier advice for the range.
    Default,
}
