//! Inverse affine maps and PIL's nearest-neighbour warp, shared by `RandomRotation` and
//! TrivialAugmentWide's shear, translate and rotate operations.

use image::RgbImage;

/// An inverse affine map, output pixel to source point, as PIL's
/// `Image.transform(size, AFFINE, (a, b, c, d, e, f))` takes it:
/// `x_in = a x + b y + c`, `y_in = d x + e y + f`, at output pixel centres.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct InverseAffine {
    pub a: f64,
    pub b: f64,
    pub c: f64,
    pub d: f64,
    pub e: f64,
    pub f: f64,
}

impl InverseAffine {
    /// `RandomRotation`'s geometry without expansion: a counter-clockwise turn by the angle
    /// about the image centre. The fused training pass maps pixel centres through it
    /// directly; its numbers must not change (training runs replay them).
    pub(crate) fn rotation(width: u32, height: u32, angle_deg: f32) -> InverseAffine {
        let (cx, cy) = (f64::from(width) / 2.0, f64::from(height) / 2.0);
        let t = -f64::from(angle_deg).to_radians();
        let (a, b, d, e) = (t.cos(), t.sin(), -t.sin(), t.cos());
        InverseAffine {
            a,
            b,
            c: a * -cx + b * -cy + cx,
            d,
            e,
            f: d * -cx + e * -cy + cy,
        }
    }

    /// The matrix of PIL's `Image.rotate(angle)` (no expansion, default centre), with its
    /// reduction modulo 360 (Python's `%` equals `rem_euclid` for a positive divisor) and
    /// its coefficients rounded to 15 decimals, so that warping with it finds PIL's source
    /// pixels exactly.
    pub(crate) fn pil_rotation(width: u32, height: u32, angle_deg: f64) -> InverseAffine {
        let (cx, cy) = (f64::from(width) / 2.0, f64::from(height) / 2.0);
        let t = -angle_deg.rem_euclid(360.0).to_radians();
        let (cos, sin) = (round15(t.cos()), round15(t.sin()));
        let (a, b, d, e) = (cos, sin, round15(-t.sin()), cos);
        InverseAffine {
            a,
            b,
            c: a * -cx + b * -cy + cx,
            d,
            e,
            f: d * -cx + e * -cy + cy,
        }
    }

    /// torchvision's `_get_inverse_affine_matrix(center, angle, translate, scale, shear)`,
    /// operation for operation (angles in degrees), as `F.affine` builds it for PIL.
    pub(crate) fn torchvision(
        center: (f64, f64),
        angle: f64,
        translate: (f64, f64),
        scale: f64,
        shear: (f64, f64),
    ) -> InverseAffine {
        let rot = angle.to_radians();
        let (sx, sy) = (shear.0.to_radians(), shear.1.to_radians());
        let (cx, cy) = center;
        let (tx, ty) = translate;
        // Rotation times shear, without scaling.
        let a = (rot - sy).cos() / sy.cos();
        let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
        let c = (rot - sy).sin() / sy.cos();
        let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
        // Its inverse (determinant 1) with the scale, then the centre and translation.
        let m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0];
        let m2 = m[2] + (m[0] * (-cx - tx) + m[1] * (-cy - ty));
        let m5 = m[5] + (m[3] * (-cx - tx) + m[4] * (-cy - ty));
        InverseAffine {
            a: m[0],
            b: m[1],
            c: m2 + cx,
            d: m[3],
            e: m[4],
            f: m5 + cy,
        }
    }

    /// The source point of output pixel (x, y), mapped at its centre (the tests' reference;
    /// the fused pass steps the same arithmetic along each row).
    #[cfg(test)]
    pub(crate) fn source(&self, x: f64, y: f64) -> (f64, f64) {
        let (xo, yo) = (x + 0.5, y + 0.5);
        (
            self.a * xo + self.b * yo + self.c,
            self.d * xo + self.e * yo + self.f,
        )
    }

    /// PIL's `Image.transform(size, AFFINE, matrix, NEAREST, fillcolor=0)` onto an image of
    /// the same size: black where the source point falls outside. PIL's three code paths
    /// (`ImagingTransformAffine`) round differently, so each is followed: a pure scale or
    /// translation steps in floating point, anything else in 16.16 fixed point when it fits.
    pub(crate) fn warp_nearest(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let mut out = RgbImage::new(w, h);
        let src = img.as_raw();
        let (w, h) = (w as usize, h as usize);
        let dst = &mut *out;
        let mut copy = |x: usize, y: usize, xin: i64, yin: i64| {
            if xin >= 0 && yin >= 0 && (xin as usize) < w && (yin as usize) < h {
                let from = (yin as usize * w + xin as usize) * 3;
                let to = (y * w + x) * 3;
                dst[to..to + 3].copy_from_slice(&src[from..from + 3]);
            }
        };
        let a = [self.a, self.b, self.c, self.d, self.e, self.f];
        if a[1] == 0.0 && a[3] == 0.0 {
            // ImagingScaleAffine.
            let mut yo = a[5] + a[4] * 0.5;
            for y in 0..h {
                let mut xo = a[2] + a[0] * 0.5;
                let yin = coord(yo);
                for x in 0..w {
                    copy(x, y, coord(xo), yin);
                    xo += a[0];
                }
                yo += a[4];
            }
        } else if [(0, 0), (w, h), (0, h), (w, 0)]
            .iter()
            .all(|&(x, y)| fits_fixed(&a, x as f64, y as f64))
        {
            // affine_fixed: 16.16 fixed point, stepped.
            let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i32;
            let (a0, a1, a3, a4) = (fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4]));
            let mut xo = fix(a[2] + a[0] * 0.5 + a[1] * 0.5);
            let mut yo = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
            for y in 0..h {
                let (mut xx, mut yy) = (xo, yo);
                for x in 0..w {
                    copy(x, y, i64::from(xx >> 16), i64::from(yy >> 16));
                    xx = xx.wrapping_add(a0);
                    yy = yy.wrapping_add(a3);
                }
                xo = xo.wrapping_add(a1);
                yo = yo.wrapping_add(a4);
            }
        } else {
            // Floating point, stepped (only for shifts past +-32768 pixels).
            let mut xo = a[2] + a[1] * 0.5 + a[0] * 0.5;
            let mut yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
            for y in 0..h {
                let (mut xx, mut yy) = (xo, yo);
                for x in 0..w {
                    copy(x, y, coord(xx), coord(yy));
                    xx += a[0];
                    yy += a[3];
                }
                xo += a[1];
                yo += a[4];
            }
        }
        out
    }
}

/// PIL's `COORD`: truncation, with everything left of 0 mapped to -1.
fn coord(v: f64) -> i64 {
    if v < 0.0 {
        -1
    } else {
        v as i64
    }
}

/// PIL's `check_fixed`: whether a corner maps within the 16.16 fixed-point range.
fn fits_fixed(a: &[f64; 6], x: f64, y: f64) -> bool {
    (x * a[0] + y * a[1] + a[2]).abs() < 32768.0 && (x * a[3] + y * a[4] + a[5]).abs() < 32768.0
}

/// Python's `round(x, 15)`: correctly rounded to 15 decimals. Rust's formatting rounds the
/// exact binary value too, and parsing back gives the nearest double, as CPython does.
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn numbered(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, (x * 16 + y) as u8]))
    }

    #[test]
    fn python_rounding() {
        assert_eq!(round15(std::f64::consts::FRAC_PI_2.cos()), 0.0);
        assert_eq!(round15(0.123_456_789_012_345_67), 0.123_456_789_012_346);
        assert_eq!(round15(-1.0), -1.0);
    }

    #[test]
    fn integer_translation_and_quarter_turns_move_whole_pixels() {
        let img = numbered(6, 4);
        // torchvision's translate (2, -1): the content moves right 2 and up 1.
        let m = InverseAffine::torchvision((3.0, 2.0), 0.0, (2.0, -1.0), 1.0, (0.0, 0.0));
        let out = m.warp_nearest(&img);
        for (x, y, px) in out.enumerate_pixels() {
            let (sx, sy) = (i64::from(x) - 2, i64::from(y) + 1);
            if sx < 0 || sy >= 4 {
                assert_eq!(px.0, [0, 0, 0], "({x}, {y})");
            } else {
                assert_eq!(px, img.get_pixel(sx as u32, sy as u32), "({x}, {y})");
            }
        }
        // PIL turns a square a quarter by transposing; the fixed-point warp agrees.
        let square = numbered(5, 5);
        let turned = InverseAffine::pil_rotation(5, 5, 90.0).warp_nearest(&square);
        assert_eq!(turned, image::imageops::rotate270(&square));
        let turned = InverseAffine::pil_rotation(5, 5, -90.0).warp_nearest(&square);
        assert_eq!(turned, image::imageops::rotate90(&square));
    }

    #[test]
    fn the_identity_copies_and_far_shifts_leave_black() {
        let img = numbered(7, 3);
        let id = InverseAffine::torchvision((0.0, 0.0), 0.0, (0.0, 0.0), 1.0, (0.0, 0.0));
        assert_eq!(id.warp_nearest(&img), img);
        // Past the fixed-point range: the floating-point path, all outside.
        let far = InverseAffine {
            a: 1.0,
            b: 0.5,
            c: 1e6,
            d: 0.0,
            e: 1.0,
            f: 0.0,
        };
        assert!(far.warp_nearest(&img).pixels().all(|p| p.0 == [0, 0, 0]));
    }
}
