//! Test helpers: image encoders, a tiny HTTP/1.1 server, zip and parquet writers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

pub fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode in memory");
    out.into_inner()
}

/// A small RGB JPEG whose content depends on `seed`.
pub fn jpeg(seed: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(24, 20, |x, y| {
        Rgb([
            (x * 9 + seed * 31) as u8,
            (y * 11 + seed * 7) as u8,
            (seed * 13) as u8,
        ])
    });
    encode(img.into(), ImageFormat::Jpeg)
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The shared real sample beside the checkout, if present.
pub fn intel_sample() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/intel-sample");
    if path.join("seg_train").is_dir() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} not found (the shared intel-sample data set lives beside the checkout)",
            path.display()
        );
        None
    }
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Every file under `root`, relative, sorted.
/// Names in `dir`, sorted.
pub fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

pub fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

/// Builds a zip from (name, bytes).
pub fn zip_bytes(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (name, bytes) in entries {
        writer.start_file(name.as_str(), options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// A Kaggle-layout archive: `train` images per class in seg_train, `test` in seg_test, `pred`.
pub fn kaggle_zip(classes: &[&str], train: u32, test: u32, pred: u32) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut seed = 0;
    for class in classes {
        for i in 0..train {
            seed += 1;
            entries.push((format!("seg_train/seg_train/{class}/{i}.jpg"), jpeg(seed)));
        }
        for i in 0..test {
            seed += 1;
            entries.push((format!("seg_test/seg_test/{class}/{i}.jpg"), jpeg(seed)));
        }
    }
    for i in 0..pred {
        seed += 1;
        entries.push((format!("seg_pred/seg_pred/{i}.jpg"), jpeg(seed)));
    }
    zip_bytes(&entries)
}

/// Breaks the data of `entry` in `zip` (its first byte after the local header, whose name
/// is the first occurrence), so that reading it fails its CRC or inflating it fails.
pub fn corrupt_entry(zip: &mut [u8], entry: &str) {
    let at = zip
        .windows(entry.len())
        .position(|w| w == entry.as_bytes())
        .unwrap();
    let extra = u16::from_le_bytes([zip[at - 2], zip[at - 1]]) as usize;
    zip[at + entry.len() + extra] ^= 0xff;
}

/// Where `entry`'s name occurs in `zip`: in its local header, then its central directory
/// record.
fn name_offsets(zip: &[u8], entry: &str) -> (usize, usize) {
    let found: Vec<usize> = zip
        .windows(entry.len())
        .enumerate()
        .filter(|(_, w)| *w == entry.as_bytes())
        .map(|(at, _)| at)
        .collect();
    assert_eq!(found.len(), 2, "{entry} should occur twice in the zip");
    (found[0], found[1])
}

/// Marks `entry` as compressed with `method` (12: bzip2) in its local header and its
/// central directory record, as an archiver using that method would write it.
pub fn set_compression_method(zip: &mut [u8], entry: &str, method: u16) {
    let (local, central) = name_offsets(zip, entry);
    let (local, central) = (local - 30, central - 46);
    zip[local + 8..local + 10].copy_from_slice(&method.to_le_bytes());
    zip[central + 10..central + 12].copy_from_slice(&method.to_le_bytes());
}

/// Breaks the signature of `entry`'s local header: opening it fails.
pub fn break_local_header(zip: &mut [u8], entry: &str) {
    let (local, _) = name_offsets(zip, entry);
    zip[local - 30] ^= 0xff;
}

// ---------------------------------------------------------------------------------------
// HTTP

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

pub enum Reply {
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Announces `Content-Length: declared` but sends `body` and closes.
    Truncated {
        declared: usize,
        body: Vec<u8>,
        headers: Vec<(String, String)>,
    },
    /// A 200 with no length: `body`, then the connection closes.
    Unsized {
        body: Vec<u8>,
        headers: Vec<(String, String)>,
    },
    /// Closes the connection without answering.
    Drop,
    /// Holds the connection open a minute without answering.
    Hang,
}

impl Reply {
    pub fn ok(body: Vec<u8>) -> Reply {
        Reply::Full {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }

    pub fn status(status: u16) -> Reply {
        Reply::Full {
            status,
            headers: Vec::new(),
            body: format!("status {status}").into_bytes(),
        }
    }

    pub fn truncated(declared: usize, body: Vec<u8>) -> Reply {
        Reply::Truncated {
            declared,
            body,
            headers: Vec::new(),
        }
    }

    pub fn without_length(body: Vec<u8>) -> Reply {
        Reply::Unsized {
            body,
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        match &mut self {
            Reply::Full { headers, .. }
            | Reply::Truncated { headers, .. }
            | Reply::Unsized { headers, .. } => headers.push((name.into(), value.into())),
            Reply::Drop | Reply::Hang => {}
        }
        self
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A one-request-per-connection HTTP/1.1 server on 127.0.0.1, for as long as the test runs.
pub struct TestServer {
    pub url: String,
    pub log: Arc<Mutex<Vec<Request>>>,
}

impl TestServer {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let handler = Arc::clone(&handler);
                let log = Arc::clone(&thread_log);
                std::thread::spawn(move || serve(stream, &*handler, &log));
            }
        });
        TestServer { url, log }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, handler: &Handler, log: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    if let Some(len) = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut body = vec![0; len];
        let _ = reader.read_exact(&mut body);
    }
    let request = Request {
        method,
        path,
        headers,
    };
    log.lock().unwrap().push(request.clone());
    let mut stream = stream;
    let head_only = request.method == "HEAD";
    match handler(&request) {
        Reply::Drop => {}
        Reply::Hang => std::thread::sleep(std::time::Duration::from_secs(60)),
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            {
                head.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            if !head_only {
                let _ = stream.write_all(&body);
            }
        }
        Reply::Truncated {
            declared,
            body,
            headers,
        } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {declared}\r\n{}\r\n",
                header_lines(&headers)
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
        Reply::Unsized { body, headers } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\n{}\r\n",
                header_lines(&headers)
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn header_lines(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect()
}

/// Serves `body` honouring `Range: bytes=START-` and `bytes=START-END` with a 206.
pub fn ranged(request: &Request, body: &[u8]) -> Reply {
    let Some((start, end)) = request
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
    else {
        return Reply::ok(body.to_vec());
    };
    let start: usize = start.parse().unwrap();
    let end = match end {
        "" => body.len() - 1,
        end => end.parse::<usize>().unwrap().min(body.len() - 1),
    };
    if start > end {
        return Reply::status(416).with_header("Content-Range", &format!("bytes */{}", body.len()));
    }
    Reply::Full {
        status: 206,
        headers: vec![(
            "Content-Range".into(),
            format!("bytes {start}-{end}/{}", body.len()),
        )],
        body: body[start..=end].to_vec(),
    }
}

// ---------------------------------------------------------------------------------------
// Parquet

/// A writer of `schema` to a new file at `path`, with the `huggingface` metadata that the
/// `datasets` library writes for a `ClassLabel` column of these `label_names`.
fn parquet_writer(
    path: &Path,
    schema: parquet::schema::types::Type,
    label_names: Option<&[&str]>,
) -> parquet::file::writer::SerializedFileWriter<std::fs::File> {
    let file = std::fs::File::create(path).unwrap();
    let metadata = label_names.map(|names| {
        let features = serde_json::json!({"info": {"features": {
            "image": {"_type": "Image"},
            "label": {"names": names, "_type": "ClassLabel"},
        }}});
        vec![parquet::file::metadata::KeyValue::new(
            "huggingface".into(),
            features.to_string(),
        )]
    });
    let props = Arc::new(
        parquet::file::properties::WriterProperties::builder()
            .set_key_value_metadata(metadata)
            .build(),
    );
    parquet::file::writer::SerializedFileWriter::new(file, Arc::new(schema), props).unwrap()
}

/// Writes a parquet file shaped like the `datasets` library's: `image {bytes, path}` and an
/// optional int64 `label`, indexing `label_names` when they are given.
pub fn write_parquet(
    path: &Path,
    rows: &[(Vec<u8>, String, Option<i64>)],
    label_names: Option<&[&str]>,
) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::schema::parser::parse_message_type;

    let schema = parse_message_type(
        "message schema {
            optional group image {
                optional binary bytes;
                optional binary path (UTF8);
            }
            optional int64 label;
        }",
    )
    .unwrap();
    let mut writer = parquet_writer(path, schema, label_names);
    let mut group = writer.next_row_group().unwrap();
    let n = rows.len();
    let bytes: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.0.clone())).collect();
    let paths: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.1.as_str())).collect();
    let labels: Vec<i64> = rows.iter().filter_map(|r| r.2).collect();
    let label_def: Vec<i16> = rows.iter().map(|r| i16::from(r.2.is_some())).collect();
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&bytes, Some(&vec![2; n]), None)
        .unwrap();
    col.close().unwrap();
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&paths, Some(&vec![2; n]), None)
        .unwrap();
    col.close().unwrap();
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(&labels, Some(&label_def), None)
        .unwrap();
    col.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
}

/// Like [`write_parquet`], with the class name as a string `label`.
pub fn write_parquet_named(path: &Path, rows: &[(Vec<u8>, &str)]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::schema::parser::parse_message_type;

    let schema = parse_message_type(
        "message schema {
            optional group image {
                optional binary bytes;
            }
            optional binary label (UTF8);
        }",
    )
    .unwrap();
    let mut writer = parquet_writer(path, schema, None);
    let mut group = writer.next_row_group().unwrap();
    let n = rows.len();
    let bytes: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.0.clone())).collect();
    let labels: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.1)).collect();
    for (values, level) in [(bytes, 2), (labels, 1)] {
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&vec![level; n]), None)
            .unwrap();
        col.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}
