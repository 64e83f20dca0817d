//! The C API selects the syscall copy path (no SIGSEGV handler) unless the
//! program opts in with `hmm_use_fast_copy(1)`. Its own test binary: the
//! choice is process-wide.

use std::ffi::{c_int, c_void};
use std::ptr::{null, null_mut};

use hmm_capi::hmm_status_code::*;
use hmm_capi::*;
use hmm_core::cpu::safecopy::{self, CopyPath, SyscallReason};

unsafe extern "C" fn double(lane: *mut hmm_lane, i: u32, _: *mut c_void) -> c_int {
    // SAFETY: `lane` is the running callback's.
    unsafe {
        let p = hmm_lane_arg(lane, 0) + u64::from(i) * 4;
        let mut v = 0u32;
        if hmm_lane_load_u32(lane, p, &mut v) != HMM_OK
            || hmm_lane_store_u32(lane, p, v * 2) != HMM_OK
        {
            return 1;
        }
        0
    }
}

/// Opens a cpu mirror and doubles 64 KiB of words through it.
fn launch_once() {
    let mut st = hmm_status {
        code: HMM_PANIC,
        message: [0; HMM_STATUS_MESSAGE_LEN],
    };
    let mut v = vec![3u32; 16384];
    let arg = hmm_arg {
        kind: hmm_arg_kind::HMM_ARG_PTR as u32,
        value: hmm_arg_value {
            ptr: v.as_mut_ptr().cast(),
        },
    };
    // SAFETY: C strings, live handles, one initialised argument.
    unsafe {
        let dev = hmm_device_open(c"cpu".as_ptr(), &mut st);
        let m = hmm_mirror_new(dev, null(), &mut st);
        assert!(!m.is_null());
        let k = hmm_kernel_new(m, null(), Some(double), null_mut(), &mut st);
        assert!(!k.is_null());
        let code = hmm_launch(m, k, v.len() as u32, &arg, 1, null_mut(), &mut st);
        assert_eq!(code, HMM_OK);
        hmm_kernel_free(k);
        hmm_mirror_free(m);
    }
    assert!(v.iter().all(|&w| w == 6));
}

#[test]
fn syscall_copies_unless_the_program_opts_in() {
    let env_syscall =
        std::env::var_os("HMM_SAFE_COPY").is_some_and(|v| !(v.is_empty() || v == "recoverable"));
    let fast = if cfg!(not(target_arch = "x86_64")) {
        CopyPath::Syscall(SyscallReason::Unsupported)
    } else if env_syscall {
        CopyPath::Syscall(SyscallReason::Environment)
    } else {
        CopyPath::Recoverable
    };
    let requested = if cfg!(target_arch = "x86_64") {
        CopyPath::Syscall(SyscallReason::Requested)
    } else {
        CopyPath::Syscall(SyscallReason::Unsupported)
    };
    // A program that never opts in: opening selects the syscall path.
    launch_once();
    assert_eq!(safecopy::active_path(), requested);
    // Opting in: the fast copy, also across a new open.
    hmm_use_fast_copy(1);
    assert_eq!(safecopy::active_path(), fast);
    launch_once();
    assert_eq!(safecopy::active_path(), fast);
    // And out again.
    hmm_use_fast_copy(0);
    assert_eq!(safecopy::active_path(), requested);
    launch_once();
    assert_eq!(safecopy::active_path(), requested);
}
