//! A safe front for the `gemm` crate's f32 matrix product over slices with explicit strides
//! (transposed operands need no copy), threaded by blocks of the output.

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::gemm_bf16;

/// A read-only matrix view: `rows x cols` with element (i, j) at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Rows `range` of this matrix.
    pub fn rows_range(self, range: Range<usize>) -> Self {
        MatRef {
            data: &self.data[(range.start * self.row_stride).min(self.data.len())..],
            rows: range.len(),
            ..self
        }
    }

    /// Columns `range` of this matrix.
    fn cols_range(self, range: Range<usize>) -> Self {
        MatRef {
            data: &self.data[(range.start * self.col_stride).min(self.data.len())..],
            cols: range.len(),
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// Below this many multiply-adds a product runs on one thread: splitting costs more.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// Blocks along the output's columns start at multiples of this, the `gemm` crate's f32
/// vector width with AVX-512 (a multiple of its AVX2 width).
const COLUMN_ALIGN: usize = 16;

/// Rows of the output are split among threads at multiples of this: the bfloat16 products'
/// packed panels hold 6 rows (a multiple of it would do too).
const ROW_ALIGN: usize = 6;

/// Fewest rows and columns of a bfloat16 product (a quarter of it when the left operand
/// comes packed). vt-resnet18 at 150 px, batch 1, with the limit at 0 / 32 / 64 /
/// 128: 48-57 / 67-72 / 63-74 / 59-61 img/s (f32: ~60); batch 32 unchanged up to 64.
const BF16_MIN_REUSE: usize = 64;

/// A left operand packed once for many products, where the products pack it (bfloat16
/// products, `super::allow_bf16_products`); empty otherwise. Kept by whoever reuses the
/// operand: a convolution's weights for every image of a batch, or for every call while the
/// weights are frozen (inference). Made with the other setting it costs speed, not accuracy:
/// products that do not pack ignore it, and products that do pack for themselves without it.
#[derive(Default)]
pub struct LhsPacking {
    #[cfg(target_arch = "x86_64")]
    bf16: Option<gemm_bf16::PackedLhs>,
}

impl LhsPacking {
    /// Packs `view` whole if the products pack their left operand.
    pub fn new(view: MatRef) -> Self {
        LhsPacking {
            // SAFETY: bfloat16 products are only allowed where the CPU has them.
            #[cfg(target_arch = "x86_64")]
            bf16: super::bf16_products_allowed()
                .then(|| unsafe { gemm_bf16::PackedLhs::new(view) }),
        }
    }
}

impl std::fmt::Debug for LhsPacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(target_arch = "x86_64")]
        let packed = self.bf16.is_some();
        #[cfg(not(target_arch = "x86_64"))]
        let packed = false;
        f.debug_struct("LhsPacking")
            .field("packed", &packed)
            .finish()
    }
}

/// Nothing packed.
static UNPACKED: LhsPacking = LhsPacking {
    #[cfg(target_arch = "x86_64")]
    bf16: None,
};

/// A left operand and its packing.
pub struct PreparedLhs<'a> {
    view: MatRef<'a>,
    packing: &'a LhsPacking,
}

impl<'a> PreparedLhs<'a> {
    /// `view` with `packing`, which must have been made from the same values; a packing of
    /// another shape is ignored.
    pub fn new(view: MatRef<'a>, packing: &'a LhsPacking) -> Self {
        #[cfg(target_arch = "x86_64")]
        let packing = match &packing.bf16 {
            Some(packed) if !packed.fits(view.rows, view.cols) => &UNPACKED,
            _ => packing,
        };
        PreparedLhs { view, packing }
    }

    /// The view alone: each product packs what it needs.
    pub fn unpacked(view: MatRef<'a>) -> Self {
        PreparedLhs {
            view,
            packing: &UNPACKED,
        }
    }
}

/// `dst = lhs * rhs`, or `dst += lhs * rhs` when `accumulate`; `dst` is row-major.
///
/// With `threads > 1` the output is cut along its larger dimension into one block per
/// thread, each a single-threaded product. At this model's convolution shapes that ran
/// 1.2-2x faster than the `gemm` crate's own threading (bench/RESULTS.md).
pub fn matmul(dst: &mut [f32], lhs: MatRef, rhs: MatRef, accumulate: bool, threads: usize) {
    matmul_prepared(dst, &PreparedLhs::unpacked(lhs), rhs, accumulate, threads);
}

/// [`matmul`] with a prepared left operand.
pub fn matmul_prepared(
    dst: &mut [f32],
    lhs: &PreparedLhs,
    rhs: MatRef,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (lhs.view.rows, lhs.view.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions differ");
    assert!(
        dst.len() >= m * n && lhs.view.fits() && rhs.fits(),
        "matrix view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    let dst = OutPtr(dst.as_mut_ptr());
    let by_rows = m >= n;
    let blocks = if m * n * k < PARALLEL_MIN_WORK {
        1
    } else if by_rows {
        threads.min(m.div_ceil(ROW_ALIGN))
    } else {
        threads.min(n.div_ceil(COLUMN_ALIGN))
    };
    if blocks <= 1 {
        // SAFETY: the views were checked above and `dst` holds m x n.
        unsafe { product(dst, n, lhs, 0..m, rhs, accumulate) };
        return;
    }
    (0..blocks).into_par_iter().for_each(|block| {
        // SAFETY: each block writes its own rows or columns of `dst` (disjoint index sets
        // within the checked m x n region), and reads views that lie inside their slices.
        unsafe {
            if by_rows {
                let rows = split(m, blocks, ROW_ALIGN, block);
                product(dst.offset(rows.start * n), n, lhs, rows, rhs, accumulate);
            } else {
                let cols = split(n, blocks, COLUMN_ALIGN, block);
                let rhs_cols = rhs.cols_range(cols.clone());
                product(dst.offset(cols.start), n, lhs, 0..m, rhs_cols, accumulate);
            }
        }
    });
}

/// The `block`-th of `blocks` near-equal ranges of `0..len`, cut at multiples of `align`.
fn split(len: usize, blocks: usize, align: usize, block: usize) -> Range<usize> {
    let step = len.div_ceil(blocks).next_multiple_of(align);
    (block * step).min(len)..((block + 1) * step).min(len)
}

/// The output pointer, shared by the threads that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: only used for disjoint blocks of one output, while `matmul` holds its `&mut`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `offset` must lie inside the output.
    unsafe fn offset(self, offset: usize) -> OutPtr {
        OutPtr(self.0.add(offset))
    }
}

/// One single-threaded product of rows `rows` of `lhs` into `dst`, row-major with row
/// stride `dst_row_stride`.
///
/// # Safety
/// The views must lie inside their slices, `dst` must hold `rows.len()` rows of `rhs.cols`
/// elements at that stride, and no one else may touch those elements meanwhile.
unsafe fn product(
    dst: OutPtr,
    dst_row_stride: usize,
    lhs: &PreparedLhs,
    rows: Range<usize>,
    rhs: MatRef,
    accumulate: bool,
) {
    if rows.is_empty() || rhs.cols == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::bf16_products_allowed() {
        // Packing converts each operand element once, and the product uses it once per row
        // or column of the other operand: with fewer than BF16_MIN_REUSE of those the
        // conversion costs more than the faster multiply-adds save (batch-1 inference).
        let bf16 = match &lhs.packing.bf16 {
            Some(packed) => {
                (rows.len().min(rhs.cols) >= BF16_MIN_REUSE / 4).then_some(gemm_bf16::Lhs::Packed {
                    packed,
                    rows: rows.clone(),
                })
            }
            None => (rows.len().min(rhs.cols) >= BF16_MIN_REUSE)
                .then(|| gemm_bf16::Lhs::View(lhs.view.rows_range(rows.clone()))),
        };
        if let Some(lhs) = bf16 {
            return gemm_bf16::product(dst.0, dst_row_stride, lhs, rhs, accumulate);
        }
    }
    let lhs = lhs.view.rows_range(rows);
    gemm::gemm(
        lhs.rows,
        rhs.cols,
        lhs.cols,
        dst.0,
        1,
        dst_row_stride as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.data.as_ptr(),
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook triple loop.
    fn naive(lhs: MatRef, rhs: MatRef) -> Vec<f32> {
        let at = |m: &MatRef, i: usize, j: usize| m.data[i * m.row_stride + j * m.col_stride];
        let mut out = vec![0f32; lhs.rows * rhs.cols];
        for i in 0..lhs.rows {
            for j in 0..rhs.cols {
                out[i * rhs.cols + j] =
                    (0..lhs.cols).map(|p| at(&lhs, i, p) * at(&rhs, p, j)).sum();
            }
        }
        out
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn every_split_matches_the_triple_loop() {
        // Wide (split by columns, ragged last block), tall (split by rows), transposed
        // operands, and a product too small to split.
        for (m, k, n, transposed) in [
            (7, 300, 333, false),
            (301, 200, 9, false),
            (40, 120, 90, true),
            (3, 4, 5, false),
        ] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let lhs = if transposed {
                MatRef::row_major(&a, k, m).t()
            } else {
                MatRef::row_major(&a, m, k)
            };
            let rhs = if transposed {
                MatRef::row_major(&b, n, k).t()
            } else {
                MatRef::row_major(&b, k, n)
            };
            let expected = naive(lhs, rhs);
            for threads in [1, 2, 3, 8] {
                let mut dst = vec![f32::NAN; m * n];
                matmul(&mut dst, lhs, rhs, false, threads);
                let mut twice = dst.clone();
                matmul(&mut twice, lhs, rhs, true, threads);
                for ((got, sum), want) in dst.iter().zip(&twice).zip(&expected) {
                    let tolerance = 1e-4 * (k as f32);
                    assert!((got - want).abs() < tolerance, "{m}x{k}x{n} on {threads}");
                    assert!(
                        (sum - 2.0 * want).abs() < 2.0 * tolerance,
                        "accumulate {m}x{k}x{n}"
                    );
                }
            }
        }
    }
}
