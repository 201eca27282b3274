//! The protocol's messages, as KServe's `grpc_predict_v2.proto` and Triton's
//! `grpc_service.proto` (package `inference`) define them, written by hand for prost: the
//! field numbers are the protos', so that clients built from them (`tritonclient.grpc`,
//! KServe's) read and write these. Only the messages of the methods vt-serve answers are
//! here. The metadata and configuration answers also serialize as the HTTP routes' JSON,
//! which has the same fields.

use std::collections::HashMap;

use axum::body::Bytes;
use serde::{Serialize, Serializer};

/// `grpc.health.v1.HealthCheckRequest` (gRPC's health checking protocol, `health.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    pub service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckResponse {
    #[prost(enumeration = "ServingStatus", tag = "1")]
    pub status: i32,
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ServingStatus {
    Unknown = 0,
    Serving = 1,
    NotServing = 2,
    ServiceUnknown = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerLiveRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerLiveResponse {
    #[prost(bool, tag = "1")]
    pub live: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerReadyRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerReadyResponse {
    #[prost(bool, tag = "1")]
    pub ready: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelReadyRequest {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Empty: whichever version the server serves.
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelReadyResponse {
    #[prost(bool, tag = "1")]
    pub ready: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerMetadataRequest {}

#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct ServerMetadataResponse {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(string, repeated, tag = "3")]
    pub extensions: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelMetadataRequest {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Empty: whichever version the server serves.
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct ModelMetadataResponse {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, repeated, tag = "2")]
    pub versions: Vec<String>,
    #[prost(string, tag = "3")]
    pub platform: String,
    #[prost(message, repeated, tag = "4")]
    pub inputs: Vec<TensorMetadata>,
    #[prost(message, repeated, tag = "5")]
    pub outputs: Vec<TensorMetadata>,
}

/// `ModelMetadataResponse.TensorMetadata`.
#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct TensorMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    /// -1 for a dimension of any size.
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
}

/// A request, input or output parameter: one of five types.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferParameter {
    #[prost(oneof = "ParameterChoice", tags = "1, 2, 3, 4, 5")]
    pub parameter_choice: Option<ParameterChoice>,
}

/// `InferParameter.parameter_choice`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ParameterChoice {
    #[prost(bool, tag = "1")]
    BoolParam(bool),
    #[prost(int64, tag = "2")]
    Int64Param(i64),
    #[prost(string, tag = "3")]
    StringParam(String),
    #[prost(double, tag = "4")]
    DoubleParam(f64),
    #[prost(uint64, tag = "5")]
    Uint64Param(u64),
}

/// A tensor's elements by type, row-major; one of the lists is used, by the datatype.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferTensorContents {
    #[prost(bool, repeated, tag = "1")]
    pub bool_contents: Vec<bool>,
    #[prost(int32, repeated, tag = "2")]
    pub int_contents: Vec<i32>,
    #[prost(int64, repeated, tag = "3")]
    pub int64_contents: Vec<i64>,
    #[prost(uint32, repeated, tag = "4")]
    pub uint_contents: Vec<u32>,
    #[prost(uint64, repeated, tag = "5")]
    pub uint64_contents: Vec<u64>,
    #[prost(float, repeated, tag = "6")]
    pub fp32_contents: Vec<f32>,
    #[prost(double, repeated, tag = "7")]
    pub fp64_contents: Vec<f64>,
    #[prost(bytes = "bytes", repeated, tag = "8")]
    pub bytes_contents: Vec<Bytes>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelInferRequest {
    #[prost(string, tag = "1")]
    pub model_name: String,
    /// Empty: whichever version the server serves.
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, repeated, tag = "5")]
    pub inputs: Vec<InferInputTensor>,
    #[prost(message, repeated, tag = "6")]
    pub outputs: Vec<InferRequestedOutputTensor>,
    /// Each input's data, in the order of `inputs`, instead of their `contents`: the
    /// binary layout (BYTES elements each after a 4-byte little-endian length), which
    /// tritonclient sends.
    #[prost(bytes = "bytes", repeated, tag = "7")]
    pub raw_input_contents: Vec<Bytes>,
}

/// `ModelInferRequest.InferInputTensor` and `ModelInferResponse.InferOutputTensor`, which
/// have the same fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, optional, tag = "5")]
    pub contents: Option<InferTensorContents>,
}

pub type InferInputTensor = InferTensor;
pub type InferOutputTensor = InferTensor;

/// `ModelInferRequest.InferRequestedOutputTensor`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferRequestedOutputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(map = "string, message", tag = "2")]
    pub parameters: HashMap<String, InferParameter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelInferResponse {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, repeated, tag = "5")]
    pub outputs: Vec<InferOutputTensor>,
    /// Each output's data in the binary layout, in the order of `outputs`, when their
    /// `contents` are not used.
    #[prost(bytes = "bytes", repeated, tag = "6")]
    pub raw_output_contents: Vec<Bytes>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelConfigRequest {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Empty: whichever version the server serves.
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelConfigResponse {
    #[prost(message, optional, tag = "1")]
    pub config: Option<ModelConfig>,
}

/// Triton's `ModelConfig` (`model_config.proto`), the fields that describe a served model
/// to its clients. The HTTP route answers it in Triton's JSON: the protos' field names,
/// enumerations by name, 64-bit integers as numbers.
#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct ModelConfig {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub platform: String,
    #[prost(message, optional, tag = "3")]
    pub version_policy: Option<ModelVersionPolicy>,
    /// The most images one request may carry; more than 0: the first dimension of every
    /// input and output is the batch.
    #[prost(int32, tag = "4")]
    pub max_batch_size: i32,
    #[prost(message, repeated, tag = "5")]
    pub input: Vec<ModelInput>,
    #[prost(message, repeated, tag = "6")]
    pub output: Vec<ModelOutput>,
    #[prost(message, repeated, tag = "7")]
    pub instance_group: Vec<ModelInstanceGroup>,
    #[prost(message, optional, tag = "11")]
    pub dynamic_batching: Option<ModelDynamicBatching>,
}

/// `ModelVersionPolicy`, of which only `latest` is used: one version is served.
#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct ModelVersionPolicy {
    #[prost(message, optional, tag = "1")]
    pub latest: Option<LatestVersions>,
}

/// `ModelVersionPolicy.Latest`.
#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct LatestVersions {
    #[prost(uint32, tag = "1")]
    pub num_versions: u32,
}

#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct ModelInput {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "DataType", tag = "2")]
    #[serde(serialize_with = "data_type_name")]
    pub data_type: i32,
    #[prost(enumeration = "InputFormat", tag = "3")]
    #[serde(serialize_with = "format_name")]
    pub format: i32,
    /// The shape without the batch dimension.
    #[prost(int64, repeated, tag = "4")]
    pub dims: Vec<i64>,
    /// The shape the model itself takes, without the batch dimension.
    #[prost(message, optional, tag = "5")]
    pub reshape: Option<ModelTensorReshape>,
}

#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct ModelOutput {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "DataType", tag = "2")]
    #[serde(serialize_with = "data_type_name")]
    pub data_type: i32,
    /// The shape without the batch dimension.
    #[prost(int64, repeated, tag = "3")]
    pub dims: Vec<i64>,
}

#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct ModelTensorReshape {
    #[prost(int64, repeated, tag = "1")]
    pub shape: Vec<i64>,
}

#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct ModelDynamicBatching {
    #[prost(int32, repeated, tag = "1")]
    pub preferred_batch_size: Vec<i32>,
    #[prost(uint64, tag = "2")]
    pub max_queue_delay_microseconds: u64,
}

#[derive(Clone, PartialEq, Serialize, prost::Message)]
pub struct ModelInstanceGroup {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int32, tag = "2")]
    pub count: i32,
    #[prost(int32, repeated, tag = "3")]
    pub gpus: Vec<i32>,
    #[prost(enumeration = "InstanceKind", tag = "4")]
    #[serde(serialize_with = "instance_kind_name")]
    pub kind: i32,
}

/// `DataType`: the values used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
pub enum DataType {
    Invalid = 0,
    Fp32 = 11,
    String = 13,
}

/// `ModelInput.Format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
pub enum InputFormat {
    None = 0,
    Nhwc = 1,
    Nchw = 2,
}

/// `ModelInstanceGroup.Kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
pub enum InstanceKind {
    Auto = 0,
    Gpu = 1,
    Cpu = 2,
}

fn data_type_name<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(match DataType::try_from(*value) {
        Ok(DataType::Fp32) => "TYPE_FP32",
        Ok(DataType::String) => "TYPE_STRING",
        Ok(DataType::Invalid) | Err(_) => "TYPE_INVALID",
    })
}

fn format_name<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(match InputFormat::try_from(*value) {
        Ok(InputFormat::Nhwc) => "FORMAT_NHWC",
        Ok(InputFormat::Nchw) => "FORMAT_NCHW",
        Ok(InputFormat::None) | Err(_) => "FORMAT_NONE",
    })
}

fn instance_kind_name<S: Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(match InstanceKind::try_from(*value) {
        Ok(InstanceKind::Gpu) => "KIND_GPU",
        Ok(InstanceKind::Cpu) => "KIND_CPU",
        Ok(InstanceKind::Auto) | Err(_) => "KIND_AUTO",
    })
}
