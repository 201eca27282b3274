//! The Open Inference Protocol (KServe's V2 protocol, NVIDIA Triton's API) in both its
//! forms, so that Triton and KServe clients (`tritonclient.http`, `tritonclient.grpc`,
//! KServe's) call vt-serve as they call those servers: the HTTP routes ([`http`]) and the
//! gRPC service `inference.GRPCInferenceService` ([`grpc`], messages in [`proto`]). This
//! module is what the two share: the model's input and outputs, checking a request against
//! them, running its images through the batcher, the output tensors, and the metadata.
//!
//! The model takes one input, `image`: BYTES of shape `[N, 1]` (or `[N]`), one encoded image
//! per element, or FP32 of shape `[N, 3, S, S]`, images the client preprocessed as the
//! model's evaluation does (the input of `vt-train export`'s ONNX model, so that a client
//! that sends that model its tensors calls vt-serve as it is). It gives two outputs,
//! `probabilities` (softmax) and `logits`, FP32 `[N, classes]`; with the classification
//! extension's `classification: K` an output is instead BYTES `[N, K]` of
//! `"value:index:label"`, best first. The model's version is its generation: 1 at startup,
//! one more at each reload of changed files.

pub mod grpc;
pub mod http;
pub mod proto;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use serde::Serialize;
use vt_data::transform::Normalize;

use crate::admission::Admitted;
use crate::batcher::{Arriving, BatchConfig, ServedModel};
use crate::classifier::{ranked, Prediction};
use crate::error::ApiError;
use crate::handlers;
use crate::input::ImageInput;
use crate::state::{AppState, ModelInfo};

/// The model's input: encoded or preprocessed images.
pub const INPUT: &str = "image";
/// Channels of a preprocessed image.
const CHANNELS: usize = 3;
/// The framework and weight format, in the protocol's `<framework>_<format>` style.
const PLATFORM: &str = "candle_safetensors";
/// The protocol's extensions this server supports, in both forms (Triton's names:
/// `model_configuration` for `/v2/models/NAME/config` and gRPC's `ModelConfig`).
const EXTENSIONS: [&str; 3] = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
];

/// The model that new requests get, if `name` is its name and `version` (when given) its
/// version.
pub fn resolve(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<ServedModel>, ApiError> {
    let model = state.model_named(name)?;
    let info = &model.info;
    match version {
        Some(version) if version != info.generation.to_string() => {
            Err(ApiError::UnknownModel(format!(
                "model `{}` has no version `{version}`: version {} is loaded (each reload of changed files counts one up)",
                info.name, info.generation
            )))
        }
        _ => Ok(model),
    }
}

pub fn server_metadata() -> proto::ServerMetadataResponse {
    proto::ServerMetadataResponse {
        name: "vt-serve".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: EXTENSIONS.map(String::from).into(),
    }
}

pub fn model_metadata(info: &ModelInfo) -> proto::ModelMetadataResponse {
    let tensor = |name: &str, datatype: &str, shape: Vec<i64>| proto::TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape,
    };
    // Far below i64::MAX classes.
    let classes = info.classes.len() as i64;
    proto::ModelMetadataResponse {
        name: info.name.clone(),
        versions: vec![info.generation.to_string()],
        platform: PLATFORM.into(),
        inputs: vec![tensor(INPUT, "BYTES", vec![-1, 1])],
        outputs: Output::ALL
            .map(|output| tensor(output.name(), "FP32", vec![-1, classes]))
            .into(),
    }
}

/// The model's configuration as Triton describes its models, for clients that read it before
/// they infer (PyTriton's `ModelClient`): a batching model (`max_batch_size` is `--queue`,
/// the most images one request may carry) whose input is the encoded form of `image`, one
/// element per image, and whose batcher runs up to `--max-batch` images at once (at most
/// `--queue`), waiting at most `--max-delay-ms` for them.
pub fn model_config(info: &ModelInfo, batch: &BatchConfig) -> proto::ModelConfig {
    // Far below i64::MAX classes; --queue and --max-batch are at most 65536 and 4096.
    let classes = info.classes.len() as i64;
    let gpu = info
        .device
        .strip_prefix("cuda:")
        .and_then(|n| n.parse().ok());
    let kind = match gpu {
        Some(_) => proto::InstanceKind::Gpu,
        None => proto::InstanceKind::Cpu,
    };
    proto::ModelConfig {
        name: info.name.clone(),
        platform: PLATFORM.into(),
        version_policy: Some(proto::ModelVersionPolicy {
            latest: Some(proto::LatestVersions { num_versions: 1 }),
        }),
        max_batch_size: i32::try_from(batch.queue).unwrap_or(i32::MAX),
        input: vec![proto::ModelInput {
            name: INPUT.into(),
            data_type: proto::DataType::String.into(),
            format: proto::InputFormat::None.into(),
            dims: vec![1],
            reshape: Some(proto::ModelTensorReshape { shape: Vec::new() }),
        }],
        output: Output::ALL
            .map(|output| proto::ModelOutput {
                name: output.name().into(),
                data_type: proto::DataType::Fp32.into(),
                dims: vec![classes],
            })
            .into(),
        instance_group: vec![proto::ModelInstanceGroup {
            name: info.name.clone(),
            count: 1,
            gpus: gpu.into_iter().collect(),
            kind: kind.into(),
        }],
        dynamic_batching: Some(proto::ModelDynamicBatching {
            // No batch is larger than the images admitted at once.
            preferred_batch_size: vec![batch.max_batch.min(batch.queue) as i32],
            max_queue_delay_microseconds: u64::try_from(batch.max_delay.as_micros())
                .unwrap_or(u64::MAX),
        }),
    }
}

/// What a request says of one of its inputs, before its data.
#[derive(Clone, Copy)]
pub struct InputHeader<'a> {
    pub name: &'a str,
    pub datatype: &'a str,
    pub shape: &'a [i64],
}

/// How a request sends its images: its input's datatype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Encoding {
    /// BYTES `[N]` or `[N, 1]`: one encoded image (JPEG, PNG...) per element.
    Encoded,
    /// FP32 `[N, 3, S, S]`: images preprocessed as the model's evaluation does, S its size.
    Preprocessed,
}

/// What a request's one input declares.
#[derive(Debug)]
pub struct Declared<'a, T> {
    pub input: &'a T,
    pub encoding: Encoding,
    pub images: usize,
}

/// The request's one input and what it declares: it must be the one input `image`, BYTES
/// of shape `[N]` or `[N, 1]` or FP32 of shape `[N, 3, S, S]` (S = `image_size`), with 1
/// to `capacity` (`--queue`) images.
pub fn declared_images<'a, T>(
    inputs: &'a [T],
    header: impl Fn(&'a T) -> InputHeader<'a>,
    capacity: usize,
    image_size: usize,
) -> Result<Declared<'a, T>, ApiError> {
    let bad = |detail: String| Err(ApiError::BadRequest(detail));
    let [one] = inputs else {
        return bad(format!(
            "the model takes one input, `{INPUT}`; the request has {}",
            inputs.len()
        ));
    };
    let input = header(one);
    if input.name != INPUT {
        return bad(format!(
            "unknown input `{}`: the model's input is `{INPUT}` (BYTES encoded images, or FP32 preprocessed ones)",
            input.name
        ));
    }
    let size = image_size as i64;
    let (encoding, images) = match (input.datatype, input.shape) {
        ("BYTES", [n, rest @ ..]) if *n >= 0 && rest.iter().all(|&d| d == 1) => {
            (Encoding::Encoded, *n as u64)
        }
        ("BYTES", shape) => {
            return bad(format!(
                "input `{INPUT}` has shape {shape:?}; it takes [N] or [N, 1] (more dimensions of 1 too), one encoded image per element"
            ))
        }
        ("FP32", &[n, c, h, w]) if n >= 0 && c == CHANNELS as i64 && h == size && w == size => {
            (Encoding::Preprocessed, n as u64)
        }
        ("FP32", shape) => {
            return bad(format!(
                "input `{INPUT}` has shape {shape:?}; as FP32 it takes [N, {CHANNELS}, {image_size}, {image_size}], images preprocessed for this model"
            ))
        }
        (other, _) => {
            return bad(format!(
                "input `{INPUT}` is BYTES (encoded images) or FP32 (preprocessed images), not {other}"
            ))
        }
    };
    if images == 0 {
        return bad(format!("input `{INPUT}` has no elements"));
    }
    if images > capacity as u64 {
        return bad(format!(
            "too many images: {images}, at most {capacity} per request (--queue)"
        ));
    }
    Ok(Declared {
        input: one,
        encoding,
        images: images as usize,
    })
}

/// A request's images, as its input carries them.
pub enum Images {
    Encoded(Vec<Bytes>),
    /// Each image's 3 x S x S values.
    Preprocessed(Vec<Vec<f32>>),
}

/// How far (in normalised units) a preprocessed value may lie outside what normalising a
/// pixel in [0, 1] gives: room for another resize's overshoot, not for unnormalised pixels.
const NORMALISED_MARGIN: f32 = 1.0;

/// The `images` preprocessed images of an FP32 input of shape `shape` from its values in
/// row-major order. Each value must be what normalising a pixel in [0, 1] by `norm` gives,
/// within [`NORMALISED_MARGIN`]: pixels of 0-255, or values that would overflow the model to
/// NaN scores, are refused.
pub fn preprocessed_images(
    values: &[f32],
    shape: &[i64],
    images: usize,
    norm: &Normalize,
) -> Result<Vec<Vec<f32>>, ApiError> {
    // The shape was checked: [images, 3, S, S].
    let per_image = shape.iter().skip(1).product::<i64>() as usize;
    if values.len() != images * per_image {
        return Err(ApiError::BadRequest(format!(
            "input `{INPUT}` has shape {shape:?} but {} values",
            values.len()
        )));
    }
    let per_channel = per_image / CHANNELS;
    let bounds = |c: usize| {
        let (mean, std) = (norm.mean[c], norm.std[c]);
        let low = (0.0 - mean) / std - NORMALISED_MARGIN;
        let high = (1.0 - mean) / std + NORMALISED_MARGIN;
        (low, high)
    };
    let outside = values.iter().enumerate().find(|&(at, v)| {
        let (low, high) = bounds(at / per_channel % CHANNELS);
        !(low..=high).contains(v)
    });
    if let Some((at, value)) = outside {
        let channel = at / per_channel % CHANNELS;
        let (low, high) = bounds(channel);
        return Err(ApiError::BadRequest(format!(
            "value {at} of input `{INPUT}` (channel {channel}) is {value}, outside \
             {low:.3}..{high:.3}: a preprocessed value is (x - mean) / std of a pixel x in \
             [0, 1], with this model's mean {:?} and std {:?}",
            norm.mean, norm.std
        )));
    }
    Ok(values.chunks(per_image).map(<[f32]>::to_vec).collect())
}

/// The JSON numbers one preprocessed image of size `image_size` takes: its values and, when
/// nested row by row, the arrays that hold them.
pub fn json_numbers_per_image(image_size: usize) -> usize {
    CHANNELS * image_size * image_size + CHANNELS * image_size + CHANNELS + 1
}

/// FP32 values in the binary layout (little-endian, the HTTP binary tensor data
/// extension's and gRPC's `raw_input_contents`), of an input of shape `shape`.
pub fn binary_values(data: &[u8], shape: &[i64]) -> Result<Vec<f32>, ApiError> {
    let expected = shape.iter().product::<i64>().saturating_mul(4);
    if data.len() as i64 != expected {
        return Err(ApiError::BadRequest(format!(
            "input `{INPUT}` has shape {shape:?}: {expected} bytes of FP32, but its binary data has {}",
            data.len()
        )));
    }
    Ok(data
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        .collect())
}

/// Checks that the input's data held as many images as its shape declared.
pub fn check_element_count(
    shape: &[i64],
    declared: usize,
    images: &[Bytes],
) -> Result<(), ApiError> {
    if images.len() != declared {
        return Err(ApiError::BadRequest(format!(
            "input `{INPUT}` has shape {shape:?} but {} elements",
            images.len()
        )));
    }
    Ok(())
}

/// BYTES elements in the binary layout (each after its 4-byte little-endian length: the
/// HTTP binary tensor data extension's, and gRPC's `raw_input_contents`), each a view into
/// `data`: the `declared` ones of an input of shape `shape`. More are refused as soon as
/// they start, as elements of 0 bytes take 8 times their 4 bytes of data as views.
pub fn binary_elements(
    data: &Bytes,
    shape: &[i64],
    declared: usize,
) -> Result<Vec<Bytes>, ApiError> {
    let mut elements = Vec::with_capacity(declared);
    let mut at = 0;
    while at < data.len() {
        if elements.len() == declared {
            return Err(ApiError::BadRequest(format!(
                "input `{INPUT}` has shape {shape:?} but more than {declared} elements"
            )));
        }
        let length = data
            .get(at..at + 4)
            .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
            .map(|bytes| u32::from_le_bytes(bytes) as usize)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "the binary data of input `{INPUT}` ends inside the 4-byte length of element {}",
                    elements.len()
                ))
            })?;
        let start = at + 4;
        let end = start
            .checked_add(length)
            .filter(|&end| end <= data.len())
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "element {} of input `{INPUT}` declares {length} bytes, but {} follow",
                    elements.len(),
                    data.len() - start
                ))
            })?;
        elements.push(data.slice(start..end));
        at = end;
    }
    Ok(elements)
}

/// Classifies a request's images on `model`, in order; an image's errors name it
/// `image[i]`. The admission is returned, to be held until the answer is written.
pub async fn classify(
    state: &AppState,
    model: &ServedModel,
    images: Images,
    arriving: Arriving,
    deadline: Instant,
) -> Result<(Arc<Admitted>, Vec<Prediction>), ApiError> {
    let images = match images {
        Images::Encoded(images) => images,
        Images::Preprocessed(inputs) => {
            return handlers::classify_preprocessed(state, model, inputs, arriving, deadline).await
        }
    };
    let images = images
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| ImageInput {
            filename: Some(format!("{INPUT}[{i}]")),
            bytes,
        })
        .collect();
    let (admitted, predictions) =
        handlers::classify_all(state, model, images, false, arriving, deadline).await?;
    Ok((admitted, predictions.into_iter().map(|(_, p)| p).collect()))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Output {
    Probabilities,
    Logits,
}

impl Output {
    const ALL: [Output; 2] = [Output::Probabilities, Output::Logits];

    pub fn name(self) -> &'static str {
        match self {
            Output::Probabilities => "probabilities",
            Output::Logits => "logits",
        }
    }

    fn values(self, prediction: &Prediction) -> &[f32] {
        match self {
            Output::Probabilities => &prediction.probs,
            Output::Logits => &prediction.logits,
        }
    }
}

/// An output as a request names it.
pub struct WantedOutput<'a> {
    pub name: &'a str,
    /// The classification extension's count.
    pub classification: Option<u64>,
    /// Whether the output goes as binary data; `None`: the request's default.
    pub binary: Option<bool>,
}

/// One output to return, and how.
pub struct OutputRequest {
    output: Output,
    binary: bool,
    /// The classification extension's count: the best this many classes as strings.
    classification: Option<usize>,
}

/// The outputs to return: those the request names, else all; as binary data where it says
/// so, else as `binary_by_default`.
pub fn requested_outputs(
    wanted: &[WantedOutput],
    binary_by_default: bool,
) -> Result<Vec<OutputRequest>, ApiError> {
    if wanted.is_empty() {
        return Ok(Output::ALL
            .map(|output| OutputRequest {
                output,
                binary: binary_by_default,
                classification: None,
            })
            .into());
    }
    let mut chosen: Vec<OutputRequest> = Vec::new();
    for wanted in wanted {
        let output = Output::ALL
            .into_iter()
            .find(|o| o.name() == wanted.name)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown output `{}`: the model's outputs are `probabilities` and `logits`",
                    wanted.name
                ))
            })?;
        if chosen.iter().any(|c| c.output == output) {
            return Err(ApiError::BadRequest(format!(
                "output `{}` is requested twice",
                wanted.name
            )));
        }
        let classification = match wanted.classification {
            Some(0) => {
                return Err(ApiError::BadRequest(
                    "classification must be at least 1".into(),
                ))
            }
            other => other.map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
        };
        chosen.push(OutputRequest {
            output,
            binary: wanted.binary.unwrap_or(binary_by_default),
            classification,
        });
    }
    Ok(chosen)
}

/// An output tensor's elements; in JSON, an array of numbers or of strings.
#[derive(Serialize)]
#[serde(untagged)]
pub enum TensorData {
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
}

impl TensorData {
    /// The binary layout: little-endian values; each BYTES element after its 4-byte
    /// little-endian length.
    pub fn write_binary(&self, out: &mut Vec<u8>) {
        match self {
            TensorData::Fp32(values) => {
                for value in values {
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
            TensorData::Bytes(strings) => {
                for text in strings {
                    // Class labels and numbers: far below 4 GiB.
                    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
                    out.extend_from_slice(text.as_bytes());
                }
            }
        }
    }
}

/// One output of an answer.
pub struct OutputTensor {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: [usize; 2],
    pub data: TensorData,
    /// Whether the request asked for it as binary data.
    pub binary: bool,
}

/// The requested outputs of `predictions`, one row per image.
pub fn output_tensors(
    info: &ModelInfo,
    outputs: &[OutputRequest],
    predictions: &[Prediction],
) -> Vec<OutputTensor> {
    let classes = info.classes.len();
    outputs
        .iter()
        .map(|wanted| {
            let values = predictions.iter().map(|p| wanted.output.values(p));
            let (datatype, width, data) = match wanted.classification {
                None => (
                    "FP32",
                    classes,
                    TensorData::Fp32(values.flatten().copied().collect()),
                ),
                Some(count) => {
                    let count = count.min(classes);
                    let strings = values
                        .flat_map(|v| classification(v, &info.classes, count))
                        .collect();
                    ("BYTES", count, TensorData::Bytes(strings))
                }
            };
            OutputTensor {
                name: wanted.output.name(),
                datatype,
                shape: [predictions.len(), width],
                data,
                binary: wanted.binary,
            }
        })
        .collect()
}

/// The classification extension's strings for one image: `value:index:label`, best first.
fn classification(values: &[f32], classes: &[String], count: usize) -> Vec<String> {
    ranked(values)
        .take(count)
        .map(|i| match classes.get(i) {
            Some(label) => format!("{}:{i}:{label}", values[i]),
            None => format!("{}:{i}", values[i]),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elements(parts: &[&[u8]]) -> Bytes {
        let mut out = Vec::new();
        for part in parts {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        Bytes::from(out)
    }

    #[test]
    fn binary_elements_are_split_at_their_lengths() {
        let data = elements(&[b"first", b"", b"third one"]);
        let split = binary_elements(&data, &[3], 3).unwrap();
        assert_eq!(split, [&b"first"[..], b"", b"third one"]);
        // A length that runs past the end, and a length cut short.
        let mut long = data.to_vec();
        long[0] = 200;
        assert!(binary_elements(&Bytes::from(long), &[3], 3).is_err());
        assert!(binary_elements(&data.slice(..data.len() - 11), &[3], 3).is_err());
    }

    /// Elements past the declared count are refused at the first: 0-byte elements would
    /// otherwise be split out by the million, each a view 8 times its 4 bytes.
    #[test]
    fn binary_elements_stop_at_the_declared_count() {
        let data = Bytes::from(vec![0; 4_000_000]);
        let error = binary_elements(&data, &[2], 2).unwrap_err().to_string();
        assert!(
            error.contains("has shape [2] but more than 2 elements"),
            "{error}"
        );
        assert_eq!(binary_elements(&data.slice(..8), &[2], 2).unwrap().len(), 2);
    }

    #[test]
    fn classification_strings_rank_and_name_the_classes() {
        let classes = ["a".to_string(), "b".into(), "c".into()];
        assert_eq!(
            classification(&[0.25, 0.5, 0.125], &classes, 2),
            ["0.5:1:b", "0.25:0:a"]
        );
        assert_eq!(classification(&[1.5, -2.0], &[], 5), ["1.5:0", "-2:1"]);
    }

    #[test]
    fn the_configuration_describes_the_served_model_and_its_batching() {
        let info = ModelInfo {
            name: "best".into(),
            arch: "vt-resnet18".into(),
            classes: vec!["sea".into(), "street".into()],
            image_size: 64,
            parameters: 1,
            sha256: String::new(),
            device: "cuda:1".into(),
            dtype: "f32".into(),
            bf16_products: false,
            temperature: None,
            training: None,
            generation: 3,
            loaded_at: 0,
        };
        let batch = BatchConfig {
            max_batch: 64,
            max_delay: std::time::Duration::from_micros(2500),
            queue: 8,
        };
        let config = model_config(&info, &batch);
        assert_eq!(config.max_batch_size, 8);
        assert_eq!(config.output[0].dims, [2]);
        // No batch is larger than the images admitted at once.
        let batching = config.dynamic_batching.unwrap();
        assert_eq!(batching.preferred_batch_size, [8]);
        assert_eq!(batching.max_queue_delay_microseconds, 2500);
        let group = &config.instance_group[0];
        assert_eq!(
            (group.kind, &group.gpus[..]),
            (proto::InstanceKind::Gpu as i32, &[1][..])
        );
    }

    #[test]
    fn the_one_input_declares_the_image_count() {
        let header = |name, datatype, shape| InputHeader {
            name,
            datatype,
            shape,
        };
        let declared = |inputs: Vec<InputHeader>| {
            declared_images(&inputs, |input| *input, 4, 8).map(|declared| {
                assert_eq!(declared.input.name, "image");
                (declared.encoding, declared.images)
            })
        };
        for (shape, images) in [(&[3][..], 3), (&[2, 1], 2)] {
            let expected = (Encoding::Encoded, images);
            assert_eq!(
                declared(vec![header("image", "BYTES", shape)]).unwrap(),
                expected
            );
        }
        assert_eq!(
            declared(vec![header("image", "FP32", &[2, 3, 8, 8])]).unwrap(),
            (Encoding::Preprocessed, 2)
        );
        for (inputs, needle) in [
            (vec![], "the request has 0"),
            (vec![header("image", "BYTES", &[1]); 2], "the request has 2"),
            (vec![header("x", "BYTES", &[1])], "unknown input `x`"),
            (vec![header("image", "FP16", &[1])], "not FP16"),
            (vec![header("image", "BYTES", &[-1])], "[N] or [N, 1]"),
            (vec![header("image", "BYTES", &[1, 3])], "[N] or [N, 1]"),
            (vec![header("image", "BYTES", &[0])], "no elements"),
            (vec![header("image", "BYTES", &[5])], "at most 4"),
            (vec![header("image", "FP32", &[1])], "[N, 3, 8, 8]"),
            (vec![header("image", "FP32", &[1, 3, 8, 9])], "[N, 3, 8, 8]"),
            (vec![header("image", "FP32", &[1, 1, 8, 8])], "[N, 3, 8, 8]"),
            (
                vec![header("image", "FP32", &[-1, 3, 8, 8])],
                "[N, 3, 8, 8]",
            ),
            (vec![header("image", "FP32", &[0, 3, 8, 8])], "no elements"),
            (vec![header("image", "FP32", &[5, 3, 8, 8])], "at most 4"),
        ] {
            let error = declared(inputs).unwrap_err().to_string();
            assert!(error.contains(needle), "{error}");
        }
    }

    #[test]
    fn preprocessed_images_are_split_and_must_be_normalised_pixels() {
        // Pixels in [0, 1] normalise to [-1, 1]; with the margin, [-2, 2] is accepted.
        let norm = Normalize {
            mean: [0.5; 3],
            std: [0.5; 3],
        };
        let shape = [2, 3, 1, 1];
        let values = [-2.0, -0.5, 0.0, 0.5, 1.0, 2.0];
        let images = preprocessed_images(&values, &shape, 2, &norm).unwrap();
        assert_eq!(images, [vec![-2.0, -0.5, 0.0], vec![0.5, 1.0, 2.0]]);
        let error = preprocessed_images(&values[..5], &shape, 2, &norm).unwrap_err();
        assert!(error.to_string().contains("but 5 values"), "{error}");
        for (at, value) in [(1, f32::NAN), (4, 2.5), (5, 255.0), (0, -1e30)] {
            let mut bad = values;
            bad[at] = value;
            let error = preprocessed_images(&bad, &shape, 2, &norm).unwrap_err();
            let expected = format!(
                "value {at} of input `image` (channel {}) is {value}, outside -2.000..2.000",
                at % 3
            );
            assert!(error.to_string().contains(&expected), "{error}");
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(binary_values(&bytes, &shape).unwrap(), values);
        let error = binary_values(&bytes[..23], &shape).unwrap_err();
        assert!(error.to_string().contains("24 bytes of FP32"), "{error}");
    }
}
