//! `vt-train compare A B`: whether two evaluations on the same images differ by more than
//! chance. Each accuracy's own interval is about ±1 point on the Intel test split, too wide
//! to tell two recipes a point apart; paired on the images, the photos only one of them
//! gets right carry the difference, and McNemar's exact test says how likely that split of
//! them is when both are equally good (McNemar 1947; the exact binomial form, as
//! statsmodels' `mcnemar(exact=True)`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, TrainError};

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

    /// The 95 % Wald interval of the paired difference (Agresti, "Categorical Data
    /// Analysis", 10.1.1).
    pub fn difference_ci95(&self) -> (f64, f64) {
        let n = self.images.max(1) as f64;
        let (b, c) = (self.only_a as f64, self.only_b as f64);
        let se = ((b + c) - (b - c).powi(2) / n).max(0.0).sqrt() / n;
        let d = self.difference();
        (d - 1.96 * se, d + 1.96 * se)
    }

    /// McNemar's exact two-sided p-value.
    pub fn p_value(&self) -> f64 {
        mcnemar_exact(self.only_a, self.only_b)
    }
}

/// McNemar's exact test: with `b` and `c` discordant pairs, twice the probability of at most
/// min(b, c) successes in b + c fair coin tosses, at most 1.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    // ln k! for k = 0..=n, so that the binomial terms stay finite for any n.
    let mut ln_factorial = Vec::with_capacity(n as usize + 1);
    ln_factorial.push(0.0f64);
    for k in 1..=n {
        ln_factorial.push(ln_factorial[k as usize - 1] + (k as f64).ln());
    }
    let ln_pmf = |k: u64| {
        ln_factorial[n as usize]
            - ln_factorial[k as usize]
            - ln_factorial[(n - k) as usize]
            - n as f64 * std::f64::consts::LN_2
    };
    let tail: f64 = (0..=b.min(c)).map(|k| ln_pmf(k).exp()).sum();
    (2.0 * tail).min(1.0)
}

/// The predictions CSV of `path`: the file itself, or the one a JSON report names.
fn predictions_csv(path: &Path) -> Result<PathBuf> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if !is_json {
        return Ok(path.to_path_buf());
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| TrainError::file_op("reading", path, e))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|cause| TrainError::Json {
            path: path.to_path_buf(),
            cause,
        })?;
    report["predictions"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| {
            TrainError::Config(format!(
                "{}: no \"predictions\" CSV named: a report of `vt-train eval` names one",
                path.display()
            ))
        })
}

/// An evaluation's outcomes, keyed by the image's class folder and file name, so that the
/// same split read through two spellings of its folder pairs up.
fn read_outcomes(csv_path: &Path) -> Result<BTreeMap<String, Outcome>> {
    let invalid = |message: String| {
        TrainError::Config(format!(
            "{}: {message}; expected the predictions CSV of `vt-train eval`",
            csv_path.display()
        ))
    };
    let mut reader =
        csv::Reader::from_path(csv_path).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    let mut outcomes = BTreeMap::new();
    for row in reader.deserialize::<Row>() {
        let row = row.map_err(|e| invalid(e.to_string()))?;
        let path = Path::new(&row.path);
        let key: PathBuf = path
            .iter()
            .rev()
            .take(2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let key = key.to_string_lossy().into_owned();
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
         difference A - B: {:+.2} points (95% interval {:+.2} to {:+.2})\n\
         McNemar's exact test: p = {}: {verdict}\n",
        c.images,
        c.only_a,
        c.only_b,
        100.0 * c.difference(),
        100.0 * low,
        100.0 * high,
        if p < 1e-4 {
            format!("{p:.1e}")
        } else {
            format!("{p:.4}")
        }
    );
    out
}

pub fn run(args: &CompareArgs) -> Result<()> {
    let a = read_outcomes(&predictions_csv(&args.a)?)?;
    let b = read_outcomes(&predictions_csv(&args.b)?)?;
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

    #[test]
    fn the_interval_of_the_difference_holds_it() {
        let c = Comparison {
            images: 3000,
            a_correct: 2736,
            b_correct: 2703,
            only_a: 95,
            only_b: 62,
            unpaired: 0,
        };
        assert!((c.difference() - 0.011).abs() < 1e-12);
        let (low, high) = c.difference_ci95();
        // sqrt(157 - 33^2/3000) / 3000, times 1.96.
        assert!(
            (high - c.difference() - 1.96 * 0.004_171_823_475_545_33).abs() < 1e-12,
            "{high}"
        );
        assert!(low > 0.0 && low < c.difference());
    }
}
