//! A golden fixture: values the independent PyTorch implementation in tools/reference
//! computed in float64 for the formula weights, and the checks against them.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use vt_model::{Model, VtConfig, VtResNet};

use super::{formula_values, relative_error, set_formula_varmap};

pub struct Fixture {
    name: &'static str,
    config: VtConfig,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    pub fn load(name: &'static str) -> Fixture {
        // cargo sets CARGO_MANIFEST_DIR when it runs a test too; a test binary run elsewhere
        // (bench/gpu.sh on a GPU machine) is pointed at its copy of the crate that way.
        let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
        let dir = crate_dir.join("tests/fixtures");
        let json = std::fs::read_to_string(dir.join(format!("golden-{name}.json"))).unwrap();
        let config: VtConfig = serde_json::from_str(&json).unwrap();
        config.validate().unwrap();
        let path = dir.join(format!("golden-{name}.safetensors"));
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        Fixture {
            name,
            config,
            tensors,
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture {} lacks {key}", self.name))
    }

    fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Tensor)> + 'a {
        self.tensors
            .iter()
            .filter_map(move |(k, t)| Some((k.strip_prefix(prefix)?, t)))
    }

    /// The model with formula weights, its variables in `dtype` on `device`.
    fn model(&self, dtype: DType, device: &Device) -> (VarMap, VtResNet) {
        let varmap = VarMap::new();
        let net = VtResNet::new(
            &self.config,
            VarBuilder::from_varmap(&varmap, dtype, device),
        )
        .unwrap();
        set_formula_varmap(&varmap);
        (varmap, net)
    }

    /// The frozen model (as vt-serve loads it) of `model`'s variables.
    fn frozen(&self, varmap: VarMap, net: VtResNet, dtype: DType, device: &Device) -> Model {
        Model {
            config: self.config.clone(),
            varmap,
            net,
            device: device.clone(),
            dtype,
        }
        .into_frozen()
        .unwrap()
    }

    pub fn check_formula(&self) {
        for (param, tensor) in self.with_prefix("formula.") {
            let ours = Tensor::from_vec(
                formula_values(param, tensor.dims()),
                tensor.dims(),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(relative_error(&ours, tensor), 0.0, "formula for {param}");
        }
    }

    /// The fixture's input in `dtype` on `device`.
    fn input(&self, dtype: DType, device: &Device) -> Tensor {
        let input = self.get("input").to_dtype(dtype).unwrap();
        input.to_device(device).unwrap()
    }

    /// Evaluation-mode logits, of the model and of its frozen copy (as vt-serve loads it)
    /// twice, the second time from what the first call kept; returns the largest relative
    /// error.
    pub fn check_eval_logits(&self, dtype: DType, device: &Device, tolerance: f64) -> f64 {
        let (varmap, net) = self.model(dtype, device);
        let input = self.input(dtype, device);
        let check = |net: &VtResNet, what: &str| {
            let logits = net.forward_t(&input, false).unwrap();
            let err = relative_error(&logits, self.get("logits_eval"));
            assert!(
                err < tolerance,
                "{} {dtype:?}: eval logits of the {what} model, relative error {err}",
                self.name
            );
            err
        };
        let err = check(&net, "trainable");
        let frozen = self.frozen(varmap, net, dtype, device);
        let first = check(&frozen.net, "frozen");
        let second = check(&frozen.net, "frozen (second call)");
        err.max(first).max(second)
    }

    /// The frozen model's token attention maps (one per VT module, N x L x H x W) and the
    /// logits that come with them.
    pub fn check_token_attention(&self, dtype: DType, device: &Device, tolerance: f64) {
        let (varmap, net) = self.model(dtype, device);
        let frozen = self.frozen(varmap, net, dtype, device);
        let out = frozen.token_attention(&self.input(dtype, device)).unwrap();
        let err = relative_error(&out.logits, self.get("logits_eval"));
        assert!(
            err < tolerance,
            "{}: logits with attention, relative error {err}",
            self.name
        );
        let expected: Vec<_> = self.with_prefix("attention.").collect();
        assert_eq!(
            out.maps.len(),
            expected.len(),
            "{}: one map per module",
            self.name
        );
        assert_eq!(out.maps.len(), self.config.vt_modules);
        for (module, map) in out.maps.iter().enumerate() {
            let expected = self.get(&format!("attention.{module}"));
            assert_eq!(map.dims(), expected.dims(), "{} module {module}", self.name);
            let err = relative_error(map, expected);
            assert!(
                err < tolerance,
                "{} {dtype:?}: attention of module {module}, relative error {err}",
                self.name
            );
        }
    }

    /// Training-mode logits, gradients and running statistics; returns the largest relative
    /// error of a gradient.
    pub fn check_training(
        &self,
        dtype: DType,
        device: &Device,
        tolerance_logits: f64,
        tolerance_grads: f64,
    ) -> f64 {
        let (varmap, net) = self.model(dtype, device);
        let input = Var::from_tensor(&self.input(dtype, device)).unwrap();
        let logits = net.forward_t(input.as_tensor(), true).unwrap();
        let err = relative_error(&logits, self.get("logits_train"));
        assert!(
            err < tolerance_logits,
            "{} {dtype:?}: train logits relative error {err}",
            self.name
        );

        let loss_weight = self.get("loss_weight").to_dtype(dtype).unwrap();
        let loss_weight = loss_weight.to_device(device).unwrap();
        let loss = (&logits * loss_weight).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        let mut checked = 0;
        let mut worst = 0f64;
        for (param, expected) in self.with_prefix("grad.") {
            let source = if param == "input" {
                input.as_tensor()
            } else {
                vars.get(param)
                    .unwrap_or_else(|| panic!("no parameter {param}"))
                    .as_tensor()
            };
            let grad = grads
                .get(source)
                .unwrap_or_else(|| panic!("no gradient for {param}"));
            // Large gradients are stored as their first rows only.
            let grad = grad.narrow(0, 0, expected.dim(0).unwrap()).unwrap();
            let err = relative_error(&grad, expected);
            worst = worst.max(err);
            assert!(
                err < tolerance_grads,
                "{} {dtype:?}: gradient of {param} relative error {err}",
                self.name
            );
            checked += 1;
        }
        assert!(
            checked >= 15,
            "{}: only {checked} gradients in the fixture",
            self.name
        );
        for (param, expected) in self.with_prefix("running.") {
            let err = relative_error(vars[param].as_tensor(), expected);
            assert!(
                err < tolerance_logits,
                "{} {dtype:?}: {param} after one step, relative error {err}",
                self.name
            );
        }
        worst
    }
}
