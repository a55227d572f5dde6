//! Squared gradient norms: `Σ g²` (SAM) and `Σ ((|w| + η)·g)²` (ASAM, Kwon et al., ICML 2021).
//!
//! Accumulated in `f64` over 32 independent lanes per chunk: the loop vectorises without
//! fast-math, several vector registers hide the additions' latency, and the sum stays accurate on
//! hundreds of millions of elements.

use crate::element::{Element, Real};
use crate::parallel::{chunks, ordered_sum};
use crate::{check_aligned, lengths, KernelError};
use multiversion::multiversion;

/// Independent accumulators per chunk (shared with the dot product).
pub(crate) const LANES: usize = 32;

/// Adds the lanes pairwise in a fixed order (the same on every CPU, whatever its vector width).
#[inline(always)]
pub(crate) fn fold_lanes(mut lanes: [f64; LANES], tail: f64) -> f64 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    lanes[0] + tail
}

#[multiversion(targets = "simd")]
fn sum_of_squares_chunk<E: Element>(g: &[E]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut blocks = g.chunks_exact(LANES);
    for block in &mut blocks {
        for (lane, &x) in lanes.iter_mut().zip(block) {
            let x = x.load().to_f64();
            *lane += x * x;
        }
    }
    let tail = blocks.remainder().iter().fold(0.0, |acc, &x| {
        let x = x.load().to_f64();
        acc + x * x
    });
    fold_lanes(lanes, tail)
}

#[multiversion(targets = "simd")]
fn sum_of_squares_adaptive_chunk<E: Element>(w: &[E], g: &[E], eta: f64) -> f64 {
    let term = |w: E, g: E| {
        let scaled = (w.load().to_f64().abs() + eta) * g.load().to_f64();
        scaled * scaled
    };
    let mut lanes = [0.0f64; LANES];
    let mut w_blocks = w.chunks_exact(LANES);
    let mut g_blocks = g.chunks_exact(LANES);
    for (wb, gb) in (&mut w_blocks).zip(&mut g_blocks) {
        for ((lane, &w), &g) in lanes.iter_mut().zip(wb).zip(gb) {
            *lane += term(w, g);
        }
    }
    let tail = w_blocks
        .remainder()
        .iter()
        .zip(g_blocks.remainder())
        .fold(0.0, |acc, (&w, &g)| acc + term(w, g));
    fold_lanes(lanes, tail)
}

/// `Σ g²` over every element of every tensor, in `f64`.
pub fn sum_of_squares<E: Element>(grads: &[&[E]]) -> f64 {
    let total = grads.iter().map(|t| t.len()).sum();
    ordered_sum(chunks(grads).collect(), total, sum_of_squares_chunk::<E>)
}

/// `Σ ((|w| + eta)·g)²`, the squared norm of `T_w g` in ASAM, in `f64`.
pub fn sum_of_squares_adaptive<E: Element>(
    weights: &[&[E]],
    grads: &[&[E]],
    eta: f64,
) -> Result<f64, KernelError> {
    let lens = lengths(weights);
    check_aligned(&lens, grads, "grads")?;
    let total = lens.iter().sum();
    let items: Vec<_> = chunks(weights).zip(chunks(grads)).collect();
    Ok(ordered_sum(items, total, |(w, g)| {
        sum_of_squares_adaptive_chunk::<E>(w, g, eta)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use proptest::prelude::*;

    /// Compensated (Neumaier) summation: a reference more accurate than the kernel.
    fn naive(g: &[f32]) -> f64 {
        let (mut sum, mut carry) = (0.0f64, 0.0f64);
        for &x in g {
            let term = (x as f64) * (x as f64);
            let t = sum + term;
            carry += if sum.abs() >= term.abs() {
                (sum - t) + term
            } else {
                (term - t) + sum
            };
            sum = t;
        }
        sum + carry
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(sum_of_squares::<f32>(&[]), 0.0);
        assert_eq!(sum_of_squares::<f32>(&[&[]]), 0.0);
        assert_eq!(sum_of_squares::<f32>(&[&[3.0]]), 9.0);
    }

    #[test]
    fn large_sum_is_accurate_and_deterministic() {
        let g: Vec<f32> = (0..3_000_001)
            .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
            .collect();
        let expected = naive(&g);
        let a = sum_of_squares::<f32>(&[&g]);
        let b = sum_of_squares::<f32>(&[&g]);
        assert_eq!(a.to_bits(), b.to_bits());
        assert!(
            ((a - expected) / expected).abs() < 1e-12,
            "{a} vs {expected}"
        );
        // Splitting the same data into several tensors does not change the sum beyond rounding.
        let (x, y) = g.split_at(1_234_567);
        let split = sum_of_squares::<f32>(&[x, y]);
        assert!(((split - expected) / expected).abs() < 1e-12);
    }

    #[test]
    fn adaptive_rejects_misaligned_lists() {
        let w = [1.0f32, 2.0];
        let g = [1.0f32];
        assert!(matches!(
            sum_of_squares_adaptive::<f32>(&[&w], &[&g], 0.0),
            Err(KernelError::Length {
                argument: "grads",
                index: 0,
                expected: 2,
                found: 1
            })
        ));
        assert!(matches!(
            sum_of_squares_adaptive::<f32>(&[&w], &[], 0.0),
            Err(KernelError::TensorCount { .. })
        ));
    }

    proptest! {
        #[test]
        fn matches_naive_formula(g in prop::collection::vec(-1e3f32..1e3, 0..5000), eta in 0.0f64..1.0) {
            let got = sum_of_squares::<f32>(&[&g]);
            let want = naive(&g);
            prop_assert!((got - want).abs() <= 1e-12 * want.max(1e-300));
            let w: Vec<f32> = g.iter().map(|x| x * 0.5 - 1.0).collect();
            let got = sum_of_squares_adaptive::<f32>(&[&w], &[&g], eta).unwrap();
            let want: f64 = w.iter().zip(&g).map(|(&w, &g)| ((w as f64).abs() + eta) * g as f64).map(|x| x * x).sum();
            prop_assert!((got - want).abs() <= 1e-12 * want.max(1e-300));
        }

        #[test]
        fn bf16_is_summed_exactly_widened(bits in prop::collection::vec(0u16..0x7f00, 0..3000)) {
            let g: Vec<bf16> = bits.iter().map(|&b| bf16::from_bits(b)).collect();
            let want: f64 = g.iter().map(|x| x.to_f64() * x.to_f64()).sum();
            let got = sum_of_squares::<bf16>(&[&g]);
            prop_assert!((got - want).abs() <= 1e-12 * want.max(1e-300));
        }
    }
}
