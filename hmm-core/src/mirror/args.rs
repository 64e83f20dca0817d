//! Kernel arguments: CPU pointers and scalars as the 64-bit words a backend
//! passes to its kernels.
//!
//! [`Mirror::launch`](super::Mirror::launch) takes anything that is
//! [`KernelArgs`]: a tuple of [`KernelArg`] values (pointers, integers,
//! floats), or a ready-made slice or array of words:
//!
//! ```
//! use hmm_core::mirror::args::KernelArgs;
//! let x = vec![1.0f32; 4];
//! let mut y = vec![0.0f32; 4];
//! let words = (x.as_ptr(), y.as_mut_ptr(), 2.5f32).with_words(|w| w.to_vec());
//! assert_eq!(words[0], x.as_ptr() as u64);
//! assert_eq!(words[2], u64::from(2.5f32.to_bits()));
//! ```
//!
//! A pointer becomes its address, an integer its (zero- or sign-extended)
//! value, a float its IEEE bits (an `f32` in the low word, as the shader
//! library's `hmm_arg_f32` reads it). Pointers are never dereferenced on
//! the host: they are addresses the device translates through the mirror.

/// One argument word.
pub trait KernelArg: Copy {
    /// The 64-bit word the kernel receives.
    fn to_word(self) -> u64;
}

impl<T> KernelArg for *const T {
    fn to_word(self) -> u64 {
        self as usize as u64
    }
}
impl<T> KernelArg for *mut T {
    fn to_word(self) -> u64 {
        self as usize as u64
    }
}
impl<T> KernelArg for &T {
    fn to_word(self) -> u64 {
        self as *const T as usize as u64
    }
}
macro_rules! int_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn to_word(self) -> u64 {
                self as u64
            }
        }
    )*};
}
int_arg!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);
impl KernelArg for bool {
    fn to_word(self) -> u64 {
        u64::from(self)
    }
}
impl KernelArg for f32 {
    fn to_word(self) -> u64 {
        u64::from(self.to_bits())
    }
}
impl KernelArg for f64 {
    fn to_word(self) -> u64 {
        self.to_bits()
    }
}

/// A launch's arguments.
pub trait KernelArgs {
    /// Calls `f` with the argument words.
    fn with_words<R>(self, f: impl FnOnce(&[u64]) -> R) -> R;
}

impl KernelArgs for &[u64] {
    fn with_words<R>(self, f: impl FnOnce(&[u64]) -> R) -> R {
        f(self)
    }
}
impl<const N: usize> KernelArgs for &[u64; N] {
    fn with_words<R>(self, f: impl FnOnce(&[u64]) -> R) -> R {
        f(self)
    }
}
impl<const N: usize> KernelArgs for [u64; N] {
    fn with_words<R>(self, f: impl FnOnce(&[u64]) -> R) -> R {
        f(&self)
    }
}
impl KernelArgs for &Vec<u64> {
    fn with_words<R>(self, f: impl FnOnce(&[u64]) -> R) -> R {
        f(self)
    }
}
impl KernelArgs for () {
    fn with_words<R>(self, f: impl FnOnce(&[u64]) -> R) -> R {
        f(&[])
    }
}
macro_rules! tuple_args {
    ($($name:ident),+) => {
        impl<$($name: KernelArg),+> KernelArgs for ($($name,)+) {
            #[allow(non_snake_case)]
            fn with_words<R>(self, f: impl FnOnce(&[u64]) -> R) -> R {
                let ($($name,)+) = self;
                f(&[$($name.to_word()),+])
            }
        }
    };
}
tuple_args!(A);
tuple_args!(A, B);
tuple_args!(A, B, C);
tuple_args!(A, B, C, D);
tuple_args!(A, B, C, D, E);
tuple_args!(A, B, C, D, E, F);
tuple_args!(A, B, C, D, E, F, G);
tuple_args!(A, B, C, D, E, F, G, H);
tuple_args!(A, B, C, D, E, F, G, H, I);
tuple_args!(A, B, C, D, E, F, G, H, I, J);
tuple_args!(A, B, C, D, E, F, G, H, I, J, K);
tuple_args!(A, B, C, D, E, F, G, H, I, J, K, L);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_of_each_kind() {
        let v = [7u32; 2];
        let w = (v.as_ptr(), -1i32, 1.5f64, true, 3u8).with_words(|w| w.to_vec());
        assert_eq!(w, vec![v.as_ptr() as u64, u64::MAX, 1.5f64.to_bits(), 1, 3]);
        assert_eq!(().with_words(|w| w.len()), 0);
        assert_eq!((&[1u64, 2]).with_words(|w| w.to_vec()), vec![1, 2]);
    }
}
