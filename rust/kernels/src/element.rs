//! Storage types the kernels accept and the arithmetic they are computed in.
//!
//! `f32` and `f64` are computed in themselves; the 16-bit types (`bf16`, `f16`) are loaded into
//! `f32`, computed there, and rounded once (to nearest even) when stored. Sums of squares always
//! accumulate in `f64`, where the product of two `f32` values is exact.

use half::{bf16, f16};
use std::ops::{Add, Div, Mul, Neg, Sub};

/// The arithmetic type a kernel computes in (`f32` or `f64`).
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    /// Rounds a host scalar to this type, as torch does when it hands a Python float to a kernel.
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// Rounds to bfloat16 (nearest, ties to even): the storage of the subtract mode's offsets.
    fn to_bf16(self) -> half::bf16;
    /// The exact value of a bfloat16 in this type.
    fn from_bf16(v: half::bf16) -> Self;
    fn abs(self) -> Self;
    fn sqrt(self) -> Self;
    /// `max` that propagates NaN from either side, like `torch.maximum`.
    fn max_nan(self, other: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn to_bf16(self) -> half::bf16 {
                half::bf16::from_f64(self as f64)
            }
            #[inline(always)]
            fn from_bf16(v: half::bf16) -> Self {
                v.to_f32() as $t
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn max_nan(self, other: Self) -> Self {
                if self.is_nan() || other.is_nan() {
                    <$t>::NAN
                } else if self > other {
                    self
                } else {
                    other
                }
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// A storage type: how an element is loaded into, and stored from, its compute type.
pub trait Element: Copy + Send + Sync + 'static {
    type Math: Real;
    const NAME: &'static str;
    fn load(self) -> Self::Math;
    fn store(v: Self::Math) -> Self;
}

impl Element for f32 {
    type Math = f32;
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        v
    }
}

impl Element for f64 {
    type Math = f64;
    const NAME: &'static str = "float64";
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(v: f64) -> Self {
        v
    }
}

impl Element for bf16 {
    type Math = f32;
    const NAME: &'static str = "bfloat16";
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Element for f16 {
    type Math = f32;
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        f16::from_f32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_types_round_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values; ties go to the even mantissa (1.0).
        assert_eq!(
            bf16::store(1.0 + 2f32.powi(-8)).to_bits(),
            bf16::from_f32(1.0).to_bits()
        );
        assert_eq!(
            bf16::store(1.0 + 3.0 * 2f32.powi(-8)).load(),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(f16::store(65504.0).load(), 65504.0);
        assert!(bf16::store(f32::NAN).load().is_nan());
    }

    #[test]
    fn max_nan_propagates() {
        assert!(1.0f32.max_nan(f32::NAN).is_nan());
        assert!(f32::NAN.max_nan(1.0).is_nan());
        assert_eq!(2.0f64.max_nan(3.0), 3.0);
    }
}
