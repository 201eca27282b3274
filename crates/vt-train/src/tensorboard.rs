//! TensorBoard event files, so that `tensorboard --logdir runs` follows a run live: the loss,
//! learning rate and gradient norm of every optimiser step, and each epoch's metrics.
//!
//! The format is TensorFlow's, as PyTorch's `SummaryWriter` writes it: a file named
//! `events.out.tfevents.*` of records (the length, a masked CRC-32C of it, an `Event`
//! protocol buffer, its masked CRC-32C), starting with a `file_version` event. Each process
//! writes a file of its own; the first one of a resumed run opens a session at the step it
//! resumes from, and TensorBoard then drops the points an interrupted process logged at that
//! step and after (PyTorch's `purge_step`), so every step is shown once.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crc_fast::CrcAlgorithm;
use prost::Message;

use crate::error::{Result, TrainError};

/// `tensorflow.Event` (tensorflow/core/util/event.proto), the fields written here.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`. The number is a oneof member, as in the original: written
/// even when it is 0, which TensorBoard would otherwise read as no scalar at all.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(oneof = "Scalar", tags = "2")]
    value: Option<Scalar>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Scalar {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

/// `tensorflow.SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    /// `SessionLog.SessionStatus`.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `SessionLog.START`: TensorBoard purges the points at this event's step and after.
const SESSION_START: i32 = 1;

/// TFRecord's masked CRC-32C.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, bytes) as u32;
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: the length and its CRC, the data and its CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends a run's scalars to an event file of its own. Writing is a convenience, as the
/// plots are: the first failure is logged and ends the logging, not the training.
pub struct EventWriter {
    path: PathBuf,
    file: Option<File>,
}

impl EventWriter {
    /// Starts a new event file in `dir` whose points begin at `first_step`: points logged
    /// there from `first_step` on by earlier processes are dropped. TensorBoard reads a
    /// run's files in the order of their names: the time, then a number past those of the
    /// files already there, put this one after them.
    pub fn create(dir: &Path, first_step: u64) -> Result<EventWriter> {
        let wall_time = now();
        let existing = std::fs::read_dir(dir)
            .map_err(|e| TrainError::file_op("reading", dir, e))?
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_name().to_string_lossy().contains("tfevents"))
            .count();
        let mut number = existing;
        let (path, file) = loop {
            let path = dir.join(format!(
                "events.out.tfevents.{}.vt-train.{number:04}",
                wall_time as u64
            ));
            match OpenOptions::new().append(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && number < existing + 100 => {
                    number += 1;
                }
                Err(e) => return Err(TrainError::file_op("creating", &path, e)),
            }
        };
        let mut writer = EventWriter {
            path,
            file: Some(file),
        };
        let step = first_step as i64;
        let opening = [
            Event {
                wall_time,
                step,
                what: Some(What::FileVersion("brain.Event:2".into())),
            },
            Event {
                wall_time,
                step,
                what: Some(What::SessionLog(SessionLog {
                    status: SESSION_START,
                })),
            },
        ];
        let bytes: Vec<u8> = opening
            .iter()
            .flat_map(|e| record(&e.encode_to_vec()))
            .collect();
        writer
            .file
            .as_mut()
            .map_or(Ok(()), |f| f.write_all(&bytes))
            .map_err(|e| TrainError::file_op("writing", &writer.path, e))?;
        Ok(writer)
    }

    /// A writer that writes nothing, for a run whose event file could not be created.
    pub fn disabled(dir: &Path) -> EventWriter {
        EventWriter {
            path: dir.to_path_buf(),
            file: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs `values` (tag, number) at `step`, in one event, written at once so that
    /// TensorBoard sees it while the run goes on.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let event = Event {
            wall_time: now(),
            step: step as i64,
            what: Some(What::Summary(Summary {
                value: values
                    .iter()
                    .map(|&(tag, value)| SummaryValue {
                        tag: tag.to_string(),
                        value: Some(Scalar::SimpleValue(value as f32)),
                    })
                    .collect(),
            })),
        };
        if let Err(e) = file.write_all(&record(&event.encode_to_vec())) {
            tracing::warn!(
                "writing {}: {e}; TensorBoard logging stops here",
                self.path.display()
            );
            self.file = None;
        }
    }
}

/// The reader the tests check the written files with, independent of the writer.
#[cfg(test)]
#[path = "../tests/common/events.rs"]
mod events;

#[cfg(test)]
mod tests {
    use super::events::{read_scalars, Point};
    use super::*;

    /// The record TensorBoard's own `RecordWriter` (tensorboard 2.21) writes for "abc", and
    /// CRC-32C's check value.
    #[test]
    fn records_are_written_as_tensorboard_writes_them() {
        let crc = crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, b"123456789") as u32;
        assert_eq!(crc, 0xe306_9283);
        assert_eq!(
            record(b"abc"),
            [3, 0, 0, 0, 0, 0, 0, 0, 176, 153, 73, 14, 97, 98, 99, 110, 87, 241, 33]
        );
    }

    #[test]
    fn scalars_are_written_and_read_back_zeros_included() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path(), 5).unwrap();
        writer.scalars(5, &[("train/loss", 1.5), ("train/lr", 0.0)]);
        writer.scalars(6, &[("train/loss", 1.25)]);
        let name = writer
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let file = read_scalars(writer.path()).unwrap();
        let point = |step, tag: &str, value| Point {
            step,
            tag: tag.to_string(),
            value,
        };
        assert_eq!(
            file.scalars,
            [
                point(5, "train/loss", 1.5),
                point(5, "train/lr", 0.0),
                point(6, "train/loss", 1.25)
            ]
        );
        assert_eq!(file.session_starts, [5]);
        // A record cut short ends the file; a damaged byte is an error.
        let bytes = std::fs::read(writer.path()).unwrap();
        std::fs::write(writer.path(), &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(read_scalars(writer.path()).unwrap().scalars.len(), 2);
        let mut bytes = bytes;
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(writer.path(), bytes).unwrap();
        assert!(read_scalars(writer.path()).is_err());
    }
}
