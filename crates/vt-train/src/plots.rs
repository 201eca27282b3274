//! PNG plots of a run: the loss and accuracy curves and a confusion matrix (with, for
//! `vt-train eval`, the reliability diagram of its confidences); and the loss
//! against the learning rate of `vt-train lr-find`. Text needs a
//! TrueType font registered at runtime (plotters' ab_glyph backend bundles none): `VT_FONT`
//! or a common system font. Without one the plots are drawn without text and a warning is
//! logged once, since a plot without labels still shows the trend.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::calibration::Calibration;
use crate::error::{Result, TrainError};
use crate::lr_find::LrFindReport;
use crate::metrics::{stage_bytes, ConfusionMatrix, EpochRecord, Staged};

pub const CURVES_PNG: &str = "curves.png";
pub const CONFUSION_PNG: &str = "confusion.png";

pub(crate) const FONT: &str = "sans-serif";
const FONT_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a font once per process; false when none could be loaded.
fn text_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let from_env = std::env::var_os("VT_FONT").map(PathBuf::from);
        let candidates = from_env
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in candidates {
            let Ok(bytes) = fs::read(&path) else { continue };
            // plotters keeps fonts for the whole process: leaking the one copy is intended.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        tracing::warn!(
            "no TrueType font found (set VT_FONT=/path/to/font.ttf): plots are drawn without text"
        );
        false
    })
}

pub(crate) fn plot_error(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Draws into a temporary sibling and renames it over `path`.
pub(crate) fn draw_atomically(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>, bool) -> Result<()>,
) -> Result<()> {
    draw_staged(path, size, draw)?.commit()
}

/// [`draw_atomically`]'s picture, [`stage`](crate::metrics::stage)d. Drawn in memory and
/// encoded here, so that a failed write reads as the file's I/O error.
pub(crate) fn draw_staged(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>, bool) -> Result<()>,
) -> Result<Staged> {
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
        draw(&root, text_available())?;
        root.present().map_err(|e| plot_error(path, e))?;
    }
    let mut png = Vec::new();
    image::RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| plot_error(path, "the drawing's pixels do not fill the picture"))?
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| plot_error(path, e))?;
    stage_bytes(path, ".png", &png)
}

struct Curve<'a> {
    label: &'a str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    path: &Path,
    title: &str,
    curves: &[Curve],
    y_floor_zero: bool,
    text: bool,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| plot_error(path, e);
    let all = curves.iter().flat_map(|c| c.points.iter());
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (mut y_min, mut y_max) = all
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
            (lo.min(y), hi.max(y))
        });
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_floor_zero {
        y_min = y_min.min(0.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(title, (FONT, 20))
            .x_label_area_size(32)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d(0.5..x_max + 0.5, (y_min - pad)..(y_max + pad))
        .map_err(|e| err(&e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("epoch")
            .label_style((FONT, 13))
            .x_label_formatter(&|x| {
                if x.fract() == 0.0 {
                    format!("{x:.0}")
                } else {
                    String::new()
                }
            });
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(&e))?;
    for curve in curves {
        let color = curve.color;
        let points: Vec<(f64, f64)> = curve
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        let series = chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if text {
            series.label(curve.label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    if text {
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight).map_err(|e| err(&e))?;
    }
    Ok(())
}

/// The series' legend, in a corner.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    corner: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(corner)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// `curves.png`: loss (train, validation) and accuracy (train, validation) per epoch.
pub fn draw_curves(path: &Path, records: &[EpochRecord]) -> Result<()> {
    let series =
        |f: fn(&EpochRecord) -> f64| records.iter().map(|r| (r.epoch as f64, f(r))).collect();
    draw_atomically(path, (1100, 420), |root, text| {
        let (left, right) = root.split_horizontally(550);
        let loss = [
            Curve {
                label: "train",
                color: BLUE,
                points: series(|r| r.train_loss),
            },
            Curve {
                label: "validation",
                color: RED,
                points: series(|r| r.val_loss),
            },
        ];
        draw_panel(&left, path, "loss", &loss, true, text)?;
        let acc = [
            Curve {
                label: "train",
                color: BLUE,
                points: series(|r| r.train_acc),
            },
            Curve {
                label: "validation",
                color: RED,
                points: series(|r| r.val_acc),
            },
        ];
        draw_panel(&right, path, "accuracy", &acc, true, text)
    })
}

/// The confusion matrix's largest cell and margins, in pixels.
const CELL: i32 = 70;
const MATRIX_LEFT: i32 = 120;
const MATRIX_TOP: i32 = 70;
/// The most pixels the cells take a side: many classes get smaller cells (1,200 classes of
/// 70 pixels made a picture the plotting library could not address, and it panicked).
const MAX_MATRIX_SIDE: i32 = 4200;
/// The smallest cells that hold their counts, and rows their class names.
const CELL_WITH_COUNT: i32 = 40;
const CELL_WITH_NAME: i32 = 14;

/// The side of a cell of `matrix`: [`CELL`], or less for more classes than fit.
fn cell_size(matrix: &ConfusionMatrix) -> i32 {
    let classes = matrix.classes.len().clamp(1, MAX_MATRIX_SIDE as usize) as i32;
    (MAX_MATRIX_SIDE / classes).min(CELL)
}

/// The size of `path`'s picture of `matrix`.
fn confusion_size(path: &Path, matrix: &ConfusionMatrix) -> Result<(u32, u32)> {
    if matrix.classes.len() > MAX_MATRIX_SIDE as usize {
        return Err(plot_error(
            path,
            format!(
                "{} classes are more than a confusion matrix of at most {MAX_MATRIX_SIDE} \
                 pixels a side can show",
                matrix.classes.len()
            ),
        ));
    }
    let side = cell_size(matrix) * matrix.classes.len().max(1) as i32;
    Ok((
        (MATRIX_LEFT + side + 20) as u32,
        (MATRIX_TOP + side + 20) as u32,
    ))
}

/// `confusion.png`: rows are true classes, columns predictions; shade = row fraction.
pub fn draw_confusion(path: &Path, matrix: &ConfusionMatrix, title: &str) -> Result<()> {
    draw_atomically(path, confusion_size(path, matrix)?, |root, text| {
        confusion_panel(root, path, matrix, title, text)
    })
}

/// `vt-train eval`'s plot: the confusion matrix, and beside it the reliability diagram,
/// staged for [`crate::outputs::write_with_report`].
pub fn stage_evaluation(
    path: &Path,
    matrix: &ConfusionMatrix,
    calibration: &Calibration,
    title: &str,
) -> Result<Staged> {
    let (width, height) = confusion_size(path, matrix)?;
    let side = height.max(420);
    draw_staged(path, (width + side, side), |root, text| {
        let (left, right) = root.split_horizontally(width);
        confusion_panel(&left, path, matrix, title, text)?;
        reliability_panel(&right, path, calibration, text)
    })
}

fn confusion_panel(
    root: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    path: &Path,
    matrix: &ConfusionMatrix,
    title: &str,
    text: bool,
) -> Result<()> {
    let (cell, left, top) = (cell_size(matrix), MATRIX_LEFT, MATRIX_TOP);
    let err = |e: &dyn std::fmt::Display| plot_error(path, e);
    for (t, row) in matrix.counts.iter().enumerate() {
        let total: u64 = row.iter().sum();
        for (p, &count) in row.iter().enumerate() {
            let frac = if total == 0 {
                0.0
            } else {
                count as f64 / total as f64
            };
            let shade = |full: f64| (255.0 - (255.0 - full) * frac) as u8;
            let color = RGBColor(shade(8.0), shade(48.0), shade(107.0));
            let (x, y) = (left + p as i32 * cell, top + t as i32 * cell);
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                color.filled(),
            ))
            .map_err(|e| err(&e))?;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                BLACK.mix(0.2),
            ))
            .map_err(|e| err(&e))?;
            if text && cell >= CELL_WITH_COUNT {
                let ink = if frac > 0.5 { WHITE } else { BLACK };
                let style = TextStyle::from((FONT, 16).into_font()).color(&ink);
                root.draw(&Text::new(
                    count.to_string(),
                    (x + 8, y + cell / 2 - 8),
                    style,
                ))
                .map_err(|e| err(&e))?;
            }
        }
    }
    if text {
        let style = TextStyle::from((FONT, 13).into_font()).color(&BLACK);
        root.draw(&Text::new(
            title.to_string(),
            (10, 8),
            TextStyle::from((FONT, 18).into_font()),
        ))
        .map_err(|e| err(&e))?;
        root.draw(&Text::new(
            "true \\ predicted",
            (10, top - 22),
            style.clone(),
        ))
        .map_err(|e| err(&e))?;
        // Rows named while they are as tall as a name, columns while they are as wide.
        for (i, name) in matrix.classes.iter().enumerate() {
            let short: String = name.chars().take(10).collect();
            let offset = i as i32 * cell;
            if cell >= CELL_WITH_NAME {
                root.draw(&Text::new(
                    short.clone(),
                    (8, top + offset + cell / 2 - 7),
                    style.clone(),
                ))
                .map_err(|e| err(&e))?;
            }
            if cell == CELL {
                root.draw(&Text::new(
                    short,
                    (left + offset + 4, top - 40),
                    style.clone(),
                ))
                .map_err(|e| err(&e))?;
            }
        }
    }
    Ok(())
}

/// The reliability diagram: per confidence bin, the accuracy as a bar and the mean
/// confidence as a line across it; a calibrated model's bars end on their lines, and on the
/// diagonal.
fn reliability_panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    path: &Path,
    calibration: &Calibration,
    text: bool,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| plot_error(path, e);
    let mut builder = ChartBuilder::on(area);
    builder.margin(16);
    if text {
        builder
            .caption(
                format!("reliability: ECE {:.2}%", 100.0 * calibration.ece),
                (FONT, 18),
            )
            .x_label_area_size(36)
            .y_label_area_size(46);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)
        .map_err(|e| err(&e))?;
    let mut mesh = chart.configure_mesh();
    mesh.disable_mesh();
    if text {
        mesh.x_desc("confidence")
            .y_desc("accuracy")
            .label_style((FONT, 13));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(&e))?;
    let filled = || calibration.bins.iter().filter(|b| b.images > 0);
    let bar = RGBColor(8, 48, 107).mix(0.8);
    let bars = chart
        .draw_series(
            filled().map(|b| Rectangle::new([(b.low, 0.0), (b.high, b.accuracy)], bar.filled())),
        )
        .map_err(|e| err(&e))?;
    if text {
        bars.label("accuracy")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], bar.filled()));
    }
    let confidence = chart
        .draw_series(filled().map(|b| {
            PathElement::new(
                [(b.low, b.confidence), (b.high, b.confidence)],
                RED.stroke_width(3),
            )
        }))
        .map_err(|e| err(&e))?;
    if text {
        confidence
            .label("mean confidence")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(3)));
    }
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.6)))
        .map_err(|e| err(&e))?;
    if text {
        // Above the diagonal, where only an underconfident model's bars reach.
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft).map_err(|e| err(&e))?;
    }
    Ok(())
}

/// The part of the segment from `a` to `b` (x on a log scale) between the heights `low` and
/// `high`, if any.
fn clip_to_heights(a: (f64, f64), b: (f64, f64), low: f64, high: f64) -> Option<[(f64, f64); 2]> {
    let rise = b.1 - a.1;
    let (mut from, mut to) = (0.0f64, 1.0f64);
    if rise == 0.0 {
        if !(low..=high).contains(&a.1) {
            return None;
        }
    } else {
        let (at_low, at_high) = ((low - a.1) / rise, (high - a.1) / rise);
        from = from.max(at_low.min(at_high));
        to = to.min(at_low.max(at_high));
        if from > to {
            return None;
        }
    }
    let (log_a, log_b) = (a.0.log10(), b.0.log10());
    let at = |t: f64| (10f64.powf(log_a + t * (log_b - log_a)), a.1 + t * rise);
    Some([at(from), at(to)])
}

/// The plot of `vt-train lr-find`: the smoothed loss (the raw losses as dots) against the
/// learning rate on a log axis, with the suggested rate and the lowest loss's tenth marked.
/// The loss axis fits the points the suggestions consider (past the skipped first ones):
/// from their lowest loss up to as far above their starting losses as these fall (at least a
/// tenth of the lowest loss), so that neither the noisy first steps nor a diverged tail,
/// often hundreds of times higher, flattens the descent; the line is cut at the edges.
pub fn stage_lr_find(path: &Path, report: &LrFindReport) -> Result<Staged> {
    let finite: Vec<(f64, f64)> = report
        .points
        .iter()
        .map(|p| (p.lr, p.smoothed_loss))
        .take_while(|p| p.1.is_finite())
        .collect();
    // All the points when none is past the skipped ones (an interrupted test).
    let considered = match report.skipped_at_start {
        skipped if skipped < finite.len() => skipped,
        _ => 0,
    };
    let window = &finite[considered..];
    let lowest = window.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let lowest_at = window.iter().position(|p| p.1 == lowest).unwrap_or(0);
    let descent = &window[..window.len().min(lowest_at + 1)];
    let before_lowest = descent.iter().map(|p| p.1).fold(lowest, f64::max);
    let highest = window.iter().map(|p| p.1).fold(lowest, f64::max);
    let climb = (before_lowest - lowest).max(0.1 * lowest.abs());
    // Raw losses below the smoothed ones are shown too.
    let lowest_raw = report.points[considered..considered + descent.len()]
        .iter()
        .map(|p| p.loss)
        .fold(lowest, f64::min);
    let (y_min, y_max) = if lowest.is_finite() {
        (lowest_raw, highest.min(before_lowest + climb))
    } else {
        (0.0, 1.0)
    };
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let (y_low, y_high) = (y_min - pad, y_max + pad);
    let segments: Vec<[(f64, f64); 2]> = finite
        .windows(2)
        .filter_map(|w| clip_to_heights(w[0], w[1], y_low, y_high))
        .collect();
    draw_staged(path, (800, 480), |root, text| {
        let err = |e: &dyn std::fmt::Display| plot_error(path, e);
        let mut builder = ChartBuilder::on(root);
        builder.margin(12);
        if text {
            builder
                .caption("learning-rate range test", (FONT, 20))
                .x_label_area_size(36)
                .y_label_area_size(50);
        }
        let mut chart = builder
            .build_cartesian_2d((report.start_lr..report.end_lr).log_scale(), y_low..y_high)
            .map_err(|e| err(&e))?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("learning rate")
                .y_desc("training loss")
                .label_style((FONT, 13))
                .x_label_formatter(&|x| format!("{x:.0e}"));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| err(&e))?;
        let grey = RGBColor(150, 150, 150);
        let raw = report
            .points
            .iter()
            .filter(|p| (y_low..=y_high).contains(&p.loss))
            .map(|p| Circle::new((p.lr, p.loss), 2, grey.filled()));
        let series = chart.draw_series(raw).map_err(|e| err(&e))?;
        if text {
            series
                .label("loss")
                .legend(move |(x, y)| Circle::new((x + 10, y), 2, grey.filled()));
        }
        let lines = segments
            .iter()
            .map(|segment| PathElement::new(segment.to_vec(), BLUE.stroke_width(2)));
        let series = chart.draw_series(lines).map_err(|e| err(&e))?;
        if text {
            series
                .label("smoothed loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        }
        if let Some(suggestion) = &report.suggestion {
            let marks = [
                (suggestion.lr(), RED, "suggested lr"),
                (suggestion.minimum, GREEN, "lowest loss lr / 10"),
            ];
            for (lr, color, name) in marks {
                if !(report.start_lr..=report.end_lr).contains(&lr) {
                    continue;
                }
                let line = PathElement::new(vec![(lr, y_low), (lr, y_high)], color.stroke_width(1));
                let series = chart.draw_series([line]).map_err(|e| err(&e))?;
                if text {
                    series
                        .label(format!("{name}: {lr:.1e}"))
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
                        });
                }
            }
            let steepest = finite.iter().find(|p| Some(p.0) == suggestion.steepest);
            if let Some(&point) = steepest {
                chart
                    .draw_series([Circle::new(point, 5, RED.filled())])
                    .map_err(|e| err(&e))?;
            }
        }
        if text {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight).map_err(|e| err(&e))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::EpochRecord;

    fn record(epoch: usize, loss: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: loss,
            train_acc: 0.3,
            val_loss: loss + 0.1,
            val_acc: 0.2,
            val_class_acc: Default::default(),
            lr: 0.1,
            img_per_s: 1.0,
            epoch_time_s: 1.0,
            grad_norm_mean: 1.0,
            grad_norm_max: 1.0,
            clipped_steps: 0,
            skipped_steps: 0,
            global_step: 1,
            stem_frozen: false,
            best: false,
        }
    }

    fn is_png(path: &Path) -> bool {
        fs::read(path)
            .map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
            .unwrap_or(false)
    }

    #[test]
    fn plots_are_written_as_png_even_with_one_epoch_or_nan() {
        let dir = tempfile::tempdir().unwrap();
        let curves = dir.path().join(CURVES_PNG);
        draw_curves(&curves, &[record(1, 1.5)]).unwrap();
        assert!(is_png(&curves));
        draw_curves(
            &curves,
            &[record(1, 1.5), record(2, f64::NAN), record(3, 0.7)],
        )
        .unwrap();
        assert!(is_png(&curves));
        let mut cm = ConfusionMatrix::new(vec!["forest".into(), "sea".into()]);
        cm.add(&[0, 0, 1], &[0, 1, 1]);
        let confusion = dir.path().join(CONFUSION_PNG);
        draw_confusion(&confusion, &cm, "validation, epoch 1").unwrap();
        assert!(is_png(&confusion));
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    }

    /// Many classes get smaller cells, within a picture the plotting library can address
    /// (1,200 classes panicked it); more classes than pixels get an error, which the
    /// caller logs, and no picture.
    #[test]
    fn a_confusion_matrix_of_many_classes_fits_its_picture() {
        let dir = tempfile::tempdir().unwrap();
        let confusion = dir.path().join(CONFUSION_PNG);
        let names = |n: usize| (0..n).map(|i| format!("class-{i}")).collect::<Vec<_>>();
        let mut cm = ConfusionMatrix::new(names(1200));
        cm.add(&[0, 1199], &[0, 5]);
        draw_confusion(&confusion, &cm, "validation, epoch 1").unwrap();
        let (width, height) = image::image_dimensions(&confusion).unwrap();
        assert!(
            width <= (MATRIX_LEFT + MAX_MATRIX_SIDE + 20) as u32
                && height <= (MATRIX_TOP + MAX_MATRIX_SIDE + 20) as u32,
            "{width}x{height}"
        );
        let cm = ConfusionMatrix::new(names(MAX_MATRIX_SIDE as usize + 1));
        let elsewhere = dir.path().join("many.png");
        let err = draw_confusion(&elsewhere, &cm, "validation")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("4201 classes are more than a confusion matrix"),
            "{err}"
        );
        assert!(!elsewhere.exists());
    }
}
