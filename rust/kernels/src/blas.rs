//! Inner products and linear combinations of tensor lists, for the SAM variants that project or
//! mix gradients (LookSAM's `g_v`, GSAM's orthogonal component, Friendly SAM's `g − σm` ...).

use crate::element::{Element, Real};
use crate::norms::{fold_lanes, LANES};
use crate::parallel::{chunks, chunks_mut, for_each, ordered_sum};
use crate::{check_aligned, lengths, KernelError};
use multiversion::multiversion;

#[multiversion(targets = "simd")]
fn dot_chunk<E: Element>(a: &[E], b: &[E]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut a_blocks = a.chunks_exact(LANES);
    let mut b_blocks = b.chunks_exact(LANES);
    for (ab, bb) in (&mut a_blocks).zip(&mut b_blocks) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(ab).zip(bb) {
            *lane += x.load().to_f64() * y.load().to_f64();
        }
    }
    let tail = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .fold(0.0, |acc, (&x, &y)| {
            acc + x.load().to_f64() * y.load().to_f64()
        });
    fold_lanes(lanes, tail)
}

/// `Σ a·b` over aligned tensor lists, accumulated in `f64` (deterministic, like the norms).
pub fn dot<E: Element>(a: &[&[E]], b: &[&[E]]) -> Result<f64, KernelError> {
    let lens = lengths(a);
    check_aligned(&lens, b, "b")?;
    let total = lens.iter().sum();
    let items: Vec<_> = chunks(a).zip(chunks(b)).collect();
    Ok(ordered_sum(items, total, |(x, y)| dot_chunk::<E>(x, y)))
}

#[multiversion(targets = "simd")]
fn axpby_chunk<E: Element>(x: &[E], y: &mut [E], alpha: E::Math, beta: E::Math) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = E::store(alpha * x.load() + beta * y.load());
    }
}

/// `y ← alpha·x + beta·y`, elementwise over aligned tensor lists (computed in the math type,
/// rounded once).
pub fn axpby<E: Element>(
    x: &[&[E]],
    y: &mut [&mut [E]],
    alpha: f64,
    beta: f64,
) -> Result<(), KernelError> {
    let lens = lengths(y);
    check_aligned(&lens, x, "x")?;
    let total = lens.iter().sum();
    let (alpha, beta) = (E::Math::from_f64(alpha), E::Math::from_f64(beta));
    let items: Vec<_> = chunks(x).zip(chunks_mut(y)).collect();
    for_each(items, total, |(x, y)| axpby_chunk::<E>(x, y, alpha, beta));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn dot_matches_the_formula(a in prop::collection::vec(-1e3f32..1e3, 0..5000), split in 0usize..5000) {
            let b: Vec<f32> = a.iter().map(|x| x.cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let got = dot::<f32>(&[&a], &[&b]).unwrap();
            prop_assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0));
            let k = split.min(a.len());
            let parts = dot::<f32>(&[&a[..k], &a[k..]], &[&b[..k], &b[k..]]).unwrap();
            prop_assert!((parts - want).abs() <= 1e-9 * want.abs().max(1.0));
        }

        #[test]
        fn axpby_is_one_rounding_of_the_formula(y0 in prop::collection::vec(-100f32..100.0, 0..300), alpha in -3.0f64..3.0, beta in -3.0f64..3.0) {
            let x: Vec<f32> = y0.iter().map(|v| v.sin()).collect();
            let mut y = y0.clone();
            axpby::<f32>(&[&x], &mut [&mut y], alpha, beta).unwrap();
            for i in 0..y.len() {
                prop_assert_eq!(y[i].to_bits(), ((alpha as f32) * x[i] + (beta as f32) * y0[i]).to_bits());
            }
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut yb: Vec<bf16> = y0.iter().map(|&v| bf16::from_f32(v)).collect();
            let yb0 = yb.clone();
            axpby::<bf16>(&[&xb], &mut [&mut yb], alpha, beta).unwrap();
            for i in 0..yb.len() {
                let want = bf16::from_f32((alpha as f32) * xb[i].to_f32() + (beta as f32) * yb0[i].to_f32());
                prop_assert_eq!(yb[i].to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn misaligned_lists_are_errors() {
        let (a, b) = (vec![1.0f32; 3], vec![1.0f32; 4]);
        assert!(dot::<f32>(&[&a], &[&b]).is_err());
        let mut y = vec![0.0f32; 4];
        assert!(axpby::<f32>(&[&a], &mut [&mut y], 1.0, 1.0).is_err());
        assert_eq!(y, vec![0.0; 4]);
    }
}
