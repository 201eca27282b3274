//! ONNX export of a checkpoint (as timm's `onnx_export.py`), for ONNX Runtime and the
//! servers built on it. The graph computes what [`crate::VtResNet`] computes in evaluation
//! mode, operation for operation, in the order vt-model runs them: BatchNorm with the
//! running statistics, the contract's heads as contiguous channel blocks. Every checkpoint
//! tensor is an initializer under its checkpoint name; the derived constants (transposed
//! weights for MatMul, reshape targets, attention scales) are left to the runtime's
//! constant folding.
//!
//! Input `image`: float32 `[batch, 3, S, S]`, S the config's `image_size`, already resized,
//! cropped and normalised as vt's evaluation does (see [`PREPROCESSING`]). Outputs `logits`
//! and `probabilities` (their softmax), float32 `[batch, num_classes]`.

pub mod proto;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Device;
use prost::Message;

use crate::checkpoint::{read_config, sha256_hex, tensors_of, WEIGHTS_FILE};
use crate::config::{Variant, VtConfig, FEATURE_CHANNELS};
use crate::error::{ModelError, Result};
use proto::tensor_shape_proto::{dimension, Dimension};
use proto::{
    attribute_type, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

/// The default domain's operator set: every operator used has had its current form since
/// opset 17 or earlier (ReduceMean still takes `axes` as an attribute there).
pub const OPSET: i64 = 17;
/// IR version 8 (2021-07-30), the one ONNX 1.12 pairs with opset 17.
pub const IR_VERSION: i64 = 8;
pub const INPUT: &str = "image";
pub const LOGITS: &str = "logits";
pub const PROBABILITIES: &str = "probabilities";
/// The symbolic name of the batch dimension of the input and outputs.
pub const BATCH: &str = "batch";

/// What [`INPUT`] must hold, in the words of the model contract's "Input".
pub const PREPROCESSING: &str = "RGB (greyscale replicated, alpha dropped, EXIF orientation \
    ignored), resized with an antialiased bilinear (triangle) filter as PIL's so that the \
    shorter side is round(image_size * 256 / 224) and the longer floor(long * that / short), \
    centre-cropped to image_size x image_size (top = floor((H - image_size) / 2), left \
    likewise), scaled to [0, 1], normalised per channel as (x - mean) / std (metadata `mean` \
    and `std`), NCHW float32";

/// The largest model file ONNX Runtime reads: protobuf counts a message's bytes in an
/// `int`, so it parses none of 2 GiB or more. Larger models would need ONNX's external data
/// (weights in files beside the model), which this export does not write.
pub const MAX_MODEL_BYTES: usize = i32::MAX as usize;

const BN_EPS: f32 = 1e-5;
/// Widths of layer1, layer2 and layer3 (as [`crate::stem`]).
const STAGE_CHANNELS: [usize; 3] = [64, 128, 256];

/// Exports the checkpoint in `dir` (strictly: every tensor of its model present with its
/// shape, nothing else) as an ONNX model.
pub fn export(dir: &Path) -> Result<ModelProto> {
    let config = read_config(dir)?;
    let variant = exported_variant(config.variant);
    let path = dir.join(WEIGHTS_FILE);
    // One read for the digest and the weights: the folder may be replaced meanwhile (as
    // training replaces `best/`).
    let bytes = fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    let sha256 = sha256_hex(&bytes);
    let tensors = tensors_of(&path, &bytes, &Device::Cpu)?
        .into_iter()
        .map(|(name, tensor)| {
            let dims = tensor.dims().to_vec();
            Ok((name, (dims, tensor.flatten_all()?.to_vec1::<f32>()?)))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    drop(bytes);
    let mut graph = Graph::new(path.clone(), tensors);
    let logits = graph.vt_resnet(&config)?;
    // Divided as candle divides: by a multiplication with 1/T rounded to f32.
    let calibrated = match config.temperature {
        Some(t) => graph.scale(&logits, 1.0 / f64::from(t), "logits.calibrated"),
        None => logits,
    };
    graph.node(
        "Softmax",
        &[&calibrated],
        PROBABILITIES,
        vec![int("axis", 1)],
    );
    if let Some(name) = graph.tensors.keys().next() {
        return Err(ModelError::UnexpectedTensor {
            path,
            name: name.clone(),
        });
    }
    let s = config.image_size as i64;
    let k = config.num_classes as i64;
    let batch = || Size::Symbol(BATCH);
    let graph = GraphProto {
        node: graph.nodes,
        name: config.arch.name().to_string(),
        initializer: graph.initializers,
        input: vec![value_info(
            INPUT,
            &[batch(), Size::Fixed(3), Size::Fixed(s), Size::Fixed(s)],
            PREPROCESSING,
        )],
        output: vec![
            value_info(LOGITS, &[batch(), Size::Fixed(k)], "class scores"),
            value_info(
                PROBABILITIES,
                &[batch(), Size::Fixed(k)],
                "softmax of the logits (divided by the metadata's temperature, if any)",
            ),
        ],
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "vt".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!(
            "{} image classifier (the Visual Transformer of Wu et al., arXiv 2006.03677) \
             exported by vt. Input `{INPUT}`: {PREPROCESSING}.",
            config.arch
        ),
        graph: Some(graph),
        metadata_props: metadata(&config, variant, sha256),
    };
    check_size(&path, model.encoded_len())?;
    Ok(model)
}

/// Refuses a model whose encoding, `bytes` long, would be over [`MAX_MODEL_BYTES`]: its file
/// would be written in full and then fail to load in every runtime.
pub fn check_size(path: &Path, bytes: usize) -> Result<()> {
    if bytes <= MAX_MODEL_BYTES {
        return Ok(());
    }
    const GIB: f64 = (1u64 << 30) as f64;
    Err(ModelError::Invalid {
        path: path.to_path_buf(),
        message: format!(
            "its ONNX model would be {bytes} bytes ({:.2} GiB), over the 2 GiB ({MAX_MODEL_BYTES} \
             bytes) that protobuf, and so ONNX Runtime, can read; vt does not export weights as \
             ONNX external data, so a model this large cannot be exported",
            bytes as f64 / GIB
        ),
    })
}

/// `value` as `name: float32 [batch, 3, 150, 150]`, to tell users what a graph takes and
/// gives.
pub fn signature(value: &ValueInfoProto) -> String {
    let Some(TypeProto {
        value: Some(type_proto::Value::TensorType(tensor)),
    }) = &value.r#type
    else {
        return format!("{}: not a tensor", value.name);
    };
    let element = match tensor.elem_type {
        proto::FLOAT => "float32".to_string(),
        proto::INT64 => "int64".to_string(),
        other => format!("element type {other}"),
    };
    let dims: Vec<String> = tensor
        .shape
        .iter()
        .flat_map(|shape| &shape.dim)
        .map(|dim| match &dim.value {
            Some(dimension::Value::DimValue(v)) => v.to_string(),
            Some(dimension::Value::DimParam(p)) => p.clone(),
            None => "?".into(),
        })
        .collect();
    format!("{}: {element} [{}]", value.name, dims.join(", "))
}

/// The name a variant goes by in the metadata. Every variant of the model code must be
/// exported with its own operations, so a new one must be handled here before it compiles.
fn exported_variant(variant: Variant) -> &'static str {
    match variant {
        Variant::Paper => "paper",
    }
}

/// What a runtime needs besides the graph: the classes in output order, and the input's
/// size and normalisation (JSON arrays, numbers as config.json writes them).
fn metadata(config: &VtConfig, variant: &str, sha256: String) -> Vec<StringStringEntryProto> {
    // f32's shortest round-trip form (0.485), which is also valid JSON.
    let floats = |values: &[f32]| {
        let listed: Vec<String> = values.iter().map(f32::to_string).collect();
        format!("[{}]", listed.join(","))
    };
    [
        ("arch", config.arch.name().to_string()),
        ("variant", variant.to_string()),
        (
            "class_names",
            serde_json::Value::from(config.class_names.clone()).to_string(),
        ),
        ("image_size", config.image_size.to_string()),
        ("mean", floats(&config.mean)),
        ("std", floats(&config.std)),
        ("tokens", config.tokens.to_string()),
        ("token_channels", config.token_channels.to_string()),
        ("heads", config.heads.to_string()),
        ("sha256", sha256),
    ]
    .into_iter()
    .chain(config.temperature.map(|t| ("temperature", t.to_string())))
    .chain(config.training.as_ref().map(|record| {
        (
            "training",
            serde_json::Value::from(record.clone()).to_string(),
        )
    }))
    .map(|(key, value)| StringStringEntryProto {
        key: key.into(),
        value,
    })
    .collect()
}

/// A dimension of a graph input or output.
enum Size {
    Fixed(i64),
    Symbol(&'static str),
}

fn value_info(name: &str, dims: &[Size], doc: &str) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|size| Dimension {
            value: Some(match size {
                Size::Fixed(v) => dimension::Value::DimValue(*v),
                Size::Symbol(s) => dimension::Value::DimParam(s.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: proto::FLOAT,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: doc.into(),
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i: Some(value),
        ..AttributeProto::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}

fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::FLOAT,
        f: Some(value),
        ..AttributeProto::default()
    }
}

/// A checkpoint tensor: its shape and row-major values.
type Values = (Vec<usize>, Vec<f32>);

/// The graph under construction. Values are named after the module that computes them
/// (`vt.0.tokenizer.attention`), so that a graph viewer reads like vt-model's code.
struct Graph {
    /// The weights file, for errors.
    path: PathBuf,
    /// The checkpoint tensors not yet taken as initializers.
    tensors: BTreeMap<String, Values>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

impl Graph {
    fn new(path: PathBuf, tensors: BTreeMap<String, Values>) -> Self {
        Graph {
            path,
            tensors,
            nodes: Vec::new(),
            initializers: Vec::new(),
        }
    }

    /// Adds a node computing `output` (also the node's name) and returns `output`.
    fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<AttributeProto>,
    ) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: output.to_string(),
            op_type: op_type.into(),
            domain: String::new(),
            attribute,
        });
        output.to_string()
    }

    /// The checkpoint tensor `name` as an initializer, which must have shape `dims`.
    fn weight(&mut self, name: &str, dims: &[usize]) -> Result<String> {
        let (found, values) =
            self.tensors
                .remove(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.path.clone(),
                    name: name.into(),
                })?;
        if found != dims {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                name: name.into(),
                expected: dims.to_vec(),
                found,
            });
        }
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(self.initializer(name, proto::FLOAT, dims, raw_data))
    }

    /// A constant, shared by every node that asks for the same `name`.
    fn initializer(&mut self, name: &str, data_type: i32, dims: &[usize], raw: Vec<u8>) -> String {
        if !self.initializers.iter().any(|t| t.name == name) {
            self.initializers.push(TensorProto {
                dims: dims.iter().map(|&d| d as i64).collect(),
                data_type,
                name: name.into(),
                raw_data: raw,
            });
        }
        name.to_string()
    }

    /// A 1-D int64 constant (shapes for Reshape).
    fn shape(&mut self, name: &str, values: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, proto::INT64, &[values.len()], raw)
    }

    /// `x * scale`, the f64 scale rounded to f32 as candle's affine rounds it.
    fn scale(&mut self, x: &str, scale: f64, output: &str) -> String {
        let constant = format!("scale.{scale:e}");
        let constant = self.initializer(
            &constant,
            proto::FLOAT,
            &[],
            (scale as f32).to_le_bytes().to_vec(),
        );
        self.node("Mul", &[x, &constant], output, vec![])
    }

    fn transpose(&mut self, x: &str, perm: &[i64], output: &str) -> String {
        self.node("Transpose", &[x], output, vec![ints("perm", perm)])
    }

    fn reshape(&mut self, x: &str, shape: &[i64], output: &str) -> String {
        let shape_name = format!(
            "shape.[{}]",
            shape
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let shape = self.shape(&shape_name, shape);
        self.node("Reshape", &[x, &shape], output, vec![])
    }

    /// `nn.Linear` `prefix` over the last axis: `x W^T (+ b)`, W `[out, in]` as stored.
    fn linear(
        &mut self,
        x: &str,
        prefix: &str,
        (in_dim, out_dim): (usize, usize),
        bias: bool,
        output: &str,
    ) -> Result<String> {
        let weight = self.weight(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let transposed = self.transpose(&weight, &[1, 0], &format!("{prefix}.weight.T"));
        if !bias {
            return Ok(self.node("MatMul", &[x, &transposed], output, vec![]));
        }
        let product = self.node(
            "MatMul",
            &[x, &transposed],
            &format!("{prefix}.matmul"),
            vec![],
        );
        let bias = self.weight(&format!("{prefix}.bias"), &[out_dim])?;
        Ok(self.node("Add", &[&product, &bias], output, vec![]))
    }

    /// A bias-free convolution and its inference-mode batch norm, then ReLU when `relu`.
    fn conv_bn(
        &mut self,
        x: &str,
        (conv, bn): (&str, &str),
        (in_channels, out_channels): (usize, usize),
        (kernel, stride, padding): (usize, usize, usize),
        relu: bool,
    ) -> Result<String> {
        let weight = self.weight(
            &format!("{conv}.weight"),
            &[out_channels, in_channels, kernel, kernel],
        )?;
        let (k, s, p) = (kernel as i64, stride as i64, padding as i64);
        let convolved = self.node(
            "Conv",
            &[x, &weight],
            conv,
            vec![
                ints("kernel_shape", &[k, k]),
                ints("strides", &[s, s]),
                ints("pads", &[p, p, p, p]),
                ints("dilations", &[1, 1]),
                int("group", 1),
            ],
        );
        let mut inputs = vec![convolved];
        for part in ["weight", "bias", "running_mean", "running_var"] {
            inputs.push(self.weight(&format!("{bn}.{part}"), &[out_channels])?);
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let normalised = self.node(
            "BatchNormalization",
            &inputs,
            bn,
            vec![float("epsilon", BN_EPS)],
        );
        if !relu {
            return Ok(normalised);
        }
        Ok(self.node("Relu", &[&normalised], &format!("{bn}.relu"), vec![]))
    }

    /// The whole model; returns the logits' name.
    fn vt_resnet(&mut self, config: &VtConfig) -> Result<String> {
        let features = self.stem(config.arch.stem_blocks())?;
        // N x C x H x W -> N x P x C with p = y * W + x.
        // Sizes spelled out rather than -1, which a batch of 0 leaves undetermined.
        let positions = config.feature_map_size().pow(2) as i64;
        let flat = self.reshape(
            &features,
            &[0, FEATURE_CHANNELS as i64, positions],
            "features.flat",
        );
        let mut x = self.transpose(&flat, &[0, 2, 1], "features.positions");
        let mut tokens: Option<String> = None;
        for i in 0..config.vt_modules {
            let prefix = format!("vt.{i}");
            let t = self.tokenizer(config, &prefix, &x, tokens.as_deref())?;
            let t = self.transformer(config, &prefix, &t)?;
            if i + 1 < config.vt_modules {
                x = self.projector(config, &prefix, &x, &t)?;
            }
            tokens = Some(t);
        }
        let tokens = tokens.ok_or_else(|| ModelError::Config("no VT modules".into()))?;
        let mean = self.node(
            "ReduceMean",
            &[&tokens],
            "head.token_mean",
            vec![ints("axes", &[1]), int("keepdims", 0)],
        );
        let dims = (config.token_channels, config.num_classes);
        self.linear(&mean, "head", dims, true, LOGITS)
    }

    /// conv1 - bn1 - ReLU - max-pool - layer1 - layer2 - layer3 (as [`crate::stem::Stem`]).
    fn stem(&mut self, blocks: [usize; 3]) -> Result<String> {
        let x = self.conv_bn(INPUT, ("conv1", "bn1"), (3, 64), (7, 2, 3), true)?;
        // Floor rounding of the output size (ceil_mode 0), as PyTorch's default.
        let mut x = self.node(
            "MaxPool",
            &[&x],
            "maxpool",
            vec![
                ints("kernel_shape", &[3, 3]),
                ints("strides", &[2, 2]),
                ints("pads", &[1, 1, 1, 1]),
                int("ceil_mode", 0),
            ],
        );
        let mut in_channels = 64;
        for (stage, (&count, &channels)) in blocks.iter().zip(&STAGE_CHANNELS).enumerate() {
            for b in 0..count {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let prefix = format!("layer{}.{b}", stage + 1);
                x = self.basic_block(&x, &prefix, (in_channels, channels), stride)?;
                in_channels = channels;
            }
        }
        Ok(x)
    }

    /// `layerK.B` (as [`crate::stem::BasicBlock`]).
    fn basic_block(
        &mut self,
        x: &str,
        prefix: &str,
        (in_channels, out_channels): (usize, usize),
        stride: usize,
    ) -> Result<String> {
        let name = |part: &str| format!("{prefix}.{part}");
        let y = self.conv_bn(
            x,
            (&name("conv1"), &name("bn1")),
            (in_channels, out_channels),
            (3, stride, 1),
            true,
        )?;
        let y = self.conv_bn(
            &y,
            (&name("conv2"), &name("bn2")),
            (out_channels, out_channels),
            (3, 1, 1),
            false,
        )?;
        let shortcut = if stride != 1 || in_channels != out_channels {
            self.conv_bn(
                x,
                (&name("downsample.0"), &name("downsample.1")),
                (in_channels, out_channels),
                (1, stride, 0),
                false,
            )?
        } else {
            x.to_string()
        };
        let sum = self.node("Add", &[&y, &shortcut], &name("add"), vec![]);
        Ok(self.node("Relu", &[&sum], &name("relu"), vec![]))
    }

    /// N x L x `width` -> N x h x L x d (d = width / h), heads as contiguous channel
    /// blocks; with `keys_last` N x h x d x L instead (the right-hand side of an attention
    /// product).
    fn split_heads(
        &mut self,
        x: &str,
        (heads, width): (usize, usize),
        keys_last: bool,
        output: &str,
    ) -> String {
        let shape = [0, 0, heads as i64, (width / heads) as i64];
        let split = self.reshape(x, &shape, &format!("{output}.split"));
        let perm: &[i64] = if keys_last {
            &[0, 2, 3, 1]
        } else {
            &[0, 2, 1, 3]
        };
        self.transpose(&split, perm, output)
    }

    /// N x h x L x d -> N x L x `width` (= h*d), heads in order.
    fn merge_heads(&mut self, x: &str, width: usize, output: &str) -> String {
        let merged = self.transpose(x, &[0, 2, 1, 3], &format!("{output}.heads_last"));
        self.reshape(&merged, &[0, 0, width as i64], output)
    }

    /// softmax_j(q_i . k_j * scale) v over heads: `q` N x h x I x d, `k_t` N x h x d x J,
    /// `v` N x h x J x e; returns the merged N x I x `width` (= h*e).
    fn attention(
        &mut self,
        (q, k_t, v): (&str, &str, &str),
        (scale, width): (f64, usize),
        prefix: &str,
    ) -> String {
        let scores = self.node("MatMul", &[q, k_t], &format!("{prefix}.scores"), vec![]);
        let scaled = self.scale(&scores, scale, &format!("{prefix}.scores.scaled"));
        let weights = self.node(
            "Softmax",
            &[&scaled],
            &format!("{prefix}.attention"),
            vec![int("axis", -1)],
        );
        let out = self.node("MatMul", &[&weights, v], &format!("{prefix}.heads"), vec![]);
        self.merge_heads(&out, width, &format!("{prefix}.out"))
    }

    /// Module `prefix`'s tokenizer (as [`crate::tokenizer::Tokenizer`]): filter-based
    /// without `previous` tokens, recurrent with them.
    fn tokenizer(
        &mut self,
        config: &VtConfig,
        module: &str,
        x: &str,
        previous: Option<&str>,
    ) -> Result<String> {
        let (c, l, ct) = (FEATURE_CHANNELS, config.tokens, config.token_channels);
        let prefix = format!("{module}.tokenizer");
        let name = |part: &str| format!("{prefix}.{part}");
        let logits = match previous {
            None => self.linear(x, &name("attn"), (c, l), false, &name("logits"))?,
            Some(tokens) => {
                let r = self.linear(tokens, &name("recur"), (ct, c), false, &name("recur.out"))?;
                let r_t = self.transpose(&r, &[0, 2, 1], &name("recur.out.T"));
                self.node("MatMul", &[x, &r_t], &name("logits"), vec![])
            }
        };
        let scale = 1.0 / (c as f64).sqrt();
        let scaled = self.scale(&logits, scale, &name("logits.scaled"));
        // softmax over the P positions (axis 1) of N x P x L.
        let a = self.node(
            "Softmax",
            &[&scaled],
            &name("attention"),
            vec![int("axis", 1)],
        );
        // value(A^T X), the order vt-model computes A^T value(X) in.
        let a_t = self.transpose(&a, &[0, 2, 1], &name("attention.T"));
        let pooled = self.node("MatMul", &[&a_t, x], &name("pooled"), vec![]);
        self.linear(&pooled, &name("value"), (c, ct), false, &name("tokens"))
    }

    /// Module `prefix`'s transformer (as [`crate::transformer::Transformer`]).
    fn transformer(&mut self, config: &VtConfig, module: &str, t: &str) -> Result<String> {
        let (ct, h) = (config.token_channels, config.heads);
        let prefix = format!("{module}.transformer");
        let name = |part: &str| format!("{prefix}.{part}");
        let k = self.linear(t, &name("key"), (ct, ct / 2), false, &name("key.out"))?;
        let q = self.linear(t, &name("query"), (ct, ct / 2), false, &name("query.out"))?;
        let k = self.split_heads(&k, (h, ct / 2), false, &name("key.heads"));
        let q_t = self.split_heads(&q, (h, ct / 2), true, &name("query.heads.T"));
        let v = self.split_heads(t, (h, ct), false, &name("value.heads"));
        let scale = 1.0 / ((ct / 2 / h) as f64).sqrt();
        let out = self.attention((&k, &q_t, &v), (scale, ct), &prefix);
        let t = self.node("Add", &[t, &out], &name("residual"), vec![]);
        let hidden = self.linear(&t, &name("ffn1"), (ct, ct), true, &name("ffn1.out"))?;
        let hidden = self.node("Relu", &[&hidden], &name("ffn1.relu"), vec![]);
        let ffn = self.linear(&hidden, &name("ffn2"), (ct, ct), true, &name("ffn2.out"))?;
        Ok(self.node("Add", &[&t, &ffn], &name("tokens"), vec![]))
    }

    /// Module `prefix`'s projector (as [`crate::projector::Projector`]): the new feature map.
    fn projector(&mut self, config: &VtConfig, module: &str, x: &str, t: &str) -> Result<String> {
        let (c, ct, h) = (FEATURE_CHANNELS, config.token_channels, config.heads);
        let prefix = format!("{module}.projector");
        let name = |part: &str| format!("{prefix}.{part}");
        let q = self.linear(x, &name("query"), (c, c), false, &name("query.out"))?;
        let k = self.linear(t, &name("key"), (ct, c), false, &name("key.out"))?;
        let v = self.linear(t, &name("value"), (ct, c), false, &name("value.out"))?;
        let q = self.split_heads(&q, (h, c), false, &name("query.heads"));
        let k_t = self.split_heads(&k, (h, c), true, &name("key.heads.T"));
        let v = self.split_heads(&v, (h, c), false, &name("value.heads"));
        let scale = 1.0 / ((c / h) as f64).sqrt();
        let out = self.attention((&q, &k_t, &v), (scale, c), &prefix);
        Ok(self.node("Add", &[x, &out], &name("features"), vec![]))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Tensor};

    use super::*;
    use crate::config::Arch;
    use crate::model::Model;

    /// A change to a checkpoint's tensors.
    type Edit = fn(&mut HashMap<String, Tensor>);

    /// A tiny checkpoint in `dir` whose tensors `edit` changes before they are written.
    fn checkpoint(dir: &Path, edit: Edit) {
        let config = VtConfig {
            tokens: 4,
            token_channels: 32,
            heads: 2,
            ..VtConfig::new(Arch::VtResNet18, 3, 32)
        };
        let model = Model::init(config, &Device::Cpu).unwrap();
        model.save(dir).unwrap();
        let path = dir.join(WEIGHTS_FILE);
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        edit(&mut tensors);
        candle_core::safetensors::save(&tensors, &path).unwrap();
    }

    /// vt-resnet34 with 8192-wide tokens holds 2.5 GB of weights: its file would not load.
    #[test]
    fn models_over_protobufs_limit_are_refused() {
        let path = Path::new("big/model.safetensors");
        check_size(path, MAX_MODEL_BYTES).unwrap();
        let err = check_size(path, 2_684_354_560).unwrap_err().to_string();
        assert!(
            err.contains("big/model.safetensors")
                && err.contains("2684354560 bytes (2.50 GiB)")
                && err.contains("2147483647 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_checkpoint_that_is_not_its_models_is_refused_by_tensor_name() {
        let tmp = tempfile::tempdir().unwrap();
        let cases: [(&str, Edit); 3] = [
            ("`vt.0.extra` (not part of this model)", |t| {
                t.insert(
                    "vt.0.extra".into(),
                    Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
                );
            }),
            ("`vt.1.tokenizer.recur.weight` is missing", |t| {
                t.remove("vt.1.tokenizer.recur.weight");
            }),
            ("`head.bias` has shape [4], expected [3]", |t| {
                t.insert(
                    "head.bias".into(),
                    Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
                );
            }),
        ];
        for (i, (needle, edit)) in cases.into_iter().enumerate() {
            let dir = tmp.path().join(i.to_string());
            checkpoint(&dir, edit);
            let err = export(&dir).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should say {needle}");
        }
        let dir = tmp.path().join("valid");
        checkpoint(&dir, |_| {});
        let graph = export(&dir).unwrap().graph.unwrap();
        let tensors =
            crate::checkpoint::read_tensors(&dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        for name in tensors.keys() {
            assert!(graph.initializer.iter().any(|t| &t.name == name), "{name}");
        }
    }
}
