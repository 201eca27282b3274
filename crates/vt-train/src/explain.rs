//! `vt-train explain`: where a checkpoint's visual tokens look. Each VT module's tokenizer
//! pools the feature map into L tokens through a spatial attention A (a softmax over the
//! positions, paper section 3.1). Drawn over the image, as the paper's token visualisations
//! are, each token's share of every position shows which regions a prediction rests on.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::ops::softmax_last_dim;
use fast_image_resize::Resizer;
use image::imageops::{self, FilterType};
use image::{ImageBuffer, Luma, RgbImage};
use plotters::prelude::*;
use vt_data::decode::{decode_rgb_limited, read_image_file, DEFAULT_MAX_PIXELS};
use vt_data::download::error_chain;
use vt_data::image_files::image_files;
use vt_data::transform::{eval_chw, Normalize};
use vt_model::{parse_device, Model};

use crate::cli::thread_count;
use crate::data::normalize;
use crate::error::{Result, ResultExt, TrainError};
use crate::outputs;
use crate::plots::{draw_atomically, plot_error, FONT};
use crate::threads;

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Checkpoint folder (config.json + model.safetensors), e.g. runs/NAME/best
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Folder for the pictures, one PNG per image named after it (created if missing)
    #[arg(long, value_name = "DIR", default_value = "explain")]
    pub out: PathBuf,
    /// How many of the best classes to name
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub top_k: u32,
    /// cpu, cuda, cuda:N or auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute threads [default: all cores]
    #[arg(long, value_parser = thread_count)]
    pub threads: Option<usize>,
    /// Image files (JPEG, PNG, WebP, ...; the format is read from the content), or folders:
    /// their image files, subfolders included, in path order
    #[arg(required = true, value_name = "IMAGE|FOLDER")]
    pub images: Vec<PathBuf>,
}

/// Side of one token's picture, in pixels.
const PANEL: u32 = 96;
const GAP: u32 = 6;
const MARGIN: u32 = 12;
/// Height of the title line and of each module's label line.
const TITLE: u32 = 34;
const LABEL: u32 = 22;
/// Tokens per row of a module's grid.
const COLUMNS: usize = 8;
/// The most tokens drawn per module (the default config has 16): past it the picture would
/// grow without bound.
const MAX_TOKENS_DRAWN: usize = 64;
/// The grids' least width: room for a module's label when it has few tokens.
const MIN_GRID_WIDTH: u32 = 640;
/// Side of the model's view of the image, left of the grids.
const VIEW: u32 = 2 * PANEL + GAP;
/// How opaque the heat map is where a token's attention peaks; elsewhere the photo shows
/// through in proportion.
const HEAT_OPACITY: f32 = 0.75;

/// What the model made of one image.
struct Explanation {
    /// The model's input as RGB: the contract's resize and centre crop.
    view: RgbImage,
    probs: Vec<f32>,
    /// Per module, per token: its attention over the H x W feature map, row-major.
    maps: Vec<Vec<Vec<f32>>>,
    /// (H, W) of the feature map.
    map_size: (u32, u32),
}

pub fn run(args: &ExplainArgs) -> Result<()> {
    outputs::refuse_managed_folder("--out", &args.out, &args.out)?;
    threads::set_compute_threads(args.threads);
    let device = parse_device(&args.device)?;
    let model = Model::load(&args.checkpoint, &device)
        .and_then(Model::into_frozen)
        .with_context(|| format!("loading checkpoint {}", args.checkpoint.display()))?;
    let images = images_to_explain(&args.images, &args.out)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| TrainError::file_op("creating", &args.out, e))?;
    let mut resizer = Resizer::new();
    // The inputs' own paths are taken too: a picture must never replace an image given.
    let out = args
        .out
        .canonicalize()
        .map_err(|e| TrainError::io(&args.out, e))?;
    let mut taken: HashSet<PathBuf> = images
        .iter()
        .filter_map(|image| image.canonicalize().ok())
        .collect();
    let mut failed = 0;
    for image in &images {
        let png = args.out.join(output_name(image, &out, &mut taken));
        let explained = explain(&model, &mut resizer, image).and_then(|explanation| {
            let top = top_classes(&explanation.probs, &model.config.class_names, args.top_k);
            let title = format!("{}: {top}", display_name(image));
            draw(&png, &explanation, &title)?;
            Ok(top)
        });
        match explained {
            Ok(top) => println!("{}: {top} -> {}", image.display(), png.display()),
            Err(e) => {
                failed += 1;
                eprintln!("{}: {}", image.display(), error_chain(&e));
            }
        }
    }
    if failed > 0 {
        return Err(TrainError::NotExplained {
            failed,
            total: images.len(),
        });
    }
    Ok(())
}

/// The image files `given` stands for, less the pictures an earlier run wrote into `out`
/// (a folder given may hold it, as `explain .` holds the default `explain/`): they are
/// not photos to explain. Images given by name are kept; none at all is refused.
fn images_to_explain(given: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    let out = out.canonicalize().ok();
    let images: Vec<PathBuf> = image_files(given)?
        .into_iter()
        .filter(|image| {
            let picture = image.to_string_lossy().ends_with(PICTURE_SUFFIX)
                && image
                    .parent()
                    .and_then(|folder| folder.canonicalize().ok())
                    .is_some_and(|folder| Some(folder) == out);
            given.contains(image) || !picture
        })
        .collect();
    if images.is_empty() {
        return Err(TrainError::Config(format!(
            "no image to explain: the folders given hold only the pictures of an earlier run \
             (*{PICTURE_SUFFIX})"
        )));
    }
    Ok(images)
}

/// How the name of each picture ends.
const PICTURE_SUFFIX: &str = ".explain.png";

/// The picture's file name in the (resolved) folder `out`: the image's stem and
/// `.explain.png`, with `-2`, `-3`... when that path is `taken` (by an earlier picture, or
/// by one of the images given) or holds what no run of explain wrote there.
fn output_name(image: &Path, out: &Path, taken: &mut HashSet<PathBuf>) -> String {
    let stem = image
        .file_stem()
        .map_or_else(|| "image".to_string(), |s| s.to_string_lossy().into_owned());
    let name = (1..)
        .map(|n| match n {
            1 => format!("{stem}{PICTURE_SUFFIX}"),
            n => format!("{stem}-{n}{PICTURE_SUFFIX}"),
        })
        .find(|name| {
            let path = out.join(name);
            !taken.contains(&path) && !is_foreign(&path)
        })
        .unwrap_or_default();
    taken.insert(out.join(&name));
    name
}

/// Whether `path` is there and is no picture that explain could have written (a PNG file):
/// a user's file, a folder or a link, which a picture must not replace.
fn is_foreign(path: &Path) -> bool {
    const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";
    let Ok(metadata) = path.symlink_metadata() else {
        return false;
    };
    let mut signature = [0u8; 8];
    let png = metadata.is_file()
        && std::fs::File::open(path)
            .and_then(|mut file| file.read_exact(&mut signature))
            .is_ok_and(|()| &signature == PNG_SIGNATURE);
    !png
}

fn display_name(image: &Path) -> String {
    image.file_name().map_or_else(
        || image.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn explain(model: &Model, resizer: &mut Resizer, path: &Path) -> Result<Explanation> {
    let bytes = read_image_file(path, DEFAULT_MAX_PIXELS)?;
    let img = decode_rgb_limited(&bytes, DEFAULT_MAX_PIXELS)?;
    let size = model.config.image_size;
    let norm = normalize(&model.config);
    let chw = eval_chw(resizer, &img, size as u32, &norm)?;
    let view = rgb_from_chw(&chw, size as u32, &norm);
    let input = Tensor::from_vec(chw, (1, 3, size, size), &model.device)?.to_dtype(model.dtype)?;
    let attention = model.token_attention(&input)?;
    let logits = model
        .config
        .calibrated(&attention.logits.to_dtype(DType::F32)?)?;
    let probs = softmax_last_dim(&logits)?.squeeze(0)?.to_vec1::<f32>()?;
    let mut map_size = (0, 0);
    let maps = attention
        .maps
        .iter()
        .map(|m| {
            let (_, tokens, h, w) = m.dims4()?;
            map_size = (h as u32, w as u32);
            m.to_dtype(DType::F32)?.reshape((tokens, h * w))?.to_vec2()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Explanation {
        view,
        probs,
        maps,
        map_size,
    })
}

/// Undoes the normalisation of the model's input, for display.
fn rgb_from_chw(chw: &[f32], size: u32, norm: &Normalize) -> RgbImage {
    let plane = (size * size) as usize;
    RgbImage::from_fn(size, size, |x, y| {
        let at = (y * size + x) as usize;
        image::Rgb(std::array::from_fn(|c| {
            let value = chw[c * plane + at] * norm.std[c] + norm.mean[c];
            (value * 255.0).round().clamp(0.0, 255.0) as u8
        }))
    })
}

/// "forest 91.2%, mountain 5.0%, glacier 1.3%": the `k` most probable classes.
fn top_classes(probs: &[f32], classes: &[String], k: u32) -> String {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    order
        .iter()
        .take(k as usize)
        .map(|&i| format!("{} {:.1}%", classes[i], 100.0 * probs[i]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The largest share of any position in any of a module's tokens, against an even spread
/// over the P positions (1: every token gathers evenly from the whole map).
fn peak_ratio(maps: &[Vec<f32>]) -> f32 {
    maps.iter()
        .flat_map(|map| map.iter().map(move |share| share * map.len() as f32))
        .fold(1.0, f32::max)
}

/// How concentrated a token's attention is at each position, in [0, 1]: its share there
/// against an even spread, on a log scale from 1x (0, and below: no colour) to the module's
/// `peak` ratio (1). A shared scale keeps a module's tokens comparable, and the figure
/// prints the peak: after little training, tokens gather almost evenly (a peak near 1x).
fn concentration(map: &[f32], peak: f32) -> Vec<f32> {
    let positions = map.len() as f32;
    if peak <= 1.0 + f32::EPSILON {
        return vec![0.0; map.len()];
    }
    map.iter()
        .map(|share| ((share * positions).ln() / peak.ln()).clamp(0.0, 1.0))
        .collect()
}

/// `view` (PANEL x PANEL) with a token's attention map over it.
/// None when `map` does not hold h x w values.
fn overlay(view: &RgbImage, map: &[f32], peak: f32, (h, w): (u32, u32)) -> Option<RgbImage> {
    let grid = ImageBuffer::<Luma<f32>, Vec<f32>>::from_raw(w, h, concentration(map, peak))?;
    let heat = imageops::resize(&grid, PANEL, PANEL, FilterType::Triangle);
    let mut out = view.clone();
    for (pixel, level) in out.pixels_mut().zip(heat.pixels()) {
        let level = level.0[0].clamp(0.0, 1.0);
        let RGBColor(r, g, b) = ViridisRGB::get_color(level);
        let alpha = HEAT_OPACITY * level;
        for (channel, heat) in pixel.0.iter_mut().zip([r, g, b]) {
            *channel =
                (f32::from(*channel) * (1.0 - alpha) + f32::from(heat) * alpha).round() as u8;
        }
    }
    Some(out)
}

/// The picture: the title, the model's view on the left, then per module a grid of its
/// tokens' attention maps.
fn draw(path: &Path, e: &Explanation, title: &str) -> Result<()> {
    let tokens = e.maps.first().map_or(0, Vec::len);
    let drawn = tokens.min(MAX_TOKENS_DRAWN);
    let columns = drawn.clamp(1, COLUMNS) as u32;
    let rows = drawn.div_ceil(COLUMNS) as u32;
    let grid_left = MARGIN + VIEW + 2 * MARGIN;
    let module_height = LABEL + rows * (PANEL + GAP);
    let width = grid_left + (columns * (PANEL + GAP) - GAP).max(MIN_GRID_WIDTH) + MARGIN;
    let height = TITLE + (module_height * e.maps.len() as u32).max(LABEL + VIEW) + MARGIN;
    let panel_view = imageops::resize(&e.view, PANEL, PANEL, FilterType::Triangle);
    let big_view = imageops::resize(&e.view, VIEW, VIEW, FilterType::Triangle);
    let (h, w) = e.map_size;
    draw_atomically(path, (width, height), |root, text| {
        let err = |e: &dyn std::fmt::Display| plot_error(path, e);
        let bitmap = |(x, y): (u32, u32), img: &RgbImage| {
            let element =
                BitMapElement::with_ref((x as i32, y as i32), img.dimensions(), img.as_raw());
            match element {
                Some(element) => root.draw(&element).map_err(|e| err(&e)),
                None => Err(err(&"a bitmap of the wrong size")),
            }
        };
        let label = |(x, y): (u32, u32), words: String, size: u32| {
            if !text {
                return Ok(());
            }
            let style = TextStyle::from((FONT, size).into_font()).color(&BLACK);
            root.draw(&Text::new(words, (x as i32, y as i32), style))
                .map_err(|e| err(&e))
        };
        label((MARGIN, 8), title.to_string(), 18)?;
        label(
            (MARGIN, TITLE + 2),
            format!("model input, {0}x{0}", e.view.width()),
            13,
        )?;
        bitmap((MARGIN, TITLE + LABEL), &big_view)?;
        for (module, maps) in e.maps.iter().enumerate() {
            let top = TITLE + module as u32 * module_height;
            let peak = peak_ratio(maps);
            label(
                (grid_left, top + 2),
                format!(
                    "module {module}: {}{} tokens over the {h}x{w} map; colour: share against \
                     an even spread, 1x to {peak:.2}x (log)",
                    if drawn < tokens {
                        format!("the first {drawn} of ")
                    } else {
                        String::new()
                    },
                    maps.len()
                ),
                13,
            )?;
            for (token, map) in maps.iter().enumerate().take(drawn) {
                let (row, column) = ((token / COLUMNS) as u32, (token % COLUMNS) as u32);
                let at = (
                    grid_left + column * (PANEL + GAP),
                    top + LABEL + row * (PANEL + GAP),
                );
                let heat = overlay(&panel_view, map, peak, e.map_size).ok_or_else(|| {
                    err(&format!(
                        "an attention map of {} values for {h}x{w}",
                        map.len()
                    ))
                })?;
                bitmap(at, &heat)?;
                if text {
                    let tag = Rectangle::new(
                        [
                            (at.0 as i32, at.1 as i32),
                            (at.0 as i32 + 24, at.1 as i32 + 15),
                        ],
                        WHITE.mix(0.8).filled(),
                    );
                    root.draw(&tag).map_err(|e| err(&e))?;
                }
                label((at.0 + 3, at.1 + 2), format!("t{token}"), 12)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_stay_apart_and_off_the_inputs() {
        let out = Path::new("/out");
        // An input that is itself named like a picture: it is never written over.
        let mut taken = HashSet::from([out.join("old.explain.png")]);
        let names: Vec<String> = ["a/photo.jpg", "b/photo.png", "photo", "c/old.jpg"]
            .iter()
            .map(|p| output_name(Path::new(p), out, &mut taken))
            .collect();
        assert_eq!(
            names,
            [
                "photo.explain.png",
                "photo-2.explain.png",
                "photo-3.explain.png",
                "old-2.explain.png"
            ]
        );
        // What is there under a picture's name and is no PNG (a user's file, a folder, a
        // link) is never replaced; an earlier picture is.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::write(out.join("notes.explain.png"), "mine").unwrap();
        std::fs::create_dir(out.join("album.explain.png")).unwrap();
        std::fs::write(out.join("again.explain.png"), b"\x89PNG\r\n\x1a\n...").unwrap();
        let mut taken = HashSet::new();
        let names: Vec<String> = ["notes.jpg", "album.jpg", "again.jpg"]
            .iter()
            .map(|p| output_name(Path::new(p), out, &mut taken))
            .collect();
        assert_eq!(
            names,
            [
                "notes-2.explain.png",
                "album-2.explain.png",
                "again.explain.png"
            ]
        );
    }

    #[test]
    fn the_view_undoes_the_normalisation() {
        let norm = Normalize::IMAGENET;
        let img = RgbImage::from_fn(4, 4, |x, y| image::Rgb([x as u8 * 60, y as u8 * 60, 200]));
        let mut chw = vec![0.0; 3 * 16];
        norm.write_chw(&img, &mut chw);
        assert_eq!(rgb_from_chw(&chw, 4, &norm), img);
    }

    #[test]
    fn concentration_is_against_an_even_spread_up_to_the_peak() {
        let maps = [vec![0.25; 4], vec![0.5, 0.5, 0.0, 0.0]];
        assert_eq!(peak_ratio(&maps), 2.0);
        let even = concentration(&maps[0], 2.0);
        assert!(even.iter().all(|&c| c.abs() < 1e-6), "{even:?}");
        assert_eq!(concentration(&maps[1], 2.0), [1.0, 1.0, 0.0, 0.0]);
        // Twice the even share, on a scale up to 4x: halfway.
        let twice = concentration(&maps[1], 4.0);
        assert!((twice[0] - 0.5).abs() < 1e-6, "{twice:?}");
        // Tokens that all gather evenly: nothing to colour.
        assert_eq!(peak_ratio(&maps[..1]), 1.0);
        assert_eq!(concentration(&maps[0], 1.0), [0.0; 4]);
    }

    #[test]
    fn heat_shows_where_the_token_looks() {
        let view = RgbImage::from_pixel(PANEL, PANEL, image::Rgb([0, 0, 0]));
        // All attention on the top-left of a 2 x 2 map.
        let out = overlay(&view, &[1.0, 0.0, 0.0, 0.0], 4.0, (2, 2)).unwrap();
        assert!(
            overlay(&view, &[1.0; 3], 4.0, (2, 2)).is_none(),
            "3 values for 2x2"
        );
        let brightness = |x: u32, y: u32| {
            out.get_pixel(x, y)
                .0
                .iter()
                .map(|&c| u32::from(c))
                .sum::<u32>()
        };
        assert!(brightness(2, 2) > 300, "{:?}", out.get_pixel(2, 2));
        assert_eq!(brightness(PANEL - 2, PANEL - 2), 0);
    }

    #[test]
    fn top_classes_are_ordered() {
        let classes = ["a", "b", "c"].map(String::from);
        assert_eq!(
            top_classes(&[0.2, 0.7, 0.1], &classes, 2),
            "b 70.0%, a 20.0%"
        );
    }
}
