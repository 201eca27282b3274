//! Parquet mirrors as the Hugging Face `datasets` library writes them: an `image` struct
//! column `{bytes: binary, path: string}` and a `label` column, either an integer index
//! (`-1` or null for unlabelled) or the class name, in any case for a name on the class
//! list. An index is into the label names that `datasets` stores in the file's metadata
//! (its `ClassLabel` feature), else into the class list.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};

use crate::error::{DataError, Result};
use crate::import::{Importer, RawImage};
use crate::layout::Role;
use crate::source::{too_large, MAX_FILE_BYTES};

/// Which source split a parquet file holds, from its name (`data/train-00000-of-00002.parquet`,
/// `seg_test-….parquet`) or its folder (`default/test/0000.parquet`). Training and
/// validation files join the training pool, which is split into train/val later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParquetSplit {
    Train,
    Test,
    Pred,
}

impl ParquetSplit {
    /// The split names understood, as an error lists them.
    pub const KNOWN: &str =
        "train, validation (or valid, val), test, pred, seg_train, seg_test, seg_pred";

    /// `None` when the file's name and folders name none of [`Self::KNOWN`]: guessing would
    /// put test images into training.
    pub fn of_file(path: &str) -> Option<ParquetSplit> {
        let lower = path.to_ascii_lowercase();
        let mut parts = lower.rsplit('/');
        let file = parts.next().unwrap_or_default();
        let stem = file.split('-').next().unwrap_or(file);
        let stem = stem.split('.').next().unwrap_or(stem);
        std::iter::once(stem)
            .chain(parts)
            .find_map(|name| match name {
                "train" | "validation" | "valid" | "val" | "seg_train" => Some(ParquetSplit::Train),
                "test" | "seg_test" => Some(ParquetSplit::Test),
                "pred" | "seg_pred" => Some(ParquetSplit::Pred),
                _ => None,
            })
    }
}

fn parquet_error(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Imports all rows of one parquet file. `display` names the file in skip reports.
pub fn import_parquet(
    path: &Path,
    display: &str,
    split: ParquetSplit,
    classes: &[String],
    importer: &mut Importer,
) -> Result<usize> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| parquet_error(path, e))?;
    let names = label_names(&reader);
    let names = match &names {
        Some(names) => names.as_slice(),
        None => {
            let message = format!(
                "{display} names no label classes in its metadata: integer labels index {}",
                classes.join(", ")
            );
            tracing::info!("{message}");
            classes
        }
    };
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| parquet_error(path, e))?;
    let mut count = 0;
    for (i, row) in rows.enumerate() {
        // A broken row group ends the file: the rest cannot be located reliably.
        let row = row.map_err(|e| parquet_error(path, e))?;
        let where_ = format!("{display}#row{i}");
        match parse_row(&row, names, classes) {
            Err(reason) => importer.skip(where_, reason)?,
            Ok((bytes, name, label)) => {
                let role = match (split, label) {
                    (ParquetSplit::Pred, _) | (_, None) => Role::Pred,
                    (ParquetSplit::Train, Some(class)) => Role::Train(class),
                    (ParquetSplit::Test, Some(class)) => Role::Test(class),
                };
                let named_by_source = name.is_some();
                let name = name.unwrap_or_else(|| format!("{}-{i:06}", stem_of(display)));
                importer.add(RawImage {
                    source_path: where_,
                    role,
                    name,
                    named_by_source,
                    bytes,
                })?;
                count += 1;
            }
        }
    }
    Ok(count)
}

fn stem_of(display: &str) -> String {
    let name = display.rsplit('/').next().unwrap_or(display);
    name.split('.').next().unwrap_or(name).to_string()
}

type Parsed = (Vec<u8>, Option<String>, Option<String>);

/// The names of the label column's classes, as the `datasets` library stores its
/// `ClassLabel` feature in the file's `huggingface` metadata:
/// `{"info": {"features": {"label": {"names": [...], "_type": "ClassLabel"}}}}`.
fn label_names(reader: &SerializedFileReader<File>) -> Option<Vec<String>> {
    let metadata = reader.metadata().file_metadata().key_value_metadata()?;
    let text = metadata
        .iter()
        .find(|entry| entry.key == "huggingface")?
        .value
        .as_deref()?;
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    let features = json.pointer("/info/features")?;
    ["label", "labels"]
        .iter()
        .find_map(|column| features.get(*column)?.get("names")?.as_array())?
        .iter()
        .map(|name| name.as_str().map(str::to_string))
        .collect()
}

/// (image bytes, original file name, class name or None when unlabelled); an integer label
/// indexes `names`, a name is one of `classes` in any case, or a class of its own.
fn parse_row(
    row: &Row,
    names: &[String],
    classes: &[String],
) -> std::result::Result<Parsed, String> {
    let mut image = None;
    let mut label = None;
    for (name, field) in row.get_column_iter() {
        match name.as_str() {
            "image" | "img" => image = Some(field),
            "label" | "labels" => label = Some(field),
            _ => {}
        }
    }
    // Checked before the copy: one row's bytes are held twice while it is parsed.
    let capped = |data: &[u8]| {
        if data.len() as u64 > MAX_FILE_BYTES {
            Err(too_large("image", data.len() as u64))
        } else {
            Ok(data.to_vec())
        }
    };
    let (bytes, name) = match image {
        None => return Err("row has no `image` column".into()),
        Some(Field::Bytes(b)) => (capped(b.data())?, None),
        Some(Field::Group(group)) => {
            let mut bytes = None;
            let mut name = None;
            for (key, value) in group.get_column_iter() {
                match (key.as_str(), value) {
                    ("bytes", Field::Bytes(b)) => bytes = Some(capped(b.data())?),
                    ("path", Field::Str(p)) => {
                        name = p.rsplit(['/', '\\']).next().map(str::to_string)
                    }
                    _ => {}
                }
            }
            match bytes {
                Some(b) => (b, name.filter(|n| !n.is_empty())),
                None => return Err("image has no embedded bytes".into()),
            }
        }
        Some(other) => return Err(format!("unexpected image column value {other}")),
    };
    let index = match label {
        None | Some(Field::Null) => None,
        Some(Field::Str(s)) => return Ok((bytes, name, Some(class_named(s, classes)))),
        Some(Field::Byte(v)) => Some(i64::from(*v)),
        Some(Field::Short(v)) => Some(i64::from(*v)),
        Some(Field::Int(v)) => Some(i64::from(*v)),
        Some(Field::Long(v)) => Some(*v),
        Some(Field::UByte(v)) => Some(i64::from(*v)),
        Some(Field::UShort(v)) => Some(i64::from(*v)),
        Some(Field::UInt(v)) => Some(i64::from(*v)),
        Some(Field::ULong(v)) => i64::try_from(*v).ok(),
        Some(other) => return Err(format!("unexpected label value {other}")),
    };
    match index {
        None | Some(-1) => Ok((bytes, name, None)),
        Some(i) => match usize::try_from(i).ok().and_then(|i| names.get(i)) {
            Some(label) => Ok((bytes, name, Some(class_named(label, classes)))),
            None => Err(format!("label {i} outside the {} classes", names.len())),
        },
    }
}

/// A label that names a listed class in another case (`Buildings`) is that class; any other
/// name is a class of its own, taken as it is.
fn class_named(label: &str, classes: &[String]) -> String {
    classes
        .iter()
        .find(|class| class.eq_ignore_ascii_case(label))
        .cloned()
        .unwrap_or_else(|| label.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_from_file_names() {
        for (path, split) in [
            ("data/train-00000-of-00001.parquet", ParquetSplit::Train),
            ("data/test-00000-of-00001.parquet", ParquetSplit::Test),
            ("default/test/0000.parquet", ParquetSplit::Test),
            ("data/validation-0.parquet", ParquetSplit::Train),
            ("data/pred-0.parquet", ParquetSplit::Pred),
            ("data/seg_test-00000-of-00002.parquet", ParquetSplit::Test),
            ("data/seg_pred-00000-of-00001.parquet", ParquetSplit::Pred),
            ("data/seg_train-00001-of-00002.parquet", ParquetSplit::Train),
            ("train.parquet", ParquetSplit::Train),
        ] {
            assert_eq!(ParquetSplit::of_file(path), Some(split), "{path}");
        }
        assert_eq!(ParquetSplit::of_file("data/extra-0.parquet"), None);
    }
}
