//! Non-blocking launches ([`Mirror::scope`]) on the cpu driver: results of
//! launches nobody waited for are not lost, `is_done` turns true, errors
//! come back through `wait`, a scope's launches run in submission order,
//! and the CPU makes progress while a launch is in flight. (The
//! conformance suite runs every launching scenario through the
//! non-blocking path too: `conformance.rs`.)

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmm_core::cpu::host::HostSpace;
use hmm_core::mirror::params::{In, InOut, Typed};
use hmm_core::mirror::{AccessError, Mirror, MirrorConfig, MirrorError};
use hmm_driver_cpu::{CpuDevice, CpuKernel};

fn mirror() -> Mirror<CpuDevice> {
    let host = Arc::new(HostSpace::new().expect("host space"));
    let cfg = MirrorConfig {
        pool_slots: 1024,
        table_pages: 256,
        ..MirrorConfig::default()
    };
    Mirror::new(host, CpuDevice::with_threads(2), cfg).expect("mirror")
}

/// `dst[i] = base + i`; args `[dst, base]`.
fn fill() -> CpuKernel {
    CpuKernel::new(|lane, i| {
        let a = lane.args();
        let (dst, base) = (a[0], a[1] as u32);
        lane.store_u32(dst + 4 * u64::from(i), base + i)
    })
}

/// `out[i] = src[i]`; args `[src, out]`.
fn copy() -> CpuKernel {
    CpuKernel::new(|lane, i| {
        let a = lane.args();
        let (src, out) = (a[0], a[1]);
        let v = lane.load_u32(src + 4 * u64::from(i))?;
        lane.store_u32(out + 4 * u64::from(i), v)
    })
}

/// Polls `p` until it is done (a hang guard, not a timing assertion: the
/// launches here take milliseconds).
fn until_done<T>(p: &hmm_core::mirror::Pending<'_, T>) {
    let t0 = Instant::now();
    while !p.is_done() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the launch never finished"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A launch whose handle is dropped (or forgotten) unwaited still runs to
/// completion before the scope returns, and its error is what the scope
/// returns — unless the closure returned an error of its own.
#[test]
fn unwaited_results_are_not_lost() {
    let m = mirror();
    let k = fill();
    let mut out = vec![0u32; 4096];
    // A successful launch nobody waited for: done (writes visible) when
    // the scope returns, and the scope returns the closure's value.
    let v = m
        .scope(|s| {
            let p = s.launch(&k, 4096, (out.as_mut_ptr(), 10u32));
            std::mem::forget(p);
            Ok(7)
        })
        .expect("scope");
    assert_eq!(v, 7);
    assert!(out.iter().enumerate().all(|(i, &x)| x == 10 + i as u32));

    // A failing launch nobody waited for: its error is the scope's, even
    // though a later launch succeeded and was waited for.
    let r = m.scope(|s| {
        let _ = s.launch(&k, u32::MAX, (out.as_mut_ptr(), 0u32));
        s.launch(&k, 4096, (out.as_mut_ptr(), 20u32)).wait()
    });
    match r {
        Err(MirrorError::TooManyInvocations { n, .. }) => assert_eq!(n, u32::MAX),
        other => panic!("expected the unwaited TooManyInvocations, got {other:?}"),
    }
    assert!(out.iter().enumerate().all(|(i, &x)| x == 20 + i as u32));

    // The closure's own error outranks an unwaited launch's.
    let r: Result<(), _> = m.scope(|s| {
        let _ = s.launch(&k, u32::MAX, (out.as_mut_ptr(), 0u32));
        Err(MirrorError::Unsupported("the closure's own error"))
    });
    assert!(
        matches!(r, Err(MirrorError::Unsupported("the closure's own error"))),
        "{r:?}"
    );
}

/// `is_done` turns true by itself, and then the launch's writes are
/// already visible (before `wait`).
#[test]
fn is_done_becomes_true_with_writes_visible() {
    let m = mirror();
    let k = fill();
    let mut out = vec![0u32; 8192];
    let report = m
        .scope(|s| {
            let p = s.launch(&k, 8192, (out.as_mut_ptr(), 3u32));
            until_done(&p);
            // The write-back is complete once `is_done` is true.
            assert_eq!(out[8191], 3 + 8191, "visible once is_done is true");
            p.wait()
        })
        .expect("launch");
    assert!(report.faults > 0 && report.pages_out >= 8, "{report:?}");
    assert!(out.iter().enumerate().all(|(i, &x)| x == 3 + i as u32));
}

/// Errors come back through `wait`: too many invocations, and a device
/// fault naming the address the kernel used.
#[test]
fn errors_come_back_through_wait() {
    let m = mirror();
    let k = fill();
    let mut out = vec![0u32; 16];
    let (too_many, fault) = m
        .scope(|s| {
            let a = s.launch(&k, u32::MAX, (out.as_mut_ptr(), 0u32));
            let b = s.launch(&k, 1, (0x1000u64, 0u32));
            Ok((a.wait(), b.wait()))
        })
        .expect("the closure returned Ok and every launch was waited for");
    assert!(
        matches!(
            too_many,
            Err(MirrorError::TooManyInvocations { n: u32::MAX, .. })
        ),
        "{too_many:?}"
    );
    match fault {
        Err(MirrorError::DeviceFault {
            addr,
            write: true,
            reason: AccessError::Unmapped,
        }) => assert_eq!(addr.0, 0x1000),
        other => panic!("expected a DeviceFault at 0x1000, got {other:?}"),
    }
    // The mirror is fine afterwards.
    m.launch(&k, 16, (out.as_mut_ptr(), 1u32)).expect("launch");
    assert_eq!(out[15], 16);
}

/// Two launches submitted back to back in one scope both complete, one
/// after the other in submission order: the second reads what the first
/// wrote. Waiting for them in the other order changes nothing.
#[test]
fn two_launches_in_one_scope_run_in_order() {
    let m = mirror();
    let (f, c) = (fill(), copy());
    const N: u32 = 3 * 1024;
    let mut mid = vec![0u32; N as usize];
    let mut out = vec![0u32; N as usize];
    for round in 0..8u32 {
        let (ra, rb) = m
            .scope(|s| {
                let a = s.launch(&f, N, (mid.as_mut_ptr(), 1000 * round));
                let b = s.launch(&c, N, (mid.as_ptr(), out.as_mut_ptr()));
                let rb = b.wait()?;
                Ok((a.wait()?, rb))
            })
            .expect("both launches");
        assert!(ra.pages_out >= 3 && rb.pages_out >= 3, "{ra:?} {rb:?}");
        for (i, (&x, &y)) in mid.iter().zip(&out).enumerate() {
            assert_eq!(x, 1000 * round + i as u32, "round {round} word {i}");
            assert_eq!(y, x, "round {round}: the copy saw the fill");
        }
    }
}

/// The CPU keeps running while a launch is in flight. Progress, not time:
/// the kernel (one invocation) waits until the CPU loop's counter reaches
/// `GOAL` and records whether it did; the CPU loop counts while the
/// launch is not done. A blocking launch would never see the counter move
/// (the kernel would give up after its bound and record 0).
#[test]
fn cpu_progresses_while_a_launch_is_in_flight() {
    const GOAL: u64 = 1000;
    let m = mirror();
    let counter = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&counter);
    let k = CpuKernel::new(move |lane, _| {
        let out = lane.args()[0];
        // Fault the output in (writable) before the wait, so a replay
        // does not wait again.
        lane.atomic_add_u32(out, 0)?;
        let t0 = Instant::now();
        // A bound only so a broken overlap fails instead of hanging.
        while seen.load(Ordering::Relaxed) < GOAL && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_micros(200));
        }
        let reached = seen.load(Ordering::Relaxed) >= GOAL;
        lane.store_u32(out, u32::from(reached))
    });
    let mut flag = vec![0u32; 1];
    let counted = m
        .scope(|s| {
            let p = s.launch(&k, 1, (flag.as_mut_ptr(),));
            let mut n = 0u64;
            while !p.is_done() {
                n += 1;
                counter.store(n, Ordering::Relaxed);
                std::thread::yield_now();
            }
            p.wait()?;
            Ok(n)
        })
        .expect("launch");
    assert_eq!(
        flag[0], 1,
        "the kernel saw the CPU loop reach {GOAL} while it ran"
    );
    assert!(
        counted >= GOAL,
        "the CPU loop counted {counted} during the launch"
    );
}

/// A panic in a `launch_with` closure is resumed by `wait` — and by the
/// end of the scope when nobody waited; the mirror keeps working, and the
/// scope's other launches still run.
#[test]
fn panics_in_launch_with_are_resumed() {
    let m = mirror();
    let k = fill();
    let mut out = vec![0u32; 1024];
    let caught = catch_unwind(AssertUnwindSafe(|| {
        m.scope(|s| {
            let p = s.launch_with(|_| -> Result<(), MirrorError> { panic!("boom in wait") });
            p.wait()
        })
    }));
    let msg = caught.expect_err("wait resumed the panic");
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"boom in wait"));

    let caught = catch_unwind(AssertUnwindSafe(|| {
        m.scope(|s| {
            let _ = s.launch_with(|_| -> Result<(), MirrorError> { panic!("boom unwaited") });
            let _ = s.launch(&k, 1024, (out.as_mut_ptr(), 5u32));
            Ok(())
        })
    }));
    let msg = caught.expect_err("the scope's end resumed the panic");
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"boom unwaited"));
    assert_eq!(out[1023], 5 + 1023, "the launch after the panic ran");
}

/// `launch_with` is the entry point for wrappers: its closure may borrow
/// (here the output slice, mutably, for the whole scope) and return any
/// value.
#[test]
fn launch_with_borrows_for_the_scope() {
    let m = mirror();
    let k = fill();
    let mut out = vec![0u32; 2048];
    let other = vec![1u64; 1 << 16];
    let (words, sum) = m
        .scope(|s| {
            let dst: &mut [u32] = &mut out;
            let k = &k;
            let p = s.launch_with(move |m| {
                let r = m.launch(k, dst.len() as u32, (dst.as_mut_ptr(), 100u32))?;
                Ok((dst.len(), r))
            });
            let sum: u64 = other.iter().sum();
            let (words, _report) = p.wait()?;
            Ok((words, sum))
        })
        .expect("launch");
    assert_eq!((words, sum), (2048, 1 << 16));
    assert!(out.iter().enumerate().all(|(i, &x)| x == 100 + i as u32));
}

/// The typed launch without waiting: `Scope::run` takes the arguments
/// `Mirror::run` takes (checked against the declared parameters), keeps
/// the slices borrowed until the scope ends, and its result comes from
/// `wait`.
#[test]
fn typed_run_in_a_scope() {
    let m = mirror();
    let k: Typed<CpuKernel, (In<u32>, InOut<u32>)> = Typed::new(copy());
    let x: Vec<u32> = (0..4096).map(|i| i * 3).collect();
    let mut y = vec![0u32; 4096];
    let other: Vec<u64> = (0..1 << 16).collect();
    let (report, sum) = m
        .scope(|s| {
            let p = s.run(&k, 4096, (&x, &mut y));
            let sum: u64 = other.iter().sum();
            Ok((p.wait()?, sum))
        })
        .expect("typed launch");
    assert_eq!(sum, (1u64 << 16) * ((1 << 16) - 1) / 2);
    assert!(report.pages_out >= 4, "{report:?}");
    assert_eq!(y, x);
}
