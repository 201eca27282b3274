//! Shared test support: the deterministic "formula weights" of tools/reference/README.md,
//! which let golden fixtures stay small (the PyTorch side computes the same values).

#![allow(dead_code)]

pub mod fixture;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use vt_model::{Arch, Model, VtConfig};

fn fnv1a(name: &str) -> u32 {
    name.bytes().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}

/// The formula value of every element of tensor `name` with shape `dims`.
pub fn formula_values(name: &str, dims: &[usize]) -> Vec<f32> {
    let phase = f64::from(fnv1a(name) % 997) * 0.01;
    let n: usize = dims.iter().product();
    let fan_in: usize = dims.iter().skip(1).product();
    (0..n)
        .map(|i| {
            let b = (0.731 * i as f64 + phase).sin();
            let v = if dims.len() >= 2 {
                b * (2.0 / fan_in as f64).sqrt()
            } else if name.ends_with("running_mean") {
                0.1 * b
            } else if name.ends_with("running_var") {
                0.5 + b * b
            } else if name.ends_with("weight") {
                1.0 + 0.2 * b
            } else {
                0.1 * b
            };
            v as f32
        })
        .collect()
}

/// Overwrites every variable of `varmap` with its formula weights (f32 values, stored in
/// the variables' own dtype).
pub fn set_formula_varmap(varmap: &VarMap) {
    let vars = varmap.data().lock().unwrap();
    for (name, var) in vars.iter() {
        let values = formula_values(name, var.dims());
        let t = Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap();
        let t = t.to_dtype(var.dtype()).unwrap().to_device(var.device());
        var.set(&t.unwrap()).unwrap();
    }
}

/// Overwrites every variable of `model` with its formula weights.
pub fn set_formula_weights(model: &Model) {
    set_formula_varmap(&model.varmap);
}

/// A tiny config for fast tests.
pub fn tiny_config(arch: Arch) -> VtConfig {
    VtConfig {
        tokens: 4,
        token_channels: 32,
        heads: 2,
        ..VtConfig::new(arch, 3, 32)
    }
}

/// max |a - b| / max |b|, computed in f64 on the CPU: a relative error that tolerates tiny
/// entries.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let on_cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64);
    let (a, b) = (on_cpu(actual).unwrap(), on_cpu(expected).unwrap());
    let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    let (d, s) = (
        diff.to_scalar::<f64>().unwrap(),
        scale.to_scalar::<f64>().unwrap(),
    );
    d / s.max(1e-30)
}
