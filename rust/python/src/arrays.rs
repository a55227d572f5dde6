//! Checking the arrays of one kernel call and lending them to the kernels as slices.
//!
//! Everything that could make a kernel read or write the wrong memory is refused here, with a
//! Python exception: a dtype that differs within the call (TypeError), shapes or tensor counts
//! that do not line up, arrays that are not C-contiguous, aligned or writable, and a written
//! array that overlaps any other array of the call (ValueError). numpy's own borrow tracking only
//! sees overlaps between views of one base array; two arrays made from one torch storage have
//! different bases, so overlap is checked on the raw address ranges.

use numpy::npyffi::{NPY_ARRAY_ALIGNED, NPY_ARRAY_WRITEABLE};
use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;
use sharpness_kernels::Element;

/// The element types the kernels accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    F16,
    /// bfloat16 as raw `uint16` storage.
    BF16,
}

impl DType {
    fn of(array: &Bound<'_, PyUntypedArray>) -> Option<DType> {
        let py = array.py();
        let dtype = array.dtype();
        if dtype.is_equiv_to(&numpy::dtype::<f32>(py)) {
            Some(DType::F32)
        } else if dtype.is_equiv_to(&numpy::dtype::<f64>(py)) {
            Some(DType::F64)
        } else if dtype.is_equiv_to(&numpy::dtype::<half::f16>(py)) {
            Some(DType::F16)
        } else if dtype.is_equiv_to(&numpy::dtype::<u16>(py)) {
            Some(DType::BF16)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            DType::F32 => f32::NAME,
            DType::F64 => f64::NAME,
            DType::F16 => half::f16::NAME,
            DType::BF16 => half::bf16::NAME,
        }
    }

    fn item_size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// One tensor argument of a call: its arrays' data pointers and lengths.
pub struct TensorList {
    data: Vec<(usize, usize)>,
}

struct Range {
    start: usize,
    end: usize,
    writable: bool,
    argument: &'static str,
}

/// The arrays of one kernel call, checked as they are added.
pub struct Call<'py> {
    dtype: Option<DType>,
    shapes: Option<Vec<Vec<usize>>>,
    first_argument: &'static str,
    ranges: Vec<Range>,
    // Keeps every array alive while the kernels hold slices of it.
    keep_alive: Vec<Bound<'py, PyUntypedArray>>,
}

fn as_arrays<'py>(
    argument: &'static str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<Vec<Bound<'py, PyUntypedArray>>> {
    if let Ok(array) = obj.cast::<PyUntypedArray>() {
        return Ok(vec![array.clone()]);
    }
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "`{argument}` must be an ndarray or a sequence of ndarrays, got a str"
        )));
    }
    let items = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "`{argument}` must be an ndarray or a sequence of ndarrays, got {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    let mut arrays = Vec::new();
    for (index, item) in items.enumerate() {
        let item = item?;
        let array = item.cast::<PyUntypedArray>().map_err(|_| {
            PyTypeError::new_err(format!(
                "item {index} of `{argument}` is a {}, not an ndarray",
                item.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        arrays.push(array.clone());
    }
    Ok(arrays)
}

impl<'py> Call<'py> {
    pub fn new(_py: Python<'py>) -> Self {
        Call {
            dtype: None,
            shapes: None,
            first_argument: "",
            ranges: Vec::new(),
            keep_alive: Vec::new(),
        }
    }

    /// The dtype shared by every array of the call (float32 for a call without arrays).
    pub fn dtype(&self) -> DType {
        self.dtype.unwrap_or(DType::F32)
    }

    /// Adds an argument the kernel only reads.
    pub fn read(
        &mut self,
        argument: &'static str,
        obj: &Bound<'py, PyAny>,
    ) -> PyResult<TensorList> {
        self.add(argument, obj, false)
    }

    /// Adds an argument the kernel writes.
    pub fn write(
        &mut self,
        argument: &'static str,
        obj: &Bound<'py, PyAny>,
    ) -> PyResult<TensorList> {
        self.add(argument, obj, true)
    }

    /// Adds a written argument of a fixed dtype, outside the call's shared dtype (the subtract
    /// mode's bfloat16 offsets beside weights of any dtype).
    pub fn write_fixed(
        &mut self,
        argument: &'static str,
        obj: &Bound<'py, PyAny>,
        dtype: DType,
    ) -> PyResult<TensorList> {
        self.add_typed(argument, obj, true, Some(dtype))
    }

    /// Adds a read argument of a fixed dtype (see [`Call::write_fixed`]).
    pub fn read_fixed(
        &mut self,
        argument: &'static str,
        obj: &Bound<'py, PyAny>,
        dtype: DType,
    ) -> PyResult<TensorList> {
        self.add_typed(argument, obj, false, Some(dtype))
    }

    fn add(
        &mut self,
        argument: &'static str,
        obj: &Bound<'py, PyAny>,
        writable: bool,
    ) -> PyResult<TensorList> {
        self.add_typed(argument, obj, writable, None)
    }

    fn add_typed(
        &mut self,
        argument: &'static str,
        obj: &Bound<'py, PyAny>,
        writable: bool,
        fixed: Option<DType>,
    ) -> PyResult<TensorList> {
        let arrays = as_arrays(argument, obj)?;
        let shapes: Vec<Vec<usize>> = arrays.iter().map(|a| a.shape().to_vec()).collect();
        match &self.shapes {
            None => {
                self.shapes = Some(shapes);
                self.first_argument = argument;
            }
            Some(lead) => {
                if lead.len() != shapes.len() {
                    return Err(PyValueError::new_err(format!(
                        "`{argument}` holds {} arrays but `{}` holds {}",
                        shapes.len(),
                        self.first_argument,
                        lead.len()
                    )));
                }
                if let Some(index) = (0..lead.len()).find(|&i| lead[i] != shapes[i]) {
                    return Err(PyValueError::new_err(format!(
                        "array {index} of `{argument}` has shape {:?} but array {index} of `{}` has shape {:?}",
                        shapes[index], self.first_argument, lead[index]
                    )));
                }
            }
        }
        let mut data = Vec::with_capacity(arrays.len());
        for (index, array) in arrays.iter().enumerate() {
            let dtype = DType::of(array).ok_or_else(|| {
                PyTypeError::new_err(format!(
                    "array {index} of `{argument}` has dtype {}; the kernels take float32, float64, float16 \
                     or bfloat16 as raw uint16 storage (native byte order)",
                    array.dtype()
                ))
            })?;
            match (fixed, self.dtype) {
                (Some(fixed), _) if fixed != dtype => {
                    return Err(PyTypeError::new_err(format!(
                        "array {index} of `{argument}` is {} but `{argument}` must be {}",
                        dtype.name(),
                        fixed.name()
                    )));
                }
                (Some(_), _) => {}
                (None, None) => self.dtype = Some(dtype),
                (None, Some(expected)) if expected != dtype => {
                    return Err(PyTypeError::new_err(format!(
                        "array {index} of `{argument}` is {} but the call's first array is {}: \
                         one call takes one dtype",
                        dtype.name(),
                        expected.name()
                    )));
                }
                (None, Some(_)) => {}
            }
            if !array.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "array {index} of `{argument}` is not C-contiguous: the kernels work on contiguous memory \
                     (use numpy.ascontiguousarray, or Tensor.contiguous())"
                )));
            }
            // SAFETY: reading the flags and data pointer of a live array object.
            let (flags, ptr) = unsafe {
                let raw = array.as_array_ptr();
                ((*raw).fields.flags, (*raw).fields.data as usize)
            };
            if flags & NPY_ARRAY_ALIGNED == 0 || ptr % dtype.item_size() != 0 {
                return Err(PyValueError::new_err(format!(
                    "array {index} of `{argument}` is not aligned to its dtype"
                )));
            }
            if writable && flags & NPY_ARRAY_WRITEABLE == 0 {
                return Err(PyValueError::new_err(format!(
                    "array {index} of `{argument}` is read-only but the kernel writes it"
                )));
            }
            let len = array.len();
            if len > 0 {
                self.ranges.push(Range {
                    start: ptr,
                    end: ptr + len * dtype.item_size(),
                    writable,
                    argument,
                });
            }
            data.push((ptr, len));
        }
        self.keep_alive.extend(arrays);
        Ok(TensorList { data })
    }

    /// Refuses any overlap between a written array and another array of the call.
    pub fn finish(&mut self) -> PyResult<()> {
        self.ranges.sort_by_key(|r| r.start);
        // Sweep in address order, remembering the furthest end seen so far, overall and among the
        // written ranges: an overlap involving a written range shows up against one of the two.
        let mut furthest: Option<&Range> = None;
        let mut furthest_written: Option<&Range> = None;
        for range in &self.ranges {
            let clash = furthest_written
                .filter(|w| range.start < w.end)
                .or_else(|| furthest.filter(|f| range.writable && range.start < f.end));
            if let Some(other) = clash {
                return Err(PyValueError::new_err(format!(
                    "`{}` and `{}` share memory; the kernels need arrays that do not overlap where they are written",
                    other.argument, range.argument
                )));
            }
            if furthest.is_none_or(|f| range.end > f.end) {
                furthest = Some(range);
            }
            if range.writable && furthest_written.is_none_or(|f| range.end > f.end) {
                furthest_written = Some(range);
            }
        }
        Ok(())
    }

    fn check_type<E: Element>(&self) {
        // `dispatch!` picks E from `self.dtype()`, so this cannot fail; it guards future edits.
        debug_assert_eq!(E::NAME, self.dtype().name());
    }

    /// The argument's arrays as read-only slices.
    pub fn slices<E: Element>(&self, list: &TensorList) -> Vec<&[E]> {
        self.check_type::<E>();
        list.data
            .iter()
            // SAFETY: `add` checked dtype, alignment and contiguity; the arrays are kept alive by
            // `self`; `finish` checked that no written array overlaps this memory.
            .map(|&(ptr, len)| {
                if len == 0 {
                    &[][..]
                } else {
                    unsafe { std::slice::from_raw_parts(ptr as *const E, len) }
                }
            })
            .collect()
    }

    /// A fixed-dtype argument's arrays as slices of `T` (its dtype was checked when it was added).
    pub fn fixed_slices<T: Copy>(&self, list: &TensorList) -> Vec<&[T]> {
        list.data
            .iter()
            // SAFETY: as in `slices`; `add_typed` checked the fixed dtype, whose item is a `T`.
            .map(|&(ptr, len)| {
                if len == 0 {
                    &[][..]
                } else {
                    unsafe { std::slice::from_raw_parts(ptr as *const T, len) }
                }
            })
            .collect()
    }

    /// A fixed-dtype argument's arrays as mutable slices of `T`.
    // `&self` holds raw pointers, not the data; `Call` checked the arrays writable and disjoint.
    #[allow(clippy::mut_from_ref)]
    pub fn fixed_slices_mut<T: Copy>(&self, list: &TensorList) -> Vec<&mut [T]> {
        list.data
            .iter()
            // SAFETY: as in `slices_mut`.
            .map(|&(ptr, len)| {
                if len == 0 {
                    &mut [][..]
                } else {
                    unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) }
                }
            })
            .collect()
    }

    /// The argument's arrays as mutable slices.
    // `&self` holds raw pointers, not the data; `Call` checked the arrays writable and disjoint.
    #[allow(clippy::mut_from_ref)]
    pub fn slices_mut<E: Element>(&self, list: &TensorList) -> Vec<&mut [E]> {
        self.check_type::<E>();
        list.data
            .iter()
            // SAFETY: as in `slices`, plus writability was checked and no other array of the call,
            // written or read, overlaps this one, so these are the only references to the memory.
            .map(|&(ptr, len)| {
                if len == 0 {
                    &mut [][..]
                } else {
                    unsafe { std::slice::from_raw_parts_mut(ptr as *mut E, len) }
                }
            })
            .collect()
    }
}
