//! Classification scores and the per-epoch metrics files `metrics.jsonl` (one JSON object
//! per epoch, appended) and `metrics.csv` (the same records as a table, rewritten whole).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use vt_model::temporary::{self, Kind};

use crate::error::{Result, TrainError};

/// Counts of (true class, predicted class): `counts[truth][prediction]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    pub classes: Vec<String>,
    pub counts: Vec<Vec<u64>>,
}

/// Precision, recall and F1 of one class; 0 where undefined (no support or no predictions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    pub class: String,
    pub support: u64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// The 95 % Wilson score interval of a proportion of `successes` in `trials`; it stays
/// within [0, 1] and is sound for small samples and proportions near 0 or 1, unlike the
/// normal approximation. No trials say nothing: [0, 1].
pub fn wilson_interval(successes: u64, trials: u64) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    // The standard normal's 97.5th percentile.
    const Z: f64 = 1.959_963_984_540_054;
    let n = trials as f64;
    let p = successes as f64 / n;
    let z2 = Z * Z;
    let denominator = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denominator;
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    ((center - half).max(0.0), (center + half).min(1.0))
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl ConfusionMatrix {
    pub fn new(classes: Vec<String>) -> Self {
        let k = classes.len();
        ConfusionMatrix {
            classes,
            counts: vec![vec![0; k]; k],
        }
    }

    /// Adds a batch; labels outside the class range are ignored.
    pub fn add(&mut self, truth: &[u32], predicted: &[u32]) {
        let k = self.classes.len();
        for (&t, &p) in truth.iter().zip(predicted) {
            let (t, p) = (t as usize, p as usize);
            if t < k && p < k {
                self.counts[t][p] += 1;
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    pub fn correct(&self) -> u64 {
        (0..self.classes.len()).map(|i| self.counts[i][i]).sum()
    }

    pub fn accuracy(&self) -> f64 {
        ratio(self.correct(), self.total())
    }

    /// The 95 % Wilson score interval of the accuracy: where the accuracy on the whole
    /// population of such images lies, given this sample of them. Two checkpoints whose
    /// intervals overlap widely are not told apart by this split.
    pub fn accuracy_interval(&self) -> (f64, f64) {
        wilson_interval(self.correct(), self.total())
    }

    /// Recall of class `k`, i.e. its accuracy.
    pub fn recall(&self, k: usize) -> f64 {
        ratio(self.counts[k][k], self.counts[k].iter().sum())
    }

    pub fn precision(&self, k: usize) -> f64 {
        ratio(
            self.counts[k][k],
            self.counts.iter().map(|row| row[k]).sum(),
        )
    }

    pub fn scores(&self) -> Vec<ClassScores> {
        (0..self.classes.len())
            .map(|k| {
                let (precision, recall) = (self.precision(k), self.recall(k));
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                ClassScores {
                    class: self.classes[k].clone(),
                    support: self.counts[k].iter().sum(),
                    precision,
                    recall,
                    f1,
                }
            })
            .collect()
    }

    /// The mean F1 over the classes present in the labels or the predictions, as
    /// scikit-learn's `f1_score(average="macro")`: a class absent from both has no F1 to
    /// average. 0 for an empty matrix.
    pub fn macro_f1(&self) -> f64 {
        let present: Vec<f64> = self
            .scores()
            .into_iter()
            .enumerate()
            .filter(|(k, s)| s.support > 0 || self.counts.iter().any(|row| row[*k] > 0))
            .map(|(_, s)| s.f1)
            .collect();
        if present.is_empty() {
            0.0
        } else {
            present.iter().sum::<f64>() / present.len() as f64
        }
    }

    /// Per-class accuracy keyed by class name; NaN (`null` in JSON) for a class without
    /// images here, which has no accuracy to report.
    pub fn class_accuracy(&self) -> BTreeMap<String, f64> {
        (0..self.classes.len())
            .map(|k| {
                let accuracy = if self.counts[k].iter().sum::<u64>() == 0 {
                    f64::NAN
                } else {
                    self.recall(k)
                };
                (self.classes[k].clone(), accuracy)
            })
            .collect()
    }

    /// The matrix as an aligned text table, rows = true class, columns = prediction.
    pub fn to_text(&self) -> String {
        let width = self
            .classes
            .iter()
            .map(String::len)
            .chain(self.counts.iter().flatten().map(|c| c.to_string().len()))
            .max()
            .unwrap_or(1)
            .max(4);
        let mut out = format!("{:>width$}", "true\\pred");
        for name in &self.classes {
            out += &format!(" {name:>width$}");
        }
        out.push('\n');
        for (name, row) in self.classes.iter().zip(&self.counts) {
            out += &format!("{name:>width$}");
            for c in row {
                out += &format!(" {c:>width$}");
            }
            out.push('\n');
        }
        out
    }
}

/// JSON has no NaN or infinity: serde_json writes them as `null`, read back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn nan_if_null_values<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let map = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(map
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
        .collect())
}

/// One line of `metrics.jsonl`. Accuracies are fractions in [0, 1]; `lr` is the rate of
/// the epoch's last step; `img_per_s` counts training images over the training time. A
/// value that is not finite (a diverged loss) is written as `null` and read back as NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub train_acc: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub val_acc: f64,
    #[serde(deserialize_with = "nan_if_null_values")]
    pub val_class_acc: BTreeMap<String, f64>,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub img_per_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub epoch_time_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm_mean: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm_max: f64,
    /// Steps whose gradient was scaled down by clipping.
    pub clipped_steps: u64,
    /// Steps skipped because the loss or gradient was not finite.
    pub skipped_steps: u64,
    /// Optimiser steps since the start of the run.
    pub global_step: u64,
    /// Whether the stem was frozen (`--freeze-stem-epochs`).
    pub stem_frozen: bool,
    /// Whether this epoch is the best so far (it was written to `best/`).
    pub best: bool,
}

pub const METRICS_JSONL: &str = "metrics.jsonl";
pub const METRICS_CSV: &str = "metrics.csv";

/// The metrics files of a run folder.
#[derive(Debug, Clone)]
pub struct MetricsLog {
    pub jsonl: PathBuf,
    pub csv: PathBuf,
}

impl MetricsLog {
    pub fn new(run_dir: &Path) -> Self {
        MetricsLog {
            jsonl: run_dir.join(METRICS_JSONL),
            csv: run_dir.join(METRICS_CSV),
        }
    }

    /// The records written so far. A torn last line (the process died while appending) is
    /// ignored; any other unreadable line is an error.
    pub fn read(&self) -> Result<Vec<EpochRecord>> {
        let text = match fs::read_to_string(&self.jsonl) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(TrainError::io(&self.jsonl, e)),
        };
        // One stream over the whole file, so that an error names its real line.
        let mut records = Vec::new();
        for record in serde_json::Deserializer::from_str(&text).into_iter() {
            match record {
                Ok(record) => records.push(record),
                // A torn last line ends the file mid-record.
                Err(cause) if cause.is_eof() => break,
                Err(cause) => {
                    return Err(TrainError::Json {
                        path: self.jsonl.clone(),
                        cause,
                    })
                }
            }
        }
        Ok(records)
    }

    /// Appends one record to `metrics.jsonl` and flushes it to disk.
    pub fn append(&self, record: &EpochRecord) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|cause| TrainError::JsonWrite {
            path: self.jsonl.clone(),
            cause,
        })?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.jsonl)
            .map_err(|e| TrainError::io(&self.jsonl, e))?;
        file.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| TrainError::io(&self.jsonl, e))
    }

    /// Replaces both files with `records` (used when a resumed run drops epochs that were
    /// logged after the saved state).
    pub fn rewrite(&self, records: &[EpochRecord], classes: &[String]) -> Result<()> {
        let mut text = String::new();
        for record in records {
            let line = serde_json::to_string(record).map_err(|cause| TrainError::JsonWrite {
                path: self.jsonl.clone(),
                cause,
            })?;
            text += &line;
            text.push('\n');
        }
        write_atomically(&self.jsonl, text.as_bytes())?;
        self.write_csv(records, classes)
    }

    /// Rewrites `metrics.csv` from the records.
    pub fn write_csv(&self, records: &[EpochRecord], classes: &[String]) -> Result<()> {
        write_csv_atomically(&self.csv, &csv_rows(records, classes))
    }
}

const CSV_COLUMNS: [&str; 15] = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "img_per_s",
    "epoch_time_s",
    "grad_norm_mean",
    "grad_norm_max",
    "clipped_steps",
    "skipped_steps",
    "global_step",
    "stem_frozen",
    "best",
];

fn csv_rows(records: &[EpochRecord], classes: &[String]) -> Vec<Vec<String>> {
    let mut header: Vec<String> = CSV_COLUMNS.iter().map(|c| c.to_string()).collect();
    header.extend(classes.iter().map(|c| format!("val_acc_{c}")));
    let mut rows = vec![header];
    for r in records {
        let mut row = vec![
            r.epoch.to_string(),
            r.train_loss.to_string(),
            r.train_acc.to_string(),
            r.val_loss.to_string(),
            r.val_acc.to_string(),
            r.lr.to_string(),
            r.img_per_s.to_string(),
            r.epoch_time_s.to_string(),
            r.grad_norm_mean.to_string(),
            r.grad_norm_max.to_string(),
            r.clipped_steps.to_string(),
            r.skipped_steps.to_string(),
            r.global_step.to_string(),
            r.stem_frozen.to_string(),
            r.best.to_string(),
        ];
        row.extend(
            classes
                .iter()
                .map(|c| r.val_class_acc.get(c).map_or(String::new(), f64::to_string)),
        );
        rows.push(row);
    }
    rows
}

/// Writes `rows` (the header first) to `path` as CSV, quoted where a cell needs it (class
/// names and paths may contain anything), atomically ([`write_atomically`]).
pub fn write_csv_atomically(path: &Path, rows: &[Vec<String>]) -> Result<()> {
    stage_csv(path, rows)?.commit()
}

/// [`write_csv_atomically`]'s file, [`stage`]d.
pub fn stage_csv(path: &Path, rows: &[Vec<String>]) -> Result<Staged> {
    let mut table = csv::Writer::from_writer(Vec::new());
    for row in rows {
        table
            .write_record(row)
            .map_err(|e| TrainError::io(path, e.into()))?;
    }
    let bytes = table
        .into_inner()
        .map_err(|e| TrainError::io(path, e.into_error()))?;
    stage_bytes(path, "", &bytes)
}

/// Writes `path` through a temporary sibling and a rename, so readers never see half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    stage_bytes(path, "", bytes)?.commit()
}

/// [`write_atomically`]'s file, [`stage`]d, its temporary's name ending in `suffix`.
pub fn stage_bytes(path: &Path, suffix: &str, bytes: &[u8]) -> Result<Staged> {
    stage(path, suffix, |tmp| {
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(tmp)?;
            file.write_all(bytes)?;
            file.sync_all()
        };
        // Named by what it writes: the temporary is gone with the error.
        write().map_err(|e| TrainError::file_op("writing", path, e))
    })
}

/// Has `write` write `.NAME.tmp-PID{suffix}` beside `path` (it finds it there, empty: it
/// must write that file, not replace it, to keep the lock on it), then renames it over
/// `path` and flushes the rename. The temporary is removed when a step fails, so a failed
/// write leaves nothing behind; those of writers killed midway are removed first, those of
/// live ones never ([`vt_model::temporary::create`]).
pub fn replace_through_temporary(
    path: &Path,
    suffix: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    stage(path, suffix, write)?.commit()
}

/// [`replace_through_temporary`]'s write, without its rename: the file is written and
/// waits beside `path` until [`Staged::commit`], so that several files can be written
/// before any earlier one is replaced.
pub fn stage(path: &Path, suffix: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<Staged> {
    // Locked until the rename is done.
    let temporary = temporary::create(path, suffix, Kind::File)?;
    let tmp = temporary.path().to_path_buf();
    let staged = Staged {
        temporary: Some(temporary),
        target: path.to_path_buf(),
    };
    write(&tmp)?;
    Ok(staged)
}

/// A file written beside its target, not yet in place: dropped uncommitted (a later file
/// failed), its temporary is removed, and the target is as it was.
#[derive(Debug)]
pub struct Staged {
    temporary: Option<temporary::Temporary>,
    target: PathBuf,
}

impl Staged {
    /// Renames the file over its target and flushes the rename.
    pub fn commit(mut self) -> Result<()> {
        let Some(temporary) = self.temporary.take() else {
            return Ok(());
        };
        let parent = self
            .target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let result = fs::rename(temporary.path(), &self.target)
            .map_err(|e| TrainError::io(&self.target, e))
            // The rename itself, on disk.
            .and_then(|()| Ok(vt_model::checkpoint::sync_dir(parent)?));
        if result.is_err() {
            // Best effort: the error being returned is the one that matters.
            let _ = fs::remove_file(temporary.path());
        }
        result
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(temporary) = &self.temporary {
            let _ = fs::remove_file(temporary.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: usize) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: 1.0 / epoch as f64,
            train_acc: 0.5,
            val_loss: 0.9,
            val_acc: 0.25,
            val_class_acc: [("a".to_string(), 0.5), ("b,c".to_string(), 0.0)].into(),
            lr: 0.01,
            img_per_s: 10.0,
            epoch_time_s: 2.0,
            grad_norm_mean: 1.5,
            grad_norm_max: 3.0,
            clipped_steps: 1,
            skipped_steps: 0,
            global_step: 4 * epoch as u64,
            stem_frozen: false,
            best: epoch == 1,
        }
    }

    #[test]
    fn scores_follow_their_definitions() {
        let mut cm = ConfusionMatrix::new(vec!["a".into(), "b".into(), "c".into()]);
        // a: 3 right, 1 as b; b: 2 right; c: 1 as a, never predicted.
        cm.add(&[0, 0, 0, 0, 1, 1, 2], &[0, 0, 0, 1, 1, 1, 0]);
        cm.add(&[7], &[0]); // out of range: ignored
        assert_eq!(cm.total(), 7);
        assert!((cm.accuracy() - 5.0 / 7.0).abs() < 1e-12);
        let (low, high) = cm.accuracy_interval();
        assert!(low < 5.0 / 7.0 && 5.0 / 7.0 < high, "{low} {high}");
        let s = cm.scores();
        assert_eq!(s[0].support, 4);
        assert!((s[0].precision - 0.75).abs() < 1e-12 && (s[0].recall - 0.75).abs() < 1e-12);
        assert!((s[1].precision - 2.0 / 3.0).abs() < 1e-12 && s[1].recall == 1.0);
        assert!((s[1].f1 - 0.8).abs() < 1e-12);
        assert_eq!((s[2].precision, s[2].recall, s[2].f1), (0.0, 0.0, 0.0));
        let text = cm.to_text();
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .eq(["a", "3", "1", "0"]),
            "{text}"
        );
    }

    #[test]
    fn macro_f1_averages_the_classes_in_labels_or_predictions() {
        let mut cm = ConfusionMatrix::new(vec!["a".into(), "b".into(), "c".into(), "d".into()]);
        // a: 1 right, 1 as c (c: no support, predicted once); d: neither.
        cm.add(&[0, 0, 1], &[0, 2, 1]);
        let f1: Vec<f64> = cm.scores().iter().map(|s| s.f1).collect();
        assert_eq!(f1[2], 0.0);
        assert!((cm.macro_f1() - (f1[0] + f1[1] + f1[2]) / 3.0).abs() < 1e-12);
        assert_eq!(ConfusionMatrix::new(vec!["a".into()]).macro_f1(), 0.0);
        // A class without validation images has no accuracy, not an accuracy of 0.
        let accuracy = cm.class_accuracy();
        assert_eq!((accuracy["a"], accuracy["b"]), (0.5, 1.0));
        assert!(accuracy["c"].is_nan() && accuracy["d"].is_nan());
    }

    #[test]
    fn records_read_back_bit_exactly_and_non_finite_values_as_nan() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(dir.path());
        // 22/96 lost its last bit when read without serde_json's float_roundtrip.
        let exact = EpochRecord {
            val_acc: 22.0 / 96.0,
            val_loss: 0.1 + 0.2,
            val_class_acc: [("a".to_string(), 22.0 / 96.0)].into(),
            ..record(1)
        };
        let diverged = EpochRecord {
            train_loss: f64::INFINITY,
            val_loss: f64::NAN,
            val_class_acc: [("a".to_string(), f64::NAN)].into(),
            ..record(2)
        };
        log.append(&exact).unwrap();
        log.append(&diverged).unwrap();
        let read = log.read().unwrap();
        assert_eq!(read[0].val_acc.to_bits(), (22.0f64 / 96.0).to_bits());
        assert_eq!(read[0], exact);
        assert!(read[1].train_loss.is_nan() && read[1].val_loss.is_nan());
        assert!(read[1].val_class_acc["a"].is_nan());
        assert_eq!(read[1].val_acc, diverged.val_acc);
        // A rewrite (as on resume) keeps every line as it was.
        let before = fs::read_to_string(&log.jsonl).unwrap();
        log.rewrite(&read, &["a".to_string()]).unwrap();
        assert_eq!(fs::read_to_string(&log.jsonl).unwrap(), before);
    }

    #[test]
    fn log_appends_rewrites_and_ignores_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(dir.path());
        assert!(log.read().unwrap().is_empty());
        for e in 1..=3 {
            log.append(&record(e)).unwrap();
        }
        let classes = vec!["a".to_string(), "b,c".to_string()];
        log.write_csv(&log.read().unwrap(), &classes).unwrap();
        let csv = fs::read_to_string(&log.csv).unwrap();
        assert!(
            csv.lines()
                .next()
                .unwrap()
                .ends_with("best,val_acc_a,\"val_acc_b,c\""),
            "{csv}"
        );
        assert_eq!(csv.lines().count(), 4);

        let mut file = OpenOptions::new().append(true).open(&log.jsonl).unwrap();
        file.write_all(b"{\"epoch\": 4, \"train_lo").unwrap();
        assert_eq!(log.read().unwrap().len(), 3);

        let kept: Vec<EpochRecord> = log
            .read()
            .unwrap()
            .into_iter()
            .filter(|r| r.epoch <= 2)
            .collect();
        log.rewrite(&kept, &classes).unwrap();
        assert_eq!(log.read().unwrap(), vec![record(1), record(2)]);
        assert_eq!(fs::read_to_string(&log.csv).unwrap().lines().count(), 3);

        fs::write(&log.jsonl, "not json\n{}\n").unwrap();
        assert!(log.read().is_err());
        let lines = format!(
            "{}\n\n{{\"epoch\":3 oops}}\n",
            serde_json::to_string(&record(1)).unwrap()
        );
        fs::write(&log.jsonl, lines).unwrap();
        let refused = log.read().unwrap_err().to_string();
        assert!(refused.contains("at line 3 column"), "{refused}");
    }

    #[test]
    fn a_failed_atomic_write_leaves_the_target_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("metrics.csv");
        write_atomically(&file, b"one").unwrap();
        write_atomically(&file, b"two").unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "two");
        // A directory in the way makes the rename fail after the temporary was written.
        let blocked = dir.path().join("blocked");
        fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_atomically(&blocked, b"three").is_err());
        let refused = replace_through_temporary(&file, ".png", |tmp| {
            fs::write(tmp, b"half").unwrap();
            Err(TrainError::io(tmp, std::io::Error::other("disk full")))
        });
        assert!(refused.is_err());
        assert_eq!(fs::read_to_string(&file).unwrap(), "two");
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["blocked", "metrics.csv"]);
    }

    /// A writer killed midway leaves its temporary (no lock held any more): the next write
    /// removes it. A live writer's (locked) stays, whoever's pid it names.
    #[cfg(unix)]
    #[test]
    fn killed_writers_temporaries_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.onnx");
        let killed = dir.path().join(".model.onnx.tmp-999991");
        fs::write(&killed, b"half of a large file").unwrap();
        let live = dir.path().join(".model.onnx.tmp-999992");
        fs::write(&live, b"being written").unwrap();
        let lock = OpenOptions::new().write(true).open(&live).unwrap();
        lock.lock().unwrap();
        write_atomically(&file, b"model").unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "model");
        assert!(!killed.exists());
        assert_eq!(fs::read_to_string(&live).unwrap(), "being written");
        drop(lock);
        write_atomically(&file, b"again").unwrap();
        assert!(!live.exists());
    }

    /// Against the formula evaluated independently (Python, float64).
    #[test]
    fn wilson_intervals_match_the_formula_and_stay_in_range() {
        for (successes, trials, low, high) in [
            (283, 360, 0.740_848_632_249_569_9, 0.825_332_035_197_455_5),
            (2700, 3000, 0.888_747_973_652_687_7, 0.910_228_947_367_051_6),
            (0, 10, 0.0, 0.277_532_799_862_889_2),
            (10, 10, 0.722_467_200_137_110_7, 1.0),
        ] {
            let (l, h) = wilson_interval(successes, trials);
            assert!(
                (l - low).abs() < 1e-12 && (h - high).abs() < 1e-12,
                "{successes}/{trials}: {l} {h}"
            );
        }
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
    }
}
