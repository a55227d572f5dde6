//! Splitting aligned tensor lists into fixed chunks and running them on rayon's pool.

use crate::{CHUNK, PARALLEL_THRESHOLD};
use rayon::prelude::*;

/// Runs `work` on every item, in parallel when the call is large enough.
pub(crate) fn for_each<T: Send>(items: Vec<T>, total: usize, work: impl Fn(T) + Sync + Send) {
    if total < PARALLEL_THRESHOLD {
        items.into_iter().for_each(work);
    } else {
        items.into_par_iter().for_each(work);
    }
}

/// Maps every item to an `f64` and adds the results in item order (deterministic).
pub(crate) fn ordered_sum<T: Send>(
    items: Vec<T>,
    total: usize,
    work: impl Fn(T) -> f64 + Sync + Send,
) -> f64 {
    let partials: Vec<f64> = if total < PARALLEL_THRESHOLD {
        items.into_iter().map(work).collect()
    } else {
        items.into_par_iter().map(work).collect()
    };
    partials.into_iter().fold(0.0, |acc, x| acc + x)
}

/// Immutable chunks of a tensor list, in order.
pub(crate) fn chunks<'a, E>(tensors: &'a [&'a [E]]) -> impl Iterator<Item = &'a [E]> + 'a {
    tensors.iter().flat_map(|t| t.chunks(CHUNK))
}

/// Mutable chunks of a tensor list, in order.
pub(crate) fn chunks_mut<'a, 'b: 'a, E>(
    tensors: &'a mut [&'b mut [E]],
) -> impl Iterator<Item = &'a mut [E]> + use<'a, 'b, E> {
    tensors.iter_mut().flat_map(|t| t.chunks_mut(CHUNK))
}
