//! Restoration fused with the base optimizer's step: one pass reads the backup (the original
//! `w`), the gradient taken at `w + e` and the optimizer state, and writes the updated weights and
//! state. The arithmetic follows torch.optim's for-loop implementations (`foreach=False`) operation
//! by operation, in `f32` for `f32`/`bf16`/`f16` storage (one rounding per stored value) and in
//! `f64` for `f64`; host scalars are rounded to the compute type as torch rounds Python floats.

use crate::element::{Element, Real};
use crate::parallel::{chunks, chunks_mut, for_each};
use crate::{check_aligned, lengths, KernelError};
use multiversion::multiversion;

/// Hyperparameters of `torch.optim.SGD` for one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdHyper {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
    /// The momentum buffers do not exist yet: torch starts them as a copy of the first update
    /// direction (`buf = d_p`), not as `(1 − dampening)·d_p`.
    pub init_momentum: bool,
}

/// Hyperparameters of `torch.optim.Adam`/`AdamW` for one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled decay `w ← w·(1 − lr·wd)` instead of adding `wd·w` to the gradient.
    pub decoupled: bool,
    pub amsgrad: bool,
    pub maximize: bool,
    /// The step count *after* this step (torch increments `state["step"]` first).
    pub step: f64,
}

#[derive(Clone, Copy)]
struct SgdScalars<M> {
    neg_lr: M,
    momentum: M,
    one_minus_dampening: M,
    weight_decay: M,
    use_weight_decay: bool,
    nesterov: bool,
    maximize: bool,
    init: bool,
}

#[multiversion(targets = "simd")]
fn restore_sgd_chunk<E: Element, const MOMENTUM: bool>(w: &mut [E], backup: &[E], g: &[E], buf: &mut [E], k: SgdScalars<E::Math>) {
    let n = w.len();
    let (backup, g) = (&backup[..n], &g[..n]);
    let buf = if MOMENTUM { &mut buf[..n] } else { buf };
    for i in 0..n {
        let p = backup[i].load();
        let g = g[i];
        let mut d = if k.maximize { -g.load() } else { g.load() };
        if k.use_weight_decay {
            d = d + k.weight_decay * p;
        }
        if MOMENTUM {
            let b = if k.init { d } else { buf[i].load() * k.momentum + k.one_minus_dampening * d };
            let b = E::store(b);
            buf[i] = b;
            // torch keeps the buffer in the parameter's dtype and reads it back from there.
            let b = b.load();
            d = if k.nesterov { d + k.momentum * b } else { b };
        }
        w[i] = E::store(p + k.neg_lr * d);
    }
}

/// Restores `w` from `backup` and applies one `torch.optim.SGD` step with the gradient `grads`
/// (taken at the perturbed point). `momentum_buffers` is required when `momentum != 0` and
/// ignored otherwise.
pub fn restore_sgd<E: Element>(
    weights: &mut [&mut [E]],
    backups: &[&[E]],
    grads: &[&[E]],
    momentum_buffers: Option<&mut [&mut [E]]>,
    hyper: SgdHyper,
) -> Result<(), KernelError> {
    let lens = lengths(weights);
    check_aligned(&lens, backups, "backups")?;
    check_aligned(&lens, grads, "grads")?;
    let buffers = match momentum_buffers {
        Some(b) if hyper.momentum != 0.0 => {
            check_aligned(&lens, b, "momentum_buffers")?;
            Some(b)
        }
        None if hyper.momentum != 0.0 => return Err(KernelError::Missing { argument: "momentum_buffers" }),
        _ => None,
    };
    let m = |v: f64| E::Math::from_f64(v);
    let k = SgdScalars {
        neg_lr: m(-hyper.lr),
        momentum: m(hyper.momentum),
        one_minus_dampening: m(1.0 - hyper.dampening),
        weight_decay: m(hyper.weight_decay),
        use_weight_decay: hyper.weight_decay != 0.0,
        nesterov: hyper.nesterov,
        maximize: hyper.maximize,
        init: hyper.init_momentum,
    };
    let total = lens.iter().sum();
    let head: Vec<_> = chunks_mut(weights).zip(chunks(backups)).zip(chunks(grads)).collect();
    match buffers {
        Some(b) => {
            let items: Vec<_> = head.into_iter().zip(chunks_mut(b)).collect();
            for_each(items, total, |(((w, p), g), b)| restore_sgd_chunk::<E, true>(w, p, g, b, k));
        }
        None => for_each(head, total, |((w, p), g)| restore_sgd_chunk::<E, false>(w, p, g, &mut [], k)),
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct AdamScalars<M> {
    decay_factor: M,
    weight_decay: M,
    one_minus_beta1: M,
    beta2: M,
    one_minus_beta2: M,
    bias_correction2_sqrt: M,
    eps: M,
    neg_step_size: M,
    coupled_decay: bool,
    decoupled_decay: bool,
    maximize: bool,
}

/// torch's `lerp(start, end, weight)`: two formulas, chosen by the weight, for accuracy at both ends.
#[inline(always)]
fn lerp<M: Real>(start: M, end: M, weight: M) -> M {
    let half = M::from_f64(0.5);
    if weight.abs() < half {
        start + weight * (end - start)
    } else {
        end - (end - start) * (M::ONE - weight)
    }
}

#[multiversion(targets = "simd")]
fn restore_adam_chunk<E: Element, const AMSGRAD: bool>(
    w: &mut [E],
    backup: &[E],
    g: &[E],
    exp_avg: &mut [E],
    exp_avg_sq: &mut [E],
    max_exp_avg_sq: &mut [E],
    k: AdamScalars<E::Math>,
) {
    // Re-slicing to one length lets the compiler drop the bounds checks.
    let n = w.len();
    let (backup, g, exp_avg, exp_avg_sq) = (&backup[..n], &g[..n], &mut exp_avg[..n], &mut exp_avg_sq[..n]);
    let max_exp_avg_sq = if AMSGRAD { &mut max_exp_avg_sq[..n] } else { max_exp_avg_sq };
    for i in 0..n {
        let mut p = backup[i].load();
        let mut grad = if k.maximize { -g[i].load() } else { g[i].load() };
        if k.decoupled_decay {
            // torch multiplies the parameter in place, so the product is rounded to storage.
            p = E::store(p * k.decay_factor).load();
        } else if k.coupled_decay {
            grad = grad + k.weight_decay * p;
        }
        let m = E::store(lerp(exp_avg[i].load(), grad, k.one_minus_beta1));
        exp_avg[i] = m;
        let v = E::store(exp_avg_sq[i].load() * k.beta2 + k.one_minus_beta2 * grad * grad);
        exp_avg_sq[i] = v;
        let second = if AMSGRAD {
            let v_max = E::store(max_exp_avg_sq[i].load().max_nan(v.load()));
            max_exp_avg_sq[i] = v_max;
            v_max.load()
        } else {
            v.load()
        };
        let denom = second.sqrt() / k.bias_correction2_sqrt + k.eps;
        w[i] = E::store(p + k.neg_step_size * (m.load() / denom));
    }
}

/// Restores `w` from `backup` and applies one `torch.optim.Adam`/`AdamW` step with the gradient
/// `grads`. `max_exp_avg_sqs` is used only with `amsgrad` (`None` otherwise).
pub fn restore_adam<E: Element>(
    weights: &mut [&mut [E]],
    backups: &[&[E]],
    grads: &[&[E]],
    exp_avgs: &mut [&mut [E]],
    exp_avg_sqs: &mut [&mut [E]],
    max_exp_avg_sqs: Option<&mut [&mut [E]]>,
    hyper: AdamHyper,
) -> Result<(), KernelError> {
    let lens = lengths(weights);
    check_aligned(&lens, backups, "backups")?;
    check_aligned(&lens, grads, "grads")?;
    check_aligned(&lens, exp_avgs, "exp_avgs")?;
    check_aligned(&lens, exp_avg_sqs, "exp_avg_sqs")?;
    if let Some(max) = &max_exp_avg_sqs {
        check_aligned(&lens, max, "max_exp_avg_sqs")?;
    }
    // Python-float arithmetic, as in torch's `_single_tensor_adam`.
    let bias_correction1 = 1.0 - hyper.beta1.powf(hyper.step);
    let bias_correction2 = 1.0 - hyper.beta2.powf(hyper.step);
    let m = |v: f64| E::Math::from_f64(v);
    let k = AdamScalars {
        decay_factor: m(1.0 - hyper.lr * hyper.weight_decay),
        weight_decay: m(hyper.weight_decay),
        one_minus_beta1: m(1.0 - hyper.beta1),
        beta2: m(hyper.beta2),
        one_minus_beta2: m(1.0 - hyper.beta2),
        bias_correction2_sqrt: m(bias_correction2.sqrt()),
        eps: m(hyper.eps),
        neg_step_size: m(-(hyper.lr / bias_correction1)),
        coupled_decay: hyper.weight_decay != 0.0 && !hyper.decoupled,
        decoupled_decay: hyper.weight_decay != 0.0 && hyper.decoupled,
        maximize: hyper.maximize,
    };
    let total = lens.iter().sum();
    let head: Vec<_> = chunks_mut(weights).zip(chunks(backups)).zip(chunks(grads)).zip(chunks_mut(exp_avgs)).zip(chunks_mut(exp_avg_sqs)).collect();
    match max_exp_avg_sqs {
        Some(max) => {
            let items: Vec<_> = head.into_iter().zip(chunks_mut(max)).collect();
            for_each(items, total, |(((((w, p), g), m1), m2), vmax)| restore_adam_chunk::<E, true>(w, p, g, m1, m2, vmax, k));
        }
        None => {
            for_each(head, total, |((((w, p), g), m1), m2)| restore_adam_chunk::<E, false>(w, p, g, m1, m2, &mut [], k));
        }
    }
    Ok(())
}
