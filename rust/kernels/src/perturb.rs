//! The ascent step and its exact undo.
//!
//! SAM moves the weights to `w + e` with `e = s·g` (`s = ρ/‖g‖`); ASAM uses `e = s·T²g` with
//! `T = |w| + η` elementwise. `(w + e) − e ≠ w` in floating point, so the kernels copy `w` into
//! a backup in the same pass and [`restore`] copies it back: restoration is bit-exact.

use crate::element::{Element, Real};
use crate::parallel::{chunks, chunks_mut, for_each};
use crate::{check_aligned, lengths, KernelError};
use half::bf16;
use multiversion::multiversion;

#[multiversion(targets = "simd")]
fn perturb_chunk<E: Element>(w: &mut [E], g: &[E], backup: &mut [E], scale: E::Math) {
    for ((w, &g), b) in w.iter_mut().zip(g).zip(backup.iter_mut()) {
        *b = *w;
        *w = E::store(w.load() + scale * g.load());
    }
}

#[multiversion(targets = "simd")]
fn perturb_adaptive_chunk<E: Element>(
    w: &mut [E],
    g: &[E],
    backup: &mut [E],
    scale: E::Math,
    eta: E::Math,
) {
    for ((w, &g), b) in w.iter_mut().zip(g).zip(backup.iter_mut()) {
        *b = *w;
        let x = w.load();
        let t = x.abs() + eta;
        *w = E::store(x + t * t * g.load() * scale);
    }
}

fn check_perturb_args<E>(
    weights: &[&mut [E]],
    grads: &[&[E]],
    backups: &[&mut [E]],
) -> Result<usize, KernelError> {
    let lens = lengths(weights);
    check_aligned(&lens, grads, "grads")?;
    check_aligned(&lens, backups, "backups")?;
    Ok(lens.iter().sum())
}

/// `backup ← w; w ← w + scale·g`, elementwise over aligned tensor lists.
pub fn perturb<E: Element>(
    weights: &mut [&mut [E]],
    grads: &[&[E]],
    backups: &mut [&mut [E]],
    scale: f64,
) -> Result<(), KernelError> {
    let total = check_perturb_args(weights, grads, backups)?;
    let scale = E::Math::from_f64(scale);
    let items: Vec<_> = chunks_mut(weights)
        .zip(chunks(grads))
        .zip(chunks_mut(backups))
        .collect();
    for_each(items, total, |((w, g), b)| {
        perturb_chunk::<E>(w, g, b, scale)
    });
    Ok(())
}

/// `backup ← w; w ← w + scale·(|w| + eta)²·g` (ASAM's `e = ρ T²g/‖Tg‖` with `scale = ρ/‖Tg‖`).
pub fn perturb_adaptive<E: Element>(
    weights: &mut [&mut [E]],
    grads: &[&[E]],
    backups: &mut [&mut [E]],
    scale: f64,
    eta: f64,
) -> Result<(), KernelError> {
    let total = check_perturb_args(weights, grads, backups)?;
    let (scale, eta) = (E::Math::from_f64(scale), E::Math::from_f64(eta));
    let items: Vec<_> = chunks_mut(weights)
        .zip(chunks(grads))
        .zip(chunks_mut(backups))
        .collect();
    for_each(items, total, |((w, g), b)| {
        perturb_adaptive_chunk::<E>(w, g, b, scale, eta)
    });
    Ok(())
}

/// `dst ← src`, bit for bit: the exact undo of [`perturb`] and [`perturb_adaptive`] (weights from
/// their backup), and every other copy between buffers. Sources first, as in the engines' `copy`.
pub fn copy<E: Element>(src: &[&[E]], dst: &mut [&mut [E]]) -> Result<(), KernelError> {
    let lens = lengths(dst);
    check_aligned(&lens, src, "src")?;
    let total = lens.iter().sum();
    let items: Vec<_> = chunks_mut(dst).zip(chunks(src)).collect();
    for_each(items, total, |(d, s)| d.copy_from_slice(s));
    Ok(())
}

#[multiversion(targets = "simd")]
fn perturb_offsets_chunk<E: Element>(
    w: &mut [E],
    g: &[E],
    offsets: &mut [bf16],
    scale: E::Math,
    eta: Option<E::Math>,
) {
    for ((w, &g), o) in w.iter_mut().zip(g).zip(offsets.iter_mut()) {
        let x = w.load();
        let e = match eta {
            Some(eta) => {
                let t = x.abs() + eta;
                t * t * g.load() * scale
            }
            None => scale * g.load(),
        };
        // The weights move by exactly the stored offset, so subtracting it undoes the move up
        // to the rounding of `w + o` and of `(w + o) − o`.
        *o = e.to_bf16();
        *w = E::store(x + E::Math::from_bf16(*o));
    }
}

/// The subtract mode's ascent: `o ← bf16(e)`, `w ← w + o` with `e = scale·g`, or ASAM's
/// `e = scale·(|w| + eta)²·g` when `eta` is given. It keeps 2 bytes per weight instead of a full
/// backup; [`subtract_offsets`] undoes it, not bit-exactly (see there).
pub fn perturb_offsets<E: Element>(
    weights: &mut [&mut [E]],
    grads: &[&[E]],
    offsets: &mut [&mut [bf16]],
    scale: f64,
    eta: Option<f64>,
) -> Result<(), KernelError> {
    let lens = lengths(weights);
    check_aligned(&lens, grads, "grads")?;
    check_aligned(&lens, offsets, "offsets")?;
    let total = lens.iter().sum();
    let (scale, eta) = (E::Math::from_f64(scale), eta.map(E::Math::from_f64));
    let items: Vec<_> = chunks_mut(weights)
        .zip(chunks(grads))
        .zip(chunks_mut(offsets))
        .collect();
    for_each(items, total, |((w, g), o)| {
        perturb_offsets_chunk::<E>(w, g, o, scale, eta)
    });
    Ok(())
}

#[multiversion(targets = "simd")]
fn subtract_offsets_chunk<E: Element>(w: &mut [E], offsets: &[bf16]) {
    for (w, &o) in w.iter_mut().zip(offsets) {
        *w = E::store(w.load() - E::Math::from_bf16(o));
    }
}

/// `w ← w − o`: the subtract mode's restoration. `fl(fl(w + o) − o)` is within one ulp of the
/// larger of `|w|` and `|w + o|` of `w`: close for weights larger than their offset, but a weight
/// much smaller than its offset comes back with the offset's rounding error.
pub fn subtract_offsets<E: Element>(
    weights: &mut [&mut [E]],
    offsets: &[&[bf16]],
) -> Result<(), KernelError> {
    let lens = lengths(weights);
    check_aligned(&lens, offsets, "offsets")?;
    let total = lens.iter().sum();
    let items: Vec<_> = chunks_mut(weights).zip(chunks(offsets)).collect();
    for_each(items, total, |(w, o)| subtract_offsets_chunk::<E>(w, o));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use proptest::prelude::*;

    fn round_trip<E: Element + PartialEq + std::fmt::Debug>(
        w0: Vec<E>,
        g: Vec<E>,
        scale: f64,
        adaptive: bool,
    ) {
        let mut w = w0.clone();
        let mut b = vec![E::store(E::Math::ZERO); w0.len()];
        if adaptive {
            perturb_adaptive::<E>(&mut [&mut w], &[&g], &mut [&mut b], scale, 0.01).unwrap();
        } else {
            perturb::<E>(&mut [&mut w], &[&g], &mut [&mut b], scale).unwrap();
        }
        assert_eq!(b, w0);
        copy::<E>(&[&b], &mut [&mut w]).unwrap();
        assert_eq!(w, w0);
    }

    #[test]
    fn perturbation_follows_the_formula_in_f32() {
        let w = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.1f32, 0.2, -0.3];
        let mut out = w.clone();
        let mut b = vec![0.0f32; 3];
        perturb::<f32>(&mut [&mut out], &[&g], &mut [&mut b], 0.5).unwrap();
        for i in 0..3 {
            assert_eq!(out[i], w[i] + 0.5f32 * g[i]);
        }
        let mut out = w.clone();
        perturb_adaptive::<f32>(&mut [&mut out], &[&g], &mut [&mut b], 0.5, 0.01).unwrap();
        for i in 0..3 {
            let t = w[i].abs() + 0.01f32;
            assert_eq!(out[i], w[i] + t * t * g[i] * 0.5f32);
        }
    }

    #[test]
    fn misaligned_lists_are_errors() {
        let mut w = vec![0.0f32; 4];
        let mut b = vec![0.0f32; 3];
        let g = vec![0.0f32; 4];
        assert!(perturb::<f32>(&mut [&mut w], &[&g], &mut [&mut b], 1.0).is_err());
        assert!(copy::<f32>(&[], &mut [&mut w]).is_err());
    }

    #[test]
    fn restoration_is_exact_across_chunks_and_tensors() {
        let n = 3 * crate::CHUNK + 17;
        let w0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        round_trip(w0.clone(), g.clone(), 0.05, false);
        round_trip(w0, g, 0.05, true);
    }

    #[test]
    fn offsets_follow_the_formula_and_subtract_back() {
        let w0 = vec![1.0f32, -2.0, 0.5, 3.0e-3];
        let g = vec![0.1f32, 0.2, -0.3, 1.0];
        let mut w = w0.clone();
        let mut o = vec![bf16::ZERO; 4];
        perturb_offsets::<f32>(&mut [&mut w], &[&g], &mut [&mut o], 0.5, None).unwrap();
        for i in 0..4 {
            assert_eq!(o[i], bf16::from_f32(0.5 * g[i]));
            assert_eq!(w[i], w0[i] + o[i].to_f32());
        }
        subtract_offsets::<f32>(&mut [&mut w], &[&o]).unwrap();
        for i in 0..4 {
            // Within one ulp of the larger of |w| and |w + o|: a weight much smaller than its
            // offset (the last one) comes back with the offset's rounding error.
            let big = w0[i].abs().max((w0[i] + o[i].to_f32()).abs());
            assert!(
                (w[i] - w0[i]).abs() <= f32::EPSILON * big,
                "{} vs {}",
                w[i],
                w0[i]
            );
        }
        assert_ne!(
            w[3], w0[3],
            "this case is not exact: the test would not see an inexact kernel"
        );
        let mut w = w0.clone();
        perturb_offsets::<f32>(&mut [&mut w], &[&g], &mut [&mut o], 0.5, Some(0.01)).unwrap();
        for i in 0..4 {
            let t = w0[i].abs() + 0.01;
            assert_eq!(o[i], bf16::from_f32(t * t * g[i] * 0.5));
        }
        let mut short = vec![bf16::ZERO; 3];
        assert!(
            perturb_offsets::<f32>(&mut [&mut w], &[&g], &mut [&mut short], 0.5, None).is_err()
        );
        assert!(subtract_offsets::<f32>(&mut [&mut w], &[&short]).is_err());
    }

    proptest! {
        #[test]
        fn subtracting_the_offsets_is_within_one_ulp(
            w in prop::collection::vec(-1e3f32..1e3, 1..300),
            scale in -1.0f64..1.0,
            adaptive in any::<bool>(),
        ) {
            let g: Vec<f32> = w.iter().map(|x| x.sin()).collect();
            let eta = adaptive.then_some(0.01);
            let mut out = w.clone();
            let mut o = vec![bf16::ZERO; w.len()];
            perturb_offsets::<f32>(&mut [&mut out], &[&g], &mut [&mut o], scale, eta).unwrap();
            subtract_offsets::<f32>(&mut [&mut out], &[&o]).unwrap();
            for i in 0..w.len() {
                let big = w[i].abs().max((w[i] + o[i].to_f32()).abs());
                prop_assert!((out[i] - w[i]).abs() <= big * f32::EPSILON, "{} vs {}", out[i], w[i]);
            }
        }

        #[test]
        fn every_dtype_round_trips(
            w in prop::collection::vec(-1e4f32..1e4, 0..300),
            scale in -10.0f64..10.0,
            adaptive in any::<bool>(),
        ) {
            let g: Vec<f32> = w.iter().map(|x| x.sin()).collect();
            round_trip(w.clone(), g.clone(), scale, adaptive);
            round_trip(w.iter().map(|&x| x as f64).collect(), g.iter().map(|&x| x as f64).collect(), scale, adaptive);
            round_trip(w.iter().map(|&x| bf16::from_f32(x)).collect(), g.iter().map(|&x| bf16::from_f32(x)).collect(), scale, adaptive);
            round_trip(w.iter().map(|&x| f16::from_f32(x)).collect(), g.iter().map(|&x| f16::from_f32(x)).collect(), scale, adaptive);
        }

        #[test]
        fn bf16_perturbation_is_one_rounding_of_the_f32_formula(
            w in prop::collection::vec(-100f32..100.0, 1..200),
            scale in -1.0f64..1.0,
        ) {
            let w: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
            let g: Vec<bf16> = w.iter().map(|x| bf16::from_f32(x.to_f32().cos())).collect();
            let mut out = w.clone();
            let mut b = w.clone();
            perturb::<bf16>(&mut [&mut out], &[&g], &mut [&mut b], scale).unwrap();
            for i in 0..w.len() {
                let want = bf16::from_f32(w[i].to_f32() + (scale as f32) * g[i].to_f32());
                prop_assert_eq!(out[i].to_bits(), want.to_bits());
            }
        }
    }
}
