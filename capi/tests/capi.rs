//! The C API called as C calls it: through the `extern "C"` functions,
//! with raw pointers. Every bad input asserts its code (and where it
//! matters its message); saxpy runs through the API on the cpu driver and,
//! where a device opens, on wgpu and vulkan (a `skip:` line otherwise;
//! `HMM_REQUIRE_GPU=1` makes a missing device a failure).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::{null, null_mut};

use hmm_capi::hmm_status_code::*;
use hmm_capi::*;

fn status() -> hmm_status {
    hmm_status {
        code: HMM_PANIC,
        message: [0; HMM_STATUS_MESSAGE_LEN],
    }
}

fn message(st: &hmm_status) -> String {
    // SAFETY: the library NUL-terminates the message inside the buffer.
    unsafe { CStr::from_ptr(st.message.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

const SAXPY_WGSL: &CStr = c"
fn hmm_kernel(i: u32) {
    let x = hmm_arg_ptr(0u);
    let y = hmm_arg_ptr(1u);
    let a = hmm_arg_f32(2u);
    let yp = hmm_index(y, i, 4u);
    let xi = hmm_load_f32(hmm_index(x, i, 4u));
    hmm_store_f32(yp, a * xi + hmm_load_f32(yp));
}
";

/// The cpu driver's saxpy, as a C program would write it.
unsafe extern "C" fn saxpy_cpu(lane: *mut hmm_lane, i: u32, _ctx: *mut c_void) -> c_int {
    // SAFETY: `lane` is the handle of the running callback.
    unsafe {
        let (x, y, a) = (
            hmm_lane_arg(lane, 0),
            hmm_lane_arg(lane, 1),
            hmm_lane_arg_f32(lane, 2),
        );
        let off = u64::from(i) * 4;
        let (mut xi, mut yi) = (0f32, 0f32);
        if hmm_lane_load_f32(lane, x + off, &mut xi) != HMM_OK
            || hmm_lane_load_f32(lane, y + off, &mut yi) != HMM_OK
            || hmm_lane_store_f32(lane, y + off, a * xi + yi) != HMM_OK
        {
            return 1;
        }
        0
    }
}

/// Opens `driver`, or `None` with a skip line when a GPU driver has no
/// device here (a failure under `HMM_REQUIRE_GPU=1`).
fn open(driver: &str) -> Option<*mut hmm_mirror> {
    let name = CString::new(driver).unwrap();
    let mut st = status();
    // SAFETY: a C string and a writable status.
    let dev = unsafe { hmm_device_open(name.as_ptr(), &mut st) };
    if dev.is_null() {
        assert_eq!(st.code, HMM_NO_DEVICE, "{}", message(&st));
        assert!(
            driver != "cpu" && std::env::var("HMM_REQUIRE_GPU").as_deref() != Ok("1"),
            "HMM_REQUIRE_GPU=1 but no {driver} device: {}",
            message(&st)
        );
        println!("skip: no {driver} device: {}", message(&st));
        return None;
    }
    assert_eq!(st.code, HMM_OK);
    assert_eq!(message(&st), "");
    // SAFETY: a live device.
    let got = unsafe { CStr::from_ptr(hmm_device_driver(dev)) };
    assert_eq!(got.to_str().unwrap(), driver);
    // SAFETY: a live device, consumed; NULL config is the defaults.
    let m = unsafe { hmm_mirror_new(dev, null(), &mut st) };
    assert!(!m.is_null(), "{}", message(&st));
    Some(m)
}

fn saxpy_kernel(m: *mut hmm_mirror) -> *mut hmm_kernel {
    let mut st = status();
    // SAFETY: a live mirror, a C string, a callback that follows the rules.
    let k = unsafe { hmm_kernel_new(m, SAXPY_WGSL.as_ptr(), Some(saxpy_cpu), null_mut(), &mut st) };
    assert!(!k.is_null(), "{}", message(&st));
    k
}

fn args(x: &[f32], y: &mut [f32], a: f32) -> [hmm_arg; 3] {
    [
        hmm_arg {
            kind: hmm_arg_kind::HMM_ARG_PTR as u32,
            value: hmm_arg_value {
                ptr: x.as_ptr().cast(),
            },
        },
        hmm_arg {
            kind: hmm_arg_kind::HMM_ARG_PTR as u32,
            value: hmm_arg_value {
                ptr: y.as_mut_ptr().cast(),
            },
        },
        hmm_arg {
            kind: hmm_arg_kind::HMM_ARG_F32 as u32,
            value: hmm_arg_value { f32: a },
        },
    ]
}

/// saxpy through the API: blocking launch with a report, a prefetch, a
/// non-blocking launch, stats.
fn saxpy_on(driver: &str) {
    let Some(m) = open(driver) else { return };
    let k = saxpy_kernel(m);
    let n = 100_000usize;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
    let mut y: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let y0 = y.clone();
    let a = 2.5f32;
    let argv = args(&x, &mut y, a);
    let mut st = status();
    // A fresh buffer: prefetching it makes every page resident.
    let z = vec![1u32; n];
    let mut pages = 0u64;
    // SAFETY: a live mirror; `z` is not dereferenced by the call.
    let code = unsafe { hmm_prefetch(m, z.as_ptr().cast(), n * 4, 0, &mut pages, &mut st) };
    assert_eq!(code, HMM_OK, "{}", message(&st));
    assert!(pages >= (n * 4 / 4096) as u64, "{pages}");
    let mut r = hmm_launch_report::default();
    // SAFETY: live handles, three initialised arguments, writable outputs.
    let code = unsafe { hmm_launch(m, k, n as u32, argv.as_ptr(), 3, &mut r, &mut st) };
    assert_eq!(code, HMM_OK, "{}", message(&st));
    assert_eq!(st.code, HMM_OK);
    assert!(
        r.submissions >= 2,
        "the first launch faults and replays: {r:?}"
    );
    assert!(r.pages_in > 0 && r.pages_out > 0, "{r:?}");
    let close = |got: f32, want: f32| (got - want).abs() <= want.abs() * 2e-6 + 2e-6;
    for i in 0..n {
        assert!(close(y[i], a * x[i] + y0[i]), "{driver}: y[{i}] = {}", y[i]);
    }

    // The CPU resets y, prefetches both (one bulk copy each instead of
    // faults), then launches without blocking.
    y.copy_from_slice(&y0);
    // SAFETY: a live mirror; `x` is not dereferenced by the call.
    let code = unsafe { hmm_prefetch(m, x.as_ptr().cast(), n * 4, 0, null_mut(), &mut st) };
    assert_eq!(code, HMM_OK, "{}", message(&st));
    // SAFETY: as above.
    let code = unsafe { hmm_prefetch(m, y.as_ptr().cast(), n * 4, 1, null_mut(), &mut st) };
    assert_eq!(code, HMM_OK, "{}", message(&st));
    // SAFETY: as for `hmm_launch`.
    let h = unsafe { hmm_launch_async(m, k, n as u32, argv.as_ptr(), 3, &mut st) };
    assert!(!h.is_null(), "{}", message(&st));
    // SAFETY: a handle not yet waited for.
    let done = unsafe { hmm_launch_is_done(h) };
    assert!(done == 0 || done == 1);
    let mut r2 = hmm_launch_report::default();
    // SAFETY: the handle, consumed; writable outputs.
    let code = unsafe { hmm_launch_wait(h, &mut r2, &mut st) };
    assert_eq!(code, HMM_OK, "{}", message(&st));
    assert!(r2.submissions >= 1 && r2.pages_out > 0, "{r2:?}");
    for i in 0..n {
        assert!(
            close(y[i], a * x[i] + y0[i]),
            "{driver} async: y[{i}] = {}",
            y[i]
        );
    }

    let mut s = hmm_stats::default();
    // SAFETY: a live mirror and a writable struct.
    let code = unsafe { hmm_mirror_stats(m, &mut s, &mut st) };
    assert_eq!(code, HMM_OK);
    assert_eq!(s.launches, 2);
    assert!(
        s.prefetched > 0 && s.pages_out >= r.pages_out + r2.pages_out,
        "{s:?}"
    );
    assert!(s.pool_capacity > 0 && s.mapped_pages > 0, "{s:?}");
    // SAFETY: live handles, not used again.
    unsafe {
        hmm_kernel_free(k);
        hmm_mirror_free(m);
    }
}

#[test]
fn saxpy_on_cpu() {
    saxpy_on("cpu");
}

#[test]
fn saxpy_on_wgpu() {
    saxpy_on("wgpu");
}

#[test]
fn saxpy_on_vulkan() {
    saxpy_on("vulkan");
}

#[test]
fn null_handles_are_invalid_arguments() {
    let mut st = status();
    // SAFETY: every pointer is NULL or valid; NULL handles are the point.
    unsafe {
        assert!(hmm_mirror_new(null_mut(), null(), &mut st).is_null());
        assert_eq!(st.code, HMM_INVALID_ARGUMENT);
        assert!(message(&st).contains("NULL"), "{}", message(&st));
        let k = hmm_kernel_new(
            null(),
            SAXPY_WGSL.as_ptr(),
            Some(saxpy_cpu),
            null_mut(),
            &mut st,
        );
        assert!(k.is_null());
        assert_eq!(st.code, HMM_INVALID_ARGUMENT);
        let code = hmm_launch(null(), null(), 1, null(), 0, null_mut(), &mut st);
        assert_eq!(
            (code, st.code),
            (HMM_INVALID_ARGUMENT, HMM_INVALID_ARGUMENT)
        );
        assert!(hmm_launch_async(null(), null(), 1, null(), 0, &mut st).is_null());
        assert_eq!(st.code, HMM_INVALID_ARGUMENT);
        let code = hmm_launch_wait(null_mut(), null_mut(), &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT);
        assert_eq!(hmm_launch_is_done(null()), 0);
        let code = hmm_prefetch(null(), 4096 as *const c_void, 4096, 0, null_mut(), &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT);
        let code = hmm_advise(null(), 4096 as *const c_void, 4096, 0, &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT);
        let code = hmm_mirror_stats(null(), null_mut(), &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT);
        // A NULL status is allowed everywhere; the code still comes back.
        let code = hmm_launch(null(), null(), 1, null(), 0, null_mut(), null_mut());
        assert_eq!(code, HMM_INVALID_ARGUMENT);
        assert!(hmm_device_note(null()).is_null());
        assert!(hmm_device_driver(null()).is_null());
        assert!(hmm_mirror_driver(null()).is_null());
        assert_eq!(hmm_mirror_max_invocations(null()), 0);
        // Lane accessors outside a callback, with a NULL lane.
        let mut v = 0u32;
        assert_eq!(
            hmm_lane_load_u32(null_mut(), 0, &mut v),
            HMM_INVALID_ARGUMENT
        );
        assert_eq!(hmm_lane_store_f64(null_mut(), 0, 1.0), HMM_INVALID_ARGUMENT);
        assert_eq!(
            hmm_lane_atomic_add_u32(null_mut(), 0, 1, null_mut()),
            HMM_INVALID_ARGUMENT
        );
        assert_eq!(hmm_lane_arg(null_mut(), 0), 0);
        assert_eq!(hmm_lane_nargs(null_mut()), 0);
        // Freeing NULL does nothing.
        hmm_device_free(null_mut());
        hmm_mirror_free(null_mut());
        hmm_kernel_free(null_mut());
    }
    let m = open("cpu").unwrap();
    // SAFETY: a live mirror; the kernel is NULL on purpose.
    unsafe {
        let code = hmm_launch(m, null(), 1, null(), 0, null_mut(), &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT);
        assert!(message(&st).contains("kernel is NULL"), "{}", message(&st));
        assert_eq!(
            hmm_mirror_stats(m, null_mut(), &mut st),
            HMM_INVALID_ARGUMENT
        );
        hmm_mirror_free(m);
    }
}

#[test]
fn bad_driver_names_are_invalid_arguments() {
    let mut st = status();
    // SAFETY: C strings and a writable status.
    unsafe {
        assert!(hmm_device_open(c"nosuch".as_ptr(), &mut st).is_null());
        assert_eq!(st.code, HMM_INVALID_ARGUMENT);
        let msg = message(&st);
        assert!(
            msg.contains("nosuch") && msg.contains("cpu, wgpu, vulkan or auto"),
            "{msg}"
        );
        let bad = [0xffu8 as c_char, 0];
        assert!(hmm_device_open(bad.as_ptr(), &mut st).is_null());
        assert_eq!(st.code, HMM_INVALID_ARGUMENT);
        assert!(message(&st).contains("UTF-8"), "{}", message(&st));
    }
}

#[test]
fn a_cpu_kernel_without_callback_is_a_typed_error() {
    let m = open("cpu").unwrap();
    let mut st = status();
    // SAFETY: a live mirror and a C string; no callback on purpose.
    unsafe {
        let k = hmm_kernel_new(m, SAXPY_WGSL.as_ptr(), None, null_mut(), &mut st);
        assert!(k.is_null());
        assert_eq!(st.code, HMM_UNSUPPORTED);
        assert!(message(&st).contains("cpu_fn is NULL"), "{}", message(&st));
        // Neither WGSL nor a callback: the same.
        assert!(hmm_kernel_new(m, null(), None, null_mut(), &mut st).is_null());
        assert_eq!(st.code, HMM_UNSUPPORTED);
        // A callback alone is enough on the cpu driver.
        let k = hmm_kernel_new(m, null(), Some(saxpy_cpu), null_mut(), &mut st);
        assert!(!k.is_null(), "{}", message(&st));
        hmm_kernel_free(k);
        hmm_mirror_free(m);
    }
}

/// Bad WGSL is `HMM_KERNEL` naming the line on every driver, the cpu
/// driver included (it validates the WGSL it does not run).
#[test]
fn bad_wgsl_is_a_kernel_error_on_every_driver() {
    let bad = c"fn hmm_kernel(i: u32) {\n    let x = ;\n}\n";
    for driver in ["cpu", "wgpu", "vulkan"] {
        let Some(m) = open(driver) else { continue };
        let mut st = status();
        // SAFETY: a live mirror, a C string, a valid callback.
        let k = unsafe { hmm_kernel_new(m, bad.as_ptr(), Some(saxpy_cpu), null_mut(), &mut st) };
        assert!(k.is_null(), "{driver}");
        assert_eq!(st.code, HMM_KERNEL, "{driver}: {}", message(&st));
        let msg = message(&st);
        assert!(
            msg.contains("parse") && msg.contains("kernel:2:13"),
            "{driver}: {msg}"
        );
        if driver != "cpu" {
            // GPU drivers need WGSL.
            // SAFETY: as above.
            let k = unsafe { hmm_kernel_new(m, null(), Some(saxpy_cpu), null_mut(), &mut st) };
            assert!(k.is_null());
            assert_eq!(st.code, HMM_INVALID_ARGUMENT, "{driver}: {}", message(&st));
        }
        // SAFETY: a live mirror, not used again.
        unsafe { hmm_mirror_free(m) };
    }
}

#[test]
fn too_many_invocations_is_typed() {
    let m = open("cpu").unwrap();
    let k = saxpy_kernel(m);
    let mut st = status();
    // SAFETY: live handles; no arguments (nothing runs).
    unsafe {
        let max = hmm_mirror_max_invocations(m);
        assert_eq!(max, 1 << 31);
        let code = hmm_launch(m, k, max + 1, null(), 0, null_mut(), &mut st);
        assert_eq!(code, HMM_TOO_MANY_INVOCATIONS, "{}", message(&st));
        assert!(message(&st).contains(&max.to_string()), "{}", message(&st));
        // n = 0 runs nothing and succeeds.
        let code = hmm_launch(m, k, 0, null(), 0, null_mut(), &mut st);
        assert_eq!(code, HMM_OK, "{}", message(&st));
        hmm_kernel_free(k);
        hmm_mirror_free(m);
    }
}

/// A pointer into unmapped memory is `HMM_DEVICE_FAULT` naming the
/// address, on launch and prefetch; the mirror stays usable.
#[test]
fn freed_memory_is_a_device_fault() {
    for driver in ["cpu", "wgpu", "vulkan"] {
        let Some(m) = open(driver) else { continue };
        let k = saxpy_kernel(m);
        // A mapping far from where the kernel places mappings (tests run
        // in parallel: a freed address near the others could be reused by
        // another thread's mmap before the launch), then its unmap.
        let hint = 0x2000_0000_0000usize as *mut c_void;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping; the range
        // is then unmapped, and only the device (never the host) reads it.
        let gone = unsafe {
            let p = libc::mmap(
                hint,
                1 << 16,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
            assert_eq!(p, hint);
            assert_eq!(libc::munmap(p, 1 << 16), 0);
            p
        };
        let mut y = vec![1.0f32; 1024];
        let mut argv = args(&[], &mut y, 2.0);
        argv[0].value.ptr = gone;
        let mut st = status();
        // SAFETY: live handles, initialised arguments.
        let code = unsafe { hmm_launch(m, k, 1024, argv.as_ptr(), 3, null_mut(), &mut st) };
        assert_eq!(code, HMM_DEVICE_FAULT, "{driver}: {}", message(&st));
        let msg = message(&st);
        // The fault names the address the kernel used: inside the 4 KiB of
        // x the 1024 invocations read (which invocation faults first
        // differs between drivers).
        let addr = msg
            .split("0x")
            .nth(1)
            .map(|h| {
                h.chars()
                    .take_while(char::is_ascii_hexdigit)
                    .collect::<String>()
            })
            .and_then(|h| u64::from_str_radix(&h, 16).ok());
        let lo = gone as u64;
        assert!(
            msg.contains("no CPU mapping") && addr.is_some_and(|a| (lo..lo + 4096).contains(&a)),
            "{driver}: {msg}"
        );
        // SAFETY: a live mirror; `gone` is not dereferenced by the call.
        let code = unsafe { hmm_prefetch(m, gone, 4096, 0, null_mut(), &mut st) };
        assert_eq!(code, HMM_DEVICE_FAULT, "{driver}: {}", message(&st));
        // Still usable: x = y itself.
        argv[0].value.ptr = y.as_ptr().cast();
        // SAFETY: as above.
        let code = unsafe { hmm_launch(m, k, 1024, argv.as_ptr(), 3, null_mut(), &mut st) };
        assert_eq!(code, HMM_OK, "{driver}: {}", message(&st));
        assert!(y.iter().all(|&v| v == 3.0), "{driver}");
        // SAFETY: live handles, not used again.
        unsafe {
            hmm_kernel_free(k);
            hmm_mirror_free(m);
        }
    }
}

/// A callback that returns nonzero without a failed access ends the
/// launch with `HMM_KERNEL`, and nothing is printed for it.
#[test]
fn a_failing_callback_is_a_kernel_error() {
    unsafe extern "C" fn fails_at_7(_: *mut hmm_lane, i: u32, _: *mut c_void) -> c_int {
        if i == 7 {
            42
        } else {
            0
        }
    }
    let m = open("cpu").unwrap();
    let mut st = status();
    // SAFETY: a live mirror, a callback that follows the rules.
    unsafe {
        let k = hmm_kernel_new(m, null(), Some(fails_at_7), null_mut(), &mut st);
        assert!(!k.is_null(), "{}", message(&st));
        let code = hmm_launch(m, k, 16, null(), 0, null_mut(), &mut st);
        assert_eq!(code, HMM_KERNEL, "{}", message(&st));
        let msg = message(&st);
        assert!(msg.contains("returned 42 for invocation 7"), "{msg}");
        hmm_kernel_free(k);
        hmm_mirror_free(m);
    }
}

/// The callback's `ctx` and every accessor kind: u64 and f64 loads and
/// stores, atomics, integer and f64 arguments, argument count.
#[test]
fn callback_context_and_accessors() {
    struct Ctx {
        calls: std::sync::atomic::AtomicU32,
    }
    unsafe extern "C" fn k(lane: *mut hmm_lane, i: u32, ctx: *mut c_void) -> c_int {
        // SAFETY: `ctx` is the `Ctx` the test passed; `lane` the live lane.
        unsafe {
            let ctx = &*ctx.cast::<Ctx>();
            ctx.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(hmm_lane_nargs(lane), 5);
            let (p64, pf, cnt) = (
                hmm_lane_arg(lane, 0),
                hmm_lane_arg(lane, 1),
                hmm_lane_arg(lane, 2),
            );
            let add = hmm_lane_arg(lane, 3) as i32;
            let scale = hmm_lane_arg_f64(lane, 4);
            let off = u64::from(i) * 8;
            let (mut v, mut f) = (0u64, 0f64);
            if hmm_lane_load_u64(lane, p64 + off, &mut v) != HMM_OK
                || hmm_lane_load_f64(lane, pf + off, &mut f) != HMM_OK
                || hmm_lane_store_u64(lane, p64 + off, (v as i64 + i64::from(add)) as u64) != HMM_OK
                || hmm_lane_store_f64(lane, pf + off, f * scale) != HMM_OK
                || hmm_lane_atomic_add_u32(lane, cnt, 1, null_mut()) != HMM_OK
            {
                return 1;
            }
            0
        }
    }
    let m = open("cpu").unwrap();
    let ctx = Ctx {
        calls: std::sync::atomic::AtomicU32::new(0),
    };
    let n = 4096usize;
    let mut a: Vec<u64> = (0..n as u64).collect();
    let mut b: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let mut count = 0u32;
    let argv = [
        hmm_arg {
            kind: hmm_arg_kind::HMM_ARG_PTR as u32,
            value: hmm_arg_value {
                ptr: a.as_mut_ptr().cast(),
            },
        },
        hmm_arg {
            kind: hmm_arg_kind::HMM_ARG_PTR as u32,
            value: hmm_arg_value {
                ptr: b.as_mut_ptr().cast(),
            },
        },
        hmm_arg {
            kind: hmm_arg_kind::HMM_ARG_PTR as u32,
            value: hmm_arg_value {
                ptr: (&mut count as *mut u32).cast(),
            },
        },
        hmm_arg {
            kind: hmm_arg_kind::HMM_ARG_I32 as u32,
            value: hmm_arg_value { i32: -3 },
        },
        hmm_arg {
            kind: hmm_arg_kind::HMM_ARG_F64 as u32,
            value: hmm_arg_value { f64: 0.5 },
        },
    ];
    let mut st = status();
    // SAFETY: a live mirror; `ctx` outlives the kernel and is thread-safe.
    unsafe {
        let kern = hmm_kernel_new(
            m,
            null(),
            Some(k),
            (&ctx as *const Ctx).cast_mut().cast(),
            &mut st,
        );
        assert!(!kern.is_null(), "{}", message(&st));
        let code = hmm_launch(
            m,
            kern,
            n as u32,
            argv.as_ptr(),
            argv.len(),
            null_mut(),
            &mut st,
        );
        assert_eq!(code, HMM_OK, "{}", message(&st));
        hmm_kernel_free(kern);
        hmm_mirror_free(m);
    }
    assert!(
        (0..n).all(|i| a[i] == (i as u64).wrapping_sub(3)),
        "{:?}",
        &a[..4]
    );
    assert!((0..n).all(|i| b[i] == i as f64 * 0.5));
    // Atomics are not undone on replay: at least once per invocation.
    assert!(count >= n as u32, "{count}");
    assert!(ctx.calls.into_inner() >= n as u32);
}

#[test]
fn bad_arguments_ranges_and_advice_are_typed() {
    let m = open("cpu").unwrap();
    let k = saxpy_kernel(m);
    let mut st = status();
    let y = vec![0u8; 8192];
    // SAFETY: live handles; the bad inputs are the point.
    unsafe {
        let bad = [hmm_arg {
            kind: 99,
            value: hmm_arg_value { u64: 0 },
        }];
        let code = hmm_launch(m, k, 1, bad.as_ptr(), 1, null_mut(), &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT);
        assert!(message(&st).contains("unknown kind 99"), "{}", message(&st));
        let code = hmm_launch(m, k, 1, null(), 2, null_mut(), &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT);
        assert!(message(&st).contains("args is NULL"), "{}", message(&st));
        assert!(hmm_launch_async(m, k, 1, bad.as_ptr(), 1, &mut st).is_null());
        assert_eq!(st.code, HMM_INVALID_ARGUMENT);
        // Empty and overflowing ranges.
        let code = hmm_prefetch(m, y.as_ptr().cast(), 0, 0, null_mut(), &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT, "{}", message(&st));
        let code = hmm_prefetch(m, usize::MAX as *const c_void, 2, 0, null_mut(), &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT, "{}", message(&st));
        // Advice: unknown is refused, the two kinds are accepted.
        let code = hmm_advise(m, y.as_ptr().cast(), y.len(), 7, &mut st);
        assert_eq!(code, HMM_INVALID_ARGUMENT);
        assert!(
            message(&st).contains("unknown advice 7"),
            "{}",
            message(&st)
        );
        for advice in [
            hmm_advice::HMM_ADVICE_READ_MOSTLY,
            hmm_advice::HMM_ADVICE_SEQUENTIAL,
            hmm_advice::HMM_ADVICE_RANDOM,
            hmm_advice::HMM_ADVICE_WILL_NEED,
            hmm_advice::HMM_ADVICE_PREFER_DEVICE,
            hmm_advice::HMM_ADVICE_DEFAULT,
        ] {
            let code = hmm_advise(m, y.as_ptr().cast(), y.len(), advice as u32, &mut st);
            assert_eq!(code, HMM_OK, "{}", message(&st));
        }
        hmm_kernel_free(k);
        hmm_mirror_free(m);
    }
}

#[test]
fn mirror_config_fields_apply_and_bad_ones_are_refused() {
    let mut st = status();
    // SAFETY: C strings, live handles, valid configs.
    unsafe {
        let dev = hmm_device_open(c"cpu".as_ptr(), &mut st);
        assert!(!dev.is_null());
        let cfg = hmm_mirror_config {
            pool_slots: 64,
            hash_cpu_writes: 1,
            ..Default::default()
        };
        let m = hmm_mirror_new(dev, &cfg, &mut st);
        assert!(!m.is_null(), "{}", message(&st));
        let mut s = hmm_stats::default();
        assert_eq!(hmm_mirror_stats(m, &mut s, &mut st), HMM_OK);
        assert_eq!(s.pool_capacity, 64);
        // saxpy over 1 MiB of data through a 256 KiB pool: evictions.
        let k = saxpy_kernel(m);
        let n = 128 * 1024;
        let x = vec![1.0f32; n];
        let mut y = vec![2.0f32; n];
        let argv = args(&x, &mut y, 3.0);
        let code = hmm_launch(m, k, n as u32, argv.as_ptr(), 3, null_mut(), &mut st);
        assert_eq!(code, HMM_OK, "{}", message(&st));
        assert!(y.iter().all(|&v| v == 5.0));
        assert_eq!(hmm_mirror_stats(m, &mut s, &mut st), HMM_OK);
        assert!(s.evictions > 0, "{s:?}");
        hmm_kernel_free(k);
        hmm_mirror_free(m);
        // A pool the device cannot hold: typed, and the device is consumed.
        let dev = hmm_device_open(c"cpu".as_ptr(), &mut st);
        assert!(!dev.is_null());
        let cfg = hmm_mirror_config {
            pool_slots: u32::MAX,
            ..Default::default()
        };
        assert!(hmm_mirror_new(dev, &cfg, &mut st).is_null());
        assert_eq!(st.code, HMM_INVALID_ARGUMENT, "{}", message(&st));
        assert!(
            message(&st).contains("4294967295 slots"),
            "{}",
            message(&st)
        );
    }
}

/// A non-blocking launch returns before the kernel is done: the callback
/// waits for the test's flag, `hmm_launch_is_done` says 0 meanwhile, the
/// mirror and kernel are freed under it, and the wait returns its result.
#[test]
fn a_non_blocking_launch_runs_while_the_caller_continues() {
    use std::sync::atomic::{AtomicBool, Ordering};
    unsafe extern "C" fn gated(lane: *mut hmm_lane, i: u32, ctx: *mut c_void) -> c_int {
        // SAFETY: `ctx` is the test's `AtomicBool`; `lane` the live lane.
        unsafe {
            let go = &*ctx.cast::<AtomicBool>();
            while !go.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            let p = hmm_lane_arg(lane, 0) + u64::from(i) * 4;
            c_int::from(hmm_lane_store_u32(lane, p, i + 1) != HMM_OK)
        }
    }
    let go = AtomicBool::new(false);
    let m = open("cpu").unwrap();
    let mut st = status();
    let mut out = vec![0u32; 1024];
    let arg = hmm_arg {
        kind: hmm_arg_kind::HMM_ARG_PTR as u32,
        value: hmm_arg_value {
            ptr: out.as_mut_ptr().cast(),
        },
    };
    // SAFETY: live handles; `go` outlives the launch (waited for below).
    unsafe {
        let ctx = (&go as *const AtomicBool).cast_mut().cast();
        let k = hmm_kernel_new(m, null(), Some(gated), ctx, &mut st);
        assert!(!k.is_null(), "{}", message(&st));
        let h = hmm_launch_async(m, k, 1024, &arg, 1, &mut st);
        assert!(!h.is_null(), "{}", message(&st));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(hmm_launch_is_done(h), 0, "finished before the gate opened");
        // The launch keeps both alive.
        hmm_kernel_free(k);
        hmm_mirror_free(m);
        go.store(true, Ordering::Release);
        let t = std::time::Instant::now();
        while hmm_launch_is_done(h) == 0 {
            assert!(t.elapsed().as_secs() < 60, "the launch never finished");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut r = hmm_launch_report::default();
        assert_eq!(
            hmm_launch_wait(h, &mut r, &mut st),
            HMM_OK,
            "{}",
            message(&st)
        );
        assert!(r.pages_out > 0, "{r:?}");
    }
    assert!(out.iter().enumerate().all(|(i, &v)| v == i as u32 + 1));
}

/// A misaligned access in a callback is `HMM_DEVICE_FAULT` (misaligned),
/// as on the GPU drivers.
#[test]
fn a_misaligned_callback_access_is_a_device_fault() {
    unsafe extern "C" fn odd(lane: *mut hmm_lane, _: u32, _: *mut c_void) -> c_int {
        let mut v = 0u32;
        // SAFETY: `lane` is the running callback's.
        let code = unsafe { hmm_lane_load_u32(lane, hmm_lane_arg(lane, 0) + 2, &mut v) };
        c_int::from(code != HMM_OK)
    }
    let m = open("cpu").unwrap();
    let mut st = status();
    let words = [0u32; 16];
    let arg = hmm_arg {
        kind: hmm_arg_kind::HMM_ARG_PTR as u32,
        value: hmm_arg_value {
            ptr: words.as_ptr().cast(),
        },
    };
    // SAFETY: live handles, one initialised argument.
    unsafe {
        let k = hmm_kernel_new(m, null(), Some(odd), null_mut(), &mut st);
        let code = hmm_launch(m, k, 1, &arg, 1, null_mut(), &mut st);
        assert_eq!(code, HMM_DEVICE_FAULT, "{}", message(&st));
        assert!(message(&st).contains("misaligned"), "{}", message(&st));
        hmm_kernel_free(k);
        hmm_mirror_free(m);
    }
}

/// A kernel built for one driver, launched on another driver's mirror:
/// a typed error, not a crash.
#[test]
fn a_kernel_of_another_driver_is_refused() {
    let cpu = open("cpu").unwrap();
    let k = saxpy_kernel(cpu);
    for driver in ["wgpu", "vulkan"] {
        let Some(m) = open(driver) else { continue };
        let mut st = status();
        // SAFETY: live handles; no arguments.
        let code = unsafe { hmm_launch(m, k, 1, null(), 0, null_mut(), &mut st) };
        assert_eq!(code, HMM_KERNEL, "{driver}: {}", message(&st));
        assert!(message(&st).contains("another driver"), "{}", message(&st));
        // SAFETY: a live mirror, not used again.
        unsafe { hmm_mirror_free(m) };
    }
    // SAFETY: live handles, not used again.
    unsafe {
        hmm_kernel_free(k);
        hmm_mirror_free(cpu);
    }
}

const NAMED_WGSL: &CStr = c"
fn hmm_kernel(i: u32) {
    let yp = hmm_index(args.y, i, 4u);
    hmm_store_f32(yp, args.a * hmm_load_f32(hmm_index(args.x, i, 4u)) + hmm_load_f32(yp));
}
";

/// Declared parameters on every driver: the WGSL reads them by name, a
/// launch with the wrong count or kinds is refused naming the argument
/// (nothing runs), and a malformed declaration is refused when the kernel
/// is built.
#[test]
fn declared_parameters_are_named_in_wgsl_and_checked_at_launch() {
    for driver in ["cpu", "wgpu", "vulkan"] {
        let Some(m) = open(driver) else { continue };
        let mut st = status();
        // SAFETY: live handles, C strings, a writable status throughout;
        // the arguments point at live vectors the launches may write.
        unsafe {
            let k = hmm_kernel_new_with_params(
                m,
                c"x: ptr, y: ptr, a: f32".as_ptr(),
                NAMED_WGSL.as_ptr(),
                Some(saxpy_cpu),
                null_mut(),
                &mut st,
            );
            assert!(!k.is_null(), "{driver}: {}", message(&st));
            let n = 3000u32;
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let mut y = vec![1.0f32; n as usize];
            let wrong = [
                hmm_arg_ptr_of(x.as_ptr().cast()),
                hmm_arg_ptr_of(y.as_mut_ptr().cast()),
                hmm_arg {
                    kind: hmm_arg_kind::HMM_ARG_F64 as u32,
                    value: hmm_arg_value { f64: 2.0 },
                },
            ];
            let code = hmm_launch(m, k, n, wrong.as_ptr(), 3, null_mut(), &mut st);
            assert_eq!(code, HMM_INVALID_ARGUMENT, "{driver}");
            assert!(
                message(&st).contains("argument 2 (`a`) is HMM_ARG_F64; the kernel declares f32"),
                "{driver}: {}",
                message(&st)
            );
            let code = hmm_launch(m, k, n, wrong.as_ptr(), 2, null_mut(), &mut st);
            assert_eq!(code, HMM_INVALID_ARGUMENT, "{driver}: two of three");
            assert!(
                y.iter().all(|&v| v == 1.0),
                "{driver}: a refused launch ran"
            );
            let right = [
                wrong[0],
                wrong[1],
                hmm_arg {
                    kind: hmm_arg_kind::HMM_ARG_F32 as u32,
                    value: hmm_arg_value { f32: 2.0 },
                },
            ];
            let code = hmm_launch(m, k, n, right.as_ptr(), 3, null_mut(), &mut st);
            assert_eq!(code, HMM_OK, "{driver}: {}", message(&st));
            assert!(
                y.iter()
                    .enumerate()
                    .all(|(i, &v)| v == 2.0 * i as f32 + 1.0),
                "{driver}"
            );
            hmm_kernel_free(k);

            for (decl, says) in [
                (c"x ptr", "not `name: kind`"),
                (c"x: f64", "kinds are"),
                (c"x: ptr, x: ptr", "twice"),
            ] {
                let k = hmm_kernel_new_with_params(
                    m,
                    decl.as_ptr(),
                    NAMED_WGSL.as_ptr(),
                    Some(saxpy_cpu),
                    null_mut(),
                    &mut st,
                );
                assert!(k.is_null(), "{driver}: {decl:?}");
                assert_eq!(st.code, HMM_INVALID_ARGUMENT, "{driver}: {decl:?}");
                assert!(message(&st).contains(says), "{driver}: {}", message(&st));
            }
            // Undeclared, `args` does not exist: a WGSL error on every
            // driver (the cpu driver checks the WGSL too).
            let k = hmm_kernel_new(m, NAMED_WGSL.as_ptr(), Some(saxpy_cpu), null_mut(), &mut st);
            assert!(k.is_null(), "{driver}");
            assert_eq!(st.code, HMM_KERNEL, "{driver}: {}", message(&st));
            hmm_mirror_free(m);
        }
    }
}

/// The header's `hmm_arg_ptr(p)` constructor (a `static inline` in C).
fn hmm_arg_ptr_of(p: *const c_void) -> hmm_arg {
    hmm_arg {
        kind: hmm_arg_kind::HMM_ARG_PTR as u32,
        value: hmm_arg_value { ptr: p },
    }
}

/// Device-private migration through the C API on the cpu driver: migrate,
/// a launch with nothing written back, a CPU read bringing the data back;
/// exclusive access revoked by a touch; typed errors; the counters.
#[test]
fn migration_calls_work_and_fail_typed() {
    let Some(m) = open("cpu") else { return };
    let mut st = status();
    let page = 4096usize;
    let pages = 8usize;
    // Page-aligned private anonymous memory of our own.
    // SAFETY: a fresh private anonymous mapping; unmapped below.
    let buf = unsafe {
        libc::mmap(
            null_mut(),
            pages * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(buf, libc::MAP_FAILED);
    let words = buf.cast::<u32>();
    let n = pages * page / 4;
    for i in 0..n {
        // SAFETY: inside the fresh mapping.
        unsafe { words.add(i).write_volatile(i as u32) };
    }
    let mut moved = 0u64;
    // SAFETY: a live mirror; `buf` is not dereferenced by the call.
    let code = unsafe { hmm_migrate_to_device(m, buf, pages * page, &mut moved, &mut st) };
    if code == HMM_UNSUPPORTED {
        assert!(
            std::env::var("HMM_REQUIRE_UFFD").as_deref() != Ok("1"),
            "HMM_REQUIRE_UFFD=1 but migration is unsupported: {}",
            message(&st)
        );
        println!("skip: migration unsupported here: {}", message(&st));
    } else {
        assert_eq!(code, HMM_OK, "{}", message(&st));
        assert_eq!(moved, pages as u64);
        for i in 0..n {
            // SAFETY: inside the mapping; the read faults the page back.
            let w = unsafe { words.add(i).read_volatile() };
            assert_eq!(w, i as u32, "word {i}");
        }
        // Exclusive: a touch revokes its page.
        // SAFETY: as above.
        let code = unsafe { hmm_make_exclusive(m, buf, pages * page, &mut moved, &mut st) };
        assert_eq!(code, HMM_OK, "{}", message(&st));
        let mut held = 0u64;
        // SAFETY: as above.
        let code = unsafe { hmm_exclusive_pages(m, buf, pages * page, &mut held, &mut st) };
        assert_eq!((code, held), (HMM_OK, pages as u64), "{}", message(&st));
        // SAFETY: inside the mapping.
        let w = unsafe { words.add(5).read_volatile() };
        assert_eq!(w, 5);
        // SAFETY: as above.
        let code = unsafe { hmm_exclusive_pages(m, buf, pages * page, &mut held, &mut st) };
        assert_eq!((code, held), (HMM_OK, pages as u64 - 1));
        // SAFETY: as above.
        let code = unsafe { hmm_migrate_to_host(m, buf, pages * page, &mut moved, &mut st) };
        assert_eq!(
            (code, moved),
            (HMM_OK, pages as u64 - 1),
            "{}",
            message(&st)
        );
        let mut s = hmm_stats::default();
        // SAFETY: a live mirror and a writable struct.
        let code = unsafe { hmm_mirror_stats(m, &mut s, &mut st) };
        assert_eq!(code, HMM_OK);
        assert_eq!(s.migrated_out, 2 * pages as u64, "{s:?}");
        assert_eq!(s.migrated_in, 2 * pages as u64, "{s:?}");
        assert_eq!(s.exclusive_revoked, 1, "{s:?}");
        assert!(s.fault_backs >= 2, "{s:?}");
        // The exclusive page's fault is never the reader's to answer.
        assert!(s.fault_backs_on_reader < s.fault_backs, "{s:?}");
        // Typed errors: shared memory, a NULL output, a NULL mirror.
        // SAFETY: a fresh shared anonymous page; unmapped below.
        let shared = unsafe {
            libc::mmap(
                null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(shared, libc::MAP_FAILED);
        // SAFETY: a live mirror; `shared` is not dereferenced.
        let code = unsafe { hmm_migrate_to_device(m, shared, page, null_mut(), &mut st) };
        assert_eq!(code, HMM_UNSUPPORTED, "{}", message(&st));
        // SAFETY: our own mapping, no reference into it.
        unsafe { libc::munmap(shared, page) };
    }
    // SAFETY: a live mirror; NULL output is refused before any use.
    let code = unsafe { hmm_exclusive_pages(m, buf, page, null_mut(), &mut st) };
    assert_eq!(code, HMM_INVALID_ARGUMENT);
    // SAFETY: a NULL mirror is refused.
    let code = unsafe { hmm_migrate_to_device(null(), buf, page, null_mut(), &mut st) };
    assert_eq!(code, HMM_INVALID_ARGUMENT);
    // SAFETY: a live mirror, not used again; our own mapping, no
    // reference into it.
    unsafe {
        hmm_mirror_free(m);
        libc::munmap(buf, pages * page);
    }
}
