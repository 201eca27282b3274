//! f32 matrix products that multiply in bfloat16 and sum in f32, on CPUs with AVX512-BF16
//! (`vdpbf16ps`: twice the multiply-adds of an f32 FMA per instruction). The operands are
//! rounded to bfloat16 (to nearest even) while they are packed; the sums, the output and
//! everything outside the product stay f32, as with PyTorch's
//! `torch.backends.mkldnn.fp32_precision = "bf16"`.
//!
//! The loops are the usual packed ones: a block of `rhs` (KC x NC) packed into strips of NR
//! columns, a block of `lhs` (MC x KC) into panels of MR rows, and an MR x NR register tile
//! per panel and strip. Each packed element is a pair of bfloat16 values adjacent along the
//! inner dimension, the operand of `vdpbf16ps`.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;

use super::gemm::MatRef;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile: four vectors of 16 f32 sums.
const NR: usize = 64;
/// Depth of a packed block (a multiple of 2: elements go in pairs).
const KC: usize = 256;
/// Rows of a packed `lhs` block (a multiple of MR).
const MC: usize = 192;
/// Columns of a packed `rhs` block (a multiple of NR).
const NC: usize = 1024;

/// Whether this CPU multiplies bfloat16 pairs (AVX512-BF16).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
}

thread_local! {
    /// This thread's packed `lhs` and `rhs` blocks, kept between products.
    static PACKED: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The left operand of a product: a view, packed block by block as the product goes, or
/// rows of an operand packed once for many products.
#[derive(Clone)]
pub enum Lhs<'a> {
    View(MatRef<'a>),
    Packed {
        packed: &'a PackedLhs,
        /// Which rows; the first is a multiple of MR.
        rows: Range<usize>,
    },
}

/// A whole left operand in the products' packed form: every KC-deep block, all panels.
pub struct PackedLhs {
    rows: usize,
    depth: usize,
    data: Vec<u32>,
}

impl PackedLhs {
    /// Packs `lhs` whole.
    ///
    /// # Safety
    /// [`available`] must be true.
    pub unsafe fn new(lhs: MatRef) -> Self {
        let padded = lhs.rows.next_multiple_of(MR);
        let blocks = lhs.cols.div_ceil(KC);
        let mut data = vec![0; blocks * padded * KC / 2];
        for (b, pc) in (0..lhs.cols).step_by(KC).enumerate() {
            let depth = pc..(pc + KC).min(lhs.cols);
            pack_lhs(lhs, 0..lhs.rows, depth, &mut data[b * padded * KC / 2..]);
        }
        PackedLhs {
            rows: lhs.rows,
            depth: lhs.cols,
            data,
        }
    }

    /// Whether this packs a `rows x depth` operand.
    pub fn fits(&self, rows: usize, depth: usize) -> bool {
        self.rows == rows && self.depth == depth
    }

    /// The panels of the block starting at depth `pc`, from the one holding row `first`.
    fn panels(&self, pc: usize, first: usize) -> &[u32] {
        let padded = self.rows.next_multiple_of(MR);
        let pairs = KC.min(self.depth - pc).div_ceil(2);
        &self.data[pc / KC * padded * KC / 2 + first / MR * MR * pairs..]
    }
}

/// One single-threaded product `dst = lhs * rhs` (or `+=` when `accumulate`), `dst` row-major
/// with row stride `dst_row_stride`.
///
/// # Safety
/// [`available`] must be true, the views must lie inside their slices, and `dst` must hold
/// the left operand's rows of `rhs.cols` elements at that stride that no one else touches
/// meanwhile.
pub unsafe fn product(
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: Lhs,
    rhs: MatRef,
    accumulate: bool,
) {
    let (m, k, n) = match &lhs {
        Lhs::View(view) => (view.rows, view.cols, rhs.cols),
        Lhs::Packed { packed, rows } => (rows.len(), packed.depth, rhs.cols),
    };
    assert_eq!(rhs.rows, k, "inner dimensions differ");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * dst_row_stride), 0, n);
            }
        }
        return;
    }
    PACKED.with_borrow_mut(|(packed_lhs, packed_rhs)| {
        packed_lhs.resize(MC * KC / 2, 0);
        packed_rhs.resize(KC / 2 * NC, 0);
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let pairs = kc.div_ceil(2);
                pack_rhs(rhs, pc..pc + kc, jc..jc + nc, packed_rhs);
                let accumulate = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let panels = match &lhs {
                        Lhs::View(view) => {
                            pack_lhs(*view, ic..ic + mc, pc..pc + kc, packed_lhs);
                            &packed_lhs[..]
                        }
                        Lhs::Packed { packed, rows } => packed.panels(pc, rows.start + ic),
                    };
                    for (s, j) in (0..nc).step_by(NR).enumerate() {
                        let strip = &packed_rhs[s * pairs * NR..][..pairs * NR];
                        for (p, i) in (0..mc).step_by(MR).enumerate() {
                            let panel = &panels[p * pairs * MR..][..pairs * MR];
                            let tile = dst.add((ic + i) * dst_row_stride + jc + j);
                            let size = ((mc - i).min(MR), (nc - j).min(NR));
                            tile_product(
                                pairs,
                                panel,
                                strip,
                                tile,
                                dst_row_stride,
                                size,
                                accumulate,
                            );
                        }
                    }
                }
            }
        }
    });
}

/// An MR x NR tile: the sums over `pairs` packed pairs, stored (or added, when
/// `accumulate`) into the first `rows x cols` elements at `dst`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile_product(
    pairs: usize,
    panel: &[u32],
    strip: &[u32],
    dst: *mut f32,
    dst_row_stride: usize,
    (rows, cols): (usize, usize),
    accumulate: bool,
) {
    let mut sums = [[_mm512_setzero_ps(); 4]; MR];
    let lhs_rows: [*const u32; MR] = std::array::from_fn(|r| panel.as_ptr().add(r * pairs));
    let mut b = strip.as_ptr();
    // Masked loads with every lane on: `_mm512_loadu_si512` copies through the stack with a
    // debug-build overlap check, which cost a third of this loop in the dev profile.
    for p in 0..pairs {
        let b0: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi32(!0, b.cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi32(!0, b.add(16).cast()));
        let b2: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi32(!0, b.add(32).cast()));
        let b3: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi32(!0, b.add(48).cast()));
        for (row, lhs_row) in sums.iter_mut().zip(lhs_rows) {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*lhs_row.add(p) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], a, b0);
            row[1] = _mm512_dpbf16_ps(row[1], a, b1);
            row[2] = _mm512_dpbf16_ps(row[2], a, b2);
            row[3] = _mm512_dpbf16_ps(row[3], a, b3);
        }
        b = b.add(NR);
    }
    for (r, row) in sums.iter().enumerate().take(rows) {
        for (v, sum) in row.iter().enumerate() {
            let lanes = cols.saturating_sub(16 * v).min(16);
            if lanes == 0 {
                break;
            }
            let mask = (u32::MAX >> (32 - lanes)) as __mmask16;
            let out = dst.add(r * dst_row_stride + 16 * v);
            let value = if accumulate {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), *sum)
            } else {
                *sum
            };
            _mm512_mask_storeu_ps(out, mask, value);
        }
    }
}

/// `x` rounded to bfloat16, to nearest even (quiet NaNs stay NaN).
fn bf16_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    if x.is_nan() {
        (bits >> 16) | 0x40
    } else {
        (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
    }
}

/// The pair `(x, y)` as one packed element: `x` in the low half, as `vdpbf16ps` reads it.
fn pair(x: f32, y: f32) -> u32 {
    bf16_bits(x) | (bf16_bits(y) << 16)
}

/// Packs rows `rows` and inner indices `depth` of `lhs` into panels of MR rows, each
/// `[row][pair]`; rows past the end are zeros, as is the odd element of a last pair.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_lhs(lhs: MatRef, rows: Range<usize>, depth: Range<usize>, packed: &mut [u32]) {
    let pairs = depth.len().div_ceil(2);
    for (p, first) in rows.clone().step_by(MR).enumerate() {
        let panel = &mut packed[p * pairs * MR..][..pairs * MR];
        for (r, out) in panel.chunks_exact_mut(pairs).enumerate() {
            let i = first + r;
            if i >= rows.end {
                out.fill(0);
            } else if lhs.col_stride == 1 {
                let row = &lhs.data[i * lhs.row_stride + depth.start..][..depth.len()];
                pack_contiguous_pairs(row, out);
            } else {
                let at = |j: usize| {
                    if j < depth.end {
                        lhs.data[i * lhs.row_stride + j * lhs.col_stride]
                    } else {
                        0.0
                    }
                };
                for (q, out) in out.iter_mut().enumerate() {
                    let j = depth.start + 2 * q;
                    *out = pair(at(j), at(j + 1));
                }
            }
        }
    }
}

/// Packs inner indices `depth` and columns `cols` of `rhs` into strips of NR columns, each
/// `[pair][column]`; columns past the end are zeros, as is the odd element of a last pair.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rhs(rhs: MatRef, depth: Range<usize>, cols: Range<usize>, packed: &mut [u32]) {
    let pairs = depth.len().div_ceil(2);
    for (s, first) in cols.clone().step_by(NR).enumerate() {
        let strip = &mut packed[s * pairs * NR..][..pairs * NR];
        let width = NR.min(cols.end - first);
        if rhs.col_stride == 1 {
            // Two rows at a time, 16 columns per vector, interleaved into pairs.
            let interleave = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            for (q, out) in strip.chunks_exact_mut(NR).enumerate() {
                let k = depth.start + 2 * q;
                let row = |k: usize| {
                    (k < depth.end).then(|| rhs.data[k * rhs.row_stride + first..].as_ptr())
                };
                let (first_row, second_row) = (row(k), row(k + 1));
                for v in 0..NR / 16 {
                    let lanes = width.saturating_sub(16 * v).min(16);
                    let mask = (u32::MAX.checked_shr(32 - lanes as u32).unwrap_or(0)) as __mmask16;
                    let load = |row: Option<*const f32>| match row {
                        Some(row) if lanes > 0 => _mm512_maskz_loadu_ps(mask, row.add(16 * v)),
                        _ => _mm512_setzero_ps(),
                    };
                    let words: __m512i =
                        std::mem::transmute(_mm512_cvtne2ps_pbh(load(second_row), load(first_row)));
                    let pairs = _mm512_permutexvar_epi16(interleave, words);
                    _mm512_storeu_si512(out.as_mut_ptr().add(16 * v).cast(), pairs);
                }
            }
        } else if rhs.row_stride == 1 {
            pack_column_pairs(rhs, depth.clone(), first..first + width, strip);
        } else {
            for c in 0..NR {
                let j = first + c;
                if c >= width {
                    for q in 0..pairs {
                        strip[q * NR + c] = 0;
                    }
                } else {
                    let at = |k: usize| {
                        if k < depth.end {
                            rhs.data[k * rhs.row_stride + j * rhs.col_stride]
                        } else {
                            0.0
                        }
                    };
                    for q in 0..pairs {
                        let k = depth.start + 2 * q;
                        strip[q * NR + c] = pair(at(k), at(k + 1));
                    }
                }
            }
        }
    }
}

/// One strip of `rhs` whose columns are contiguous along the inner dimension: a pair is
/// one 64-bit load, so each gather fetches 8 columns' pairs, and a converted vector holds
/// 16 columns' pairs in strip order. Columns past `cols` are zeros, as is the odd element
/// of a last pair.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_column_pairs(
    rhs: MatRef,
    depth: Range<usize>,
    cols: Range<usize>,
    strip: &mut [u32],
) {
    let pairs = depth.len().div_ceil(2);
    let whole = depth.len() / 2;
    for v in 0..NR / 16 {
        let lanes = cols.len().saturating_sub(16 * v).min(16);
        if lanes == 0 {
            for q in 0..pairs {
                strip[q * NR + 16 * v..][..16].fill(0);
            }
            continue;
        }
        // Element offsets of the columns' first pairs; lanes past the end repeat the last
        // column and are masked off.
        let offset = |l: usize| ((cols.start + 16 * v + l.min(lanes - 1)) * rhs.col_stride) as i64;
        let low = _mm512_set_epi64(
            offset(7),
            offset(6),
            offset(5),
            offset(4),
            offset(3),
            offset(2),
            offset(1),
            offset(0),
        );
        let high = _mm512_set_epi64(
            offset(15),
            offset(14),
            offset(13),
            offset(12),
            offset(11),
            offset(10),
            offset(9),
            offset(8),
        );
        let mask_low = ((u32::MAX >> (32 - lanes)) & 0xff) as __mmask8;
        let mask_high = ((u32::MAX >> (32 - lanes)) >> 8) as __mmask8;
        for q in 0..whole {
            let base = rhs.data.as_ptr().add(depth.start + 2 * q).cast::<i64>();
            let zero = _mm512_setzero_si512();
            let low = _mm512_mask_i64gather_epi64::<4>(zero, mask_low, low, base);
            let high = _mm512_mask_i64gather_epi64::<4>(zero, mask_high, high, base);
            let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
                _mm512_castsi512_ps(high),
                _mm512_castsi512_ps(low),
            ));
            _mm512_storeu_si512(strip.as_mut_ptr().add(q * NR + 16 * v).cast(), words);
        }
        if whole < pairs {
            // An odd depth: the last pair is the last element and a zero.
            for l in 0..16 {
                let value = if l < lanes {
                    rhs.data[depth.end - 1 + (cols.start + 16 * v + l) * rhs.col_stride]
                } else {
                    0.0
                };
                strip[whole * NR + 16 * v + l] = pair(value, 0.0);
            }
        }
    }
}

/// Consecutive values as pairs: `out[q] = (values[2q], values[2q + 1])`, zero past the end.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_contiguous_pairs(values: &[f32], out: &mut [u32]) {
    for (q, out) in out.chunks_mut(16).enumerate() {
        let start = 32 * q;
        let load = |offset: usize| {
            let lanes = values.len().saturating_sub(start + offset).min(16);
            let mask = (u32::MAX.checked_shr(32 - lanes as u32).unwrap_or(0)) as __mmask16;
            if lanes == 0 {
                _mm512_setzero_ps()
            } else {
                _mm512_maskz_loadu_ps(mask, values.as_ptr().add(start + offset))
            }
        };
        let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(load(16), load(0)));
        let mask = (u32::MAX >> (32 - out.len())) as __mmask16;
        _mm512_mask_storeu_epi32(out.as_mut_ptr().cast(), mask, words);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// `x` after rounding to bfloat16.
    fn rounded(x: f32) -> f32 {
        f32::from_bits(bf16_bits(x) << 16)
    }

    /// The textbook triple loop over the rounded operands, in f64.
    fn expected(lhs: MatRef, rhs: MatRef) -> Vec<f64> {
        let at = |m: &MatRef, i: usize, j: usize| {
            f64::from(rounded(m.data[i * m.row_stride + j * m.col_stride]))
        };
        let mut out = Vec::with_capacity(lhs.rows * rhs.cols);
        for i in 0..lhs.rows {
            for j in 0..rhs.cols {
                out.push((0..lhs.cols).map(|p| at(&lhs, i, p) * at(&rhs, p, j)).sum());
            }
        }
        out
    }

    /// A `rows x cols` view of `data` in one of four layouts.
    fn view(data: &[f32], rows: usize, cols: usize, layout: usize) -> MatRef<'_> {
        match layout {
            0 => MatRef::row_major(data, rows, cols),
            1 => MatRef::row_major(data, cols, rows).t(),
            // Every other element of rows twice as long, and the transpose of that.
            2 => MatRef {
                data,
                rows,
                cols,
                row_stride: 2 * cols,
                col_stride: 2,
            },
            _ => MatRef {
                data,
                rows,
                cols,
                row_stride: 2,
                col_stride: 2 * rows,
            },
        }
    }

    #[test]
    fn products_match_the_rounded_triple_loop() {
        if !available() {
            eprintln!("skipping: this CPU has no AVX512-BF16");
            return;
        }
        // Ragged tiles and strips, an odd depth, depths, heights and widths past one block.
        let shapes = [
            (1, 1, 1),
            (7, 3, 70),
            (13, 600, 65),
            (200, 33, 130),
            (5, 40, 1100),
        ];
        for (m, k, n) in shapes {
            let (a, b) = (values(2 * m * k, 1), values(2 * k * n, 2));
            for (lhs_layout, rhs_layout) in [(0, 0), (1, 1), (0, 1), (2, 3), (3, 2)] {
                let (lhs, rhs) = (view(&a, m, k, lhs_layout), view(&b, k, n, rhs_layout));
                let want = expected(lhs, rhs);
                // SAFETY: the CPU was checked.
                let packed = unsafe { PackedLhs::new(lhs) };
                // Rows of 3 extra elements: the product must leave them alone.
                let stride = n + 3;
                let mut dst = vec![f32::NAN; m * stride];
                let mut twice = vec![0.5f32; m * stride];
                // Rows from 0 and, packed once, from MR on: a thread's share.
                let first = if (lhs_layout + rhs_layout) % 2 == 1 {
                    MR.min(m)
                } else {
                    0
                };
                // SAFETY: the CPU was checked; the views and outputs fit.
                unsafe {
                    let packed = Lhs::Packed {
                        packed: &packed,
                        rows: first..m,
                    };
                    let at = |buffer: &mut Vec<f32>| buffer.as_mut_ptr().add(first * stride);
                    let head = Lhs::View(lhs.rows_range(0..first));
                    product(dst.as_mut_ptr(), stride, head.clone(), rhs, false);
                    product(at(&mut dst), stride, packed.clone(), rhs, false);
                    product(twice.as_mut_ptr(), stride, head, rhs, true);
                    product(at(&mut twice), stride, packed, rhs, true);
                    let mut whole = vec![f32::NAN; m * stride];
                    product(whole.as_mut_ptr(), stride, Lhs::View(lhs), rhs, false);
                    assert_eq!(
                        whole.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        dst.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "packed once or per product, the same sums"
                    );
                }
                for i in 0..m {
                    for j in 0..stride {
                        let (got, sum) = (dst[i * stride + j], twice[i * stride + j]);
                        if j >= n {
                            assert!(got.is_nan() && sum == 0.5, "{m}x{k}x{n} wrote past a row");
                            continue;
                        }
                        let want = want[i * n + j];
                        let tolerance = 1e-5 * k as f64;
                        let case =
                            format!("{m}x{k}x{n}, layouts {lhs_layout}/{rhs_layout}, ({i}, {j})");
                        assert!(
                            (f64::from(got) - want).abs() < tolerance,
                            "{case}: {got} vs {want}"
                        );
                        assert!(
                            (f64::from(sum) - want - 0.5).abs() < tolerance,
                            "{case}: += gave {sum}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        for (x, want) in [
            (1.0f32, 0x3f80),
            (f32::from_bits(0x3f80_8000), 0x3f80),
            (f32::from_bits(0x3f81_8000), 0x3f82),
            (f32::from_bits(0x3f80_8001), 0x3f81),
            (f32::INFINITY, 0x7f80),
            (-2.5, 0xc020),
        ] {
            assert_eq!(bf16_bits(x), want, "{x}");
        }
        assert!(f32::from_bits(bf16_bits(f32::NAN) << 16).is_nan());
    }
}
