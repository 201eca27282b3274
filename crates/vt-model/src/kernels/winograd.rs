//! 3x3 convolutions with stride 1 and padding 1 by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! Each 2x2 output tile comes from a 4x4 input tile: with the weights and the tiles moved
//! into the transform domain, a channel pair costs 16 multiplications per tile instead of
//! 36, and the products for all tiles become 16 independent GEMMs. Most of VT-ResNet's stem
//! is such convolutions, in the forward pass and in the input gradient. The weight gradient
//! uses the dual algorithm F(3x3, 2x2): the output gradient's 2x2 tiles act as filters on
//! the same 4x4 input tiles.

use std::cell::RefCell;

use rayon::prelude::*;

use super::gemm::{matmul, matmul_prepared, LhsPacking, MatRef, PreparedLhs};

/// Transform-domain points per tile: 4x4.
const POINTS: usize = 16;

/// Below this many tiles per call, im2col and one GEMM measured faster: the weight transform
/// is not repaid (batch-1 inference on the smallest maps).
const MIN_TILES: usize = 128;

/// Floats per group of images in the transform domain (16 x channels x tiles), about what a
/// core's L2 cache holds beside the weights.
const GROUP_FLOATS: usize = 1 << 17;

/// Fewest columns (tiles) per product with bfloat16 products: fewer would leave a product
/// too narrow to repay converting its weights (kernels::gemm), as the 14x14 and 7x7 maps of
/// 112 px images do with one or two images per group. vt-resnet18 at 112 px, training batch
/// 32, four alternations: 44.0-48.7 img/s against 41.0-44.6 without it. In f32 it made no
/// difference beyond the noise.
const BF16_MIN_COLUMNS: usize = 256;

/// Images per group: as many as keep the transform domain within GROUP_FLOATS, and with
/// bfloat16 products at least enough for BF16_MIN_COLUMNS columns per product.
fn images_per_group(s: &Shape) -> usize {
    let min_columns = if super::bf16_products_allowed() {
        BF16_MIN_COLUMNS
    } else {
        0
    };
    let widest = s.in_channels.max(s.out_channels);
    (GROUP_FLOATS / (POINTS * widest * s.tiles()))
        .max(min_columns.div_ceil(s.tiles()))
        .clamp(1, s.batch.max(1))
}

/// The shape of a same-size 3x3 convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Shape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Shape {
    /// Whether there are enough tiles to pay for the transforms (see [`MIN_TILES`]).
    pub fn worthwhile(&self) -> bool {
        self.batch * self.tiles() >= MIN_TILES
    }

    fn tiles_h(&self) -> usize {
        self.height.div_ceil(2)
    }

    fn tiles_w(&self) -> usize {
        self.width.div_ceil(2)
    }

    fn tiles(&self) -> usize {
        self.tiles_h() * self.tiles_w()
    }

    fn plane(&self) -> usize {
        self.height * self.width
    }
}

/// `G v` for a 3-vector: the weight transform along one axis.
fn filter_transform([a, b, c]: [f32; 3]) -> [f32; 4] {
    [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
}

/// `U = G g G^T` for every (out, in) pair of 3x3 kernels, as `u[(out * 16 + point) * in +
/// in_channel]`: for each point an `out x in` matrix with row stride `16 * in`. With `flip`,
/// the weights of the input gradient instead: the kernels rotated by 180 degrees with input
/// and output channels swapped.
fn transform_weights(
    weight: &[f32],
    out_channels: usize,
    in_channels: usize,
    flip: bool,
) -> Vec<f32> {
    let (rows, cols) = if flip {
        (in_channels, out_channels)
    } else {
        (out_channels, in_channels)
    };
    let mut u = vec![0.0; POINTS * rows * cols];
    u.par_chunks_mut(POINTS * cols)
        .enumerate()
        .for_each(|(r, u)| {
            for c in 0..cols {
                let (o, i) = if flip { (c, r) } else { (r, c) };
                let k = &weight[(o * in_channels + i) * 9..][..9];
                let g = |y: usize, x: usize| {
                    if flip {
                        k[(2 - y) * 3 + 2 - x]
                    } else {
                        k[y * 3 + x]
                    }
                };
                // G g, column by column: 4x3.
                let columns: [[f32; 4]; 3] =
                    std::array::from_fn(|x| filter_transform([g(0, x), g(1, x), g(2, x)]));
                for y in 0..4 {
                    let row = filter_transform([columns[0][y], columns[1][y], columns[2][y]]);
                    for (x, v) in row.into_iter().enumerate() {
                        u[(y * 4 + x) * cols + c] = v;
                    }
                }
            }
        });
    u
}

/// Weights transformed by [`transform_weights`], each point's matrix packed once for all
/// the products that use it (see `LhsPacking`).
pub(super) struct Weights {
    u: Vec<f32>,
    rows: usize,
    cols: usize,
    packings: Vec<LhsPacking>,
}

impl Weights {
    /// The transformed `weight` (out x in x 3 x 3), or with `flip` the input gradient's.
    pub fn new(weight: &[f32], out_channels: usize, in_channels: usize, flip: bool) -> Self {
        let (rows, cols) = if flip {
            (in_channels, out_channels)
        } else {
            (out_channels, in_channels)
        };
        let u = transform_weights(weight, out_channels, in_channels, flip);
        let packings = (0..POINTS)
            .into_par_iter()
            .map(|p| LhsPacking::new(point_view(&u, p, rows, cols)))
            .collect();
        Weights {
            u,
            rows,
            cols,
            packings,
        }
    }

    fn point(&self, p: usize) -> PreparedLhs<'_> {
        let view = point_view(&self.u, p, self.rows, self.cols);
        PreparedLhs::new(view, &self.packings[p])
    }
}

/// Point p's `rows x cols` matrix of transformed weights `u`.
fn point_view(u: &[f32], p: usize, rows: usize, cols: usize) -> MatRef<'_> {
    MatRef {
        data: &u[p * cols..],
        rows,
        cols,
        row_stride: POINTS * cols,
        col_stride: 1,
    }
}

/// Transforms channel planes into the transform domain, `B^T d B` for every 4x4 input tile
/// d: `planes` yields each image's plane of one channel, and tile `column` (image-major,
/// then row-major tiles) of point `p` goes to `points[p][column]`.
///
/// Works a row of tiles at a time with each input row split into its even and odd padded
/// columns, so that every loop runs over contiguous memory and vectorises.
fn transform_planes<'a>(
    s: &Shape,
    planes: impl Iterator<Item = &'a [f32]>,
    points: &mut [&mut [f32]],
) {
    let (th, tw, w) = (s.tiles_h(), s.tiles_w(), s.width);
    // Tile tx reads padded columns 2tx .. 2tx+3, input columns 2tx-1 .. 2tx+2: evens hold
    // input columns 2t-1, odds 2t, for t in 0..=tw.
    let half = tw + 1;
    let mut rows = vec![0.0; 8 * half];
    for (image, plane) in planes.enumerate() {
        for ty in 0..th {
            // Input rows 2ty-1 .. 2ty+2, zero outside the image; then B^T along y, in place.
            for (dy, row) in rows.chunks_exact_mut(2 * half).enumerate() {
                let (even, odd) = row.split_at_mut(half);
                even.fill(0.0);
                odd.fill(0.0);
                if let Some(y) = (2 * ty + dy).checked_sub(1).filter(|&y| y < s.height) {
                    let pairs = plane[y * w..(y + 1) * w].chunks_exact(2);
                    if let [last] = pairs.remainder() {
                        odd[w / 2] = *last;
                    }
                    for ((pair, odd), even) in pairs.zip(odd.iter_mut()).zip(&mut even[1..]) {
                        *odd = pair[0];
                        *even = pair[1];
                    }
                }
            }
            let (d0, rest) = rows.split_at_mut(2 * half);
            let (d1, rest) = rest.split_at_mut(2 * half);
            let (d2, d3) = rest.split_at_mut(2 * half);
            for x in 0..2 * half {
                let (a, b, c, d) = (d0[x], d1[x], d2[x], d3[x]);
                d0[x] = a - c;
                d1[x] = b + c;
                d2[x] = c - b;
                d3[x] = b - d;
            }
            // Then B along x, tile by tile, into 16 contiguous runs.
            let base = (image * th + ty) * tw;
            for (u, row) in rows.chunks_exact(2 * half).zip(points.chunks_exact_mut(4)) {
                let (even, odd) = u.split_at(half);
                let [v0, v1, v2, v3] = row else {
                    unreachable!("chunks of four")
                };
                let (v0, v1) = (&mut v0[base..base + tw], &mut v1[base..base + tw]);
                let (v2, v3) = (&mut v2[base..base + tw], &mut v3[base..base + tw]);
                let (e0, e1, o0, o1) = (&even[..tw], &even[1..], &odd[..tw], &odd[1..]);
                for t in 0..tw {
                    v0[t] = e0[t] - e1[t];
                    v1[t] = o0[t] + e1[t];
                    v2[t] = e1[t] - o0[t];
                    v3[t] = o0[t] - o1[t];
                }
            }
        }
    }
}

/// Output plane `out` of one channel of image `image`, `A^T m A` for every tile, from the
/// transform-domain products of that channel: `m(p)` is point p's row over all columns.
fn untransform_plane<'a>(s: &Shape, image: usize, m: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
    let (th, tw, w) = (s.tiles_h(), s.tiles_w(), s.width);
    // A^T along y: two rows of 4 points per tile.
    let mut a = vec![0.0; 8 * tw];
    let mut row = vec![0.0; 2 * tw];
    for ty in 0..th {
        let base = (image * th + ty) * tw;
        let point = |i: usize, j: usize| &m(i * 4 + j)[base..base + tw];
        for (j, pair) in a.chunks_exact_mut(2 * tw).enumerate() {
            let (top, bottom) = pair.split_at_mut(tw);
            let (m0, m1, m2, m3) = (point(0, j), point(1, j), point(2, j), point(3, j));
            for tx in 0..tw {
                top[tx] = m0[tx] + m1[tx] + m2[tx];
                bottom[tx] = m1[tx] - m2[tx] - m3[tx];
            }
        }
        // Then A along x into two output rows.
        for r in 0..2 {
            let y = 2 * ty + r;
            if y >= s.height {
                break;
            }
            let at = |j: usize| &a[(j * 2 + r) * tw..][..tw];
            let (s0, s1, s2, s3) = (at(0), at(1), at(2), at(3));
            for (tx, pair) in row.chunks_exact_mut(2).enumerate() {
                pair[0] = s0[tx] + s1[tx] + s2[tx];
                pair[1] = s1[tx] - s2[tx] - s3[tx];
            }
            out[y * w..(y + 1) * w].copy_from_slice(&row[..w]);
        }
    }
}

thread_local! {
    /// Each thread's transform-domain buffers (the convolution's input and products, or the
    /// weight gradient's input and output gradient), kept between groups and calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The convolution of `input` (batch x in x height x width) with `weights`, padding 1:
/// batch x out x height x width. `finish(channel, plane)` runs on each output plane while it
/// is still in cache.
///
/// Images go in groups small enough for a group's transformed input and products to stay
/// in a core's cache: each thread takes whole groups when there are enough of them, else
/// the threads share the work inside each group.
pub(super) fn conv3x3(
    s: &Shape,
    input: &[f32],
    weights: &Weights,
    finish: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    assert!(
        (weights.rows, weights.cols) == (s.out_channels, s.in_channels),
        "winograd: weights of {} x {} channels for a {} x {} convolution",
        weights.rows,
        weights.cols,
        s.out_channels,
        s.in_channels
    );
    let per_group = images_per_group(s);
    let out_image = s.out_channels * s.plane();
    let mut out = vec![0.0; s.batch * out_image];
    let run = |(group, out_group): (usize, &mut [f32])| {
        // Taken out of the cell meanwhile: rayon may run another group on this thread
        // while this one waits inside a parallel loop.
        let mut scratch = SCRATCH.take();
        conv_group(
            s,
            input,
            weights,
            &finish,
            group * per_group,
            out_group,
            &mut scratch,
        );
        SCRATCH.set(scratch);
    };
    if s.batch.div_ceil(per_group) >= super::threads() {
        out.par_chunks_mut(per_group * out_image)
            .enumerate()
            .for_each(run);
    } else {
        out.chunks_mut(per_group * out_image)
            .enumerate()
            .for_each(run);
    }
    out
}

/// Fills `v` as `[point][channel][column]`, a row-major `channels x columns` matrix per
/// point: `transform(c, rows)` writes channel c's 16 rows, every element of them. Channels
/// run in parallel.
fn transform_group(
    channels: usize,
    columns: usize,
    v: &mut Vec<f32>,
    transform: impl Fn(usize, &mut [&mut [f32]]) + Sync,
) {
    v.resize(POINTS * channels * columns, 0.0);
    let mut channel_rows: Vec<Vec<&mut [f32]>> =
        (0..channels).map(|_| Vec::with_capacity(POINTS)).collect();
    for point in v[..POINTS * channels * columns].chunks_mut(channels * columns) {
        for (rows, row) in channel_rows.iter_mut().zip(point.chunks_mut(columns)) {
            rows.push(row);
        }
    }
    channel_rows
        .into_par_iter()
        .enumerate()
        .for_each(|(c, mut rows)| transform(c, &mut rows));
}

/// Channel `c`'s plane in each image of `images`, from `data` (batch x channels x plane).
fn channel_planes(
    data: &[f32],
    (channels, plane): (usize, usize),
    images: std::ops::Range<usize>,
    c: usize,
) -> impl Iterator<Item = &[f32]> {
    images.map(move |n| &data[(n * channels + c) * plane..][..plane])
}

/// [`conv3x3`] for the images from `first` on that fill `out`, with `(v, m)` as room for
/// the transformed input and the products.
fn conv_group(
    s: &Shape,
    input: &[f32],
    weights: &Weights,
    finish: &(impl Fn(usize, &mut [f32]) + Sync),
    first: usize,
    out: &mut [f32],
    (v, m): &mut (Vec<f32>, Vec<f32>),
) {
    let out_image = s.out_channels * s.plane();
    let images = out.len() / out_image;
    let columns = images * s.tiles();
    transform_group(s.in_channels, columns, v, |c, rows| {
        let planes = channel_planes(input, (s.in_channels, s.plane()), first..first + images, c);
        transform_planes(s, planes, rows);
    });
    let v = &v[..POINTS * s.in_channels * columns];
    // m: [point][out channel][column], one single-threaded product per point.
    m.resize(POINTS * s.out_channels * columns, 0.0);
    m[..POINTS * s.out_channels * columns]
        .par_chunks_mut(s.out_channels * columns)
        .enumerate()
        .for_each(|(p, m)| {
            let rhs = MatRef::row_major(
                &v[p * s.in_channels * columns..][..s.in_channels * columns],
                s.in_channels,
                columns,
            );
            matmul_prepared(m, &weights.point(p), rhs, false, 1);
        });
    let m = &m[..POINTS * s.out_channels * columns];
    out.par_chunks_mut(s.plane())
        .enumerate()
        .for_each(|(i, plane)| {
            let (image, k) = (i / s.out_channels, i % s.out_channels);
            let run = |p: usize| &m[(p * s.out_channels + k) * columns..][..columns];
            untransform_plane(s, image, run, plane);
            finish(k, plane);
        });
}

/// `G h G^T` of every 2x2 tile h of the output gradient, `G = [1 0; 1/2 1/2; 1/2 -1/2; 0 1]`:
/// like [`transform_planes`], for the weight gradient's F(3x3, 2x2).
fn transform_grad_planes<'a>(
    s: &Shape,
    planes: impl Iterator<Item = &'a [f32]>,
    points: &mut [&mut [f32]],
) {
    let (th, tw, w) = (s.tiles_h(), s.tiles_w(), s.width);
    // Rows padded with zeros to whole tiles.
    let padded = 2 * tw;
    let mut h = vec![0.0; 2 * padded];
    let mut u = vec![0.0; 4 * padded];
    for (image, plane) in planes.enumerate() {
        for ty in 0..th {
            for (dy, row) in h.chunks_exact_mut(padded).enumerate() {
                row.fill(0.0);
                let y = 2 * ty + dy;
                if y < s.height {
                    row[..w].copy_from_slice(&plane[y * w..(y + 1) * w]);
                }
            }
            // G h, along y.
            let (h0, h1) = h.split_at(padded);
            let (u0, rest) = u.split_at_mut(padded);
            let (u1, rest) = rest.split_at_mut(padded);
            let (u2, u3) = rest.split_at_mut(padded);
            for x in 0..padded {
                u0[x] = h0[x];
                u1[x] = 0.5 * (h0[x] + h1[x]);
                u2[x] = 0.5 * (h0[x] - h1[x]);
                u3[x] = h1[x];
            }
            // Then G^T along x.
            let base = (image * th + ty) * tw;
            for (u, row) in u.chunks_exact(padded).zip(points.chunks_exact_mut(4)) {
                let [v0, v1, v2, v3] = row else {
                    unreachable!("chunks of four")
                };
                let runs = v0[base..base + tw]
                    .iter_mut()
                    .zip(&mut v1[base..base + tw])
                    .zip(&mut v2[base..base + tw])
                    .zip(&mut v3[base..base + tw]);
                for (tx, (((v0, v1), v2), v3)) in runs.enumerate() {
                    let (a, b) = (u[2 * tx], u[2 * tx + 1]);
                    *v0 = a;
                    *v1 = 0.5 * (a + b);
                    *v2 = 0.5 * (a - b);
                    *v3 = b;
                }
            }
        }
    }
}

/// dL/dW (out x in x 3 x 3) of the convolution [`conv3x3`] computes, from its input and
/// the output gradient `grad_out` (batch x out x height x width).
///
/// Per 2x2 output tile h and its 4x4 input tile d, F(3x3, 2x2) gives the tile's 3x3
/// contribution as `A^T [(G h G^T) . (B^T d B)] A`; summed over tiles, the products become
/// 16 GEMMs accumulated over groups of images. The input tiles are transformed with the
/// forward pass's B, whose last row is the negative of F(3x3, 2x2)'s: `A` absorbs the sign.
pub(super) fn weight_grad3x3(s: &Shape, input: &[f32], grad_out: &[f32]) -> Vec<f32> {
    let per_group = images_per_group(s);
    let (outs, ins) = (s.out_channels, s.in_channels);
    // Transform-domain sums: [point][out][in].
    let mut sums = vec![0.0; POINTS * outs * ins];
    // The forward pass's per-thread buffers: transformed input and output gradient.
    let mut scratch = SCRATCH.take();
    let (v, d) = &mut scratch;
    for first in (0..s.batch).step_by(per_group) {
        let images = first..(first + per_group).min(s.batch);
        let columns = images.len() * s.tiles();
        transform_group(ins, columns, v, |c, rows| {
            let planes = channel_planes(input, (ins, s.plane()), images.clone(), c);
            transform_planes(s, planes, rows);
        });
        transform_group(outs, columns, d, |k, rows| {
            let planes = channel_planes(grad_out, (outs, s.plane()), images.clone(), k);
            transform_grad_planes(s, planes, rows);
        });
        let (v, d) = (&v[..POINTS * ins * columns], &d[..POINTS * outs * columns]);
        sums.par_chunks_mut(outs * ins)
            .enumerate()
            .for_each(|(p, sum)| {
                let grad =
                    MatRef::row_major(&d[p * outs * columns..][..outs * columns], outs, columns);
                let tiles =
                    MatRef::row_major(&v[p * ins * columns..][..ins * columns], ins, columns);
                matmul(sum, grad, tiles.t(), true, 1);
            });
    }
    SCRATCH.set(scratch);
    // A^T m A per (out, in) pair, A^T = [1 1 1 0; 0 1 -1 0; 0 1 1 -1] with the sign folded in.
    let along = |m: [f32; 4]| [m[0] + m[1] + m[2], m[1] - m[2], m[1] + m[2] - m[3]];
    let mut grad = vec![0.0; outs * ins * 9];
    grad.par_chunks_mut(ins * 9)
        .enumerate()
        .for_each(|(k, grad)| {
            for (c, kernel) in grad.chunks_exact_mut(9).enumerate() {
                let m = |i: usize, j: usize| sums[((i * 4 + j) * outs + k) * ins + c];
                let columns: [[f32; 3]; 4] =
                    std::array::from_fn(|j| along([m(0, j), m(1, j), m(2, j), m(3, j)]));
                for y in 0..3 {
                    let row = along([columns[0][y], columns[1][y], columns[2][y], columns[3][y]]);
                    kernel[y * 3..y * 3 + 3].copy_from_slice(&row);
                }
            }
        });
    grad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_rel;
    use candle_core::{DType, Device, Tensor};

    fn random(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn run(input: &Tensor, weight: &Tensor, flip: bool) -> Tensor {
        let (batch, in_channels, height, width) = input.dims4().unwrap();
        let (o, i, _, _) = weight.dims4().unwrap();
        let out_channels = if flip { i } else { o };
        let shape = Shape {
            batch,
            in_channels,
            out_channels,
            height,
            width,
        };
        let w = weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let weights = Weights::new(&w, o, i, flip);
        let x = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = conv3x3(&shape, &x, &weights, |_, _| {});
        Tensor::from_vec(y, (batch, out_channels, height, width), &Device::Cpu).unwrap()
    }

    const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
        // batch, in, out, height, width
        (1, 3, 5, 7, 5),
        (2, 4, 3, 1, 1),
        (3, 2, 6, 2, 3),
        (1, 16, 8, 10, 10),
        (5, 8, 8, 9, 6),
        (40, 2, 3, 4, 4),
        // Two images per group: three groups.
        (5, 64, 64, 15, 16),
    ];

    #[test]
    fn forward_matches_candle_on_odd_and_even_sizes() {
        for &(n, c, k, h, w) in &SHAPES {
            let x = random(&[n, c, h, w]);
            let weight = random(&[k, c, 3, 3]);
            let expected = x.conv2d(&weight, 1, 1, 1, 1).unwrap();
            let err = max_rel(&run(&x, &weight, false), &expected);
            assert!(err < 1e-5, "{n}x{c}x{h}x{w} -> {k}: relative error {err}");
        }
    }

    #[test]
    fn weight_gradient_matches_candle() {
        for &(n, c, k, h, w) in &SHAPES {
            let x = random(&[n, c, h, w]).to_dtype(DType::F64).unwrap();
            let weight = random(&[k, c, 3, 3]).to_dtype(DType::F64).unwrap();
            let dy = random(&[n, k, h, w]);
            // The reference: d/dW of sum(y * dy), by candle's autograd in f64.
            let weight = candle_core::Var::from_tensor(&weight).unwrap();
            let y = x.conv2d(&weight, 1, 1, 1, 1).unwrap();
            let loss = (y * dy.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let expected = loss
                .backward()
                .unwrap()
                .get(&weight)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let shape = Shape {
                batch: n,
                in_channels: c,
                out_channels: k,
                height: h,
                width: w,
            };
            let flat = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let ours = weight_grad3x3(&shape, &flat(&x), &flat(&dy));
            let ours = Tensor::from_vec(ours, (k, c, 3, 3), &Device::Cpu).unwrap();
            let err = max_rel(&ours, &expected);
            assert!(err < 1e-5, "{n}x{c}x{h}x{w} -> {k}: relative error {err}");
        }
    }

    #[test]
    fn flipped_weights_give_the_input_gradient() {
        for &(n, c, k, h, w) in &SHAPES {
            let dy = random(&[n, k, h, w]);
            let weight = random(&[k, c, 3, 3]);
            let expected = dy.conv_transpose2d(&weight, 1, 0, 1, 1).unwrap();
            let err = max_rel(&run(&dy, &weight, true), &expected);
            assert!(err < 1e-5, "{n}x{k}x{h}x{w} -> {c}: relative error {err}");
        }
    }
}
