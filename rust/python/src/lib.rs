//! `sharpness._core`: PyO3 bindings of the `sharpness-kernels` crate.
//!
//! Each function only borrows its numpy arrays, checks them (dtype, shape, C-contiguity,
//! writability, aliasing), releases the GIL and calls one kernel. Every tensor argument is either
//! one ndarray (a flat buffer) or a sequence of ndarrays (a list of tensors, aligned across the
//! arguments of the call). bfloat16 data travels as its raw 16-bit storage in `uint16` arrays,
//! since numpy has no bfloat16 and `torch.Tensor.numpy()` refuses it.

mod arrays;

use arrays::{Call, DType};
use half::{bf16, f16};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use sharpness_kernels as k;

fn kernel_error(e: k::KernelError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Runs `$body` with `$E` bound to the kernel element type of `$dtype`.
macro_rules! dispatch {
    ($dtype:expr, $E:ident, $body:block) => {
        match $dtype {
            DType::F32 => {
                type $E = f32;
                $body
            }
            DType::F64 => {
                type $E = f64;
                $body
            }
            DType::F16 => {
                type $E = f16;
                $body
            }
            DType::BF16 => {
                type $E = bf16;
                $body
            }
        }
    };
}

/// Σ g² over every element of `grads`, accumulated in float64.
#[pyfunction]
fn sum_of_squares(py: Python<'_>, grads: &Bound<'_, PyAny>) -> PyResult<f64> {
    let mut call = Call::new(py);
    let g = call.read("grads", grads)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let g = call.slices::<E>(&g);
        Ok(py.detach(|| k::sum_of_squares::<E>(&g)))
    })
}

/// Σ ((|w| + eta)·g)², the squared norm of ASAM's `T_w g`, accumulated in float64.
#[pyfunction]
fn sum_of_squares_adaptive(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    eta: f64,
) -> PyResult<f64> {
    let mut call = Call::new(py);
    let w = call.read("weights", weights)?;
    let g = call.read("grads", grads)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let (w, g) = (call.slices::<E>(&w), call.slices::<E>(&g));
        py.detach(|| k::sum_of_squares_adaptive::<E>(&w, &g, eta))
            .map_err(kernel_error)
    })
}

/// `backups ← weights; weights ← weights + scale·grads`.
#[pyfunction]
fn perturb(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    backups: &Bound<'_, PyAny>,
    scale: f64,
) -> PyResult<()> {
    let mut call = Call::new(py);
    let w = call.write("weights", weights)?;
    let g = call.read("grads", grads)?;
    let b = call.write("backups", backups)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let (mut w, g, mut b) = (
            call.slices_mut::<E>(&w),
            call.slices::<E>(&g),
            call.slices_mut::<E>(&b),
        );
        py.detach(|| k::perturb::<E>(&mut w, &g, &mut b, scale))
            .map_err(kernel_error)
    })
}

/// `backups ← weights; weights ← weights + scale·(|weights| + eta)²·grads` (ASAM).
#[pyfunction]
fn perturb_adaptive(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    backups: &Bound<'_, PyAny>,
    scale: f64,
    eta: f64,
) -> PyResult<()> {
    let mut call = Call::new(py);
    let w = call.write("weights", weights)?;
    let g = call.read("grads", grads)?;
    let b = call.write("backups", backups)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let (mut w, g, mut b) = (
            call.slices_mut::<E>(&w),
            call.slices::<E>(&g),
            call.slices_mut::<E>(&b),
        );
        py.detach(|| k::perturb_adaptive::<E>(&mut w, &g, &mut b, scale, eta))
            .map_err(kernel_error)
    })
}

/// The subtract mode's ascent: `offsets ← bf16(e)`, `weights ← weights + offsets`, with
/// `e = scale·grads`, or ASAM's `e = scale·(|weights| + eta)²·grads` when `eta` is given.
/// `offsets` are bfloat16 (raw uint16) whatever the weights' dtype.
#[pyfunction]
#[pyo3(signature = (weights, grads, offsets, scale, eta=None))]
fn perturb_offsets(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    scale: f64,
    eta: Option<f64>,
) -> PyResult<()> {
    let mut call = Call::new(py);
    let w = call.write("weights", weights)?;
    let g = call.read("grads", grads)?;
    let o = call.write_fixed("offsets", offsets, DType::BF16)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let (mut w, g, mut o) = (
            call.slices_mut::<E>(&w),
            call.slices::<E>(&g),
            call.fixed_slices_mut::<bf16>(&o),
        );
        py.detach(|| k::perturb_offsets::<E>(&mut w, &g, &mut o, scale, eta))
            .map_err(kernel_error)
    })
}

/// `weights ← weights − offsets`: the subtract mode's restoration (within about one ulp).
#[pyfunction]
fn subtract_offsets(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let mut call = Call::new(py);
    let w = call.write("weights", weights)?;
    let o = call.read_fixed("offsets", offsets, DType::BF16)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let (mut w, o) = (call.slices_mut::<E>(&w), call.fixed_slices::<bf16>(&o));
        py.detach(|| k::subtract_offsets::<E>(&mut w, &o))
            .map_err(kernel_error)
    })
}

/// `dst ← src`, bit for bit (sources first, as in the engines' `copy`).
#[pyfunction]
fn copy(py: Python<'_>, src: &Bound<'_, PyAny>, dst: &Bound<'_, PyAny>) -> PyResult<()> {
    let mut call = Call::new(py);
    let d = call.write("dst", dst)?;
    let s = call.read("src", src)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let (s, mut d) = (call.slices::<E>(&s), call.slices_mut::<E>(&d));
        py.detach(|| k::copy::<E>(&s, &mut d)).map_err(kernel_error)
    })
}

/// Restores `weights` from `backups` and applies one torch.optim.SGD step with `grads`
/// (`backups=None`: a plain step in place).
#[pyfunction]
#[pyo3(signature = (weights, backups, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0,
                    weight_decay=0.0, nesterov=false, maximize=false, init_momentum=false))]
// The arguments mirror torch.optim.SGD's, one keyword each, as Python callers pass them.
#[allow(clippy::too_many_arguments)]
fn restore_sgd(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    backups: Option<&Bound<'_, PyAny>>,
    grads: &Bound<'_, PyAny>,
    momentum_buffers: Option<&Bound<'_, PyAny>>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
    init_momentum: bool,
) -> PyResult<()> {
    if nesterov && (momentum <= 0.0 || dampening != 0.0) {
        return Err(PyValueError::new_err(
            "nesterov momentum requires a momentum and zero dampening",
        ));
    }
    let mut call = Call::new(py);
    let w = call.write("weights", weights)?;
    let b = backups.map(|b| call.read("backups", b)).transpose()?;
    let g = call.read("grads", grads)?;
    let buf = match (momentum_buffers, momentum != 0.0) {
        (Some(bufs), true) => Some(call.write("momentum_buffers", bufs)?),
        (None, true) => {
            return Err(PyValueError::new_err(
                "momentum != 0 needs momentum_buffers",
            ))
        }
        (_, false) => None,
    };
    call.finish()?;
    let hyper = k::SgdHyper {
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
        init_momentum,
    };
    dispatch!(call.dtype(), E, {
        let (mut w, g) = (call.slices_mut::<E>(&w), call.slices::<E>(&g));
        let b = b.as_ref().map(|b| call.slices::<E>(b));
        let mut buf = buf.as_ref().map(|b| call.slices_mut::<E>(b));
        py.detach(|| match &b {
            Some(b) => k::restore_sgd::<E>(&mut w, b, &g, buf.as_deref_mut(), hyper),
            None => k::sgd_step::<E>(&mut w, &g, buf.as_deref_mut(), hyper),
        })
        .map_err(kernel_error)
    })
}

/// Restores `weights` from `backups` and applies one torch.optim.Adam/AdamW step with `grads`
/// (`backups=None`: a plain step in place).
#[pyfunction]
#[pyo3(signature = (weights, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr,
                    beta1, beta2, eps, weight_decay=0.0, decoupled=false, amsgrad=false, maximize=false))]
// The arguments mirror torch.optim.Adam(W)'s, one keyword each, as Python callers pass them.
#[allow(clippy::too_many_arguments)]
fn restore_adam(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    backups: Option<&Bound<'_, PyAny>>,
    grads: &Bound<'_, PyAny>,
    exp_avgs: &Bound<'_, PyAny>,
    exp_avg_sqs: &Bound<'_, PyAny>,
    max_exp_avg_sqs: Option<&Bound<'_, PyAny>>,
    step: f64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
) -> PyResult<()> {
    // NaN fails this test too.
    if step.is_nan() || step < 1.0 {
        return Err(PyValueError::new_err(format!(
            "step counts from 1 (the step being taken), got {step}"
        )));
    }
    let mut call = Call::new(py);
    let w = call.write("weights", weights)?;
    let b = backups.map(|b| call.read("backups", b)).transpose()?;
    let g = call.read("grads", grads)?;
    let m1 = call.write("exp_avgs", exp_avgs)?;
    let m2 = call.write("exp_avg_sqs", exp_avg_sqs)?;
    let vmax = match (max_exp_avg_sqs, amsgrad) {
        (Some(v), true) => Some(call.write("max_exp_avg_sqs", v)?),
        (None, true) => return Err(PyValueError::new_err("amsgrad needs max_exp_avg_sqs")),
        (Some(_), false) => {
            return Err(PyValueError::new_err(
                "max_exp_avg_sqs given without amsgrad",
            ))
        }
        (None, false) => None,
    };
    call.finish()?;
    let hyper = k::AdamHyper {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
        amsgrad,
        maximize,
        step,
    };
    dispatch!(call.dtype(), E, {
        let (mut w, g) = (call.slices_mut::<E>(&w), call.slices::<E>(&g));
        let b = b.as_ref().map(|b| call.slices::<E>(b));
        let (mut m1, mut m2) = (call.slices_mut::<E>(&m1), call.slices_mut::<E>(&m2));
        let mut vmax = vmax.as_ref().map(|v| call.slices_mut::<E>(v));
        py.detach(|| match &b {
            Some(b) => {
                k::restore_adam::<E>(&mut w, b, &g, &mut m1, &mut m2, vmax.as_deref_mut(), hyper)
            }
            None => k::adam_step::<E>(&mut w, &g, &mut m1, &mut m2, vmax.as_deref_mut(), hyper),
        })
        .map_err(kernel_error)
    })
}

/// Σ a·b over aligned tensor lists, accumulated in float64.
#[pyfunction]
fn dot(py: Python<'_>, a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> PyResult<f64> {
    let mut call = Call::new(py);
    let x = call.read("a", a)?;
    let y = call.read("b", b)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let (x, y) = (call.slices::<E>(&x), call.slices::<E>(&y));
        py.detach(|| k::dot::<E>(&x, &y)).map_err(kernel_error)
    })
}

/// `y ← alpha·x + beta·y`.
#[pyfunction]
fn axpby(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    alpha: f64,
    beta: f64,
) -> PyResult<()> {
    let mut call = Call::new(py);
    let xs = call.read("x", x)?;
    let ys = call.write("y", y)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let (xs, mut ys) = (call.slices::<E>(&xs), call.slices_mut::<E>(&ys));
        py.detach(|| k::axpby::<E>(&xs, &mut ys, alpha, beta))
            .map_err(kernel_error)
    })
}

/// For each array, whether any element is non-zero (NaN counts, -0.0 does not); stops at the
/// first non-zero block of each array.
#[pyfunction]
fn any_nonzero(py: Python<'_>, tensors: &Bound<'_, PyAny>) -> PyResult<Vec<bool>> {
    let mut call = Call::new(py);
    let t = call.read("tensors", tensors)?;
    call.finish()?;
    dispatch!(call.dtype(), E, {
        let t = call.slices::<E>(&t);
        Ok(py.detach(|| t.iter().map(|x| k::any_nonzero::<E>(x)).collect()))
    })
}

/// Number of threads the kernels run on (rayon's global pool; `RAYON_NUM_THREADS` sets it).
#[pyfunction]
fn num_threads() -> usize {
    k::num_threads()
}

#[pymodule]
#[pyo3(name = "_core")]
fn sharpness_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CHUNK", k::CHUNK)?;
    m.add_function(wrap_pyfunction!(sum_of_squares, m)?)?;
    m.add_function(wrap_pyfunction!(sum_of_squares_adaptive, m)?)?;
    m.add_function(wrap_pyfunction!(perturb, m)?)?;
    m.add_function(wrap_pyfunction!(perturb_adaptive, m)?)?;
    m.add_function(wrap_pyfunction!(copy, m)?)?;
    m.add_function(wrap_pyfunction!(perturb_offsets, m)?)?;
    m.add_function(wrap_pyfunction!(subtract_offsets, m)?)?;
    m.add_function(wrap_pyfunction!(restore_sgd, m)?)?;
    m.add_function(wrap_pyfunction!(restore_adam, m)?)?;
    m.add_function(wrap_pyfunction!(any_nonzero, m)?)?;
    m.add_function(wrap_pyfunction!(dot, m)?)?;
    m.add_function(wrap_pyfunction!(axpby, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    Ok(())
}
