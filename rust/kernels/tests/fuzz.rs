//! Fuzzing of the public kernel API with proptest.
//!
//! Every kernel is called on random tensor lists (0 to 5 tensors, lengths from 0 to past the
//! parallel threshold, PARALLEL_THRESHOLD elements), for each of the four element types (`f32`, `f64`,
//! `bf16`, `f16`), with values that are by turns ordinary, sprinkled with specials or mostly
//! specials (±0, NaN with random payloads, ±inf, subnormals, near-overflow magnitudes, raw random
//! bits), and random (sometimes non-finite) scalars and hyperparameters. Each case checks:
//!
//! - no panic, ever;
//! - a misaligned call (one argument with a tensor more, a tensor less, or one tensor of another
//!   length) returns `Err` naming that argument and writes nothing (every buffer bit-identical);
//!   an argument the hyperparameters do not use (momentum buffers without momentum, maxima
//!   without amsgrad) is ignored and left untouched, and a missing required one is `Err(Missing)`;
//! - an aligned call matches a naive per-element transcription of the formula: bit for bit for
//!   the elementwise kernels (any NaN equals any NaN), and within `2(n+1)·ε_f64` relative for the
//!   float64 sums.
//!
//! Kernels: `sum_of_squares`, `sum_of_squares_adaptive`, `perturb`, `perturb_adaptive`,
//! `perturb_offsets` with `subtract_offsets` (the subtract memory mode), `restore`, `restore_sgd`
//! and `sgd_step`, `restore_adam` and `adam_step`, `dot`, `axpby`, `any_nonzero`.
//!
//! Case count: proptest's `PROPTEST_CASES` (default 256 per test: 2,816 cases, a few seconds in
//! CI's `cargo test --release`). There are 11 tests and every case runs its kernel for all four
//! element types, so `PROPTEST_CASES=10000 cargo test --release -p sharpness-kernels --test fuzz`
//! runs 110,000 cases (440,000 kernel calls; about two minutes on two cores).

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use sharpness_kernels::{
    self as k, AdamHyper, Element, KernelError, Real, SgdHyper, CHUNK, PARALLEL_THRESHOLD,
};
use std::fmt::Debug;

// ---- element types as bits -------------------------------------------------------------------

trait Fuzz: Element + Debug {
    /// Width of the storage type in bits, and of its mantissa field.
    const WIDTH: u32;
    const MANTISSA: u32;
    fn from_raw(bits: u64) -> Self;
    fn raw(self) -> u64;
}

macro_rules! impl_fuzz {
    ($t:ty, $bits:ty, $width:expr, $mantissa:expr) => {
        impl Fuzz for $t {
            const WIDTH: u32 = $width;
            const MANTISSA: u32 = $mantissa;
            fn from_raw(bits: u64) -> Self {
                <$t>::from_bits(bits as $bits)
            }
            fn raw(self) -> u64 {
                self.to_bits() as u64
            }
        }
    };
}
impl_fuzz!(f32, u32, 32, 23);
impl_fuzz!(f64, u64, 64, 52);
impl_fuzz!(bf16, u16, 16, 7);
impl_fuzz!(f16, u16, 16, 10);

fn sign_bit<E: Fuzz>() -> u64 {
    1 << (E::WIDTH - 1)
}

fn mantissa_mask<E: Fuzz>() -> u64 {
    (1 << E::MANTISSA) - 1
}

fn exponent_mask<E: Fuzz>() -> u64 {
    ((1u64 << (E::WIDTH - 1 - E::MANTISSA)) - 1) << E::MANTISSA
}

/// Bit-for-bit equality, except that any NaN equals any NaN (payloads and signs of NaNs produced
/// by arithmetic are not specified).
fn same<E: Fuzz>(a: E, b: E) -> bool {
    (a.load().to_f64().is_nan() && b.load().to_f64().is_nan()) || a.raw() == b.raw()
}

fn check_lists<E: Fuzz>(what: &str, got: &[Vec<E>], want: &[Vec<E>]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: tensor count", what);
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        prop_assert_eq!(g.len(), w.len(), "{}: length of tensor {}", what, t);
        for (i, (&x, &y)) in g.iter().zip(w).enumerate() {
            prop_assert!(
                same(x, y),
                "{} {}: tensor {} element {}: kernel {:?} ({:#x}), formula {:?} ({:#x})",
                E::NAME,
                what,
                t,
                i,
                x,
                x.raw(),
                y,
                y.raw()
            );
        }
    }
    Ok(())
}

/// Exact equality of every bit (NaN payloads included): buffers a call must not have written.
fn check_untouched<E: Fuzz>(
    what: &str,
    got: &[Vec<E>],
    before: &[Vec<E>],
) -> Result<(), TestCaseError> {
    let bits = |l: &[Vec<E>]| {
        l.iter()
            .map(|t| t.iter().map(|x| x.raw()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    prop_assert!(
        bits(got) == bits(before),
        "{} `{}` was written",
        E::NAME,
        what
    );
    Ok(())
}

// ---- data ----------------------------------------------------------------------------------

/// SplitMix64: the values come from a seed, proptest shrinks the seed and the shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// One value: `special_pct` percent specials, the rest ordinary (|x| ≤ 4, some zeros).
    fn value<E: Fuzz>(&mut self, special_pct: u64) -> E {
        if self.below(100) >= special_pct {
            return if self.below(16) == 0 {
                E::from_raw(0)
            } else {
                E::store(E::Math::from_f64(4.0 * self.unit()))
            };
        }
        let sign = if self.below(2) == 0 {
            0
        } else {
            sign_bit::<E>()
        };
        let mantissa = self.next() & mantissa_mask::<E>();
        let bits = match self.below(8) {
            0 => sign,                                                          // ±0
            1 => sign | exponent_mask::<E>() | (mantissa | 1),                  // NaN, any payload
            2 => sign | exponent_mask::<E>(),                                   // ±inf
            3 | 4 => sign | (mantissa | 1),                                     // subnormal
            5 => sign | (exponent_mask::<E>() - (1 << E::MANTISSA)) | mantissa, // near overflow
            _ => self.next(),                                                   // raw bits
        };
        E::from_raw(bits & (u64::MAX >> (64 - E::WIDTH)))
    }

    /// A tensor list of the given lengths. Each case draws how special its values are.
    fn tensors<E: Fuzz>(&mut self, lens: &[usize], special_pct: u64) -> Vec<Vec<E>> {
        lens.iter()
            .map(|&n| (0..n).map(|_| self.value::<E>(special_pct)).collect())
            .collect()
    }

    /// Share of specials for a case: none, a few, or mostly.
    fn special_pct(&mut self) -> u64 {
        [0, 0, 5, 30, 90][self.below(5) as usize]
    }
}

fn refs<E>(l: &[Vec<E>]) -> Vec<&[E]> {
    l.iter().map(|t| &t[..]).collect()
}

fn muts<E>(l: &mut [Vec<E>]) -> Vec<&mut [E]> {
    l.iter_mut().map(|t| &mut t[..]).collect()
}

fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        10 => Just(0usize),
        25 => 1usize..8,
        60 => 8usize..300,
        4 => (CHUNK - 3)..(CHUNK + 4),
        // One tensor past the parallel threshold: the rayon path, chunk tails.
        1 => PARALLEL_THRESHOLD..(PARALLEL_THRESHOLD + 100),
    ]
}

fn lens_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(len_strategy(), 0..6)
}

/// One argument made misaligned with the first: `(which argument, kind, index, delta)`.
type Defect = (u8, u8, u8, u16);

fn defect_strategy() -> impl Strategy<Value = Option<Defect>> {
    prop_oneof![3 => Just(None), 2 => any::<Defect>().prop_map(Some)]
}

/// The lengths of a misaligned argument: a tensor more, a tensor less, or one tensor longer or
/// shorter. Never equal to `lens`.
fn misaligned(lens: &[usize], (_, kind, index, delta): Defect) -> Vec<usize> {
    let mut out = lens.to_vec();
    if out.is_empty() || kind % 3 == 0 {
        if out.is_empty() || kind % 2 == 0 {
            out.insert(index as usize % (out.len() + 1), delta as usize % 50);
        } else {
            out.remove(index as usize % out.len());
        }
    } else {
        let i = index as usize % out.len();
        let d = 1 + delta as usize % 40;
        out[i] = if kind % 2 == 0 || out[i] < d {
            out[i] + d
        } else {
            out[i] - d
        };
    }
    out
}

/// The lengths of each of `names` (the first leads): all `lens`, except the defective one.
fn argument_lengths(
    lens: &[usize],
    names: &[&'static str],
    defect: Option<Defect>,
) -> (Vec<Vec<usize>>, Option<&'static str>) {
    let mut all = vec![lens.to_vec(); names.len()];
    match defect {
        Some(d) if names.len() > 1 => {
            let which = 1 + d.0 as usize % (names.len() - 1);
            all[which] = misaligned(lens, d);
            (all, Some(names[which]))
        }
        _ => (all, None),
    }
}

fn check_error(result: Result<(), KernelError>, argument: &str) -> Result<(), TestCaseError> {
    match result {
        Err(KernelError::TensorCount { argument: a, .. })
        | Err(KernelError::Length { argument: a, .. }) => {
            prop_assert_eq!(a, argument, "the error names another argument");
            Ok(())
        }
        other => Err(TestCaseError::fail(format!(
            "`{argument}` misaligned: expected an error naming it, got {other:?}"
        ))),
    }
}

/// A host scalar: mostly ordinary, sometimes zero or non-finite.
fn scalar(range: std::ops::Range<f64>) -> impl Strategy<Value = f64> {
    prop_oneof![
        12 => range,
        1 => Just(0.0),
        1 => prop::sample::select(vec![-0.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e-300, 1e300, f64::MIN_POSITIVE / 4.0]),
    ]
}

// ---- sums ----------------------------------------------------------------------------------

/// Kernel sum against a naive left-to-right sum of the same non-negative terms: both are within
/// `(n−1)·ε` of the exact sum, relative.
fn check_sum(what: &str, got: f64, want: f64, n: usize) -> Result<(), TestCaseError> {
    let tol = 2.0 * (n as f64 + 1.0) * f64::EPSILON;
    let ok = if want.is_nan() || got.is_nan() {
        want.is_nan() && got.is_nan()
    } else if want.is_infinite() || got.is_infinite() {
        // Equal, or a finite sum within rounding of overflowing.
        got == want || got.abs().min(want.abs()) >= f64::MAX * (1.0 - tol)
    } else {
        (got - want).abs() <= tol * want.abs()
    };
    prop_assert!(
        ok,
        "{}: kernel {:e}, naive {:e} (n = {})",
        what,
        got,
        want,
        n
    );
    Ok(())
}

fn fuzz_sum_of_squares<E: Fuzz>(seed: u64, lens: &[usize]) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    let g: Vec<Vec<E>> = rng.tensors(lens, pct);
    let got = k::sum_of_squares::<E>(&refs(&g));
    let want = g
        .iter()
        .flatten()
        .map(|x| x.load().to_f64())
        .fold(0.0, |acc, x| acc + x * x);
    check_sum(
        &format!("{} sum_of_squares", E::NAME),
        got,
        want,
        lens.iter().sum(),
    )
}

fn fuzz_sum_of_squares_adaptive<E: Fuzz>(
    seed: u64,
    lens: &[usize],
    defect: Option<Defect>,
    eta: f64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    let (shapes, bad) = argument_lengths(lens, &["weights", "grads"], defect);
    let w: Vec<Vec<E>> = rng.tensors(&shapes[0], pct);
    let g: Vec<Vec<E>> = rng.tensors(&shapes[1], pct);
    let result = k::sum_of_squares_adaptive::<E>(&refs(&w), &refs(&g), eta);
    if let Some(argument) = bad {
        return check_error(result.map(|_| ()), argument);
    }
    let got = result.map_err(|e| TestCaseError::fail(format!("aligned call failed: {e}")))?;
    let want = w
        .iter()
        .flatten()
        .zip(g.iter().flatten())
        .fold(0.0, |acc, (&w, &g)| {
            let t = (w.load().to_f64().abs() + eta) * g.load().to_f64();
            acc + t * t
        });
    check_sum(
        &format!("{} sum_of_squares_adaptive", E::NAME),
        got,
        want,
        lens.iter().sum(),
    )
}

// ---- perturbation and restoration ------------------------------------------------------------

fn fuzz_perturb<E: Fuzz>(
    seed: u64,
    lens: &[usize],
    defect: Option<Defect>,
    scale: f64,
    adaptive: Option<f64>,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    let (shapes, bad) = argument_lengths(lens, &["weights", "grads", "backups"], defect);
    let w0: Vec<Vec<E>> = rng.tensors(&shapes[0], pct);
    let g: Vec<Vec<E>> = rng.tensors(&shapes[1], pct);
    let b0: Vec<Vec<E>> = rng.tensors(&shapes[2], 50); // garbage the kernel must overwrite
    let (mut w, mut b) = (w0.clone(), b0.clone());
    let result = match adaptive {
        None => k::perturb::<E>(&mut muts(&mut w), &refs(&g), &mut muts(&mut b), scale),
        Some(eta) => {
            k::perturb_adaptive::<E>(&mut muts(&mut w), &refs(&g), &mut muts(&mut b), scale, eta)
        }
    };
    if let Some(argument) = bad {
        check_error(result.clone(), argument)?;
        check_untouched("weights", &w, &w0)?;
        return check_untouched("backups", &b, &b0);
    }
    result.map_err(|e| TestCaseError::fail(format!("aligned call failed: {e}")))?;
    let s = E::Math::from_f64(scale);
    let want: Vec<Vec<E>> = w0
        .iter()
        .zip(&g)
        .map(|(wt, gt)| {
            wt.iter()
                .zip(gt)
                .map(|(&w, &g)| match adaptive {
                    // w + s·g
                    None => E::store(w.load() + s * g.load()),
                    // w + ((|w| + η)²·g)·s, in that order
                    Some(eta) => {
                        let x = w.load();
                        let t = x.abs() + E::Math::from_f64(eta);
                        E::store(x + t * t * g.load() * s)
                    }
                })
                .collect()
        })
        .collect();
    check_lists(
        if adaptive.is_some() {
            "perturb_adaptive weights"
        } else {
            "perturb weights"
        },
        &w,
        &want,
    )?;
    // The backup is a copy of the original weights, every bit of them.
    check_untouched("backups (as a copy of the weights)", &b, &w0)
}

fn fuzz_offsets<E: Fuzz>(
    seed: u64,
    lens: &[usize],
    defect: Option<Defect>,
    scale: f64,
    adaptive: Option<f64>,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    let (shapes, bad) = argument_lengths(lens, &["weights", "grads", "offsets"], defect);
    let w0: Vec<Vec<E>> = rng.tensors(&shapes[0], pct);
    let g: Vec<Vec<E>> = rng.tensors(&shapes[1], pct);
    let o0: Vec<Vec<bf16>> = rng.tensors(&shapes[2], 50); // garbage the kernel must overwrite
    let (mut w, mut o) = (w0.clone(), o0.clone());
    let result = k::perturb_offsets::<E>(
        &mut muts(&mut w),
        &refs(&g),
        &mut muts(&mut o),
        scale,
        adaptive,
    );
    if let Some(argument) = bad {
        check_error(result.clone(), argument)?;
        check_untouched("weights", &w, &w0)?;
        return check_untouched("offsets", &o, &o0);
    }
    result.map_err(|e| TestCaseError::fail(format!("aligned call failed: {e}")))?;
    let s = E::Math::from_f64(scale);
    let e_of = |w: E, g: E| match adaptive {
        None => s * g.load(),
        Some(eta) => {
            let t = w.load().abs() + E::Math::from_f64(eta);
            t * t * g.load() * s
        }
    };
    // o = bf16(e); w + o in the weights' compute type, one rounding
    let want_o: Vec<Vec<bf16>> = w0
        .iter()
        .zip(&g)
        .map(|(wt, gt)| {
            wt.iter()
                .zip(gt)
                .map(|(&w, &g)| e_of(w, g).to_bf16())
                .collect()
        })
        .collect();
    check_lists("perturb_offsets offsets", &o, &want_o)?;
    let want_w: Vec<Vec<E>> = w0
        .iter()
        .zip(&want_o)
        .map(|(wt, ot)| {
            wt.iter()
                .zip(ot)
                .map(|(&w, &o)| E::store(w.load() + E::Math::from_bf16(o)))
                .collect()
        })
        .collect();
    check_lists("perturb_offsets weights", &w, &want_w)?;
    // the restoration subtracts exactly the stored offsets
    let moved = w.clone();
    k::subtract_offsets::<E>(&mut muts(&mut w), &refs(&o))
        .map_err(|e| TestCaseError::fail(format!("subtract failed: {e}")))?;
    let want_back: Vec<Vec<E>> = moved
        .iter()
        .zip(&o)
        .map(|(wt, ot)| {
            wt.iter()
                .zip(ot)
                .map(|(&w, &o)| E::store(w.load() - E::Math::from_bf16(o)))
                .collect()
        })
        .collect();
    check_lists("subtract_offsets weights", &w, &want_back)
}

fn fuzz_copy<E: Fuzz>(
    seed: u64,
    lens: &[usize],
    defect: Option<Defect>,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    let (shapes, bad) = argument_lengths(lens, &["dst", "src"], defect);
    let d0: Vec<Vec<E>> = rng.tensors(&shapes[0], pct);
    let src: Vec<Vec<E>> = rng.tensors(&shapes[1], pct);
    let mut dst = d0.clone();
    let result = k::copy::<E>(&refs(&src), &mut muts(&mut dst));
    if let Some(argument) = bad {
        check_error(result.clone(), argument)?;
        return check_untouched("dst", &dst, &d0);
    }
    result.map_err(|e| TestCaseError::fail(format!("aligned call failed: {e}")))?;
    check_untouched("dst (a copy of src)", &dst, &src)
}

fn fuzz_any_nonzero<E: Fuzz>(
    seed: u64,
    lens: &[usize],
    zero_pct: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    for n in lens {
        // Mostly ±0, so that both answers occur, with the non-zero elements anywhere.
        let t: Vec<E> = (0..*n)
            .map(|_| {
                if rng.below(100) < zero_pct {
                    E::from_raw(if rng.below(2) == 0 {
                        0
                    } else {
                        sign_bit::<E>()
                    })
                } else {
                    rng.value(pct)
                }
            })
            .collect();
        let want = t.iter().any(|x| x.load() != E::Math::ZERO);
        prop_assert_eq!(
            k::any_nonzero::<E>(&t),
            want,
            "{} any_nonzero of {:?}",
            E::NAME,
            &t[..t.len().min(64)]
        );
    }
    Ok(())
}

// ---- dot and axpby -----------------------------------------------------------------------------

fn fuzz_dot<E: Fuzz>(
    seed: u64,
    lens: &[usize],
    defect: Option<Defect>,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    let (shapes, bad) = argument_lengths(lens, &["a", "b"], defect);
    let a: Vec<Vec<E>> = rng.tensors(&shapes[0], pct);
    let b: Vec<Vec<E>> = rng.tensors(&shapes[1], pct);
    let result = k::dot::<E>(&refs(&a), &refs(&b));
    if let Some(argument) = bad {
        return check_error(result.map(|_| ()), argument);
    }
    let got = result.map_err(|e| TestCaseError::fail(format!("aligned call failed: {e}")))?;
    let terms: Vec<f64> = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| x.load().to_f64() * y.load().to_f64())
        .collect();
    let want = terms.iter().fold(0.0, |acc, t| acc + t);
    let sum_abs = terms.iter().fold(0.0, |acc, t| acc + t.abs());
    let n = terms.len();
    let tol = 2.0 * (n as f64 + 1.0) * f64::EPSILON * sum_abs;
    // Terms of both signs can overflow in one order of summation and not in another
    // (a NaN `sum_abs` counts as possible overflow too).
    let overflow_possible = sum_abs.is_nan() || sum_abs >= f64::MAX / 4.0;
    let ok = overflow_possible
        || (want.is_nan() && got.is_nan())
        || got == want
        || (got - want).abs() <= tol;
    prop_assert!(
        ok,
        "{} dot: kernel {:e}, naive {:e} (n = {}, sum |a·b| = {:e})",
        E::NAME,
        got,
        want,
        n,
        sum_abs
    );
    Ok(())
}

fn fuzz_axpby<E: Fuzz>(
    seed: u64,
    lens: &[usize],
    defect: Option<Defect>,
    alpha: f64,
    beta: f64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    // The kernel's lead argument is `y` (the one it writes).
    let (shapes, bad) = argument_lengths(lens, &["y", "x"], defect);
    let y0: Vec<Vec<E>> = rng.tensors(&shapes[0], pct);
    let x: Vec<Vec<E>> = rng.tensors(&shapes[1], pct);
    let mut y = y0.clone();
    let result = k::axpby::<E>(&refs(&x), &mut muts(&mut y), alpha, beta);
    if let Some(argument) = bad {
        check_error(result.clone(), argument)?;
        return check_untouched("y", &y, &y0);
    }
    result.map_err(|e| TestCaseError::fail(format!("aligned call failed: {e}")))?;
    let (a, b) = (E::Math::from_f64(alpha), E::Math::from_f64(beta));
    let want: Vec<Vec<E>> = y0
        .iter()
        .zip(&x)
        .map(|(yt, xt)| {
            yt.iter()
                .zip(xt)
                .map(|(&y, &x)| E::store(a * x.load() + b * y.load()))
                .collect()
        })
        .collect();
    check_lists("axpby y", &y, &want)
}

// ---- fused restore + SGD ------------------------------------------------------------------------

fn sgd_strategy() -> impl Strategy<Value = SgdHyper> {
    (
        scalar(-0.5..2.0),
        prop_oneof![Just(0.0), Just(0.9), scalar(0.0..1.0)],
        prop_oneof![Just(0.0), scalar(0.0..1.0)],
        prop_oneof![Just(0.0), scalar(0.0..0.5)],
        any::<(bool, bool, bool)>(),
    )
        .prop_map(
            |(lr, momentum, dampening, weight_decay, (nesterov, maximize, init_momentum))| {
                SgdHyper {
                    lr,
                    momentum,
                    dampening,
                    weight_decay,
                    nesterov,
                    maximize,
                    init_momentum,
                }
            },
        )
}

/// `_single_tensor_sgd` for one element (host scalars rounded to the compute type, every stored
/// value rounded to storage). Returns the new parameter and, with momentum, the new buffer.
fn sgd_formula<E: Element>(param: E, grad: E, buf: E, h: SgdHyper) -> (E, Option<E>) {
    let s = |v: f64| E::Math::from_f64(v);
    let p = param.load();
    let mut d = if h.maximize {
        -grad.load()
    } else {
        grad.load()
    };
    if h.weight_decay != 0.0 {
        d = d + s(h.weight_decay) * p;
    }
    let mut new_buf = None;
    if h.momentum != 0.0 {
        let b = if h.init_momentum {
            E::store(d)
        } else {
            E::store(buf.load() * s(h.momentum) + s(1.0 - h.dampening) * d)
        };
        new_buf = Some(b);
        d = if h.nesterov {
            d + s(h.momentum) * b.load()
        } else {
            b.load()
        };
    }
    (E::store(p + s(-h.lr) * d), new_buf)
}

/// `buffers`: 0 = none given, 1 = given. `in_place`: `sgd_step` (no backups).
fn fuzz_sgd<E: Fuzz>(
    seed: u64,
    lens: &[usize],
    defect: Option<Defect>,
    h: SgdHyper,
    give_buffers: bool,
    in_place: bool,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    let names: &[&'static str] = if in_place {
        &["weights", "grads", "momentum_buffers"]
    } else {
        &["weights", "backups", "grads", "momentum_buffers"]
    };
    let (shapes, bad) = argument_lengths(lens, names, defect);
    let w0: Vec<Vec<E>> = rng.tensors(&shapes[0], if in_place { pct } else { 50 });
    let backups: Vec<Vec<E>> = if in_place {
        Vec::new()
    } else {
        rng.tensors(&shapes[1], pct)
    };
    let g: Vec<Vec<E>> = rng.tensors(&shapes[names.len() - 2], pct);
    let buf0: Vec<Vec<E>> = rng.tensors(&shapes[names.len() - 1], pct);
    let (mut w, mut buf) = (w0.clone(), buf0.clone());
    let result = {
        let mut bufs = muts(&mut buf);
        let bufs = if give_buffers {
            Some(&mut bufs[..])
        } else {
            None
        };
        if in_place {
            k::sgd_step::<E>(&mut muts(&mut w), &refs(&g), bufs, h)
        } else {
            k::restore_sgd::<E>(&mut muts(&mut w), &refs(&backups), &refs(&g), bufs, h)
        }
    };
    let uses_buffers = h.momentum != 0.0;
    // What must fail: a misaligned argument the call uses, or missing buffers it needs.
    let expected_error = match bad {
        Some("momentum_buffers") if !(uses_buffers && give_buffers) => None, // ignored
        other => other,
    };
    if let Some(argument) = expected_error {
        check_error(result.clone(), argument)?;
    } else if uses_buffers && !give_buffers {
        prop_assert_eq!(
            result.clone(),
            Err(KernelError::Missing {
                argument: "momentum_buffers"
            })
        );
    }
    if result.is_err() {
        check_untouched("weights", &w, &w0)?;
        return check_untouched("momentum_buffers", &buf, &buf0);
    }
    if !uses_buffers || !give_buffers {
        check_untouched("momentum_buffers (not used)", &buf, &buf0)?;
    }
    let source = if in_place { &w0 } else { &backups };
    let mut want_w = Vec::new();
    let mut want_buf = Vec::new();
    for t in 0..lens.len() {
        let (mut wt, mut bt) = (Vec::new(), Vec::new());
        for i in 0..lens[t] {
            // Buffers the call ignores may be misaligned: read them only where they exist.
            let b0 = buf0
                .get(t)
                .and_then(|b| b.get(i))
                .copied()
                .unwrap_or(E::from_raw(0));
            let (p, b) = sgd_formula(source[t][i], g[t][i], b0, h);
            wt.push(p);
            bt.push(b.unwrap_or(b0));
        }
        want_w.push(wt);
        want_buf.push(bt);
    }
    check_lists(&format!("SGD weights ({h:?})"), &w, &want_w)?;
    if uses_buffers && give_buffers {
        check_lists(&format!("SGD momentum ({h:?})"), &buf, &want_buf)?;
    }
    Ok(())
}

// ---- fused restore + Adam -----------------------------------------------------------------------

fn adam_strategy() -> impl Strategy<Value = AdamHyper> {
    (
        scalar(-0.1..0.5),
        prop_oneof![Just(0.9), scalar(0.0..1.0)],
        prop_oneof![Just(0.999), scalar(0.0..1.0)],
        prop_oneof![Just(1e-8), scalar(0.0..1e-2)],
        prop_oneof![Just(0.0), scalar(0.0..0.5)],
        any::<(bool, bool, bool)>(),
        prop_oneof![4 => Just(1.0), 4 => (1.0f64..1e4).prop_map(f64::floor), 1 => scalar(0.0..1e9)],
    )
        .prop_map(
            |(lr, beta1, beta2, eps, weight_decay, (decoupled, amsgrad, maximize), step)| {
                AdamHyper {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    decoupled,
                    amsgrad,
                    maximize,
                    step,
                }
            },
        )
}

fn torch_lerp<M: Real>(start: M, end: M, weight: M) -> M {
    if weight.abs() < M::from_f64(0.5) {
        start + weight * (end - start)
    } else {
        end - (end - start) * (M::ONE - weight)
    }
}

/// `_single_tensor_adam` for one element: (param, exp_avg, exp_avg_sq, max_exp_avg_sq).
fn adam_formula<E: Element>(param: E, grad: E, m: E, v: E, vmax: E, h: AdamHyper) -> (E, E, E, E) {
    let s = |x: f64| E::Math::from_f64(x);
    let mut p = param.load();
    let mut grad = if h.maximize {
        -grad.load()
    } else {
        grad.load()
    };
    if h.weight_decay != 0.0 {
        if h.decoupled {
            p = E::store(p * s(1.0 - h.lr * h.weight_decay)).load();
        } else {
            grad = grad + s(h.weight_decay) * p;
        }
    }
    let m = E::store(torch_lerp(m.load(), grad, s(1.0 - h.beta1)));
    let v = E::store(v.load() * s(h.beta2) + s(1.0 - h.beta2) * grad * grad);
    let bias_correction1 = 1.0 - h.beta1.powf(h.step);
    let bias_correction2 = 1.0 - h.beta2.powf(h.step);
    let step_size = h.lr / bias_correction1;
    let (second, vmax) = if h.amsgrad {
        let (a, b) = (vmax.load(), v.load());
        // torch.maximum: NaN from either side wins (`x != x` is the NaN test for a generic type).
        #[allow(clippy::eq_op)]
        let max = if a != a || b != b {
            a + b
        } else if a > b {
            a
        } else {
            b
        };
        let max = E::store(max);
        (max.load(), max)
    } else {
        (v.load(), vmax)
    };
    let denom = second.sqrt() / s(bias_correction2.sqrt()) + s(h.eps);
    (E::store(p + s(-step_size) * m.load() / denom), m, v, vmax)
}

fn fuzz_adam<E: Fuzz>(
    seed: u64,
    lens: &[usize],
    defect: Option<Defect>,
    h: AdamHyper,
    give_max: bool,
    in_place: bool,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let pct = rng.special_pct();
    let names: &[&'static str] = if in_place {
        &[
            "weights",
            "grads",
            "exp_avgs",
            "exp_avg_sqs",
            "max_exp_avg_sqs",
        ]
    } else {
        &[
            "weights",
            "backups",
            "grads",
            "exp_avgs",
            "exp_avg_sqs",
            "max_exp_avg_sqs",
        ]
    };
    let at = |name: &str| names.iter().position(|n| *n == name).unwrap();
    let (shapes, bad) = argument_lengths(lens, names, defect);
    let w0: Vec<Vec<E>> = rng.tensors(&shapes[0], if in_place { pct } else { 50 });
    let backups: Vec<Vec<E>> = if in_place {
        Vec::new()
    } else {
        rng.tensors(&shapes[1], pct)
    };
    let g: Vec<Vec<E>> = rng.tensors(&shapes[at("grads")], pct);
    let m0: Vec<Vec<E>> = rng.tensors(&shapes[at("exp_avgs")], pct);
    let v0: Vec<Vec<E>> = rng.tensors(&shapes[at("exp_avg_sqs")], pct);
    let x0: Vec<Vec<E>> = rng.tensors(&shapes[at("max_exp_avg_sqs")], pct);
    let (mut w, mut m, mut v, mut x) = (w0.clone(), m0.clone(), v0.clone(), x0.clone());
    let result = {
        let mut xs = muts(&mut x);
        let max = if give_max { Some(&mut xs[..]) } else { None };
        if in_place {
            k::adam_step::<E>(
                &mut muts(&mut w),
                &refs(&g),
                &mut muts(&mut m),
                &mut muts(&mut v),
                max,
                h,
            )
        } else {
            k::restore_adam::<E>(
                &mut muts(&mut w),
                &refs(&backups),
                &refs(&g),
                &mut muts(&mut m),
                &mut muts(&mut v),
                max,
                h,
            )
        }
    };
    let expected_error = match bad {
        Some("max_exp_avg_sqs") if !(h.amsgrad && give_max) => None, // ignored
        other => other,
    };
    if let Some(argument) = expected_error {
        check_error(result.clone(), argument)?;
    } else if h.amsgrad && !give_max {
        prop_assert_eq!(
            result.clone(),
            Err(KernelError::Missing {
                argument: "max_exp_avg_sqs"
            })
        );
    }
    if result.is_err() {
        check_untouched("weights", &w, &w0)?;
        check_untouched("exp_avgs", &m, &m0)?;
        check_untouched("exp_avg_sqs", &v, &v0)?;
        return check_untouched("max_exp_avg_sqs", &x, &x0);
    }
    if !h.amsgrad || !give_max {
        check_untouched("max_exp_avg_sqs (not used)", &x, &x0)?;
    }
    let source = if in_place { &w0 } else { &backups };
    let (mut ww, mut wm, mut wv, mut wx) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in 0..lens.len() {
        let (mut a, mut b, mut c, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..lens[t] {
            let x_in = x0
                .get(t)
                .and_then(|x| x.get(i))
                .copied()
                .unwrap_or(E::from_raw(0));
            let (p, m1, m2, mx) = adam_formula(source[t][i], g[t][i], m0[t][i], v0[t][i], x_in, h);
            a.push(p);
            b.push(m1);
            c.push(m2);
            d.push(mx);
        }
        ww.push(a);
        wm.push(b);
        wv.push(c);
        wx.push(d);
    }
    check_lists(&format!("Adam weights ({h:?})"), &w, &ww)?;
    check_lists(&format!("Adam exp_avg ({h:?})"), &m, &wm)?;
    check_lists(&format!("Adam exp_avg_sq ({h:?})"), &v, &wv)?;
    if h.amsgrad && give_max {
        check_lists(&format!("Adam max_exp_avg_sq ({h:?})"), &x, &wx)?;
    }
    Ok(())
}

// ---- the tests: every case runs all four element types ------------------------------------------

macro_rules! all_types {
    ($f:ident($($arg:expr),*)) => {{
        $f::<f32>($($arg),*)?;
        $f::<f64>($($arg),*)?;
        $f::<bf16>($($arg),*)?;
        $f::<f16>($($arg),*)?;
    }};
}

proptest! {
    // PROPTEST_CASES sets the number of cases (proptest's default config reads it); failures are
    // reported with their minimal input rather than written next to this file.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_sum_of_squares_matches_formula(seed in any::<u64>(), lens in lens_strategy()) {
        all_types!(fuzz_sum_of_squares(seed, &lens));
    }

    #[test]
    fn fuzz_sum_of_squares_adaptive_matches_formula(
        seed in any::<u64>(), lens in lens_strategy(), defect in defect_strategy(), eta in scalar(0.0..1.0),
    ) {
        all_types!(fuzz_sum_of_squares_adaptive(seed, &lens, defect, eta));
    }

    #[test]
    fn fuzz_perturb_matches_formula(seed in any::<u64>(), lens in lens_strategy(), defect in defect_strategy(), scale in scalar(-10.0..10.0)) {
        all_types!(fuzz_perturb(seed, &lens, defect, scale, None));
    }

    #[test]
    fn fuzz_perturb_adaptive_matches_formula(
        seed in any::<u64>(), lens in lens_strategy(), defect in defect_strategy(), scale in scalar(-10.0..10.0), eta in scalar(0.0..1.0),
    ) {
        all_types!(fuzz_perturb(seed, &lens, defect, scale, Some(eta)));
    }

    #[test]
    fn fuzz_perturb_offsets_matches_formula(
        seed in any::<u64>(), lens in lens_strategy(), defect in defect_strategy(), scale in scalar(-10.0..10.0),
        eta in prop::option::of(scalar(0.0..1.0)),
    ) {
        all_types!(fuzz_offsets(seed, &lens, defect, scale, eta));
    }

    #[test]
    fn fuzz_restore_copies_bits(seed in any::<u64>(), lens in lens_strategy(), defect in defect_strategy()) {
        all_types!(fuzz_copy(seed, &lens, defect));
    }

    #[test]
    fn fuzz_restore_sgd_matches_formula(
        seed in any::<u64>(), lens in lens_strategy(), defect in defect_strategy(), h in sgd_strategy(),
        give_buffers in prop::bool::weighted(0.85), in_place in prop::bool::weighted(0.25),
    ) {
        all_types!(fuzz_sgd(seed, &lens, defect, h, give_buffers, in_place));
    }

    #[test]
    fn fuzz_restore_adam_matches_formula(
        seed in any::<u64>(), lens in lens_strategy(), defect in defect_strategy(), h in adam_strategy(),
        give_max in prop::bool::weighted(0.85), in_place in prop::bool::weighted(0.25),
    ) {
        all_types!(fuzz_adam(seed, &lens, defect, h, give_max, in_place));
    }

    #[test]
    fn fuzz_dot_matches_formula(seed in any::<u64>(), lens in lens_strategy(), defect in defect_strategy()) {
        all_types!(fuzz_dot(seed, &lens, defect));
    }

    #[test]
    fn fuzz_axpby_matches_formula(
        seed in any::<u64>(), lens in lens_strategy(), defect in defect_strategy(), alpha in scalar(-3.0..3.0), beta in scalar(-3.0..3.0),
    ) {
        all_types!(fuzz_axpby(seed, &lens, defect, alpha, beta));
    }

    #[test]
    fn fuzz_any_nonzero_matches_formula(seed in any::<u64>(), lens in lens_strategy(), zero_pct in prop_oneof![Just(100u64), 90u64..100, 0u64..90]) {
        all_types!(fuzz_any_nonzero(seed, &lens, zero_pct));
    }
}
