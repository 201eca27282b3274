//! A reader of TensorBoard event files, decoding them apart from the writer
//! (`vt_train::tensorboard`) so that the tests check the format, not the writer against
//! itself. Shared by the unit tests of the writer and the integration tests.

use std::path::Path;

use crc_fast::CrcAlgorithm;
use prost::Message;

/// `tensorflow.Event`, the fields read here.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
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

/// `tensorflow.Summary.Value`.
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
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `SessionLog.START`.
const SESSION_START: i32 = 1;

/// One scalar of an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub step: i64,
    pub tag: String,
    pub value: f32,
}

/// What an event file holds: its scalars in order, and the steps of its session starts.
#[derive(Debug, Default)]
pub struct EventFile {
    pub scalars: Vec<Point>,
    pub session_starts: Vec<i64>,
}

/// TFRecord's masked CRC-32C.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, bytes) as u32;
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Reads an event file, checking every record's checksums. A last record cut short (a
/// process killed while writing it) ends the file, as TensorBoard reads it.
pub fn read_scalars(path: &Path) -> Result<EventFile, String> {
    let invalid = |message: &str| format!("{}: {message}", path.display());
    let bytes = std::fs::read(path).map_err(|e| invalid(&e.to_string()))?;
    let mut file = EventFile::default();
    let mut rest = bytes.as_slice();
    while let Some((header, tail)) = rest.split_at_checked(12) {
        let (length, crc) = header.split_at(8);
        if masked_crc(length).to_le_bytes() != crc {
            return Err(invalid("a record length with a wrong checksum"));
        }
        let length = u64::from_le_bytes(length.try_into().unwrap()) as usize;
        let Some((data, tail)) = tail.split_at_checked(length) else {
            break;
        };
        let Some((crc, tail)) = tail.split_at_checked(4) else {
            break;
        };
        if masked_crc(data).to_le_bytes() != crc {
            return Err(invalid("a record with a wrong checksum"));
        }
        let event = Event::decode(data).map_err(|e| invalid(&e.to_string()))?;
        match event.what {
            Some(What::Summary(summary)) => {
                for value in summary.value {
                    if let Some(Scalar::SimpleValue(v)) = value.value {
                        file.scalars.push(Point {
                            step: event.step,
                            tag: value.tag,
                            value: v,
                        });
                    }
                }
            }
            Some(What::SessionLog(log)) if log.status == SESSION_START => {
                file.session_starts.push(event.step)
            }
            _ => {}
        }
        rest = tail;
    }
    Ok(file)
}
