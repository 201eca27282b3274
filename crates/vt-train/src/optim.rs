//! Optimisers whose state can be saved and restored exactly: SGD with momentum, Nesterov and
//! coupled weight decay (PyTorch's `torch.optim.SGD`, dampening 0) and AdamW with decoupled
//! weight decay (`torch.optim.AdamW`). candle_nn's SGD has no momentum and its AdamW keeps
//! its moments private, so neither could resume a run where it stopped.
//!
//! Weight decay follows timm's convention: only tensors of rank >= 2 (convolution and linear
//! weights) decay; BatchNorm weights, every bias and other vectors do not. BatchNorm running
//! statistics are not parameters: the forward pass updates them in training mode and the
//! optimiser never sees them.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use vt_model::kernels::{AdamWStep, SgdStep};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Method {
    Sgd {
        momentum: f64,
        nesterov: bool,
    },
    #[serde(rename = "adamw")]
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
    },
}

/// As the logs name it: "SGD (momentum 0.9, Nesterov)", "AdamW (betas 0.9, 0.999, eps 1e-8)".
impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Method::Sgd { momentum, nesterov } => {
                write!(f, "SGD (momentum {momentum}")?;
                if nesterov {
                    write!(f, ", Nesterov")?;
                }
                write!(f, ")")
            }
            Method::AdamW { beta1, beta2, eps } => {
                write!(f, "AdamW (betas {beta1}, {beta2}, eps {eps:e})")
            }
        }
    }
}

/// A trainable tensor of the model.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Whether weight decay applies (rank >= 2).
    pub decay: bool,
}

/// BatchNorm running statistics: model state, but no parameter.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// Every parameter of `varmap` (running statistics excluded), sorted by name.
pub fn trainable_params(varmap: &VarMap) -> Vec<Param> {
    let vars = varmap
        .data()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut params: Vec<Param> = vars
        .iter()
        .filter(|(name, var)| !is_running_stat(name) && var.dtype().is_float())
        .map(|(name, var)| Param {
            name: name.clone(),
            var: var.clone(),
            decay: var.rank() >= 2,
        })
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    params
}

struct Slot {
    param: Param,
    /// Updates applied to this parameter (AdamW's bias correction counts per parameter, so
    /// a parameter frozen for a while starts its correction afresh, as in PyTorch).
    steps: u64,
    /// SGD's momentum buffer or AdamW's first moment.
    first: Option<Tensor>,
    /// AdamW's second moment.
    second: Option<Tensor>,
}

pub struct Optimizer {
    method: Method,
    weight_decay: f64,
    slots: Vec<Slot>,
}

/// What [`Optimizer::state`] exports besides tensors.
pub type StepCounts = BTreeMap<String, u64>;

impl Optimizer {
    pub fn new(method: Method, weight_decay: f64, params: Vec<Param>) -> Self {
        let slots = params
            .into_iter()
            .map(|param| Slot {
                param,
                steps: 0,
                first: None,
                second: None,
            })
            .collect();
        Optimizer {
            method,
            weight_decay,
            slots,
        }
    }

    pub fn params(&self) -> impl Iterator<Item = &Param> {
        self.slots.iter().map(|s| &s.param)
    }

    /// Adds the parameters' gradients in `grads` to `sum` (gradient accumulation). Only the
    /// parameters' are kept: the store of a backward pass also holds every intermediate
    /// tensor's gradient, which would otherwise stay alive until the update.
    pub fn accumulate(&self, sum: &mut GradStore, grads: &GradStore) -> Result<()> {
        for slot in &self.slots {
            let var = slot.param.var.as_tensor();
            let Some(grad) = grads.get(var) else { continue };
            let total = match sum.get(var) {
                Some(before) => (before + grad)?,
                None => grad.clone(),
            };
            sum.insert(var, total);
        }
        Ok(())
    }

    /// The global L2 norm of the gradients of the parameters that `selected` accepts.
    pub fn grad_norm(&self, grads: &GradStore, selected: &dyn Fn(&str) -> bool) -> Result<f64> {
        let squares = self
            .slots
            .iter()
            .filter(|s| selected(&s.param.name))
            .filter_map(|s| grads.get(s.param.var.as_tensor()))
            .map(|g| g.sqr()?.sum_all())
            .collect::<Result<Vec<_>>>()?;
        if squares.is_empty() {
            return Ok(0.0);
        }
        let total = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()?;
        Ok(f64::from(total).sqrt())
    }

    /// One update at learning rate `lr` of the parameters that `selected` accepts, with
    /// gradients multiplied by `grad_scale` first (gradient clipping).
    pub fn step(
        &mut self,
        grads: &GradStore,
        lr: f64,
        grad_scale: f64,
        selected: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        for slot in self.slots.iter_mut().filter(|s| selected(&s.param.name)) {
            let Some(grad) = grads.get(slot.param.var.as_tensor()) else {
                continue;
            };
            // Detached, so that stored moments never hold on to the autograd graph.
            let grad = grad.detach();
            let grad = if grad_scale == 1.0 {
                grad
            } else {
                (grad * grad_scale)?
            };
            let wd = if slot.param.decay {
                self.weight_decay
            } else {
                0.0
            };
            let theta = slot.param.var.as_tensor().detach();
            slot.steps += 1;
            let next = match self.method {
                Method::Sgd { momentum, nesterov } => {
                    let update = SgdStep {
                        lr,
                        weight_decay: wd,
                        momentum,
                        nesterov,
                    };
                    let buffer = slot.first.as_ref();
                    let (next, buffer) = match update.fused(&theta, &grad, buffer)? {
                        Some((next, buffer)) => (next, Some(buffer)),
                        None => sgd_with_tensor_ops(&update, &theta, grad, buffer)?,
                    };
                    slot.first = buffer;
                    next
                }
                Method::AdamW { beta1, beta2, eps } => {
                    let t = i32::try_from(slot.steps).unwrap_or(i32::MAX);
                    let update = AdamWStep::at_step(t, lr, wd, (beta1, beta2), eps);
                    let moments = slot.first.as_ref().zip(slot.second.as_ref());
                    let (next, m, v) = match update.fused(&theta, &grad, moments)? {
                        Some(updated) => updated,
                        None => adamw_with_tensor_ops(&update, &theta, &grad, moments)?,
                    };
                    slot.first = Some(m);
                    slot.second = Some(v);
                    next
                }
            };
            slot.param.var.set(&next)?;
        }
        Ok(())
    }

    /// Moments named as in PyTorch's state dict (`NAME.momentum_buffer`, `NAME.exp_avg`,
    /// `NAME.exp_avg_sq`) and the per-parameter step counts.
    pub fn state(&self) -> (HashMap<String, Tensor>, StepCounts) {
        let (first, second) = self.moment_names();
        let mut tensors = HashMap::new();
        let mut steps = StepCounts::new();
        for slot in &self.slots {
            let name = &slot.param.name;
            if let Some(t) = &slot.first {
                tensors.insert(format!("{name}.{first}"), t.clone());
            }
            if let (Some(t), Some(second)) = (&slot.second, second) {
                tensors.insert(format!("{name}.{second}"), t.clone());
            }
            if slot.steps > 0 {
                steps.insert(name.clone(), slot.steps);
            }
        }
        (tensors, steps)
    }

    /// Restores what [`Optimizer::state`] exported; every tensor must belong to a parameter
    /// of this optimiser with the parameter's shape. Errors name the offending tensor. Step
    /// counts are read for this optimiser's parameters: the caller refuses others, naming
    /// the file they came from.
    pub fn load_state(
        &mut self,
        mut tensors: HashMap<String, Tensor>,
        steps: &StepCounts,
    ) -> Result<()> {
        let (first, second) = self.moment_names();
        for slot in &mut self.slots {
            let name = slot.param.name.clone();
            let mut take = |suffix: &str| -> Result<Option<Tensor>> {
                let key = format!("{name}.{suffix}");
                match tensors.remove(&key) {
                    Some(t) if t.dims() != slot.param.var.dims() => candle_core::bail!(
                        "optimiser tensor `{key}` has shape {:?}, parameter has {:?}",
                        t.dims(),
                        slot.param.var.dims()
                    ),
                    Some(t) => Ok(Some(t.to_device(slot.param.var.device())?)),
                    None => Ok(None),
                }
            };
            slot.first = take(first)?;
            slot.second = match second {
                Some(second) => take(second)?,
                None => None,
            };
            slot.steps = steps.get(&name).copied().unwrap_or(0);
            let has_moments = slot.first.is_some()
                || matches!(self.method, Method::Sgd { momentum, .. } if momentum == 0.0);
            if slot.steps > 0 && !has_moments {
                candle_core::bail!("optimiser state lacks the moments of `{name}`");
            }
        }
        if let Some(unknown) = tensors.keys().next() {
            candle_core::bail!("optimiser state has unexpected tensor `{unknown}`");
        }
        Ok(())
    }

    fn moment_names(&self) -> (&'static str, Option<&'static str>) {
        match self.method {
            Method::Sgd { .. } => ("momentum_buffer", None),
            Method::AdamW { .. } => ("exp_avg", Some("exp_avg_sq")),
        }
    }
}

/// SGD's step as candle tensor operations, on any device: (parameter, momentum buffer, None
/// without momentum); `buffer` None on the first step.
fn sgd_with_tensor_ops(
    update: &SgdStep,
    theta: &Tensor,
    grad: Tensor,
    buffer: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let d_p = if update.weight_decay == 0.0 {
        grad
    } else {
        (grad + (theta * update.weight_decay)?)?
    };
    if update.momentum == 0.0 {
        return Ok(((theta - (d_p * update.lr)?)?, None));
    }
    let buf = match buffer {
        None => d_p.clone(),
        Some(buf) => ((buf * update.momentum)? + &d_p)?,
    };
    let step = if update.nesterov {
        (&d_p + (&buf * update.momentum)?)?
    } else {
        buf.clone()
    };
    Ok(((theta - (step * update.lr)?)?, Some(buf)))
}

/// AdamW's step as candle tensor operations, on any device: (parameter, first moment,
/// second moment); `moments` None means zeros.
fn adamw_with_tensor_ops(
    update: &AdamWStep,
    theta: &Tensor,
    grad: &Tensor,
    moments: Option<(&Tensor, &Tensor)>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let theta = if update.weight_decay == 0.0 {
        theta.clone()
    } else {
        (theta * (1.0 - update.lr * update.weight_decay))?
    };
    let (m, v) = match moments {
        None => (
            (grad * (1.0 - update.beta1))?,
            (grad.sqr()? * (1.0 - update.beta2))?,
        ),
        Some((m, v)) => (
            ((m * update.beta1)? + (grad * (1.0 - update.beta1))?)?,
            ((v * update.beta2)? + (grad.sqr()? * (1.0 - update.beta2))?)?,
        ),
    };
    let denom = ((v.sqrt()? / update.bias2.sqrt())? + update.eps)?;
    let next = (&theta - ((&m / denom)? * (update.lr / update.bias1))?)?;
    Ok((next, m, v))
}

/// The factor that brings a gradient of norm `norm` down to `max_norm` (PyTorch's
/// `clip_grad_norm_`: `max_norm / (norm + 1e-6)`, never above 1). `max_norm <= 0` disables it.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_read_as_text() {
        let sgd = Method::Sgd {
            momentum: 0.9,
            nesterov: true,
        };
        assert_eq!(sgd.to_string(), "SGD (momentum 0.9, Nesterov)");
        let plain = Method::Sgd {
            momentum: 0.0,
            nesterov: false,
        };
        assert_eq!(plain.to_string(), "SGD (momentum 0)");
        let adamw = Method::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        assert_eq!(adamw.to_string(), "AdamW (betas 0.9, 0.999, eps 1e-8)");
    }
    use candle_core::{DType, Device};
    use vt_model::kernels::OPTIMIZER_CHUNK;

    fn setup() -> (VarMap, Var, Var) {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints((1, 2), "w.weight", candle_nn::Init::Const(1.0))
            .unwrap();
        let b = vb
            .get_with_hints(1, "w.bias", candle_nn::Init::Const(0.5))
            .unwrap();
        vb.get_with_hints(1, "bn.running_mean", candle_nn::Init::Const(0.0))
            .unwrap();
        let vars = varmap.data().lock().unwrap();
        let (w_var, b_var) = (vars["w.weight"].clone(), vars["w.bias"].clone());
        drop(vars);
        assert!(w.is_variable() && b.is_variable());
        (varmap, w_var, b_var)
    }

    /// loss = sum(w * x) + 3 b: gradients are x for w and 3 for b.
    fn grads(w: &Var, b: &Var, x: [f32; 2]) -> GradStore {
        let x = Tensor::new(&[x], &Device::Cpu).unwrap();
        let loss = ((w.as_tensor() * x).unwrap().sum_all().unwrap()
            + (b.as_tensor().sum_all().unwrap() * 3.0).unwrap())
        .unwrap();
        loss.backward().unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn params_exclude_running_stats_and_decay_only_matrices() {
        let (varmap, _, _) = setup();
        let params = trainable_params(&varmap);
        let summary: Vec<(&str, bool)> =
            params.iter().map(|p| (p.name.as_str(), p.decay)).collect();
        assert_eq!(summary, vec![("w.bias", false), ("w.weight", true)]);
    }

    #[test]
    fn sgd_nesterov_with_weight_decay_matches_pytorch() {
        let (varmap, w, b) = setup();
        let (lr, mu, wd) = (0.1, 0.9, 0.01);
        let mut opt = Optimizer::new(
            Method::Sgd {
                momentum: mu,
                nesterov: true,
            },
            wd,
            trainable_params(&varmap),
        );
        let all = |_: &str| true;
        // Step 1: d = g + wd p; buf = d; update = d + mu buf.
        opt.step(&grads(&w, &b, [1.0, -2.0]), lr, 1.0, &all)
            .unwrap();
        let d1 = [1.0 + wd, -2.0 + wd];
        let w1: Vec<f64> = (0..2).map(|i| 1.0 - lr * (d1[i] + mu * d1[i])).collect();
        let b1 = 0.5 - lr * (3.0 + mu * 3.0); // bias: no decay
                                              // Step 2: buf = mu buf + d.
        opt.step(&grads(&w, &b, [1.0, -2.0]), lr, 1.0, &all)
            .unwrap();
        let g = [1.0, -2.0];
        let w2: Vec<f64> = (0..2)
            .map(|i| {
                let d = g[i] + wd * w1[i];
                let buf = mu * d1[i] + d;
                w1[i] - lr * (d + mu * buf)
            })
            .collect();
        let buf_b = mu * 3.0 + 3.0;
        let b2 = b1 - lr * (3.0 + mu * buf_b);
        for (got, want) in values(&w).iter().zip(&w2) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert!((f64::from(values(&b)[0]) - b2).abs() < 1e-6);
    }

    #[test]
    fn adamw_matches_pytorch_and_skips_decay_on_biases() {
        let (varmap, w, b) = setup();
        let (lr, wd, b1, b2, eps) = (0.01, 0.05, 0.9, 0.999, 1e-8);
        let method = Method::AdamW {
            beta1: b1,
            beta2: b2,
            eps,
        };
        let mut opt = Optimizer::new(method, wd, trainable_params(&varmap));
        let all = |_: &str| true;
        let g = [0.5f64, -4.0];
        let (mut p, mut m, mut v) = ([1.0f64, 1.0], [0.0f64; 2], [0.0f64; 2]);
        for t in 1..=3 {
            opt.step(&grads(&w, &b, [g[0] as f32, g[1] as f32]), lr, 1.0, &all)
                .unwrap();
            for i in 0..2 {
                p[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let denom = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
                p[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
            }
        }
        for (got, want) in values(&w).iter().zip(&p) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
        // The bias sees a constant gradient: Adam moves it by ~lr per step, with no decay.
        assert!((f64::from(values(&b)[0]) - (0.5 - 3.0 * lr)).abs() < 1e-5);
    }

    #[test]
    fn fused_adamw_matches_the_tensor_operations() {
        let dev = Device::Cpu;
        // Longer than one parallel chunk, with a ragged end.
        let shape = (3, OPTIMIZER_CHUNK / 2 + 5);
        let theta = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let mut moments: Option<(Tensor, Tensor)> = None;
        let (mut fused, mut reference) = (theta.clone(), theta);
        for t in 1..=3 {
            let grad = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let update = AdamWStep::at_step(t, 0.01, 0.05, (0.9, 0.999), 1e-8);
            let pair = moments.as_ref().map(|(m, v)| (m, v));
            let (next, m, v) = update.fused(&fused, &grad, pair).unwrap().unwrap();
            let (want, want_m, want_v) =
                adamw_with_tensor_ops(&update, &reference, &grad, pair).unwrap();
            for (got, want) in [(&next, &want), (&m, &want_m), (&v, &want_v)] {
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "step {t}");
            }
            (fused, reference, moments) = (next, want, Some((m, v)));
        }
        // Anything but contiguous f32 tensors of one shape goes to the tensor operations.
        let update = AdamWStep {
            lr: 0.01,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            bias1: 0.1,
            bias2: 0.001,
        };
        let f64_theta = fused.to_dtype(DType::F64).unwrap();
        assert!(update
            .fused(&f64_theta, &f64_theta, None)
            .unwrap()
            .is_none());
        let transposed = fused.t().unwrap();
        assert!(update
            .fused(&transposed, &transposed, None)
            .unwrap()
            .is_none());
        let row = fused.get(0).unwrap();
        assert!(update.fused(&fused, &row, None).unwrap().is_none());
    }

    #[test]
    fn fused_sgd_matches_the_tensor_operations() {
        let dev = Device::Cpu;
        let shape = (3, OPTIMIZER_CHUNK / 2 + 5);
        for (weight_decay, nesterov) in [(0.0, true), (5e-4, true), (5e-4, false)] {
            let update = SgdStep {
                lr: 0.05,
                weight_decay,
                momentum: 0.9,
                nesterov,
            };
            let theta = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let (mut fused, mut reference) = (theta.clone(), theta);
            let (mut buffer, mut reference_buffer): (Option<Tensor>, Option<Tensor>) = (None, None);
            for t in 1..=3 {
                let grad = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
                let (next, buf) = update
                    .fused(&fused, &grad, buffer.as_ref())
                    .unwrap()
                    .unwrap();
                let (want, want_buf) =
                    sgd_with_tensor_ops(&update, &reference, grad, reference_buffer.as_ref())
                        .unwrap();
                let want_buf = want_buf.unwrap();
                for (got, want) in [(&next, &want), (&buf, &want_buf)] {
                    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                    let diff = diff.to_scalar::<f32>().unwrap();
                    assert!(diff < 1e-6, "step {t}, {update:?}: {diff}");
                }
                (fused, reference) = (next, want);
                (buffer, reference_buffer) = (Some(buf), Some(want_buf));
            }
        }
        // Without momentum there is no buffer to fuse: the tensor operations run.
        let plain = SgdStep {
            lr: 0.05,
            weight_decay: 0.0,
            momentum: 0.0,
            nesterov: false,
        };
        let theta = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        assert!(plain.fused(&theta, &theta, None).unwrap().is_none());
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let method = Method::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let all = |_: &str| true;
        let (varmap, w, b) = setup();
        let mut opt = Optimizer::new(method, 0.05, trainable_params(&varmap));
        opt.step(&grads(&w, &b, [1.0, 2.0]), 0.01, 1.0, &all)
            .unwrap();
        let (tensors, steps) = opt.state();
        assert_eq!(tensors.len(), 4);
        assert_eq!(steps["w.weight"], 1);

        let (varmap2, w2, b2) = setup();
        w2.set(w.as_tensor()).unwrap();
        b2.set(b.as_tensor()).unwrap();
        let mut restored = Optimizer::new(method, 0.05, trainable_params(&varmap2));
        restored.load_state(tensors.clone(), &steps).unwrap();
        opt.step(&grads(&w, &b, [-1.0, 0.5]), 0.01, 1.0, &all)
            .unwrap();
        restored
            .step(&grads(&w2, &b2, [-1.0, 0.5]), 0.01, 1.0, &all)
            .unwrap();
        assert_eq!(values(&w), values(&w2));
        assert_eq!(values(&b), values(&b2));

        let mut bad = tensors;
        bad.insert(
            "nope.exp_avg".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = restored.load_state(bad, &steps).unwrap_err().to_string();
        assert!(err.contains("nope.exp_avg"), "{err}");
    }

    #[test]
    fn clipping_scales_the_global_norm_and_skips_unselected_params() {
        let (varmap, w, b) = setup();
        let mut opt = Optimizer::new(
            Method::Sgd {
                momentum: 0.0,
                nesterov: false,
            },
            0.0,
            trainable_params(&varmap),
        );
        let g = grads(&w, &b, [3.0, 4.0]);
        // |(3, 4, 3)| over both parameters; 5 over the weight alone.
        let norm = opt.grad_norm(&g, &|_| true).unwrap();
        assert!((norm - 34f64.sqrt()).abs() < 1e-6);
        let weight_only = |n: &str| n == "w.weight";
        let norm = opt.grad_norm(&g, &weight_only).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let scale = clip_scale(norm, 1.0);
        assert!((scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert_eq!(clip_scale(100.0, 0.0), 1.0);
        opt.step(&g, 1.0, scale, &weight_only).unwrap();
        let w_now = values(&w);
        // The update (3, 4) clipped to unit length; the bias is untouched.
        assert!(
            (f64::from(w_now[0]) - (1.0 - 0.6)).abs() < 1e-5,
            "{w_now:?}"
        );
        assert!(
            (f64::from(w_now[1]) - (1.0 - 0.8)).abs() < 1e-5,
            "{w_now:?}"
        );
        assert_eq!(values(&b), vec![0.5]);
    }

    #[test]
    fn accumulated_gradients_are_the_sum_of_the_parameters_gradients() {
        let (varmap, w, b) = setup();
        let sgd = Method::Sgd {
            momentum: 0.0,
            nesterov: false,
        };
        let opt = Optimizer::new(sgd, 0.0, trainable_params(&varmap));
        let mut sum = GradStore::default();
        opt.accumulate(&mut sum, &grads(&w, &b, [3.0, 4.0]))
            .unwrap();
        opt.accumulate(&mut sum, &grads(&w, &b, [-1.0, 0.5]))
            .unwrap();
        assert_eq!(values_of(&sum, &w), vec![2.0, 4.5]);
        assert_eq!(values_of(&sum, &b), vec![6.0]);
        // Only the two parameters: the intermediate tensors' gradients are dropped.
        assert_eq!(sum.get_ids().count(), 2);
    }

    fn values_of(grads: &GradStore, v: &Var) -> Vec<f32> {
        grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}
