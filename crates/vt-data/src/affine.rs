//! Inverse affine maps (`RandomRotation`'s, torchvision's `F.affine`, PIL's `Image.rotate`)
//! and PIL's bilinear warp, for TrivialAugmentWide's shear, translate and rotate operations
//! (bilinear, as torchvision's reference recipe asks for).

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

    /// PIL's `Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=0)` onto an image
    /// of the same size (`ImagingGenericTransform` with `bilinear_filter32RGB`): each output
    /// pixel centre mapped in floating point, black where it falls outside the source, else
    /// the two-by-two blend of the source pixels around it (edges clamped), in PIL's order
    /// of operations and truncated to 8 bits as PIL does.
    pub(crate) fn warp_bilinear(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let mut out = RgbImage::new(w, h);
        if w == 0 || h == 0 {
            return out;
        }
        let (wf, hf) = (f64::from(w), f64::from(h));
        let (w, h) = (w as usize, h as usize);
        let src = img.as_raw();
        let at = |x: i64, y: usize, c: usize| {
            f64::from(src[(y * w + x.clamp(0, w as i64 - 1) as usize) * 3 + c])
        };
        let lerp = |a: f64, b: f64, d: f64| a + (b - a) * d;
        for (y, row) in out.chunks_exact_mut(w * 3).enumerate() {
            for (x, px) in row.chunks_exact_mut(3).enumerate() {
                let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
                let xin = self.a * xo + self.b * yo + self.c;
                let yin = self.d * xo + self.e * yo + self.f;
                if !(0.0..wf).contains(&xin) || !(0.0..hf).contains(&yin) {
                    continue;
                }
                let (xin, yin) = (xin - 0.5, yin - 0.5);
                let (x0, y0) = (xin.floor(), yin.floor());
                let (dx, dy) = (xin - x0, yin - y0);
                let (x0, y0) = (x0 as i64, y0 as i64);
                let top = y0.clamp(0, h as i64 - 1) as usize;
                // Past the last row, PIL blends the row above with itself.
                let below = usize::try_from(y0 + 1).ok().filter(|&b| b < h);
                for (c, value) in px.iter_mut().enumerate() {
                    let upper = lerp(at(x0, top, c), at(x0 + 1, top, c), dx);
                    let lower = below.map_or(upper, |b| lerp(at(x0, b, c), at(x0 + 1, b, c), dx));
                    *value = lerp(upper, lower, dy) as u8;
                }
            }
        }
        out
    }
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

    /// PIL's own answers (Pillow 13, `Image.transform(..., BILINEAR)`) for a row shifted by
    /// fractions of a pixel: blends truncated, black once the centre leaves the image.
    #[test]
    fn bilinear_blends_neighbours_and_truncates_as_pil() {
        let row = RgbImage::from_fn(4, 1, |x, _| Rgb([[0, 255, 100, 0][x as usize]; 3]));
        for (shift, expected) in [
            (0.5, [127, 177, 50, 0]),
            (0.25, [63, 216, 75, 0]),
            (0.7, [178, 146, 29, 0]),
        ] {
            let warp = InverseAffine {
                a: 1.0,
                b: 0.0,
                c: shift,
                d: 0.0,
                e: 1.0,
                f: 0.0,
            };
            let out: Vec<u8> = warp.warp_bilinear(&row).pixels().map(|p| p[0]).collect();
            assert_eq!(out, expected, "shift {shift}");
        }
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
        let out = m.warp_bilinear(&img);
        for (x, y, px) in out.enumerate_pixels() {
            let (sx, sy) = (i64::from(x) - 2, i64::from(y) + 1);
            if sx < 0 || sy >= 4 {
                assert_eq!(px.0, [0, 0, 0], "({x}, {y})");
            } else {
                assert_eq!(px, img.get_pixel(sx as u32, sy as u32), "({x}, {y})");
            }
        }
        // PIL turns a square a quarter by transposing; the warp agrees (no blending: every
        // centre maps onto a centre).
        let square = numbered(5, 5);
        let turned = InverseAffine::pil_rotation(5, 5, 90.0).warp_bilinear(&square);
        assert_eq!(turned, image::imageops::rotate270(&square));
        let turned = InverseAffine::pil_rotation(5, 5, -90.0).warp_bilinear(&square);
        assert_eq!(turned, image::imageops::rotate90(&square));
    }

    #[test]
    fn the_identity_copies_and_far_shifts_leave_black() {
        let img = numbered(7, 3);
        let id = InverseAffine::torchvision((0.0, 0.0), 0.0, (0.0, 0.0), 1.0, (0.0, 0.0));
        assert_eq!(id.warp_bilinear(&img), img);
        // Far outside the image: all black.
        let far = InverseAffine {
            a: 1.0,
            b: 0.5,
            c: 1e6,
            d: 0.0,
            e: 1.0,
            f: 0.0,
        };
        assert!(far.warp_bilinear(&img).pixels().all(|p| p.0 == [0, 0, 0]));
    }
}
