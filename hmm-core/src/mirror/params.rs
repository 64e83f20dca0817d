//! Typed kernel parameters: a kernel declares its parameters once, by name
//! and type, and every launch is checked against them by the compiler.
//!
//! A parameter type says what the host passes and what the kernel sees:
//!
//! | declared | host passes | kernel (WGSL) sees | cpu closure sees |
//! |---|---|---|---|
//! | [`In<T>`] | `&[T]` (a `&Vec<T>` coerces) | `vec2<u32>`: the data address | [`DevPtr<T>`] |
//! | [`InOut<T>`] | `&mut [T]` | `vec2<u32>` | [`DevPtr<T>`] |
//! | [`Ptr<T>`] | `*const T` (a `&T` coerces) | `vec2<u32>` | [`DevPtr<T>`] |
//! | [`PtrMut<T>`] | `*mut T` (a `&mut T` coerces) | `vec2<u32>` | [`DevPtr<T>`] |
//! | `u32`, `i32`, `f32` | the value | `u32`, `i32`, `f32` | the value |
//! | `u64` | the value | `vec2<u32>` (low, high) | the value |
//!
//! Because the launch's argument tuple has the declared types as its
//! *expected* type, the compiler does the checking: `&v` with
//! `v: Vec<f32>` becomes the slice's data pointer (never the address of the
//! `Vec`'s header), a literal `2.5` becomes an `f32` where an `f32` is
//! declared, and a wrong type or count does not compile:
//!
//! ```
//! use hmm_core::mirror::params::{In, InOut, Params};
//! type Saxpy = (In<f32>, InOut<f32>, f32);
//! let x = vec![1.0f32; 4];
//! let mut y = vec![0.0f32; 4];
//! let args: <Saxpy as Params>::Host<'_> = (&x, &mut y, 2.5);
//! let mut words = [0u64; 16];
//! let n = Saxpy::words(args, &mut words);
//! assert_eq!(n, 3);
//! assert_eq!(words[0], x.as_ptr() as u64);
//! assert_eq!(words[2], u64::from(2.5f32.to_bits()));
//! ```
//!
//! A `&Vec<T>` where a pointer is declared does not compile (it would pass
//! the header's address):
//!
//! ```compile_fail,E0308
//! use hmm_core::mirror::params::{Ptr, Params};
//! let v = vec![1.0f32; 4];
//! let args: <(Ptr<f32>,) as Params>::Host<'_> = (&v,);
//! ```
//!
//! and neither does a scalar of another type:
//!
//! ```compile_fail,E0308
//! use hmm_core::mirror::params::{In, Params};
//! let x = vec![1.0f32; 4];
//! let args: <(In<f32>, u32) as Params>::Host<'_> = (&x, 2.5f64);
//! ```
//!
//! Kernels see these words through the shader library's generated
//! prelude (`args.x`, `args.n`, …) or, on the cpu driver, as the
//! [`Params::Dev`] tuple. The device dereferences pointers through the
//! mirror, like any other CPU address: what it writes through an [`In`]
//! or [`Ptr`] parameter is written (nothing on the device can enforce
//! "read only"), so a kernel must write only through [`InOut`] and
//! [`PtrMut`] parameters, as the names say.

use core::marker::PhantomData;

use super::backend::Backend;
use super::host_side::HostSide;
use super::{LaunchReport, Mirror, MirrorError};

/// How a parameter reaches a WGSL kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParamKind {
    /// A CPU address (`vec2<u32>`, low and high words).
    Ptr,
    /// A `u32`.
    U32,
    /// An `i32`.
    I32,
    /// An `f32`.
    F32,
    /// A `u64` (`vec2<u32>`, low and high words).
    U64,
}

impl ParamKind {
    /// The WGSL type the prelude declares for it.
    pub fn wgsl_type(self) -> &'static str {
        match self {
            ParamKind::Ptr | ParamKind::U64 => "vec2<u32>",
            ParamKind::U32 => "u32",
            ParamKind::I32 => "i32",
            ParamKind::F32 => "f32",
        }
    }
    /// The shader library's function that loads one from a CPU address.
    pub fn wgsl_loader(self) -> &'static str {
        match self {
            ParamKind::Ptr => "hmm_load_ptr",
            ParamKind::U64 => "hmm_load_u64",
            ParamKind::U32 => "hmm_load_u32",
            ParamKind::I32 => "hmm_load_i32",
            ParamKind::F32 => "hmm_load_f32",
        }
    }
    /// The shader library's function that reads argument word `k` as it.
    pub fn wgsl_reader(self) -> &'static str {
        match self {
            ParamKind::Ptr => "hmm_arg_ptr",
            ParamKind::U64 => "hmm_arg_u64",
            ParamKind::U32 => "hmm_arg_u32",
            ParamKind::I32 => "hmm_arg_i32",
            ParamKind::F32 => "hmm_arg_f32",
        }
    }
}

/// A CPU address of a `T` as a kernel sees it: the device dereferences it
/// through the mirror; the host never does.
pub struct DevPtr<T> {
    addr: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for DevPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtr<T> {}
impl<T> core::fmt::Debug for DevPtr<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "DevPtr({:#x})", self.addr)
    }
}
impl<T> PartialEq for DevPtr<T> {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
    }
}
impl<T> Eq for DevPtr<T> {}

impl<T> DevPtr<T> {
    /// The pointer at address `addr`.
    pub const fn from_addr(addr: u64) -> Self {
        DevPtr {
            addr,
            _t: PhantomData,
        }
    }
    /// Its address.
    pub const fn addr(self) -> u64 {
        self.addr
    }
    /// Whether it is null.
    pub const fn is_null(self) -> bool {
        self.addr == 0
    }
    /// The address of element `i` (`addr + i * size_of::<T>()`, wrapping
    /// like the device's arithmetic; an address outside any mapping is a
    /// device fault when used, never a host access).
    pub const fn at(self, i: u32) -> u64 {
        self.addr
            .wrapping_add((i as u64).wrapping_mul(core::mem::size_of::<T>() as u64))
    }
    /// The address `bytes` past it.
    pub const fn byte_add(self, bytes: u64) -> u64 {
        self.addr.wrapping_add(bytes)
    }
}

/// One declared parameter type (see the [module docs](self)).
pub trait Param: 'static {
    /// What the host passes.
    type Host<'a>;
    /// What the cpu driver's closure receives.
    type Dev: Copy;
    /// How the WGSL prelude reads it.
    const KIND: ParamKind;
    /// The argument word.
    fn word(host: Self::Host<'_>) -> u64;
    /// The closure's view of the word.
    fn dev(word: u64) -> Self::Dev;
}

/// A slice the kernel reads: the host passes `&[T]`.
pub struct In<T>(PhantomData<fn() -> T>);
/// A slice the kernel reads and writes: the host passes `&mut [T]`.
pub struct InOut<T>(PhantomData<fn() -> T>);
/// A pointer the kernel reads through (a `Box`'s or a node's address): the
/// host passes `*const T`.
pub struct Ptr<T>(PhantomData<fn() -> T>);
/// A pointer the kernel writes through: the host passes `*mut T`.
pub struct PtrMut<T>(PhantomData<fn() -> T>);

/// The four pointer kinds differ only in what the host passes and how its
/// address is taken.
macro_rules! pointer_param {
    ($($name:ident: $host:ty, |$h:ident| $addr:expr;)+) => {$(
        impl<T: 'static> Param for $name<T> {
            type Host<'a> = $host;
            type Dev = DevPtr<T>;
            const KIND: ParamKind = ParamKind::Ptr;
            fn word($h: Self::Host<'_>) -> u64 {
                $addr as usize as u64
            }
            fn dev(word: u64) -> DevPtr<T> {
                DevPtr::from_addr(word)
            }
        }
    )+};
}
pointer_param! {
    In: &'a [T], |h| h.as_ptr();
    InOut: &'a mut [T], |h| h.as_mut_ptr();
    Ptr: *const T, |h| h;
    PtrMut: *mut T, |h| h;
}

macro_rules! scalar_param {
    ($t:ty, $kind:ident, |$v:ident| $to:expr, |$w:ident| $from:expr) => {
        impl Param for $t {
            type Host<'a> = $t;
            type Dev = $t;
            const KIND: ParamKind = ParamKind::$kind;
            fn word($v: $t) -> u64 {
                $to
            }
            fn dev($w: u64) -> $t {
                $from
            }
        }
    };
}
scalar_param!(u32, U32, |v| u64::from(v), |w| w as u32);
// The low word holds the value's bits, as `hmm_arg_i32` reads them.
scalar_param!(i32, I32, |v| u64::from(v as u32), |w| w as u32 as i32);
scalar_param!(f32, F32, |v| u64::from(v.to_bits()), |w| f32::from_bits(
    w as u32
));
scalar_param!(u64, U64, |v| v, |w| w);

/// The most parameters a kernel may declare (the shader library carries 16
/// argument words).
pub const MAX_PARAMS: usize = 16;

/// A kernel's whole parameter list: a tuple of [`Param`]s (up to 12), or
/// `()`.
pub trait Params: 'static {
    /// The tuple the host passes.
    type Host<'a>;
    /// The tuple the cpu driver's closure receives.
    type Dev: Copy;
    /// How each parameter reaches WGSL, in order.
    const KINDS: &'static [ParamKind];
    /// Writes the argument words into `out`; returns how many.
    fn words(host: Self::Host<'_>, out: &mut [u64; MAX_PARAMS]) -> usize;
    /// The closure's view of `words` (missing words read as 0).
    fn dev(words: &[u64]) -> Self::Dev;
}

impl Params for () {
    type Host<'a> = ();
    type Dev = ();
    const KINDS: &'static [ParamKind] = &[];
    fn words(_: (), _: &mut [u64; MAX_PARAMS]) -> usize {
        0
    }
    fn dev(_: &[u64]) {}
}

macro_rules! tuple_params {
    ($($name:ident $idx:tt),+) => {
        impl<$($name: Param),+> Params for ($($name,)+) {
            type Host<'a> = ($($name::Host<'a>,)+);
            type Dev = ($($name::Dev,)+);
            const KINDS: &'static [ParamKind] = &[$($name::KIND),+];
            fn words(host: Self::Host<'_>, out: &mut [u64; MAX_PARAMS]) -> usize {
                $(out[$idx] = $name::word(host.$idx);)+
                Self::KINDS.len()
            }
            fn dev(words: &[u64]) -> Self::Dev {
                let w = |k: usize| words.get(k).copied().unwrap_or(0);
                ($($name::dev(w($idx)),)+)
            }
        }
    };
}
tuple_params!(A 0);
tuple_params!(A 0, B 1);
tuple_params!(A 0, B 1, C 2);
tuple_params!(A 0, B 1, C 2, D 3);
tuple_params!(A 0, B 1, C 2, D 3, E 4);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
tuple_params!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);

/// A parameter list with its names, as a kernel declares it; made by
/// `hmm::params!` (which pairs every name with its type, so the counts
/// always agree).
pub struct Signature<P> {
    names: &'static [&'static str],
    _p: PhantomData<fn() -> P>,
}

impl<P> Clone for Signature<P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P> Copy for Signature<P> {}
impl<P: Params> core::fmt::Debug for Signature<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list()
            .entries(self.names.iter().zip(P::KINDS))
            .finish()
    }
}

impl<P: Params> Signature<P> {
    /// The signature with these names. Prefer `hmm::params!`; a count that
    /// does not match `P`'s is refused when the kernel is built.
    pub const fn new(names: &'static [&'static str]) -> Self {
        Signature {
            names,
            _p: PhantomData,
        }
    }
    /// The names, in order.
    pub fn names(&self) -> &'static [&'static str] {
        self.names
    }
    /// Names paired with how each reaches WGSL; `None` if the counts
    /// differ.
    pub fn params(&self) -> Option<impl Iterator<Item = (&'static str, ParamKind)>> {
        (self.names.len() == P::KINDS.len())
            .then(|| self.names.iter().copied().zip(P::KINDS.iter().copied()))
    }
}

/// A device kernel `K` with its declared parameters `P`: launched with
/// [`Mirror::run`], whose arguments the compiler checks against `P`.
pub struct Typed<K: ?Sized, P> {
    _p: PhantomData<fn() -> P>,
    kernel: K,
}

impl<K: core::fmt::Debug + ?Sized, P> core::fmt::Debug for Typed<K, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Typed")
            .field("kernel", &&self.kernel)
            .field("params", &core::any::type_name::<P>())
            .finish()
    }
}

impl<K, P: Params> Typed<K, P> {
    /// Declares that `kernel` reads its arguments as `P` says. Building the
    /// kernel from a source with that signature (as `hmm`'s `kernel()`
    /// does) is what makes the declaration true; a wrong one makes the
    /// kernel read the wrong words, never the host.
    pub fn new(kernel: K) -> Self {
        Typed {
            kernel,
            _p: PhantomData,
        }
    }
    /// The untyped kernel, by value.
    pub fn into_kernel(self) -> K {
        self.kernel
    }
}

impl<K: ?Sized, P> Typed<K, P> {
    /// The untyped kernel.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }
}

impl<B: Backend, H: HostSide> Mirror<B, H> {
    /// [`launch`](Mirror::launch) with arguments the compiler checks
    /// against the kernel's declared parameters (see the
    /// [`params`](self) module): `(&x, &mut y, 2.0)` for
    /// `(In<f32>, InOut<f32>, f32)`.
    pub fn run<P: Params>(
        &self,
        kernel: &Typed<B::Kernel, P>,
        n: u32,
        args: P::Host<'_>,
    ) -> Result<LaunchReport, MirrorError> {
        let mut words = [0u64; MAX_PARAMS];
        let len = P::words(args, &mut words);
        self.launch(kernel.kernel(), n, &words[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_views_round_trip() {
        type P = (
            In<u8>,
            InOut<u64>,
            Ptr<u32>,
            PtrMut<u16>,
            u32,
            i32,
            f32,
            u64,
        );
        let a = [1u8, 2];
        let mut b = [0u64; 3];
        let c = 7u32;
        let mut d = 9u16;
        let (pa, pb, pc, pd) = (
            a.as_ptr() as u64,
            b.as_mut_ptr() as u64,
            &c as *const u32 as u64,
            &mut d as *mut u16 as u64,
        );
        let mut w = [0u64; MAX_PARAMS];
        let n = P::words((&a, &mut b, &c, &mut d, 5, -2, 1.5, u64::MAX - 1), &mut w);
        assert_eq!(n, 8);
        assert_eq!(
            &w[..8],
            &[
                pa,
                pb,
                pc,
                pd,
                5,
                u64::from((-2i32) as u32),
                u64::from(1.5f32.to_bits()),
                u64::MAX - 1
            ]
        );
        let (xa, xb, _, _, s, i, f, l) = P::dev(&w[..n]);
        assert_eq!(xa.at(1), pa + 1);
        assert_eq!(xb.at(2), pb + 16);
        assert_eq!((s, i, f, l), (5, -2, 1.5, u64::MAX - 1));
        assert_eq!(
            P::KINDS,
            &[
                ParamKind::Ptr,
                ParamKind::Ptr,
                ParamKind::Ptr,
                ParamKind::Ptr,
                ParamKind::U32,
                ParamKind::I32,
                ParamKind::F32,
                ParamKind::U64
            ]
        );
    }

    #[test]
    fn a_vec_passes_its_data_pointer() {
        let v = vec![1.0f32; 8];
        let mut w = [0u64; MAX_PARAMS];
        <(In<f32>,)>::words((&v,), &mut w);
        assert_eq!(w[0], v.as_ptr() as u64);
        assert_ne!(w[0], &v as *const Vec<f32> as u64);
    }

    #[test]
    fn signatures_pair_names_with_kinds_or_refuse() {
        let s = Signature::<(In<f32>, f32)>::new(&["x", "a"]);
        let got: Vec<_> = s.params().expect("counts agree").collect();
        assert_eq!(got, vec![("x", ParamKind::Ptr), ("a", ParamKind::F32)]);
        assert!(Signature::<(In<f32>, f32)>::new(&["x"]).params().is_none());
    }
}
