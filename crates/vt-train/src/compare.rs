//! `vt-train compare A B`: whether two evaluations on the same images differ by more than
//! chance. Each accuracy's own interval is about ±1 point on the Intel test split, too wide
//! to tell two recipes a point apart; paired on the images, the photos only one of them
//! gets right carry the difference, and McNemar's exact test says how likely that split of
//! them is when both are equally good (McNemar 1947; the exact binomial form, as
//! statsmodels' `mcnemar(exact=True)`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, TrainError};
use crate::metrics::wilson_interval;

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// The first evaluation: a `vt-train eval` report (.json) or its predictions (.csv)
    #[arg(value_name = "A")]
    pub a: PathBuf,
    /// The second evaluation, of the same images
    #[arg(value_name = "B")]
    pub b: PathBuf,
}

/// One image of a predictions CSV: its label and whether the prediction was right.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    label: String,
    correct: bool,
}

/// The columns of `vt-train eval`'s predictions CSV that a comparison reads.
#[derive(Deserialize)]
struct Row {
    path: String,
    label: String,
    correct: bool,
}

/// Two evaluations paired on their common images.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub images: u64,
    pub a_correct: u64,
    pub b_correct: u64,
    /// Images A gets right and B wrong.
    pub only_a: u64,
    /// Images B gets right and A wrong.
    pub only_b: u64,
    /// Images in only one of the two evaluations, left out.
    pub unpaired: u64,
}

impl Comparison {
    /// Accuracy of A minus accuracy of B.
    pub fn difference(&self) -> f64 {
        (self.only_a as f64 - self.only_b as f64) / self.images.max(1) as f64
    }

    /// The 95 % interval of the difference: Newcombe's square-and-add interval for paired
    /// proportions (Newcombe 1998, method 10), from the Wilson intervals of the two
    /// accuracies and their correlation over the images. It keeps close to 95 % coverage
    /// for the few images only one of two close checkpoints gets right, where a Wald
    /// interval is too narrow, and so is an exact interval conditional on their number
    /// (86 % in simulations of 150 images). At the margin it may disagree with the exact
    /// test, which is the one to read for "is there a difference".
    pub fn difference_ci95(&self) -> (f64, f64) {
        let n = self.images.max(1) as f64;
        let both = self.a_correct - self.only_a;
        let neither = self.images - both - self.only_a - self.only_b;
        let (p_a, p_b) = (self.a_correct as f64 / n, self.b_correct as f64 / n);
        let (low_a, high_a) = wilson_interval(self.a_correct, self.images);
        let (low_b, high_b) = wilson_interval(self.b_correct, self.images);
        // The correlation of the two outcomes, its positive part shrunk by n/2 as Newcombe
        // does; none when either model is always or never right.
        let margins = [
            self.a_correct,
            self.images - self.a_correct,
            self.b_correct,
            self.images - self.b_correct,
        ];
        let phi = if margins.contains(&0) {
            0.0
        } else {
            let cross = both as f64 * neither as f64 - self.only_a as f64 * self.only_b as f64;
            let cross = if cross > n / 2.0 {
                cross - n / 2.0
            } else {
                cross.min(0.0)
            };
            cross / margins.iter().map(|&m| m as f64).product::<f64>().sqrt()
        };
        let spread = |x: f64, y: f64| (x * x - 2.0 * phi * x * y + y * y).max(0.0).sqrt();
        let d = self.difference();
        (
            d - spread(p_a - low_a, high_b - p_b),
            d + spread(p_b - low_b, high_a - p_a),
        )
    }

    /// McNemar's exact two-sided p-value.
    pub fn p_value(&self) -> f64 {
        mcnemar_exact(self.only_a, self.only_b)
    }
}

/// McNemar's exact test: with `b` and `c` discordant pairs, twice the probability of at most
/// min(b, c) successes in b + c fair coin tosses, at most 1.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    (2.0 * binomial_cdf(b.min(c), b + c, 0.5)).min(1.0)
}

/// P(X <= k) for X ~ Binomial(n, p), summed from logarithms so that it stays finite for
/// any n.
fn binomial_cdf(k: u64, n: u64, p: f64) -> f64 {
    if p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return if k >= n { 1.0 } else { 0.0 };
    }
    let (ln_p, ln_q) = (p.ln(), (-p).ln_1p());
    // ln C(n, i), built up term by term.
    let mut ln_choose = 0.0f64;
    let mut sum = 0.0;
    for i in 0..=k.min(n) {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        sum += (ln_choose + i as f64 * ln_p + (n - i) as f64 * ln_q).exp();
    }
    sum.min(1.0)
}

/// An evaluation as given: its predictions CSV, and the split a JSON report names.
struct Evaluation {
    csv: PathBuf,
    split: Option<String>,
}

/// The predictions of `path`: the CSV itself, or that of a JSON report, which `eval` writes
/// beside it. The path the report names is used only when absolute: a relative one is
/// relative to where `eval` ran, which may not be here.
fn evaluation(path: &Path) -> Result<Evaluation> {
    if !path.exists() {
        return Err(TrainError::Config(format!(
            "{}: no such file; give reports that `vt-train eval` wrote \
             (eval-<checkpoint>-<split>.json beside the checkpoint folder, with its .csv), or \
             their CSVs",
            path.display()
        )));
    }
    refuse_unless_file(path)?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if !is_json {
        return Ok(Evaluation {
            csv: path.to_path_buf(),
            split: None,
        });
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| TrainError::file_op("reading", path, e))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|cause| TrainError::Json {
            path: path.to_path_buf(),
            cause,
        })?;
    let beside = path.with_extension("csv");
    let named = report["predictions"].as_str().map(PathBuf::from);
    let csv = match named {
        _ if beside.is_file() => beside,
        Some(named) if named.is_absolute() => named,
        _ => {
            return Err(TrainError::Config(format!(
                "{}: its predictions CSV is not beside it ({}): give a report of `vt-train \
                 eval` with its CSV, or the CSV itself",
                path.display(),
                beside.display()
            )))
        }
    };
    Ok(Evaluation {
        csv,
        split: report["split"].as_str().map(str::to_string),
    })
}

/// Refuses a path that is not a regular file: a folder, or a pipe or device, which reading
/// could block on forever, or never end.
fn refuse_unless_file(path: &Path) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    Err(TrainError::Config(format!(
        "{}: not a file; give reports that `vt-train eval` wrote, or their CSVs",
        path.display()
    )))
}

/// The most bytes read for the header of a predictions CSV (a column per class: 10,000
/// classes of 100-character names take 1 MB): a file that is not one, a stream of zeros,
/// is refused without being read whole.
const MAX_HEADER_BYTES: u64 = 16 << 20;

/// What is wrong with `csv_path`'s header, read within its first [`MAX_HEADER_BYTES`], for
/// a predictions CSV: none when it holds the columns a comparison reads.
fn header_problem(csv_path: &Path) -> std::io::Result<Option<String>> {
    let mut start = Vec::new();
    File::open(csv_path)?
        .take(MAX_HEADER_BYTES)
        .read_to_end(&mut start)?;
    // A first line cut short by the limit would read as a whole header.
    if start.len() as u64 == MAX_HEADER_BYTES && !start.iter().any(|&b| b == b'\n' || b == b'\r') {
        return Ok(Some(format!(
            "its first line is longer than {} MiB, more than a header",
            MAX_HEADER_BYTES >> 20
        )));
    }
    let has_columns = |header: &csv::StringRecord| {
        ["path", "label", "correct"]
            .iter()
            .all(|column| header.iter().any(|h| h == *column))
    };
    let header = csv::Reader::from_reader(start.as_slice())
        .headers()
        .is_ok_and(has_columns);
    Ok((!header)
        .then(|| "its first line is not a header with path, label and correct columns".into()))
}

/// An evaluation's outcomes, keyed by the image's class folder and file name, so that the
/// same split read through two spellings of its folder (or two systems' separators) pairs
/// up.
fn read_outcomes(csv_path: &Path) -> Result<BTreeMap<String, Outcome>> {
    let invalid = |message: String| {
        TrainError::Config(format!(
            "{}: {message}; expected the predictions CSV of `vt-train eval`",
            csv_path.display()
        ))
    };
    refuse_unless_file(csv_path)?;
    match header_problem(csv_path) {
        Ok(None) => {}
        Ok(Some(problem)) => return Err(invalid(problem)),
        Err(e) => return Err(invalid(format!("cannot read it: {e}"))),
    }
    let mut reader =
        csv::Reader::from_path(csv_path).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    let mut outcomes = BTreeMap::new();
    for row in reader.deserialize::<Row>() {
        let row = row.map_err(|e| invalid(e.to_string()))?;
        // Split on either separator: a CSV written on Windows pairs with one from Unix.
        let mut parts = row.path.rsplit(['/', '\\']);
        let file = parts.next().unwrap_or_default();
        let key = format!("{}/{file}", parts.next().unwrap_or_default());
        let outcome = Outcome {
            label: row.label,
            correct: row.correct,
        };
        if outcomes.insert(key, outcome).is_some() {
            return Err(invalid(format!("{} is listed twice", row.path)));
        }
    }
    Ok(outcomes)
}

fn pair(
    a: &BTreeMap<String, Outcome>,
    b: &BTreeMap<String, Outcome>,
) -> std::result::Result<Comparison, String> {
    let mut comparison = Comparison {
        images: 0,
        a_correct: 0,
        b_correct: 0,
        only_a: 0,
        only_b: 0,
        unpaired: 0,
    };
    for (key, x) in a {
        let Some(y) = b.get(key) else {
            comparison.unpaired += 1;
            continue;
        };
        if x.label != y.label {
            return Err(format!(
                "{key} is labelled {} in one and {} in the other: not the same data",
                x.label, y.label
            ));
        }
        comparison.images += 1;
        comparison.a_correct += u64::from(x.correct);
        comparison.b_correct += u64::from(y.correct);
        comparison.only_a += u64::from(x.correct && !y.correct);
        comparison.only_b += u64::from(y.correct && !x.correct);
    }
    comparison.unpaired += b.keys().filter(|k| !a.contains_key(*k)).count() as u64;
    if comparison.images == 0 {
        return Err("the two evaluations have no image in common".into());
    }
    Ok(comparison)
}

/// `x` to two decimals, signed unless it rounds to zero: never "-0.00" nor "+0.00".
fn signed(x: f64) -> String {
    let rounded = format!("{:.2}", x.abs());
    if rounded.bytes().all(|b| b == b'0' || b == b'.') {
        rounded
    } else if x < 0.0 {
        format!("-{rounded}")
    } else {
        format!("+{rounded}")
    }
}

pub fn report_text(a: &Path, b: &Path, c: &Comparison) -> String {
    let percent = |k: u64| 100.0 * k as f64 / c.images as f64;
    let (low, high) = c.difference_ci95();
    let p = c.p_value();
    let verdict = if p < 0.05 {
        "the difference is unlikely to be chance (p < 0.05)"
    } else {
        "no significant difference (p >= 0.05): these images do not tell them apart"
    };
    let mut out = format!(
        "A {}: accuracy {:.2}% ({}/{})\nB {}: accuracy {:.2}% ({}/{})\n",
        a.display(),
        percent(c.a_correct),
        c.a_correct,
        c.images,
        b.display(),
        percent(c.b_correct),
        c.b_correct,
        c.images
    );
    if c.unpaired > 0 {
        out += &format!("{} image(s) in only one of them are left out\n", c.unpaired);
    }
    out += &format!(
        "on the same {} images: {} right only by A, {} right only by B\n\
         difference A - B: {} points (95% interval {} to {})\n\
         McNemar's exact test: p {}: {verdict}\n",
        c.images,
        c.only_a,
        c.only_b,
        signed(100.0 * c.difference()),
        signed(100.0 * low),
        signed(100.0 * high),
        if p < 1e-300 {
            "< 1e-300".to_string()
        } else if p < 1e-4 {
            format!("= {p:.1e}")
        } else {
            format!("= {p:.4}")
        }
    );
    out
}

pub fn run(args: &CompareArgs) -> Result<()> {
    let (first, second) = (evaluation(&args.a)?, evaluation(&args.b)?);
    if let (Some(x), Some(y)) = (&first.split, &second.split) {
        if x != y {
            return Err(TrainError::Config(format!(
                "{} evaluates the {x} split and {} the {y} split: compare evaluations of the \
                 same images",
                args.a.display(),
                args.b.display()
            )));
        }
    }
    let a = read_outcomes(&first.csv)?;
    let b = read_outcomes(&second.csv)?;
    let comparison = pair(&a, &b).map_err(|message| {
        TrainError::Config(format!(
            "comparing {} with {}: {message}",
            args.a.display(),
            args.b.display()
        ))
    })?;
    print!("{}", report_text(&args.a, &args.b, &comparison));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_signed_unless_they_round_to_zero() {
        let texts: Vec<String> = [-0.004, -0.0, 0.0, 0.004, 0.005001, -1.5, 12.346]
            .into_iter()
            .map(signed)
            .collect();
        assert_eq!(
            texts,
            ["0.00", "0.00", "0.00", "0.00", "+0.01", "-1.50", "+12.35"]
        );
    }

    #[test]
    fn a_missing_report_is_named_with_where_reports_come_from() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("eval-best-test.json");
        let args = CompareArgs {
            a: missing.clone(),
            b: missing.clone(),
        };
        let err = run(&args).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: no such file", missing.display()))
                && err.contains("`vt-train eval`"),
            "{err}"
        );
    }

    /// A pipe, a device and a file of anything but a predictions CSV are refused without
    /// being read whole (a pipe's read blocked forever, `/dev/zero`'s took all memory).
    #[cfg(unix)]
    #[test]
    fn what_is_not_a_predictions_csv_is_refused_unread() {
        let root = tempfile::tempdir().unwrap();
        let pipe = root.path().join("a.csv");
        assert!(std::process::Command::new("mkfifo")
            .arg(&pipe)
            .status()
            .unwrap()
            .success());
        let zeros = root.path().join("zeros.csv");
        std::os::unix::fs::symlink("/dev/zero", &zeros).unwrap();
        for path in [&pipe, &zeros] {
            let err = read_outcomes(path).unwrap_err().to_string();
            assert!(err.contains("not a file"), "{err}");
        }
        // Past the header's bytes, none of them a line end (sparse: no disk is used).
        let nul = root.path().join("nul.csv");
        std::fs::File::create(&nul)
            .unwrap()
            .set_len(2 * MAX_HEADER_BYTES)
            .unwrap();
        let headless = root.path().join("headless.csv");
        std::fs::write(&headless, "image,class\na.jpg,x\n").unwrap();
        let err = read_outcomes(&nul).unwrap_err().to_string();
        assert!(
            err.contains("its first line is longer than 16 MiB"),
            "{err}"
        );
        let err = read_outcomes(&headless).unwrap_err().to_string();
        assert!(
            err.contains("is not a header with path, label and correct"),
            "{err}"
        );
        let csv = root.path().join("eval.csv");
        std::fs::write(&csv, "path,label,correct\nforest/1.jpg,forest,true\n").unwrap();
        assert_eq!(read_outcomes(&csv).unwrap().len(), 1);
        // As the csv crate reads them: old Mac line ends, a blank first line, a header
        // alone without its line end, and a column per class of many long names.
        let wide: String = (0..300)
            .map(|i| format!(",p_{i:04}_{}", "x".repeat(220)))
            .collect();
        for (text, images) in [
            (
                "path,label,correct\rforest/1.jpg,forest,true\r".to_string(),
                1,
            ),
            ("\npath,label,correct\nforest/1.jpg,forest,true\n".into(), 1),
            ("path,label,correct".into(), 0),
            (
                format!(
                    "path,label,correct{wide}\nforest/1.jpg,forest,true{}\n",
                    ",0.5".repeat(300)
                ),
                1,
            ),
        ] {
            std::fs::write(&csv, &text).unwrap();
            let read = read_outcomes(&csv).unwrap_or_else(|e| panic!("{e}: {text:.40}"));
            assert_eq!(read.len(), images);
        }
    }

    /// Exact values of the binomial sums (Python's `math.comb` over fractions).
    #[test]
    fn mcnemar_matches_the_binomial_sums() {
        for (b, c, p) in [
            (0, 0, 1.0),
            (5, 5, 1.0),
            (0, 6, 0.031_25),
            (10, 2, 0.038_574_218_75),
            (121, 59, 4.434_449_263_755_176e-6),
            (1500, 1400, 0.065_987_349_665_183_81),
        ] {
            let got = mcnemar_exact(b, c);
            assert!(
                (got - p).abs() <= 1e-9 * p.max(1e-300),
                "({b}, {c}): {got} vs {p}"
            );
            assert_eq!(got, mcnemar_exact(c, b));
        }
    }

    fn outcomes(rows: &[(&str, &str, bool)]) -> BTreeMap<String, Outcome> {
        rows.iter()
            .map(|&(key, label, correct)| {
                (
                    key.to_string(),
                    Outcome {
                        label: label.into(),
                        correct,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_reports_csv_is_the_one_beside_it_or_one_named_absolutely() {
        let root = tempfile::tempdir().unwrap();
        let report = root.path().join("eval-best-val.json");
        let write_report = |named: &Path| {
            let json = serde_json::json!({ "split": "val", "predictions": named });
            std::fs::write(&report, json.to_string()).unwrap();
        };
        let elsewhere = root.path().join("moved.csv");
        std::fs::write(&elsewhere, "").unwrap();
        // Relative to where `eval` ran, which is not known here.
        write_report(Path::new("moved.csv"));
        let err = evaluation(&report).err().unwrap().to_string();
        assert!(
            err.contains("its predictions CSV is not beside it"),
            "{err}"
        );
        write_report(&elsewhere);
        assert_eq!(evaluation(&report).unwrap().csv, elsewhere);
        let beside = report.with_extension("csv");
        std::fs::write(&beside, "").unwrap();
        assert_eq!(evaluation(&report).unwrap().csv, beside);
        assert_eq!(evaluation(&report).unwrap().split.as_deref(), Some("val"));
    }

    #[test]
    fn evaluations_pair_on_their_common_images() {
        let a = outcomes(&[
            ("sea/1.jpg", "sea", true),
            ("sea/2.jpg", "sea", true),
            ("sea/3.jpg", "sea", false),
            ("sea/4.jpg", "sea", true),
        ]);
        let b = outcomes(&[
            ("sea/1.jpg", "sea", false),
            ("sea/2.jpg", "sea", true),
            ("sea/3.jpg", "sea", true),
            ("sea/5.jpg", "sea", true),
        ]);
        let c = pair(&a, &b).unwrap();
        assert_eq!(
            c,
            Comparison {
                images: 3,
                a_correct: 2,
                b_correct: 2,
                only_a: 1,
                only_b: 1,
                unpaired: 2,
            }
        );
        assert_eq!(c.difference(), 0.0);
        let relabelled = outcomes(&[("sea/1.jpg", "street", true)]);
        assert!(pair(&a, &relabelled).unwrap_err().contains("labelled sea"));
        let other = outcomes(&[("forest/9.jpg", "forest", true)]);
        assert!(pair(&a, &other).unwrap_err().contains("no image in common"));
    }

    /// Newcombe's interval against a transcription of Fagerland, Lydersen and Laake's R
    /// code (Statistical Analysis of Contingency Tables, 2017, chapter 8), whose first
    /// example (Bentur et al.) the book gives as -0.507 to -0.026.
    #[test]
    fn the_interval_of_the_difference_is_newcombes() {
        let close = |x: f64, y: f64| (x - y).abs() < 1e-12;
        // Images both get right, only A, only B, neither; the interval.
        for (both, only_a, only_b, neither, low, high) in [
            (
                1,
                1,
                7,
                12,
                -0.506_920_226_686_141,
                -0.025_559_124_164_859_837,
            ),
            (
                59,
                6,
                16,
                80,
                -0.118_621_195_638_709_94,
                -0.004_625_113_933_050_061,
            ),
            (
                2800,
                95,
                62,
                43,
                0.002_797_280_890_567_99,
                0.019_358_757_115_756_728,
            ),
            (
                300,
                10,
                2,
                48,
                0.002_157_632_385_366_637_5,
                0.043_634_880_893_465_68,
            ),
            (
                2990,
                5,
                0,
                5,
                -5.741_284_058_244_388_6e-5,
                0.003_972_848_976_252_479,
            ),
            (
                120,
                14,
                11,
                5,
                -0.048_172_625_143_844_39,
                0.088_715_969_409_650_99,
            ),
            // Both always right: no correlation to use, and the interval is still not 0.
            (
                10,
                0,
                0,
                0,
                -0.277_532_799_862_889_15,
                0.277_532_799_862_889_15,
            ),
        ] {
            let c = Comparison {
                images: both + only_a + only_b + neither,
                a_correct: both + only_a,
                b_correct: both + only_b,
                only_a,
                only_b,
                unpaired: 0,
            };
            let (l, h) = c.difference_ci95();
            assert!(
                close(l, low) && close(h, high),
                "{both}/{only_a}/{only_b}/{neither}: {l} {h}"
            );
        }
    }
}
