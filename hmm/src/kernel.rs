//! Kernels written once: typed, named parameters ([`kernel!`](crate::kernel!),
//! or [`KernelSource::new`] with [`params!`](crate::params)); WGSL for the GPU
//! drivers (checked with naga on every driver); an optional Rust closure
//! for the cpu driver; generated WGSL accessors for `#[repr(C)]` structs.
//!
//! ```
//! use hmm::{Device, Driver, In, InOut, MirrorConfig};
//!
//! hmm::kernel! {
//!     const SAXPY: saxpy(x: In<f32>, y: InOut<f32>, a: f32)
//!         .wgsl(r#"
//! fn hmm_kernel(i: u32) {
//!     let yp = hmm_index(args.y, i, 4u);
//!     hmm_store_f32(yp, args.a * hmm_load_f32(hmm_index(args.x, i, 4u)) + hmm_load_f32(yp));
//! }"#)
//!         .cpu(|lane, i, (x, y, a)| {
//!             let v = a * lane.load_f32(x.at(i))? + lane.load_f32(y.at(i))?;
//!             lane.store_f32(y.at(i), v)
//!         });
//! }
//!
//! let opened = Device::open(Some(Driver::Cpu)).unwrap();
//! let mirror = hmm::mirror(opened.device, MirrorConfig::default()).unwrap();
//! let saxpy = mirror.backend().kernel(&SAXPY).unwrap();
//! let x = vec![1.0f32; 1000];
//! let mut y = vec![2.0f32; 1000];
//! mirror.run(&saxpy, 1000, (&x, &mut y, 3.0)).unwrap();
//! assert!(y.iter().all(|&v| v == 5.0));
//! ```
//!
//! What the compiler refuses: a `&Vec<T>` where a pointer is declared
//! (it would pass the address of the `Vec`'s header, not its data)…
//!
//! ```compile_fail,E0308
//! use hmm::{params, Device, Driver, KernelSource, MirrorConfig, Ptr};
//! const K: KernelSource<(Ptr<f32>,)> =
//!     KernelSource::new("k", params![x: Ptr<f32>]).cpu(|_, _, _| Ok(()));
//! let o = Device::open(Some(Driver::Cpu)).unwrap();
//! let m = hmm::mirror(o.device, MirrorConfig::default()).unwrap();
//! let k = m.backend().kernel(&K).unwrap();
//! let v = vec![1.0f32; 4];
//! m.run(&k, 4, (&v,)).unwrap();
//! ```
//!
//! …(declare `In<f32>` and pass `&v`, or pass `v.as_ptr()`), and a scalar
//! of another type than declared:
//!
//! ```compile_fail,E0308
//! use hmm::{params, Device, Driver, In, KernelSource, MirrorConfig};
//! const K: KernelSource<(In<f32>, u32)> =
//!     KernelSource::new("k", params![x: In<f32>, n: u32]).cpu(|_, _, _| Ok(()));
//! let o = Device::open(Some(Driver::Cpu)).unwrap();
//! let m = hmm::mirror(o.device, MirrorConfig::default()).unwrap();
//! let k = m.backend().kernel(&K).unwrap();
//! let v = vec![1.0f32; 4];
//! m.run(&k, 4, (&v, 2.5)).unwrap();
//! ```
//!
//! # The WGSL side
//!
//! The kernel defines `fn hmm_kernel(i: u32)`, run once per invocation
//! `i`. Its parameters are the fields of a module-scope `args` (`args.x`):
//! pointers and `u64`s are `vec2<u32>` (low, high word), `u32`/`i32`/`f32`
//! are themselves. The shader library (`hmm_shaders`) provides, on CPU
//! addresses (`p: vec2<u32>`):
//!
//! | helper | what |
//! |---|---|
//! | `hmm_index(p, i, stride)`, `hmm_add(p, bytes)` | address arithmetic (64-bit) |
//! | `hmm_load_u32/i32/f32/u64/ptr(p)`, `hmm_store_u32/i32/f32/u64(p, v)` | loads and stores (4-byte aligned; 64-bit values 8-byte aligned) |
//! | `hmm_atomic_add/min/max/or/and/exchange_u32(p, v)`, `hmm_atomic_cas_u32(p, e, v)`, `hmm_atomic_add_f32(p, v)` | atomics on CPU memory |
//! | `hmm_null()`, `hmm_is_null(p)` | null pointers |
//! | `hmm_faulted()` | whether this invocation faulted (loops over pointers should stop: the invocation is replayed once the page is mapped) |
//!
//! A [`device_struct!`](crate::device_struct) adds, for each field `f` of
//! struct `S`, `S_f(p)` (the field's address) and `S_get_f(p)` (its
//! value), plus `S_SIZE`, from the struct's real layout.
//!
//! WGSL is parsed and validated when the kernel is built, on every driver
//! (feature `wgsl-check`, on by default; without it the cpu driver skips
//! the check). An error is [`KernelError::Wgsl`], naming the line and
//! column in the kernel's own source.

use std::fmt::Write as _;

use hmm_core::mirror::backend::BackendError;
pub use hmm_core::mirror::params::MAX_PARAMS;

/// Whether this build checks WGSL when a kernel is built (feature
/// `wgsl-check`, on by default): without it the cpu driver accepts a
/// kernel's WGSL unchecked (it runs the closure), and only the GPU drivers
/// (which need naga anyway) report WGSL errors.
pub const WGSL_CHECK: bool = cfg!(feature = "wgsl-check");
use hmm_core::mirror::params::{ParamKind, Params, Signature, Typed};
use hmm_driver_cpu::{CpuKernel, Lane, LaneFault};

use crate::{Device, Kernel};

/// The cpu driver's version of a kernel with parameters `P`: called per
/// invocation with the arguments as `P::Dev` (pointers as
/// [`DevPtr`](crate::DevPtr), scalars as themselves).
pub type CpuFn<P> = fn(&mut Lane<'_>, u32, <P as Params>::Dev) -> Result<(), LaneFault>;

/// A kernel for every driver, declared once: its name, its parameters
/// ([`params!`](crate::params)), WGSL for the GPU drivers and, optionally,
/// a Rust closure for the cpu driver. Built for a device with
/// [`Device::kernel`]; see the [module docs](self).
pub struct KernelSource<P: Params = ()> {
    name: &'static str,
    params: Signature<P>,
    wgsl: Option<&'static str>,
    cpu: Option<CpuFn<P>>,
    structs: &'static [StructLayout],
}

impl<P: Params> Clone for KernelSource<P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P: Params> Copy for KernelSource<P> {}

impl<P: Params> std::fmt::Debug for KernelSource<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSource")
            .field("name", &self.name)
            .field("params", &self.params)
            .field("wgsl", &self.wgsl.is_some())
            .field("cpu", &self.cpu.is_some())
            .finish()
    }
}

impl<P: Params> KernelSource<P> {
    /// A kernel named `name` (for messages) with these parameters, and no
    /// code yet.
    pub const fn new(name: &'static str, params: Signature<P>) -> Self {
        KernelSource {
            name,
            params,
            wgsl: None,
            cpu: None,
            structs: &[],
        }
    }
    /// Its WGSL (defining `fn hmm_kernel(i: u32)`), for the GPU drivers.
    pub const fn wgsl(self, src: &'static str) -> Self {
        KernelSource {
            wgsl: Some(src),
            ..self
        }
    }
    /// Its Rust version, for the cpu driver.
    pub const fn cpu(self, f: CpuFn<P>) -> Self {
        KernelSource {
            cpu: Some(f),
            ..self
        }
    }
    /// Structs whose WGSL accessors the kernel uses
    /// ([`device_struct!`](crate::device_struct)): `&[Node::LAYOUT]`.
    pub const fn structs(self, layouts: &'static [StructLayout]) -> Self {
        KernelSource {
            structs: layouts,
            ..self
        }
    }
    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// The whole WGSL the GPU drivers compile: the kernel as written, then
    /// the generated struct accessors and parameters (after it, so the
    /// kernel's line numbers are its own). `None` without WGSL.
    pub fn full_wgsl(&self) -> Result<Option<String>, KernelError> {
        let Some(src) = self.wgsl else {
            return Ok(None);
        };
        let mut s = String::from(src);
        s.push_str("\n\n// ---- generated by hmm from the kernel's declarations ----\n");
        for l in self.structs {
            l.write_wgsl(&mut s);
        }
        self.write_args(&mut s)?;
        Ok(Some(s))
    }

    /// `struct HmmArgs`, `var<private> args` and the `hmm_init_args` that
    /// fills it from the argument words.
    fn write_args(&self, s: &mut String) -> Result<(), KernelError> {
        let Some(params) = self.params.params() else {
            return Err(KernelError::ParamCount {
                kernel: self.name,
                names: self.params.names().len(),
                types: P::KINDS.len(),
            });
        };
        let params: Vec<(&'static str, ParamKind)> = params.collect();
        let prelude = args_prelude(&params).map_err(|name| KernelError::ParamName {
            kernel: self.name,
            name,
        })?;
        s.push_str(&prelude);
        Ok(())
    }
}

/// The WGSL that gives a kernel its named parameters: `struct HmmArgs`,
/// `var<private> args` and the `hmm_init_args` that fills it from the
/// argument words, in order (empty for no parameters). Appended after a
/// kernel's own source, it keeps the kernel's line numbers. `Err` names a
/// parameter whose name is not a WGSL identifier.
///
/// What [`KernelSource`] generates, for callers that declare parameters at
/// run time (the C API).
///
/// ```
/// use hmm::ParamKind;
/// let p = hmm::kernel::args_prelude(&[("x", ParamKind::Ptr), ("n", ParamKind::U32)]).unwrap();
/// assert!(p.contains("x: vec2<u32>,") && p.contains("hmm_arg_u32(1u)"));
/// assert_eq!(hmm::kernel::args_prelude(&[("2x", ParamKind::U32)]), Err("2x"));
/// ```
pub fn args_prelude<'a>(params: &[(&'a str, ParamKind)]) -> Result<String, &'a str> {
    let mut s = String::new();
    if params.is_empty() {
        return Ok(s);
    }
    if let Some((name, _)) = params.iter().find(|(n, _)| !is_wgsl_ident(n)) {
        return Err(name);
    }
    s.push_str("struct HmmArgs {\n");
    for (name, kind) in params {
        let _ = writeln!(s, "    {name}: {},", kind.wgsl_type());
    }
    s.push_str("}\n\nvar<private> args: HmmArgs;\n\nfn hmm_init_args() {\n    args = HmmArgs(");
    for (k, (_, kind)) in params.iter().enumerate() {
        let sep = if k == 0 { "" } else { ", " };
        let _ = write!(s, "{sep}{}({k}u)", kind.wgsl_reader());
    }
    s.push_str(");\n}\n");
    Ok(s)
}

/// `[A-Za-z_][A-Za-z0-9_]*`, not `_` alone and not starting with `__`
/// (WGSL reserves those).
fn is_wgsl_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        && s != "_"
        && !s.starts_with("__")
}

/// Errors building a kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The cpu driver was opened and the kernel has no `cpu` version.
    #[error("kernel `{kernel}` has no cpu version (`.cpu(...)`); the cpu driver runs only kernels that have one")]
    NoCpuVersion {
        /// The kernel's name.
        kernel: &'static str,
    },
    /// A GPU driver was opened and the kernel has no WGSL.
    #[error("kernel `{kernel}` has no WGSL (`.wgsl(...)`); the {driver} driver needs it")]
    NoWgsl {
        /// The kernel's name.
        kernel: &'static str,
        /// The driver.
        driver: &'static str,
    },
    /// Its WGSL does not parse or validate.
    #[error("kernel `{kernel}`: WGSL {what}{}:\n{report}", at(*line, *column))]
    Wgsl {
        /// The kernel's name.
        kernel: &'static str,
        /// "does not parse" or "does not validate".
        what: &'static str,
        /// 1-based line in the kernel's own source (`None`: no location,
        /// or one in the generated part).
        line: Option<u32>,
        /// 1-based column (bytes) on that line.
        column: Option<u32>,
        /// naga's report, its positions relabelled to the kernel's lines.
        report: String,
    },
    /// Names and types of the parameters differ in number (a
    /// [`Signature`] made by hand; `params!` cannot).
    #[error("kernel `{kernel}` names {names} parameters but declares {types} types")]
    ParamCount {
        /// The kernel's name.
        kernel: &'static str,
        /// Names given.
        names: usize,
        /// Types declared.
        types: usize,
    },
    /// A parameter name that is not a WGSL identifier.
    #[error("kernel `{kernel}`: parameter name `{name}` is not a WGSL identifier")]
    ParamName {
        /// The kernel's name.
        kernel: &'static str,
        /// The name.
        name: &'static str,
    },
    /// The device refused it.
    #[error("kernel `{kernel}`: {error}")]
    Device {
        /// The kernel's name.
        kernel: &'static str,
        /// The device's error.
        error: BackendError,
    },
}

impl Device {
    /// Builds `src` for this device's driver: checks its WGSL (every
    /// driver, feature `wgsl-check`), then compiles it (GPU drivers) or
    /// wraps its closure (cpu driver). The result is launched with
    /// [`Mirror::run`](crate::Mirror::run), whose arguments the compiler
    /// checks against the declared parameters.
    pub fn kernel<P: Params>(
        &self,
        src: &KernelSource<P>,
    ) -> Result<Typed<Kernel, P>, KernelError> {
        let name = src.name;
        let wgsl = src.full_wgsl()?;
        if let Some(w) = &wgsl {
            check_wgsl(name, w)?;
        }
        let kernel = match self {
            Device::Cpu(_) => {
                let f = src.cpu.ok_or(KernelError::NoCpuVersion { kernel: name })?;
                Kernel::Cpu(CpuKernel::new(move |lane, i| {
                    let args = P::dev(lane.args());
                    f(lane, i, args)
                }))
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => {
                let w = wgsl.ok_or(KernelError::NoWgsl {
                    kernel: name,
                    driver: "wgpu",
                })?;
                Kernel::Wgpu(d.kernel(&w).map_err(|error| KernelError::Device {
                    kernel: name,
                    error,
                })?)
            }
            #[cfg(feature = "vulkan")]
            Device::Vulkan(d) => {
                let w = wgsl.ok_or(KernelError::NoWgsl {
                    kernel: name,
                    driver: "vulkan",
                })?;
                Kernel::Vulkan(d.kernel(&w).map_err(|error| KernelError::Device {
                    kernel: name,
                    error,
                })?)
            }
        };
        Ok(Typed::new(kernel))
    }
}

/// " at line L, column C" where known.
fn at(line: Option<u32>, column: Option<u32>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l}, column {c}"),
        (Some(l), None) => format!(" at line {l}"),
        _ => String::new(),
    }
}

#[cfg(feature = "wgsl-check")]
fn check_wgsl(kernel: &'static str, wgsl: &str) -> Result<(), KernelError> {
    hmm_shaders::check(wgsl).map_err(|e| KernelError::Wgsl {
        kernel,
        what: if e.parse {
            "does not parse"
        } else {
            "does not validate"
        },
        line: e.line,
        column: e.column,
        report: e.report,
    })
}

#[cfg(not(feature = "wgsl-check"))]
fn check_wgsl(_: &'static str, _: &str) -> Result<(), KernelError> {
    Ok(())
}

/// How a field of a [`device_struct!`](crate::device_struct) reaches WGSL:
/// implemented for the field types a kernel can load (`u32`, `i32`, `f32`,
/// `u64`, `i64`, raw pointers, `Box`, `Option<Box>`, `&'static`).
pub trait DeviceField {
    /// What `S_get_f` loads.
    const KIND: ParamKind;
}

macro_rules! device_field {
    ($kind:ident: $($t:ty),*) => {$(
        impl DeviceField for $t {
            const KIND: ParamKind = ParamKind::$kind;
        }
    )*};
}
device_field!(U32: u32);
device_field!(I32: i32);
device_field!(F32: f32);
device_field!(U64: u64, i64);
impl<T> DeviceField for *const T {
    const KIND: ParamKind = ParamKind::Ptr;
}
impl<T> DeviceField for *mut T {
    const KIND: ParamKind = ParamKind::Ptr;
}
impl<T> DeviceField for Box<T> {
    const KIND: ParamKind = ParamKind::Ptr;
}
impl<T> DeviceField for Option<Box<T>> {
    const KIND: ParamKind = ParamKind::Ptr;
}
impl<T> DeviceField for &'static T {
    const KIND: ParamKind = ParamKind::Ptr;
}
impl<T> DeviceField for Option<&'static T> {
    const KIND: ParamKind = ParamKind::Ptr;
}

/// A `#[repr(C)]` struct's layout as kernels see it, from
/// [`device_struct!`](crate::device_struct).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructLayout {
    /// The struct's name (the prefix of its WGSL accessors).
    pub name: &'static str,
    /// `size_of`.
    pub size: usize,
    /// Each field: name, byte offset, kind.
    pub fields: &'static [(&'static str, usize, ParamKind)],
}

impl StructLayout {
    fn write_wgsl(&self, s: &mut String) {
        let n = self.name;
        let _ = writeln!(s, "const {n}_SIZE: u32 = {}u;", self.size);
        for &(f, off, kind) in self.fields {
            let _ = writeln!(
                s,
                "fn {n}_{f}(p: vec2<u32>) -> vec2<u32> {{ return hmm_add(p, {off}u); }}"
            );
            let load = kind.wgsl_loader();
            let _ = writeln!(
                s,
                "fn {n}_get_{f}(p: vec2<u32>) -> {} {{ return {load}({n}_{f}(p)); }}",
                kind.wgsl_type()
            );
        }
    }
}

/// A type whose layout kernels can follow: made by
/// [`device_struct!`](crate::device_struct).
pub trait DeviceStruct {
    /// Its layout.
    const LAYOUT: StructLayout;
}

/// Declares a kernel's parameters once, by name and type:
/// `params![x: In<f32>, y: InOut<f32>, n: u32]`. The types are those of
/// [`hmm_core::mirror::params`] (re-exported by `hmm`).
#[macro_export]
macro_rules! params {
    () => {
        $crate::Signature::<()>::new(&[])
    };
    ($($name:ident : $ty:ty),+ $(,)?) => {
        $crate::Signature::<($($ty,)+)>::new(&[$(stringify!($name)),+])
    };
}

/// Declares a kernel constant with each parameter's name and type written
/// once: `kernel! { const K: name(x: In<f32>, n: u32) .wgsl(..).cpu(..); }`
/// is `const K: KernelSource<(In<f32>, u32)> = KernelSource::new("name",
/// params![x: In<f32>, n: u32]).wgsl(..).cpu(..);`.
///
/// ```
/// hmm::kernel! {
///     /// `y[i] += a * x[i]`.
///     pub const SAXPY: saxpy(x: hmm::In<f32>, y: hmm::InOut<f32>, a: f32)
///         .wgsl("fn hmm_kernel(i: u32) {
///             let yp = hmm_index(args.y, i, 4u);
///             hmm_store_f32(yp, args.a * hmm_load_f32(hmm_index(args.x, i, 4u)) + hmm_load_f32(yp));
///         }")
///         .cpu(|lane, i, (x, y, a)| {
///             let v = a * lane.load_f32(x.at(i))? + lane.load_f32(y.at(i))?;
///             lane.store_f32(y.at(i), v)
///         });
/// }
/// assert_eq!(SAXPY.name(), "saxpy");
/// ```
#[macro_export]
macro_rules! kernel {
    (
        $(#[$meta:meta])*
        $vis:vis const $const:ident : $name:ident ( $($p:ident : $t:ty),* $(,)? ) $($rest:tt)*
    ) => {
        $(#[$meta])*
        $vis const $const: $crate::KernelSource<($($t,)*)> =
            $crate::KernelSource::new(stringify!($name), $crate::params![$($p: $t),*]) $($rest)*
    };
}

/// Defines a `#[repr(C)]` struct and the WGSL accessors kernels use to
/// follow pointers to it, from its real layout (`offset_of!`): for each
/// field `f`, `Name_f(p)` is the field's address and `Name_get_f(p)` its
/// value; `Name_SIZE` is its size. Pass `&[Name::LAYOUT]` to
/// [`KernelSource::structs`].
///
/// ```
/// hmm::device_struct! {
///     /// A list node.
///     #[derive(Debug)]
///     pub struct Node {
///         pub next: Option<Box<Node>>,
///         pub value: u64,
///     }
/// }
/// use hmm::DeviceStruct;
/// assert_eq!(Node::LAYOUT.fields[1], ("value", 8, hmm::ParamKind::U64));
/// ```
///
/// Every field must be a type kernels can load ([`DeviceField`]); another
/// does not compile.
#[macro_export]
macro_rules! device_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($(#[$fmeta:meta])* $fvis:vis $field:ident : $fty:ty),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        $vis struct $name {
            $($(#[$fmeta])* $fvis $field: $fty),+
        }
        impl $crate::DeviceStruct for $name {
            const LAYOUT: $crate::StructLayout = $crate::StructLayout {
                name: stringify!($name),
                size: ::core::mem::size_of::<$name>(),
                fields: &[$((
                    stringify!($field),
                    ::core::mem::offset_of!($name, $field),
                    <$fty as $crate::DeviceField>::KIND,
                )),+],
            };
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{In, InOut};

    const K: KernelSource<(In<u32>, InOut<u32>, u32)> =
        KernelSource::new("k", params![src: In<u32>, dst: InOut<u32>, n: u32])
            .wgsl("fn hmm_kernel(i: u32) {}");

    #[test]
    fn the_prelude_names_every_parameter() {
        let w = K.full_wgsl().expect("wgsl").expect("some");
        assert!(w.starts_with("fn hmm_kernel(i: u32) {}"), "{w}");
        assert!(
            w.contains("    src: vec2<u32>,\n    dst: vec2<u32>,\n    n: u32,\n"),
            "{w}"
        );
        assert!(
            w.contains("args = HmmArgs(hmm_arg_ptr(0u), hmm_arg_ptr(1u), hmm_arg_u32(2u));"),
            "{w}"
        );
    }

    #[test]
    fn bad_names_and_counts_are_typed_errors() {
        let bad: KernelSource<(u32,)> =
            KernelSource::new("b", Signature::new(&["x", "y"])).wgsl("fn hmm_kernel(i: u32) {}");
        assert!(matches!(
            bad.full_wgsl(),
            Err(KernelError::ParamCount {
                names: 2,
                types: 1,
                ..
            })
        ));
        for name in ["1x", "a-b", "__x", "_", ""] {
            let names: &'static [&'static str] = Box::leak(Box::new([name]));
            let bad: KernelSource<(u32,)> =
                KernelSource::new("b", Signature::new(names)).wgsl("fn hmm_kernel(i: u32) {}");
            assert!(
                matches!(bad.full_wgsl(), Err(KernelError::ParamName { .. })),
                "{name:?}"
            );
        }
    }
}
