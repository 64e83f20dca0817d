//! Kernels written once, on every driver this build has: named, typed
//! parameters reach WGSL and the cpu closure alike; a WGSL-only kernel runs
//! on the GPU drivers and is a typed error on the cpu driver (and a
//! cpu-only one the other way round); bad WGSL is a typed error naming the
//! kernel's own line and column on every driver; `device_struct!` accessors
//! follow `Box` pointers.

use hmm::{
    device_struct, params, Device, Driver, In, InOut, KernelError, KernelSource, MirrorConfig, Ptr,
    PtrMut,
};

/// Every driver of this build that opens here. A GPU driver that does not
/// open is skipped with a line, or fails the test under
/// `HMM_REQUIRE_GPU=1`.
fn devices() -> Vec<Device> {
    let mut out = Vec::new();
    for d in [Driver::Cpu, Driver::Wgpu, Driver::Vulkan] {
        if !d.is_built() {
            continue;
        }
        match Device::open(Some(d)) {
            Ok(o) => out.push(o.device),
            Err(e) if std::env::var("HMM_REQUIRE_GPU").as_deref() != Ok("1") => {
                eprintln!("skip: {}: {e}", d.name());
            }
            Err(e) => panic!("{}: {e} (HMM_REQUIRE_GPU=1)", d.name()),
        }
    }
    out
}

/// Every scalar kind, and a pointer offset, written out by one invocation.
const SCALARS: KernelSource<(PtrMut<u32>, u32, i32, f32, u64)> = KernelSource::new(
    "scalars",
    params![out: PtrMut<u32>, u: u32, s: i32, f: f32, w: u64],
)
.wgsl(
    r#"
fn hmm_kernel(i: u32) {
    hmm_store_u32(args.out, args.u);
    hmm_store_i32(hmm_index(args.out, 1u, 4u), args.s);
    hmm_store_f32(hmm_index(args.out, 2u, 4u), args.f * 2.0);
    hmm_store_u64(hmm_index(args.out, 2u, 8u), args.w);
}"#,
)
.cpu(|lane, _, (out, u, s, f, w)| {
    lane.store_u32(out.at(0), u)?;
    lane.store_u32(out.at(1), s as u32)?;
    lane.store_f32(out.at(2), f * 2.0)?;
    lane.store_u64(out.byte_add(16), w)
});

#[test]
fn every_parameter_kind_reaches_the_kernel_by_name() {
    for dev in devices() {
        let name = dev.driver().name();
        let m = hmm::mirror(dev, MirrorConfig::default()).expect("mirror");
        let k = m.backend().kernel(&SCALARS).expect("kernel");
        let mut out = [0u32; 6];
        let w = 0x1234_5678_9abc_def0u64;
        // Literals take the declared types: 7 is a u32, -3 an i32, 1.25
        // an f32.
        m.run(&k, 1, (out.as_mut_ptr(), 7, -3, 1.25, w))
            .expect("run");
        assert_eq!(out[0], 7, "{name}");
        assert_eq!(out[1] as i32, -3, "{name}");
        assert_eq!(f32::from_bits(out[2]), 2.5, "{name}");
        assert_eq!(
            u64::from(out[4]) | u64::from(out[5]) << 32,
            w,
            "{name}: u64 as (low, high)"
        );
    }
}

const WGSL_ONLY: KernelSource<(In<u32>, InOut<u32>)> =
    KernelSource::new("wgsl_only", params![x: In<u32>, y: InOut<u32>]).wgsl(
        r#"
fn hmm_kernel(i: u32) {
    hmm_store_u32(hmm_index(args.y, i, 4u), hmm_load_u32(hmm_index(args.x, i, 4u)) * 3u);
}"#,
    );

const CPU_ONLY: KernelSource<(In<u32>, InOut<u32>)> =
    KernelSource::new("cpu_only", params![x: In<u32>, y: InOut<u32>]).cpu(|lane, i, (x, y)| {
        let v = lane.load_u32(x.at(i))?;
        lane.store_u32(y.at(i), v * 3)
    });

#[test]
fn one_source_is_enough_and_a_missing_one_is_a_typed_error() {
    let x: Vec<u32> = (0..5000).collect();
    for dev in devices() {
        let driver = dev.driver();
        let m = hmm::mirror(dev, MirrorConfig::default()).expect("mirror");
        let (runs, refused) = if driver == Driver::Cpu {
            (CPU_ONLY, WGSL_ONLY)
        } else {
            (WGSL_ONLY, CPU_ONLY)
        };
        match m.backend().kernel(&refused) {
            Err(KernelError::NoCpuVersion {
                kernel: "wgsl_only",
            }) if driver == Driver::Cpu => {}
            Err(KernelError::NoWgsl {
                kernel: "cpu_only",
                driver: d,
            }) if d == driver.name() => {}
            r => panic!("{}: {r:?}", driver.name()),
        }
        let k = m.backend().kernel(&runs).expect("kernel");
        let mut y = vec![0u32; x.len()];
        m.run(&k, x.len() as u32, (&x, &mut y)).expect("run");
        assert!(
            y.iter().enumerate().all(|(i, &v)| v == 3 * i as u32),
            "{}",
            driver.name()
        );
    }
}

/// Line 4, column 13: `hmm_lod_u32` does not exist.
const TYPO: KernelSource<(In<u32>,)> = KernelSource::new("typo", params![x: In<u32>])
    .wgsl(
        r#"
fn hmm_kernel(i: u32) {
    let p = hmm_index(args.x, i, 4u);
    let v = hmm_lod_u32(p);
}"#,
    )
    .cpu(|_, _, _| Ok(()));

/// Line 3, column 29: an `f32` stored as a `u32` (found by validation).
const MISTYPED: KernelSource<(PtrMut<u32>, f32)> =
    KernelSource::new("mistyped", params![out: PtrMut<u32>, f: f32])
        .wgsl(
            r#"
fn hmm_kernel(i: u32) {
    hmm_store_u32(args.out, args.f);
}"#,
        )
        .cpu(|_, _, _| Ok(()));

#[test]
fn bad_wgsl_names_the_kernels_line_and_column_on_every_driver() {
    for dev in devices() {
        let name = dev.driver().name();
        if !hmm::kernel::WGSL_CHECK {
            // Built without naga: the cpu driver cannot check WGSL, and
            // runs its closure.
            assert_eq!(dev.driver(), Driver::Cpu);
            dev.kernel(&TYPO).expect("unchecked");
            continue;
        }
        match dev.kernel(&TYPO) {
            Err(
                e @ KernelError::Wgsl {
                    kernel: "typo",
                    line: Some(4),
                    column: Some(13),
                    ..
                },
            ) => {
                let msg = e.to_string();
                assert!(msg.contains("line 4, column 13"), "{name}: {msg}");
                assert!(msg.contains("hmm_lod_u32"), "{name}: {msg}");
            }
            r => panic!("{name}: {r:?}"),
        }
        match dev.kernel(&MISTYPED) {
            // `args.f`, the argument of the wrong type.
            Err(KernelError::Wgsl {
                line: Some(3),
                column: Some(29),
                ..
            }) => {}
            r => panic!("{name}: {r:?}"),
        }
    }
}

device_struct! {
    /// A list node as the CPU builds it and the device follows it.
    #[allow(dead_code)] // `value` and `weight` are read by the kernels only
    struct Node {
        value: u32,
        weight: f32,
        next: Option<Box<Node>>,
    }
}

const LIST: KernelSource<(Ptr<Node>, PtrMut<f32>)> =
    KernelSource::new("list", params![head: Ptr<Node>, out: PtrMut<f32>])
        .structs(&[<Node as hmm::DeviceStruct>::LAYOUT])
        .wgsl(
            r#"
fn hmm_kernel(i: u32) {
    var node = args.head;
    var sum = 0.0;
    loop {
        if hmm_is_null(node) || hmm_faulted() {
            break;
        }
        sum = sum + f32(Node_get_value(node)) * Node_get_weight(node);
        node = Node_get_next(node);
    }
    hmm_store_f32(args.out, sum);
}"#,
        )
        .cpu(|lane, _, (head, out)| {
            let (value, weight, next) = (
                core::mem::offset_of!(Node, value) as u64,
                core::mem::offset_of!(Node, weight) as u64,
                core::mem::offset_of!(Node, next) as u64,
            );
            let (mut node, mut sum) = (head.addr(), 0.0f32);
            while node != 0 {
                sum += lane.load_u32(node + value)? as f32 * lane.load_f32(node + weight)?;
                node = lane.load_u64(node + next)?;
            }
            lane.store_f32(out.addr(), sum)
        });

#[test]
fn struct_accessors_follow_box_pointers_from_the_real_layout() {
    let mut head: Option<Box<Node>> = None;
    for v in 1..=300u32 {
        head = Some(Box::new(Node {
            value: v,
            weight: 0.5,
            next: head,
        }));
    }
    let want: f32 = (1..=300u32).map(|v| v as f32 * 0.5).sum();
    for dev in devices() {
        let name = dev.driver().name();
        let m = hmm::mirror(dev, MirrorConfig::default()).expect("mirror");
        let k = m.backend().kernel(&LIST).expect("kernel");
        let mut out = 0.0f32;
        let h: &Node = head.as_deref().expect("head");
        m.run(&k, 1, (h, &mut out)).expect("run");
        assert_eq!(out, want, "{name}");
    }
    // Drop the list iteratively (a recursive drop of 300 boxes is fine,
    // but keep it explicit for longer lists).
    while let Some(mut n) = head {
        head = n.next.take();
    }
}
