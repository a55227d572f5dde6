//! Fused multi-tensor kernels for Sharpness-Aware Minimization (SAM, Foret et al., ICLR 2021).
//!
//! Every kernel works on a *list* of tensors, each given as a slice; a flat parameter buffer is
//! simply a list of one. The lists passed to one call are aligned: tensor `i` of every argument has
//! the same length. Work is split into fixed chunks of [`CHUNK`] elements that rayon spreads over
//! the threads; reductions add the per-chunk partial sums in chunk order, so every result is the
//! same whatever the thread count or schedule.
//!
//! Nothing here knows about Python: the `sharpness-python` crate borrows numpy arrays, checks them
//! and calls these functions with the GIL released. Inputs whose lengths do not line up are
//! reported as [`KernelError`]s, never as panics.

pub mod blas;
pub mod element;
pub mod norms;
mod parallel;
pub mod perturb;
pub mod scan;
pub mod steps;

pub use blas::{axpby, dot};
pub use element::{Element, Real};
pub use norms::{sum_of_squares, sum_of_squares_adaptive};
pub use perturb::{copy, perturb, perturb_adaptive, perturb_offsets, subtract_offsets};
pub use scan::any_nonzero;
pub use steps::{adam_step, restore_adam, restore_sgd, sgd_step, AdamHyper, SgdHyper};

/// Elements a work item covers (64 KiB of f32): large enough to amortise scheduling, small
/// enough to balance two to a few dozen threads.
pub const CHUNK: usize = 1 << 14;

/// Below this many elements in one call, threads cost more than they save: waking rayon's
/// workers costs tens of microseconds, about what one core needs for ~200k f32 elements that sit
/// in cache (measured: serial wins at 85k elements, breaks even near 200k, loses from 400k).
pub const PARALLEL_THRESHOLD: usize = 16 * CHUNK;

/// Arguments of one kernel call that do not line up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// Two arguments hold different numbers of tensors.
    TensorCount {
        argument: &'static str,
        expected: usize,
        found: usize,
    },
    /// Tensor `index` of `argument` is not as long as the same tensor of the first argument.
    Length {
        argument: &'static str,
        index: usize,
        expected: usize,
        found: usize,
    },
    /// A state argument the hyperparameters need was not given.
    Missing { argument: &'static str },
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::TensorCount {
                argument,
                expected,
                found,
            } => write!(
                f,
                "`{argument}` holds {found} tensors but the first argument holds {expected}"
            ),
            KernelError::Length {
                argument,
                index,
                expected,
                found,
            } => write!(
                f,
                "tensor {index} of `{argument}` has {found} elements, expected {expected}"
            ),
            KernelError::Missing { argument } => {
                write!(f, "`{argument}` is required by these hyperparameters")
            }
        }
    }
}

impl std::error::Error for KernelError {}

/// Threads the kernels run on: rayon's global pool (`RAYON_NUM_THREADS` sets its size).
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// The length of every tensor in a list.
pub(crate) fn lengths<E, S: AsRef<[E]>>(tensors: &[S]) -> Vec<usize> {
    tensors.iter().map(|t| t.as_ref().len()).collect()
}

/// Checks that `other` holds as many tensors as `lead`, each of the same length.
pub(crate) fn check_aligned<E, S: AsRef<[E]>>(
    lead: &[usize],
    other: &[S],
    argument: &'static str,
) -> Result<(), KernelError> {
    if other.len() != lead.len() {
        return Err(KernelError::TensorCount {
            argument,
            expected: lead.len(),
            found: other.len(),
        });
    }
    for (index, (&expected, tensor)) in lead.iter().zip(other).enumerate() {
        let found = tensor.as_ref().len();
        if found != expected {
            return Err(KernelError::Length {
                argument,
                index,
                expected,
                found,
            });
        }
    }
    Ok(())
}
