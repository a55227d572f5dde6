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

/// One SGD step over a chunk; the weights are read from `backup` (after a perturbation) or, with
/// `IN_PLACE`, from `w` itself (a plain step; `backup` is then empty).
#[multiversion(targets = "simd")]
fn restore_sgd_chunk<E: Element, const MOMENTUM: bool, const IN_PLACE: bool>(
    w: &mut [E],
    backup: &[E],
    g: &[E],
    buf: &mut [E],
    k: SgdScalars<E::Math>,
) {
    let n = w.len();
    let g = &g[..n];
    let backup = if IN_PLACE { backup } else { &backup[..n] };
    let buf = if MOMENTUM { &mut buf[..n] } else { buf };
    for i in 0..n {
        let p = if IN_PLACE {
            w[i].load()
        } else {
            backup[i].load()
        };
        let g = g[i];
        let mut d = if k.maximize { -g.load() } else { g.load() };
        if k.use_weight_decay {
            d = d + k.weight_decay * p;
        }
        if MOMENTUM {
            let b = if k.init {
                d
            } else {
                buf[i].load() * k.momentum + k.one_minus_dampening * d
            };
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
    sgd(weights, Some(backups), grads, momentum_buffers, hyper)
}

/// One `torch.optim.SGD` step in place (no perturbation to undo): the steps of SAM variants that
/// skip the second pass.
pub fn sgd_step<E: Element>(
    weights: &mut [&mut [E]],
    grads: &[&[E]],
    momentum_buffers: Option<&mut [&mut [E]]>,
    hyper: SgdHyper,
) -> Result<(), KernelError> {
    sgd(weights, None, grads, momentum_buffers, hyper)
}

fn sgd<E: Element>(
    weights: &mut [&mut [E]],
    backups: Option<&[&[E]]>,
    grads: &[&[E]],
    momentum_buffers: Option<&mut [&mut [E]]>,
    hyper: SgdHyper,
) -> Result<(), KernelError> {
    let lens = lengths(weights);
    if let Some(b) = backups {
        check_aligned(&lens, b, "backups")?;
    }
    check_aligned(&lens, grads, "grads")?;
    let buffers = match momentum_buffers {
        Some(b) if hyper.momentum != 0.0 => {
            check_aligned(&lens, b, "momentum_buffers")?;
            Some(b)
        }
        None if hyper.momentum != 0.0 => {
            return Err(KernelError::Missing {
                argument: "momentum_buffers",
            })
        }
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
    match backups {
        Some(backups) => {
            let head: Vec<_> = chunks_mut(weights)
                .zip(chunks(backups))
                .zip(chunks(grads))
                .collect();
            match buffers {
                Some(b) => {
                    let items: Vec<_> = head.into_iter().zip(chunks_mut(b)).collect();
                    for_each(items, total, |(((w, p), g), b)| {
                        restore_sgd_chunk::<E, true, false>(w, p, g, b, k)
                    });
                }
                None => for_each(head, total, |((w, p), g)| {
                    restore_sgd_chunk::<E, false, false>(w, p, g, &mut [], k)
                }),
            }
        }
        None => {
            let head: Vec<_> = chunks_mut(weights).zip(chunks(grads)).collect();
            match buffers {
                Some(b) => {
                    let items: Vec<_> = head.into_iter().zip(chunks_mut(b)).collect();
                    for_each(items, total, |((w, g), b)| {
                        restore_sgd_chunk::<E, true, true>(w, &[], g, b, k)
                    });
                }
                None => for_each(head, total, |(w, g)| {
                    restore_sgd_chunk::<E, false, true>(w, &[], g, &mut [], k)
                }),
            }
        }
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

/// One Adam step over a chunk; the weights are read from `backup` or, with `IN_PLACE`, from `w`.
#[multiversion(targets = "simd")]
fn restore_adam_chunk<E: Element, const AMSGRAD: bool, const IN_PLACE: bool>(
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
    let (g, exp_avg, exp_avg_sq) = (&g[..n], &mut exp_avg[..n], &mut exp_avg_sq[..n]);
    let backup = if IN_PLACE { backup } else { &backup[..n] };
    let max_exp_avg_sq = if AMSGRAD {
        &mut max_exp_avg_sq[..n]
    } else {
        max_exp_avg_sq
    };
    for i in 0..n {
        let mut p = if IN_PLACE {
            w[i].load()
        } else {
            backup[i].load()
        };
        let mut grad = if k.maximize {
            -g[i].load()
        } else {
            g[i].load()
        };
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
        // torch's `param.addcdiv_(exp_avg, denom, value=-step_size)` computes `(value·t1)/t2`.
        w[i] = E::store(p + k.neg_step_size * m.load() / denom);
    }
}

/// Restores `w` from `backup` and applies one `torch.optim.Adam`/`AdamW` step with the gradient
/// `grads`. `max_exp_avg_sqs` is required with `amsgrad` and ignored otherwise.
pub fn restore_adam<E: Element>(
    weights: &mut [&mut [E]],
    backups: &[&[E]],
    grads: &[&[E]],
    exp_avgs: &mut [&mut [E]],
    exp_avg_sqs: &mut [&mut [E]],
    max_exp_avg_sqs: Option<&mut [&mut [E]]>,
    hyper: AdamHyper,
) -> Result<(), KernelError> {
    adam(
        weights,
        Some(backups),
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        hyper,
    )
}

/// One `torch.optim.Adam`/`AdamW` step in place (no perturbation to undo).
pub fn adam_step<E: Element>(
    weights: &mut [&mut [E]],
    grads: &[&[E]],
    exp_avgs: &mut [&mut [E]],
    exp_avg_sqs: &mut [&mut [E]],
    max_exp_avg_sqs: Option<&mut [&mut [E]]>,
    hyper: AdamHyper,
) -> Result<(), KernelError> {
    adam(
        weights,
        None,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        hyper,
    )
}

fn adam<E: Element>(
    weights: &mut [&mut [E]],
    backups: Option<&[&[E]]>,
    grads: &[&[E]],
    exp_avgs: &mut [&mut [E]],
    exp_avg_sqs: &mut [&mut [E]],
    max_exp_avg_sqs: Option<&mut [&mut [E]]>,
    hyper: AdamHyper,
) -> Result<(), KernelError> {
    let lens = lengths(weights);
    if let Some(b) = backups {
        check_aligned(&lens, b, "backups")?;
    }
    check_aligned(&lens, grads, "grads")?;
    check_aligned(&lens, exp_avgs, "exp_avgs")?;
    check_aligned(&lens, exp_avg_sqs, "exp_avg_sqs")?;
    let max_exp_avg_sqs = match max_exp_avg_sqs {
        Some(max) if hyper.amsgrad => {
            check_aligned(&lens, max, "max_exp_avg_sqs")?;
            Some(max)
        }
        None if hyper.amsgrad => {
            return Err(KernelError::Missing {
                argument: "max_exp_avg_sqs",
            })
        }
        _ => None,
    };
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
    // Without a backup, every chunk gets an empty (unread) backup slice.
    let sources: Vec<&[E]> = match backups {
        Some(b) => chunks(b).collect(),
        None => vec![&[][..]; lens.iter().map(|l| l.div_ceil(crate::CHUNK)).sum()],
    };
    let head: Vec<_> = chunks_mut(weights)
        .zip(sources)
        .zip(chunks(grads))
        .zip(chunks_mut(exp_avgs))
        .zip(chunks_mut(exp_avg_sqs))
        .collect();
    let in_place = backups.is_none();
    match (max_exp_avg_sqs, in_place) {
        (Some(max), false) => {
            let items: Vec<_> = head.into_iter().zip(chunks_mut(max)).collect();
            for_each(items, total, |(((((w, p), g), m1), m2), vmax)| {
                restore_adam_chunk::<E, true, false>(w, p, g, m1, m2, vmax, k)
            });
        }
        (Some(max), true) => {
            let items: Vec<_> = head.into_iter().zip(chunks_mut(max)).collect();
            for_each(items, total, |(((((w, p), g), m1), m2), vmax)| {
                restore_adam_chunk::<E, true, true>(w, p, g, m1, m2, vmax, k)
            });
        }
        (None, false) => {
            for_each(head, total, |((((w, p), g), m1), m2)| {
                restore_adam_chunk::<E, false, false>(w, p, g, m1, m2, &mut [], k)
            });
        }
        (None, true) => {
            for_each(head, total, |((((w, p), g), m1), m2)| {
                restore_adam_chunk::<E, false, true>(w, p, g, m1, m2, &mut [], k)
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The fused steps against a naive per-element transcription of torch's for-loop optimizers
    //! (`_single_tensor_sgd`, `_single_tensor_adam`), written here operation by operation in
    //! torch's order: Python-float arithmetic for host scalars, then each tensor op in the compute
    //! type (`f32` for `f32`/`bf16`/`f16`, `f64` for `f64`). Values that torch stores into a tensor
    //! the caller keeps (parameter, momentum buffer, moments, and AdamW's decayed parameter) are
    //! rounded to the storage type; the half types skip torch's other intermediate roundings by
    //! contract ("computed in f32, one rounding per stored value"). Kernel and reference are
    //! compared bit for bit.
    use super::*;
    use crate::CHUNK;
    use half::{bf16, f16};
    use proptest::prelude::*;

    // ---- data -------------------------------------------------------------------------------

    /// SplitMix64: large inputs come from a seed, so proptest only shrinks the seed.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Mostly uniform in [-scale, scale]; sometimes ±0, sometimes tiny (subnormal in f16).
        fn value(&mut self, scale: f64) -> f64 {
            let u = self.unit() * 2.0 - 1.0;
            match self.next_u64() % 16 {
                0 => 0.0,
                1 => -0.0,
                2 => u * scale * 1e-6,
                _ => u * scale,
            }
        }

        fn vec<E: Element>(&mut self, n: usize, scale: f64) -> Vec<E> {
            (0..n)
                .map(|_| E::store(E::Math::from_f64(self.value(scale))))
                .collect()
        }

        /// Non-negative values, as a second-moment accumulator holds.
        fn vec_nonneg<E: Element>(&mut self, n: usize, scale: f64) -> Vec<E> {
            (0..n)
                .map(|_| E::store(E::Math::from_f64(self.value(scale).abs())))
                .collect()
        }
    }

    /// A weight buffer holding NaN: the fused steps must never read the perturbed weights.
    fn poisoned<E: Element>(n: usize) -> Vec<E> {
        vec![E::store(E::Math::from_f64(f64::NAN)); n]
    }

    /// Bit-for-bit equality (any NaN equals any NaN; +0 and −0 differ).
    fn same<E: Element>(a: E, b: E) -> bool {
        let (x, y) = (a.load().to_f64(), b.load().to_f64());
        (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
    }

    fn check_same<E: Element>(what: &str, got: &[E], want: &[E]) -> Result<(), TestCaseError> {
        prop_assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            prop_assert!(
                same(g, w),
                "{} {}[{}]: kernel {:e}, reference {:e}",
                E::NAME,
                what,
                i,
                g.load().to_f64(),
                w.load().to_f64()
            );
        }
        Ok(())
    }

    fn len_strategy() -> impl Strategy<Value = usize> {
        prop_oneof![
            1 => Just(0usize),
            2 => Just(1usize),
            6 => (1usize..150).prop_map(|k| 2 * k + 1),
            1 => (0usize..64).prop_map(|k| 3 * CHUNK + 2 * k + 1),
        ]
    }

    // ---- torch.optim.SGD ----------------------------------------------------------------------

    /// One element of `_single_tensor_sgd`. `buf` is the momentum buffer (ignored with
    /// `init_momentum`, when torch creates it). Returns the new parameter and buffer.
    fn sgd_reference<E: Element>(param: E, grad: E, buf: Option<E>, h: SgdHyper) -> (E, Option<E>) {
        let s = |v: f64| E::Math::from_f64(v);
        let param = param.load();
        // grad = grads[i] if not maximize else -grads[i]
        let mut grad = if h.maximize {
            -grad.load()
        } else {
            grad.load()
        };
        // if weight_decay != 0: grad = grad.add(param, alpha=weight_decay)
        if h.weight_decay != 0.0 {
            grad = grad + s(h.weight_decay) * param;
        }
        let mut new_buf = None;
        if h.momentum != 0.0 {
            let buf: E = if h.init_momentum {
                // buf = torch.clone(grad).detach()
                E::store(grad)
            } else {
                // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                E::store(
                    buf.expect("momentum buffer").load() * s(h.momentum)
                        + s(1.0 - h.dampening) * grad,
                )
            };
            new_buf = Some(buf);
            grad = if h.nesterov {
                // grad = grad.add(buf, alpha=momentum)
                grad + s(h.momentum) * buf.load()
            } else {
                buf.load()
            };
        }
        // param.add_(grad, alpha=-lr)
        (E::store(param + s(-h.lr) * grad), new_buf)
    }

    fn sgd_hyper() -> impl Strategy<Value = SgdHyper> {
        (
            prop_oneof![Just(0.1), 1e-4f64..2.0],
            prop_oneof![Just(0.0), Just(0.9), 0.0f64..1.0],
            prop_oneof![Just(0.0), 0.0f64..1.0],
            prop_oneof![Just(0.0), Just(5e-4), 0.0f64..0.5],
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(lr, momentum, dampening, weight_decay, nesterov, maximize)| {
                    // torch refuses nesterov without momentum or with dampening.
                    let nesterov = nesterov && momentum > 0.0;
                    let dampening = if nesterov { 0.0 } else { dampening };
                    SgdHyper {
                        lr,
                        momentum,
                        dampening,
                        weight_decay,
                        nesterov,
                        maximize,
                        init_momentum: true,
                    }
                },
            )
    }

    /// `steps` SGD steps from fresh momentum buffers (`init_momentum` on the first one only),
    /// kernel against reference, comparing weights and buffers after every step.
    fn check_sgd<E: Element>(
        seed: u64,
        n: usize,
        hyper: SgdHyper,
        steps: usize,
    ) -> Result<(), TestCaseError> {
        let mut rng = Rng(seed);
        let mut params: Vec<E> = rng.vec(n, 4.0);
        // The kernel overwrites the buffer on the first step: start it as garbage.
        let mut buf: Vec<E> = rng.vec(n, 1e3);
        let mut ref_buf: Option<Vec<E>> = None;
        for step in 0..steps {
            let h = SgdHyper {
                init_momentum: step == 0,
                ..hyper
            };
            let grads: Vec<E> = rng.vec(n, 2.0);
            let mut weights = poisoned::<E>(n);
            let with_buffers = h.momentum != 0.0;
            {
                let mut bufs = [&mut buf[..]];
                let buffers = if with_buffers {
                    Some(&mut bufs[..])
                } else {
                    None
                };
                restore_sgd::<E>(&mut [&mut weights], &[&params], &[&grads], buffers, h).unwrap();
            }
            let mut want_w = Vec::with_capacity(n);
            let mut want_buf = Vec::with_capacity(n);
            for i in 0..n {
                let b = ref_buf.as_ref().map(|b| b[i]);
                let (w, b) = sgd_reference(params[i], grads[i], b, h);
                want_w.push(w);
                if let Some(b) = b {
                    want_buf.push(b);
                }
            }
            check_same(
                &format!("SGD step {} weights ({h:?})", step + 1),
                &weights,
                &want_w,
            )?;
            if with_buffers {
                check_same(
                    &format!("SGD step {} momentum ({h:?})", step + 1),
                    &buf,
                    &want_buf,
                )?;
                ref_buf = Some(want_buf);
            }
            params = weights;
        }
        Ok(())
    }

    // ---- torch.optim.Adam / AdamW ---------------------------------------------------------------

    /// torch's `lerp` (`aten/src/ATen/native/Lerp.h`), scalar path.
    fn torch_lerp<M: Real>(start: M, end: M, weight: M) -> M {
        if weight.abs() < M::from_f64(0.5) {
            start + weight * (end - start)
        } else {
            end - (end - start) * (M::ONE - weight)
        }
    }

    /// `torch.maximum`: NaN from either side wins.
    fn torch_maximum<M: Real>(a: M, b: M) -> M {
        // `x != x` is the NaN test for a generic `Real`.
        #[allow(clippy::eq_op)]
        if a != a {
            a
        } else if b != b {
            b
        } else if a > b {
            a
        } else {
            b
        }
    }

    struct AdamState<E> {
        param: E,
        exp_avg: E,
        exp_avg_sq: E,
        max_exp_avg_sq: Option<E>,
    }

    /// One element of `_single_tensor_adam` (`capturable=False`, `differentiable=False`).
    fn adam_reference<E: Element>(s0: &AdamState<E>, grad: E, h: AdamHyper) -> AdamState<E> {
        let s = |v: f64| E::Math::from_f64(v);
        let mut param = s0.param.load();
        // grad = grads[i] if not maximize else -grads[i]
        let mut grad = if h.maximize {
            -grad.load()
        } else {
            grad.load()
        };
        if h.weight_decay != 0.0 {
            if h.decoupled {
                // param.mul_(1 - lr * weight_decay)
                param = E::store(param * s(1.0 - h.lr * h.weight_decay)).load();
            } else {
                // grad = grad.add(param, alpha=weight_decay)
                grad = grad + s(h.weight_decay) * param;
            }
        }
        // exp_avg.lerp_(grad, 1 - beta1)
        let exp_avg = E::store(torch_lerp(s0.exp_avg.load(), grad, s(1.0 - h.beta1)));
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let exp_avg_sq =
            E::store(s0.exp_avg_sq.load() * s(h.beta2) + s(1.0 - h.beta2) * grad * grad);
        // Python floats.
        let bias_correction1 = 1.0 - h.beta1.powf(h.step);
        let bias_correction2 = 1.0 - h.beta2.powf(h.step);
        let step_size = h.lr / bias_correction1;
        // Python writes `bias_correction2**0.5`. CPython's libm `pow(x, 0.5)` can be one ulp off
        // `sqrt(x)` (e.g. beta2 = 0.999, step 1270 on glibc 2.36); LLVM folds `powf(x, 0.5)` into
        // `sqrt` anyway, so the kernel and this reference both use the correctly rounded root.
        let bias_correction2_sqrt = bias_correction2.sqrt();
        let (second, max_exp_avg_sq) = match s0.max_exp_avg_sq {
            Some(old) => {
                // torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
                let max = E::store(torch_maximum(old.load(), exp_avg_sq.load()));
                (max.load(), Some(max))
            }
            None => (exp_avg_sq.load(), None),
        };
        // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        let denom = second.sqrt() / s(bias_correction2_sqrt) + s(h.eps);
        // param.addcdiv_(exp_avg, denom, value=-step_size): param + value * exp_avg / denom
        let param = E::store(param + s(-step_size) * exp_avg.load() / denom);
        AdamState {
            param,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
        }
    }

    fn adam_hyper() -> impl Strategy<Value = AdamHyper> {
        (
            prop_oneof![Just(1e-3), 1e-5f64..0.5],
            prop_oneof![Just(0.9), Just(0.0), 0.0f64..0.999],
            prop_oneof![Just(0.999), 0.5f64..0.99999],
            prop_oneof![Just(1e-8), 1e-12f64..1e-2],
            prop_oneof![Just(0.0), Just(1e-2), 0.0f64..0.5],
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            prop_oneof![Just(1.0), 1.0f64..1000.0].prop_map(f64::floor),
        )
            .prop_map(
                |(lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, step)| {
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

    /// `steps` Adam steps starting at `hyper.step` (fresh zero state at step 1, random state
    /// otherwise), kernel against reference after every step.
    fn check_adam<E: Element>(
        seed: u64,
        n: usize,
        hyper: AdamHyper,
        steps: usize,
    ) -> Result<(), TestCaseError> {
        let mut rng = Rng(seed);
        let zero = || vec![E::store(E::Math::ZERO); n];
        let mut params: Vec<E> = rng.vec(n, 4.0);
        let fresh = hyper.step == 1.0;
        let mut m: Vec<E> = if fresh { zero() } else { rng.vec(n, 1.0) };
        let mut v: Vec<E> = if fresh {
            zero()
        } else {
            rng.vec_nonneg(n, 1.0)
        };
        let mut vmax: Vec<E> = if fresh {
            zero()
        } else {
            rng.vec_nonneg(n, 1.0)
        };
        for k in 0..steps {
            let h = AdamHyper {
                step: hyper.step + k as f64,
                ..hyper
            };
            let grads: Vec<E> = rng.vec(n, 2.0);
            let want: Vec<AdamState<E>> = (0..n)
                .map(|i| {
                    let s0 = AdamState {
                        param: params[i],
                        exp_avg: m[i],
                        exp_avg_sq: v[i],
                        max_exp_avg_sq: h.amsgrad.then(|| vmax[i]),
                    };
                    adam_reference(&s0, grads[i], h)
                })
                .collect();
            let mut weights = poisoned::<E>(n);
            {
                let mut max = [&mut vmax[..]];
                let max = if h.amsgrad { Some(&mut max[..]) } else { None };
                restore_adam::<E>(
                    &mut [&mut weights],
                    &[&params],
                    &[&grads],
                    &mut [&mut m],
                    &mut [&mut v],
                    max,
                    h,
                )
                .unwrap();
            }
            let label = |what: &str| format!("Adam step {} {what} ({h:?})", h.step);
            check_same(
                &label("weights"),
                &weights,
                &want.iter().map(|s| s.param).collect::<Vec<_>>(),
            )?;
            check_same(
                &label("exp_avg"),
                &m,
                &want.iter().map(|s| s.exp_avg).collect::<Vec<_>>(),
            )?;
            check_same(
                &label("exp_avg_sq"),
                &v,
                &want.iter().map(|s| s.exp_avg_sq).collect::<Vec<_>>(),
            )?;
            if h.amsgrad {
                let want_max: Vec<E> = want.iter().map(|s| s.max_exp_avg_sq.unwrap()).collect();
                check_same(&label("max_exp_avg_sq"), &vmax, &want_max)?;
            }
            params = weights;
        }
        Ok(())
    }

    // ---- multi-tensor lists -------------------------------------------------------------------

    /// Cuts `0..n` at sorted points into pieces (some empty).
    fn pieces(n: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|&c| if n == 0 { 0 } else { c % (n + 1) })
            .collect();
        points.push(0);
        points.push(n);
        points.sort_unstable();
        points.windows(2).map(|w| (w[0], w[1])).collect()
    }

    fn split<'a, E>(data: &'a [E], pieces: &[(usize, usize)]) -> Vec<&'a [E]> {
        pieces.iter().map(|&(a, b)| &data[a..b]).collect()
    }

    fn split_mut<'a, E>(mut data: &'a mut [E], pieces: &[(usize, usize)]) -> Vec<&'a mut [E]> {
        let mut out = Vec::with_capacity(pieces.len());
        for &(a, b) in pieces {
            let (head, tail) = std::mem::take(&mut data).split_at_mut(b - a);
            out.push(head);
            data = tail;
        }
        out
    }

    /// The same SGD and Adam steps on one flat buffer and on the same data cut into tensors.
    fn check_list_equals_flat<E: Element>(
        seed: u64,
        n: usize,
        cuts: &[usize],
        sgd: SgdHyper,
        adam: AdamHyper,
    ) -> Result<(), TestCaseError> {
        let mut rng = Rng(seed);
        let parts = pieces(n, cuts);
        let params: Vec<E> = rng.vec(n, 4.0);
        let grads: Vec<E> = rng.vec(n, 2.0);
        let buf0: Vec<E> = rng.vec(n, 1.0);
        let (m0, v0, vmax0): (Vec<E>, Vec<E>, Vec<E>) = (
            rng.vec(n, 1.0),
            rng.vec_nonneg(n, 1.0),
            rng.vec_nonneg(n, 1.0),
        );

        let sgd = SgdHyper {
            init_momentum: false,
            momentum: if sgd.momentum == 0.0 {
                0.9
            } else {
                sgd.momentum
            },
            ..sgd
        };
        let (mut w_flat, mut b_flat) = (poisoned::<E>(n), buf0.clone());
        restore_sgd::<E>(
            &mut [&mut w_flat],
            &[&params],
            &[&grads],
            Some(&mut [&mut b_flat]),
            sgd,
        )
        .unwrap();
        let (mut w_list, mut b_list) = (poisoned::<E>(n), buf0.clone());
        {
            let mut w = split_mut(&mut w_list, &parts);
            let mut b = split_mut(&mut b_list, &parts);
            restore_sgd::<E>(
                &mut w,
                &split(&params, &parts),
                &split(&grads, &parts),
                Some(&mut b),
                sgd,
            )
            .unwrap();
        }
        check_same("list SGD weights", &w_list, &w_flat)?;
        check_same("list SGD momentum", &b_list, &b_flat)?;

        let adam = AdamHyper {
            amsgrad: true,
            ..adam
        };
        let (mut w_flat, mut m_flat, mut v_flat, mut x_flat) =
            (poisoned::<E>(n), m0.clone(), v0.clone(), vmax0.clone());
        restore_adam::<E>(
            &mut [&mut w_flat],
            &[&params],
            &[&grads],
            &mut [&mut m_flat],
            &mut [&mut v_flat],
            Some(&mut [&mut x_flat]),
            adam,
        )
        .unwrap();
        let (mut w_list, mut m_list, mut v_list, mut x_list) = (poisoned::<E>(n), m0, v0, vmax0);
        {
            let mut w = split_mut(&mut w_list, &parts);
            let mut m = split_mut(&mut m_list, &parts);
            let mut v = split_mut(&mut v_list, &parts);
            let mut x = split_mut(&mut x_list, &parts);
            restore_adam::<E>(
                &mut w,
                &split(&params, &parts),
                &split(&grads, &parts),
                &mut m,
                &mut v,
                Some(&mut x),
                adam,
            )
            .unwrap();
        }
        check_same("list Adam weights", &w_list, &w_flat)?;
        check_same("list Adam exp_avg", &m_list, &m_flat)?;
        check_same("list Adam exp_avg_sq", &v_list, &v_flat)?;
        check_same("list Adam max_exp_avg_sq", &x_list, &x_flat)?;
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn sgd_matches_torch_formula(seed in any::<u64>(), n in len_strategy(), h in sgd_hyper(), steps in 1usize..4) {
            check_sgd::<f32>(seed, n, h, steps)?;
            check_sgd::<f64>(seed, n, h, steps)?;
            check_sgd::<bf16>(seed, n, h, steps)?;
            check_sgd::<f16>(seed, n, h, steps)?;
        }

        #[test]
        fn adam_matches_torch_formula(seed in any::<u64>(), n in len_strategy(), h in adam_hyper(), steps in 1usize..4) {
            check_adam::<f32>(seed, n, h, steps)?;
            check_adam::<f64>(seed, n, h, steps)?;
            check_adam::<bf16>(seed, n, h, steps)?;
            check_adam::<f16>(seed, n, h, steps)?;
        }

        #[test]
        fn lists_equal_the_flat_buffer(
            seed in any::<u64>(),
            n in len_strategy(),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
            sgd in sgd_hyper(),
            adam in adam_hyper(),
        ) {
            check_list_equals_flat::<f32>(seed, n, &cuts, sgd, adam)?;
            check_list_equals_flat::<f64>(seed, n, &cuts, sgd, adam)?;
            check_list_equals_flat::<bf16>(seed, n, &cuts, sgd, adam)?;
            check_list_equals_flat::<f16>(seed, n, &cuts, sgd, adam)?;
        }
    }

    // ---- fixed cases ----------------------------------------------------------------------------

    const ADAM: AdamHyper = AdamHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        decoupled: false,
        amsgrad: false,
        maximize: false,
        step: 1.0,
    };

    const SGD: SgdHyper = SgdHyper {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        maximize: false,
        init_momentum: false,
    };

    #[test]
    fn every_hyperparameter_path_on_a_large_buffer() {
        // Deterministic sweep of the branches on 3 chunks and a tail, all four dtypes.
        let n = 3 * CHUNK + 101;
        for (seed, momentum, dampening, weight_decay, nesterov, maximize) in [
            (1, 0.0, 0.0, 0.0, false, false),
            (2, 0.9, 0.0, 0.0, false, false),
            (3, 0.9, 0.1, 1e-2, false, true),
            (4, 0.9, 0.0, 1e-2, true, false),
            (5, 0.5, 0.5, 0.0, false, true),
        ] {
            let h = SgdHyper {
                momentum,
                dampening,
                weight_decay,
                nesterov,
                maximize,
                ..SGD
            };
            check_sgd::<f32>(seed, n, h, 3).unwrap();
            check_sgd::<f64>(seed, n, h, 3).unwrap();
            check_sgd::<bf16>(seed, n, h, 3).unwrap();
            check_sgd::<f16>(seed, n, h, 3).unwrap();
        }
        for (seed, weight_decay, decoupled, amsgrad, maximize, beta1) in [
            (6, 0.0, false, false, false, 0.9),
            (7, 1e-2, false, true, false, 0.9),
            (8, 1e-2, true, false, true, 0.9),
            (9, 1e-1, true, true, false, 0.3),
            (10, 0.0, false, true, true, 0.0),
        ] {
            let h = AdamHyper {
                weight_decay,
                decoupled,
                amsgrad,
                maximize,
                beta1,
                ..ADAM
            };
            check_adam::<f32>(seed, n, h, 3).unwrap();
            check_adam::<f64>(seed, n, h, 3).unwrap();
            check_adam::<bf16>(seed, n, h, 3).unwrap();
            check_adam::<f16>(seed, n, h, 3).unwrap();
        }
    }

    #[test]
    fn sgd_without_momentum_is_plain_descent() {
        let backup = [1.0f32, -2.0, 0.5];
        let g = [0.5f32, 0.25, -1.0];
        let mut w = [f32::NAN; 3];
        restore_sgd::<f32>(
            &mut [&mut w],
            &[&backup],
            &[&g],
            None,
            SgdHyper {
                momentum: 0.0,
                ..SGD
            },
        )
        .unwrap();
        assert_eq!(w, [0.95, -2.025, 0.6]);
        // First step with momentum: the buffer becomes the gradient itself, not (1 − dampening)·g.
        let mut buf = [f32::NAN; 3];
        let h = SgdHyper {
            dampening: 0.5,
            init_momentum: true,
            ..SGD
        };
        restore_sgd::<f32>(&mut [&mut w], &[&backup], &[&g], Some(&mut [&mut buf]), h).unwrap();
        assert_eq!(buf, g);
        assert_eq!(w, [0.95, -2.025, 0.6]);
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        // At step 1 the bias-corrected update is g/(|g| + eps'), so each weight moves by ≈ lr.
        let backup = [1.0f64, -2.0, 0.5];
        let g = [0.5f64, -0.25, 3.0];
        let (mut w, mut m, mut v) = ([f64::NAN; 3], [0.0f64; 3], [0.0f64; 3]);
        restore_adam::<f64>(
            &mut [&mut w],
            &[&backup],
            &[&g],
            &mut [&mut m],
            &mut [&mut v],
            None,
            AdamHyper { eps: 0.0, ..ADAM },
        )
        .unwrap();
        for i in 0..3 {
            assert!(
                (w[i] - (backup[i] - 1e-3 * g[i].signum())).abs() < 1e-15,
                "{w:?}"
            );
            assert!((m[i] - 0.1 * g[i]).abs() < 1e-15);
            assert!((v[i] - 0.001 * g[i] * g[i]).abs() < 1e-15);
        }
    }

    #[test]
    fn non_finite_values_propagate_like_torch() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let backup = [1.0f32, 1.0, 1.0, 1.0, -0.0, 0.0];
        let g = [nan, inf, -inf, 0.0, -0.0, 1.0];
        let m0 = [0.0f32; 6];
        let v0 = [0.0f32, 0.0, 0.0, 0.0, 0.0, nan];
        let x0 = [0.0f32, 0.0, 0.0, nan, 0.0, 0.0];
        for amsgrad in [false, true] {
            let h = AdamHyper {
                amsgrad,
                step: 3.0,
                weight_decay: 0.1,
                ..ADAM
            };
            let (mut w, mut m, mut v, mut x) = ([0.0f32; 6], m0, v0, x0);
            let max = if amsgrad {
                Some(&mut [&mut x[..]][..])
            } else {
                None
            };
            restore_adam::<f32>(
                &mut [&mut w],
                &[&backup],
                &[&g],
                &mut [&mut m],
                &mut [&mut v],
                max,
                h,
            )
            .unwrap();
            for i in 0..6 {
                let s0 = AdamState {
                    param: backup[i],
                    exp_avg: m0[i],
                    exp_avg_sq: v0[i],
                    max_exp_avg_sq: amsgrad.then_some(x0[i]),
                };
                let want = adam_reference(&s0, g[i], h);
                assert!(
                    same(w[i], want.param),
                    "amsgrad={amsgrad} w[{i}] {} vs {}",
                    w[i],
                    want.param
                );
                assert!(same(m[i], want.exp_avg));
                assert!(same(v[i], want.exp_avg_sq));
                if amsgrad {
                    assert!(
                        same(x[i], want.max_exp_avg_sq.unwrap()),
                        "max[{i}] {} vs {:?}",
                        x[i],
                        want.max_exp_avg_sq
                    );
                }
            }
            if amsgrad {
                // torch.maximum propagates NaN, from the old maximum as from the new moment.
                assert!(x[3].is_nan() && x[5].is_nan() && x[0].is_nan());
                assert!(w[3].is_nan());
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let n = 5 * CHUNK + 3;
        let mut rng = Rng(42);
        let params: Vec<f32> = rng.vec(n, 1.0);
        let grads: Vec<f32> = rng.vec(n, 1.0);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (mut w, mut buf) = (vec![0.0f32; n], vec![0.5f32; n]);
                restore_sgd::<f32>(
                    &mut [&mut w],
                    &[&params],
                    &[&grads],
                    Some(&mut [&mut buf]),
                    SGD,
                )
                .unwrap();
                let (mut w2, mut m, mut v, mut x) = (
                    vec![0.0f32; n],
                    vec![0.1f32; n],
                    vec![0.2f32; n],
                    vec![0.3f32; n],
                );
                let h = AdamHyper {
                    amsgrad: true,
                    ..ADAM
                };
                restore_adam::<f32>(
                    &mut [&mut w2],
                    &[&params],
                    &[&grads],
                    &mut [&mut m],
                    &mut [&mut v],
                    Some(&mut [&mut x]),
                    h,
                )
                .unwrap();
                (w, buf, w2, m, v, x)
            })
        };
        assert!(run(1) == run(3));
    }

    // ---- errors ---------------------------------------------------------------------------------

    #[test]
    fn sgd_rejects_misaligned_lists_without_writing() {
        let backup = [1.0f32; 4];
        let g = [1.0f32; 4];
        let short = [1.0f32; 3];
        let mut w = [7.0f32; 4];
        let mut buf = [7.0f32; 4];
        let err = restore_sgd::<f32>(
            &mut [&mut w],
            &[&backup, &backup],
            &[&g],
            Some(&mut [&mut buf]),
            SGD,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::TensorCount {
                argument: "backups",
                expected: 1,
                found: 2
            }
        );
        let err = restore_sgd::<f32>(
            &mut [&mut w],
            &[&backup],
            &[&short],
            Some(&mut [&mut buf]),
            SGD,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::Length {
                argument: "grads",
                index: 0,
                expected: 4,
                found: 3
            }
        );
        let mut short_buf = [7.0f32; 3];
        let err = restore_sgd::<f32>(
            &mut [&mut w],
            &[&backup],
            &[&g],
            Some(&mut [&mut short_buf]),
            SGD,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::Length {
                argument: "momentum_buffers",
                index: 0,
                expected: 4,
                found: 3
            }
        );
        let err =
            restore_sgd::<f32>(&mut [&mut w], &[&backup], &[&g], Some(&mut []), SGD).unwrap_err();
        assert_eq!(
            err,
            KernelError::TensorCount {
                argument: "momentum_buffers",
                expected: 1,
                found: 0
            }
        );
        // Second tensor of a list misaligned.
        let (mut w0, mut w1) = ([7.0f32; 2], [7.0f32; 4]);
        let err = restore_sgd::<f32>(
            &mut [&mut w0, &mut w1],
            &[&backup[..2], &backup],
            &[&g[..2], &short],
            None,
            SgdHyper {
                momentum: 0.0,
                ..SGD
            },
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::Length {
                argument: "grads",
                index: 1,
                expected: 4,
                found: 3
            }
        );
        assert_eq!((w, buf, w0, w1), ([7.0; 4], [7.0; 4], [7.0; 2], [7.0; 4]));
    }

    #[test]
    fn sgd_needs_buffers_only_with_momentum() {
        let backup = [1.0f32; 4];
        let g = [1.0f32; 4];
        let mut w = [7.0f32; 4];
        let err = restore_sgd::<f32>(&mut [&mut w], &[&backup], &[&g], None, SGD).unwrap_err();
        assert_eq!(
            err,
            KernelError::Missing {
                argument: "momentum_buffers"
            }
        );
        assert_eq!(
            err.to_string(),
            "`momentum_buffers` is required by these hyperparameters"
        );
        assert_eq!(w, [7.0; 4]);
        // Without momentum, buffers are ignored, even misaligned ones, and left untouched.
        let mut ignored = [7.0f32; 1];
        restore_sgd::<f32>(
            &mut [&mut w],
            &[&backup],
            &[&g],
            Some(&mut [&mut ignored]),
            SgdHyper {
                momentum: 0.0,
                ..SGD
            },
        )
        .unwrap();
        assert_eq!(ignored, [7.0]);
        assert_eq!(w, [0.9; 4]);
    }

    #[test]
    fn adam_rejects_misaligned_lists_without_writing() {
        let backup = [1.0f32; 4];
        let g = [1.0f32; 4];
        let mut w = [7.0f32; 4];
        let (mut m, mut v, mut x) = ([7.0f32; 4], [7.0f32; 4], [7.0f32; 4]);
        let mut short = [7.0f32; 3];
        let err = restore_adam::<f32>(
            &mut [&mut w],
            &[&backup],
            &[],
            &mut [&mut m],
            &mut [&mut v],
            None,
            ADAM,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::TensorCount {
                argument: "grads",
                expected: 1,
                found: 0
            }
        );
        let err = restore_adam::<f32>(
            &mut [&mut w],
            &[&backup],
            &[&g],
            &mut [&mut short],
            &mut [&mut v],
            None,
            ADAM,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::Length {
                argument: "exp_avgs",
                index: 0,
                expected: 4,
                found: 3
            }
        );
        let err = restore_adam::<f32>(
            &mut [&mut w],
            &[&backup],
            &[&g],
            &mut [&mut m],
            &mut [&mut short],
            None,
            ADAM,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::Length {
                argument: "exp_avg_sqs",
                index: 0,
                expected: 4,
                found: 3
            }
        );
        let h = AdamHyper {
            amsgrad: true,
            ..ADAM
        };
        let err = restore_adam::<f32>(
            &mut [&mut w],
            &[&backup],
            &[&g],
            &mut [&mut m],
            &mut [&mut v],
            Some(&mut [&mut short]),
            h,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::Length {
                argument: "max_exp_avg_sqs",
                index: 0,
                expected: 4,
                found: 3
            }
        );
        assert_eq!(
            (w, m, v, x, short),
            ([7.0; 4], [7.0; 4], [7.0; 4], [7.0; 4], [7.0; 3])
        );
        let _ = &mut x;
    }

    #[test]
    fn adam_needs_max_buffers_exactly_with_amsgrad() {
        let backup = [1.0f32; 4];
        let g = [1.0f32; 4];
        let mut w = [7.0f32; 4];
        let (mut m, mut v) = ([0.0f32; 4], [0.0f32; 4]);
        let h = AdamHyper {
            amsgrad: true,
            ..ADAM
        };
        let err = restore_adam::<f32>(
            &mut [&mut w],
            &[&backup],
            &[&g],
            &mut [&mut m],
            &mut [&mut v],
            None,
            h,
        )
        .unwrap_err();
        assert_eq!(
            err,
            KernelError::Missing {
                argument: "max_exp_avg_sqs"
            }
        );
        assert_eq!((w, m, v), ([7.0; 4], [0.0; 4], [0.0; 4]));
        // Without amsgrad the maxima are not touched (plain Adam), even when given.
        let mut x = [1e9f32; 4];
        restore_adam::<f32>(
            &mut [&mut w],
            &[&backup],
            &[&g],
            &mut [&mut m],
            &mut [&mut v],
            Some(&mut [&mut x]),
            ADAM,
        )
        .unwrap();
        assert_eq!(x, [1e9; 4]);
        let (mut w2, mut m2, mut v2) = ([7.0f32; 4], [0.0f32; 4], [0.0f32; 4]);
        restore_adam::<f32>(
            &mut [&mut w2],
            &[&backup],
            &[&g],
            &mut [&mut m2],
            &mut [&mut v2],
            None,
            ADAM,
        )
        .unwrap();
        assert_eq!((w, m, v), (w2, m2, v2));
    }
}

#[cfg(test)]
mod in_place_tests {
    //! The in-place steps are the fused steps with the backup equal to the weights.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn in_place_equals_restore_from_a_copy(
            w0 in prop::collection::vec(-10f32..10.0, 0..(3 * crate::CHUNK + 5)),
            momentum in prop::sample::select(vec![0.0, 0.9]),
            amsgrad in any::<bool>(),
            decoupled in any::<bool>(),
        ) {
            let g: Vec<f32> = w0.iter().map(|x| (x * 1.7).sin()).collect();
            let sgd = SgdHyper { lr: 0.1, momentum, dampening: 0.1, weight_decay: 0.01, nesterov: false, maximize: false, init_momentum: false };
            let (mut a, mut b) = (vec![0.0f32; w0.len()], w0.clone());
            let (mut ba, mut bb) = (vec![0.5f32; w0.len()], vec![0.5f32; w0.len()]);
            restore_sgd::<f32>(&mut [&mut a], &[&w0], &[&g], Some(&mut [&mut ba]), sgd).unwrap();
            sgd_step::<f32>(&mut [&mut b], &[&g], Some(&mut [&mut bb]), sgd).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&ba, &bb);

            let adam = AdamHyper { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, decoupled, amsgrad, maximize: false, step: 3.0 };
            let (mut a, mut b) = (vec![0.0f32; w0.len()], w0.clone());
            let mut state_a: Vec<Vec<f32>> = (0..3).map(|k| vec![0.1 * k as f32; w0.len()]).collect();
            let mut state_b = state_a.clone();
            let [ma, va, xa] = &mut state_a[..] else { unreachable!() };
            let [mb, vb, xb] = &mut state_b[..] else { unreachable!() };
            restore_adam::<f32>(&mut [&mut a], &[&w0], &[&g], &mut [ma], &mut [va], Some(&mut [xa]), adam).unwrap();
            adam_step::<f32>(&mut [&mut b], &[&g], &mut [mb], &mut [vb], Some(&mut [xb]), adam).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&state_a, &state_b);
        }
    }
}
