//! Early-exit scans.

use crate::element::{Element, Real};

/// Elements tested between two early-exit checks (vectorises within a block).
const BLOCK: usize = 256;

/// Whether any element differs from zero (NaN counts as non-zero, `-0.0` as zero). Stops at the
/// first non-zero block, so a real gradient costs a few hundred elements, not a pass.
pub fn any_nonzero<E: Element>(tensor: &[E]) -> bool {
    tensor.chunks(BLOCK).any(|block| {
        block
            .iter()
            .fold(false, |seen, &x| seen | (x.load() != E::Math::ZERO))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn finds_the_one_nonzero_element() {
        let mut v = vec![0.0f32; 1000];
        assert!(!any_nonzero(&v));
        assert!(!any_nonzero::<f32>(&[]));
        v[999] = -1e-30;
        assert!(any_nonzero(&v));
        v[999] = -0.0;
        assert!(!any_nonzero(&v));
        v[3] = f32::NAN;
        assert!(any_nonzero(&v));
        assert!(any_nonzero(&[bf16::from_f32(0.0), bf16::from_f32(2.0)]));
        assert!(!any_nonzero(&[0.0f64; 7]));
    }
}
