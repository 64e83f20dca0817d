use super::*;

const SAXPY: &str = r#"
fn hmm_kernel(i: u32) {
    let x = hmm_arg_ptr(0u);
    let y = hmm_arg_ptr(1u);
    let a = hmm_arg_f32(2u);
    let yp = hmm_index(y, i, 4u);
    hmm_store_f32(yp, a * hmm_load_f32(hmm_index(x, i, 4u)) + hmm_load_f32(yp));
}
"#;

#[test]
fn check_locates_errors_in_the_kernels_own_lines() {
    check(SAXPY).expect("saxpy checks");
    // Line 3, column 13 of this source: `hmm_lod_f32` is not defined.
    let bad =
        "fn hmm_kernel(i: u32) {\n    let p = hmm_arg_ptr(0u);\n    let v = hmm_lod_f32(p);\n}\n";
    let e = check(bad).expect_err("undefined function");
    assert!(e.parse, "{e}");
    assert_eq!((e.line, e.column), (Some(3), Some(13)), "{e}");
    assert!(e.report.contains("kernel:3"), "{}", e.report);
    assert!(e.to_string().contains("line 3, column 13"), "{e}");
    // A type error found by validation, not parsing: a store of an
    // f32 into a u32 (line 2).
    let bad = "fn hmm_kernel(i: u32) {\n    var x: u32 = 1.5f;\n}\n";
    let e = check(bad).expect_err("type error");
    assert_eq!(e.line, Some(2), "{e}");
    assert!(matches!(
        check("fn f() {}"),
        Err(WgslError { line: None, .. })
    ));
}

#[test]
fn a_kernel_may_define_its_own_args_init() {
    let k = "struct A { x: vec2<u32>, }\nvar<private> args: A;\nfn hmm_kernel(i: u32) {\n    hmm_store_u32(hmm_index(args.x, i, 4u), i);\n}\nfn hmm_init_args() { args = A(hmm_arg_ptr(0u)); }\n";
    check(k).expect("own init");
    build(k).expect("own init builds");
    // Without one, compose adds the empty default after the kernel.
    assert!(compose(SAXPY).ends_with("fn hmm_init_args() {}\n"));
    assert_eq!(compose(k).matches(ARGS_INIT).count(), 1);
}

#[test]
fn library_and_pt_ops_validate() {
    build(SAXPY).expect("saxpy composes and validates");
    let m = naga::front::wgsl::parse_str(PT_OPS).expect("pt_ops parses");
    validate_module(&m).expect("pt_ops validates");
}

/// `(binding, name)` of every global of a module in group 0 named
/// `hmm_pool*`, sorted by binding.
fn pool_bindings_of(m: &naga::Module) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = m
        .global_variables
        .iter()
        .filter_map(|(_, g)| {
            let name = g.name.clone()?;
            let b = g.binding.as_ref()?;
            (b.group == 0 && name.starts_with("hmm_pool")).then_some((b.binding, name))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn pool_bindings_are_generated_for_every_count() {
    for n in [1, 2, 3, POOL_BINDINGS, 8, 17, MAX_POOL_BINDINGS] {
        let (m, _) = build_with(SAXPY, n).unwrap_or_else(|e| panic!("{n} bindings: {e}"));
        let want: Vec<(u32, String)> = (0..n)
            .map(|k| (binding::POOL0 + k, format!("hmm_pool{k}")))
            .collect();
        assert_eq!(pool_bindings_of(&m), want, "{n} bindings");
        let src = compose_with(SAXPY, n).expect("composes");
        // One arm per binding in each of the four dispatching switches,
        // and one rmw function per binding.
        assert_eq!(src.matches("default: { return atomicLoad(").count(), 1);
        assert_eq!(src.matches("atomicLoad(&hmm_pool").count(), n as usize);
        assert_eq!(src.matches("atomicStore(&hmm_pool").count(), n as usize);
        assert_eq!(src.matches("return hmm_rmw").count(), n as usize);
        assert_eq!(
            src.matches("atomicCompareExchangeWeak(&hmm_pool").count(),
            n as usize
        );
        assert_eq!(src.matches("atomicExchange(&hmm_pool").count(), n as usize);
        // Loop-free apart from the library's two known loops (the
        // bounded f32 CAS loop and the loop-budget probe).
        let lib = &src[..src.find("// ---- kernel ----").expect("kernel marker")];
        assert_eq!(lib.matches("for (").count(), 1, "{n} bindings");
        assert_eq!(lib.matches("loop {").count(), 1, "{n} bindings");
        assert!(!lib.contains("while"), "{n} bindings");
    }
}

#[test]
fn compose_keeps_the_default_layout() {
    assert_eq!(
        compose(SAXPY),
        compose_with(SAXPY, POOL_BINDINGS).expect("4 bindings")
    );
    let (m, _) = build(SAXPY).expect("builds");
    assert_eq!(
        pool_bindings_of(&m).iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
}

#[test]
fn pool_binding_counts_outside_the_range_are_typed_errors() {
    for n in [0, MAX_POOL_BINDINGS + 1, u32::MAX] {
        assert!(
            matches!(compose_with(SAXPY, n), Err(ShaderError::PoolBindings(m)) if m == n),
            "{n}"
        );
        assert!(matches!(
            build_with(SAXPY, n),
            Err(ShaderError::PoolBindings(_))
        ));
        assert!(check_pool_bindings(n).is_err());
    }
    assert_eq!(
        check_pool_bindings(MAX_POOL_BINDINGS).ok(),
        Some(MAX_POOL_BINDINGS)
    );
    assert!(ShaderError::PoolBindings(0).to_string().contains("1 to 29"));
}

#[test]
fn errors_point_into_the_kernel_for_any_binding_count() {
    for n in [1, MAX_POOL_BINDINGS] {
        let e = build_with("fn hmm_kernel(i: u32) {\n  let x = nope;\n}\n", n).unwrap_err();
        assert!(e.to_string().contains("kernel:2"), "{n}: {e}");
    }
}

#[test]
fn params_match_the_wgsl_struct_size() {
    let (m, _) = build(SAXPY).expect("builds");
    let ty = m
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some("HmmParams"))
        .expect("HmmParams");
    let layouter = {
        let mut l = naga::proc::Layouter::default();
        l.update(m.to_ctx()).expect("layout");
        l
    };
    assert_eq!(
        layouter[ty.0].size as usize,
        core::mem::size_of::<Params>(),
        "Rust Params and WGSL HmmParams differ in size"
    );
}

#[test]
fn prelude_follows_the_format() {
    let p = prelude();
    assert!(p.contains(&format!("const HMM_DIRTY: u32 = {}u;", format::DIRTY)));
    assert!(p.contains(&format!(
        "const HMM_INDEX_SHIFT: u32 = {}u;",
        format::INDEX_SHIFT
    )));
}

#[test]
fn errors_point_into_the_kernel() {
    let e = build("fn hmm_kernel(i: u32) {\n  let x = nope;\n}\n").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ShaderError::Parse(_)), "{msg}");
    assert!(msg.contains("kernel:2"), "{msg}");
    assert!(matches!(
        build("fn main() {}"),
        Err(ShaderError::NoKernelFn)
    ));
}

#[test]
fn control_buffer_round_trip() {
    let l = ControlLayout {
        fault_cap: 2,
        bitmap_bits: 70,
    };
    let mut w = vec![0u32; l.words() as usize];
    w[0] = 5; // overflowed: 5 faults, 2 records kept
    w[1..5].copy_from_slice(&[3, FAULT_WRITE, 0x1000, 0x7f]);
    w[5..9].copy_from_slice(&[65, 0, 0x2000, 0]);
    let b = l.bitmap_off() as usize;
    w[b] = 1 << 3;
    w[b + 2] = 1 << 1; // invocation 65
    assert_eq!(l.loop_limit_hits(&w), 0);
    w[l.loop_limit_off() as usize] = 4;
    assert_eq!(l.loop_limit_hits(&w), 4);
    assert_eq!(l.loop_limit_hits(&w[..3]), 0, "short buffer");
    let o = l.parse(&w);
    assert_eq!(o.faults.len(), 2);
    assert_eq!(o.faults[0].addr(), 0x7f_0000_1000);
    assert_eq!(o.incomplete.iter().collect::<Vec<_>>(), vec![3, 65]);
    assert_eq!(l.parse(&w[..3]), LaunchOutcome::default(), "short buffer");
}

#[test]
fn capacity_never_wraps_above_two_to_the_31() {
    for n in [(1u32 << 31) + 1, u32::MAX - 1, u32::MAX] {
        let d = Dispatch::plan(Invocations::All(n), &[], 8, 64).unwrap();
        let (bits, _) = d.capacity();
        assert!(
            bits >= n,
            "{n} invocations planned with a {bits}-bit bitmap"
        );
        assert!(d.fits(bits, 1024));
    }
    let d = Dispatch::plan(Invocations::All(1 << 31), &[], 8, 64).unwrap();
    assert_eq!(d.capacity().0, 1 << 31);
}

#[test]
fn a_dense_replay_is_a_bitmap_never_larger_than_n_over_8() {
    // Every third id of 0..100_000: a list would be 133 KB, the bitmap
    // 12.5 KB.
    let set = InvocationSet::from_ids(100_000, (0..100_000).step_by(3));
    let d = Dispatch::plan(Invocations::Only(&set), &[], 8, 64).unwrap();
    assert_eq!(d.params.replay, REPLAY_BITMAP);
    let top = 99_999 + 1;
    assert_eq!((d.params.n, d.layout.bitmap_bits), (top, top));
    assert_eq!(d.replay.len(), (top as usize).div_ceil(32));
    let back = InvocationSet::from_bitmap_words(top, &d.replay);
    assert!(back.iter().eq(set.iter()));
    // Sparse: the list.
    let set = InvocationSet::from_ids(100_000, [5, 99_000]);
    let d = Dispatch::plan(Invocations::Only(&set), &[], 8, 64).unwrap();
    assert_eq!(
        (d.params.replay, d.replay.clone()),
        (REPLAY_LIST, vec![5, 99_000])
    );
}

#[test]
fn the_invocation_limit_fits_the_binding_and_never_exceeds_two_to_the_31() {
    assert_eq!(max_invocations(1024, u64::MAX), MAX_INVOCATIONS);
    let m = max_invocations(1024, 128 << 20);
    let l = ControlLayout {
        fault_cap: 1024,
        bitmap_bits: m,
    };
    assert!(l.bytes() <= 128 << 20, "{} bytes", l.bytes());
    let over = ControlLayout {
        fault_cap: 1024,
        bitmap_bits: m + 32,
    };
    assert!(over.bytes() > 128 << 20);
    assert_eq!(max_invocations(1024, 16), 0);
}

#[test]
fn dispatch_plans_replays_and_refuses_too_many_args() {
    let d = Dispatch::plan(
        Invocations::Only(&InvocationSet::from_ids(100, [3, 70])),
        &[0x1_0000_0002, 7],
        8,
        64,
    )
    .unwrap();
    assert_eq!(d.params.n, 2);
    assert_eq!(d.params.replay, REPLAY_LIST);
    assert_eq!(d.params.loop_probe, LOOP_PROBE_ITERS);
    assert_eq!(d.layout.bitmap_bits, 71);
    assert_eq!(d.params.bitmap_off, d.layout.bitmap_off());
    assert_eq!(&d.params.args[..4], &[2, 1, 7, 0]);
    assert_eq!(d.replay, vec![3, 70]);
    assert!(d.fits(71, 2) && !d.fits(70, 2) && !d.fits(71, 1));
    assert_eq!(d.capacity(), (1024, 1024));
    let d = Dispatch::plan(Invocations::All(0), &[], 8, 64).unwrap();
    assert_eq!((d.params.n, d.layout.bitmap_bits), (0, 1));
    assert!(matches!(
        Dispatch::plan(Invocations::All(1), &[0; MAX_ARGS + 1], 8, 64),
        Err(BackendError::Kernel(_))
    ));
}

#[test]
fn memory_plan_splits_the_pool_and_refuses_what_does_not_fit() {
    let cfg = |pool_slots, table_pages| DeviceConfig {
        pool_slots,
        table_pages,
    };
    let p = MemoryPlan::new(cfg(250, 4), 100, 1 << 20).unwrap();
    assert_eq!(p.chunk_slots, 100);
    assert_eq!(p.binding_slots, [100, 100, 50, 1]);
    assert_eq!(p.table_bytes, 4 * 4096);
    let p = MemoryPlan::new(cfg(0, 0), 100, 1 << 20).unwrap();
    assert_eq!(
        (p.chunk_slots, p.binding_slots, p.table_bytes),
        (1, [1; 4], 4096)
    );
    for bad in [
        MemoryPlan::new(cfg(401, 4), 100, 1 << 20),
        MemoryPlan::new(cfg(10, 4), 0, 1 << 20),
        MemoryPlan::new(cfg(10, 257), 100, 1 << 20),
    ] {
        assert!(matches!(bad, Err(BackendError::OutOfMemory(_))), "{bad:?}");
    }
}

#[test]
fn pt_batches_address_low_words_and_check_bounds() {
    use hmm_core::mirror::format::TablePage;
    let locs = [
        PteLoc {
            table: TablePage(0),
            index: 3,
        },
        PteLoc {
            table: TablePage(2),
            index: 511,
        },
    ];
    let b = PtBatch::plan(&locs, !4);
    assert_eq!(b.words, vec![6, (2 * 512 + 511) * 2]);
    assert_eq!((b.params.count, b.params.keep), (2, !4));
    assert!(PtBatch::check(&locs, 3).is_ok());
    assert!(PtBatch::check(&locs, 2).is_err());
    let ptes: Vec<_> = PtBatch::ptes(&[1, 2, 3]).collect();
    assert_eq!(ptes, vec![format::Pte(0x2_0000_0001)]);
}

#[test]
fn grid_covers_every_thread() {
    for n in [0u32, 1, 64, 65, 64 * 65_535, 64 * 65_535 + 1, u32::MAX / 2] {
        let (x, y, row) = grid(n);
        assert!(x <= 65_535 && y <= 65_535);
        assert!(u64::from(row) * u64::from(y) >= u64::from(n));
    }
}

#[test]
fn mul_wide_matches_u64() {
    // The WGSL hmm_mul_wide splits into 16-bit halves; check the same
    // arithmetic on the host (the GPU tests check the shader itself).
    fn mul_wide(a: u32, b: u32) -> u64 {
        let (a0, a1, b0, b1) = (a & 0xffff, a >> 16, b & 0xffff, b >> 16);
        let (p00, p01, p10, p11) = (a0 * b0, a0 * b1, a1 * b0, a1 * b1);
        let mid = (p00 >> 16) + (p01 & 0xffff) + (p10 & 0xffff);
        let lo = (p00 & 0xffff) | (mid << 16);
        let hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16);
        (u64::from(hi) << 32) | u64::from(lo)
    }
    for (a, b) in [
        (0, 0),
        (u32::MAX, u32::MAX),
        (123_456_789, 4096),
        (1 << 31, 8),
        (65_535, 65_537),
    ] {
        assert_eq!(mul_wide(a, b), u64::from(a) * u64::from(b));
    }
}
