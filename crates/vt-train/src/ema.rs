//! An exponential moving average of the model's weights (timm's `ModelEmaV2`): after each
//! step `ema = decay * ema + (1 - decay) * weights` for every tensor, BatchNorm running
//! statistics included, so the averaged model is complete and can be evaluated and saved
//! on its own.

use candle_core::Result;
use candle_nn::VarMap;
use vt_model::Model;

pub struct Ema {
    pub decay: f64,
    pub model: Model,
}

/// Copies every tensor of `from` into the variable of the same name in `to`.
pub fn copy_vars(from: &VarMap, to: &VarMap) -> Result<()> {
    let (src, dst) = (lock(from), lock(to));
    for (name, var) in dst.iter() {
        let source = src
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}` to copy")))?;
        var.set(source.as_tensor())?;
    }
    Ok(())
}

fn lock(
    varmap: &VarMap,
) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, candle_core::Var>> {
    varmap
        .data()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Ema {
    /// Starts the average at the model's current weights.
    pub fn new(model: &Model, decay: f64) -> vt_model::Result<Ema> {
        let copy = Model::init(model.config.clone(), &model.device)?;
        copy_vars(&model.varmap, &copy.varmap)?;
        Ok(Ema { decay, model: copy })
    }

    pub fn update(&self, model: &Model) -> Result<()> {
        let (src, dst) = (lock(&model.varmap), lock(&self.model.varmap));
        for (name, avg) in dst.iter() {
            let Some(current) = src.get(name) else {
                candle_core::bail!("the model has no tensor `{name}` for the average");
            };
            let next =
                ((avg.as_tensor() * self.decay)? + (current.as_tensor() * (1.0 - self.decay))?)?;
            avg.set(&next)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use vt_model::{Arch, VtConfig};

    #[test]
    fn the_average_moves_by_one_minus_decay() {
        let config = VtConfig {
            tokens: 2,
            token_channels: 8,
            heads: 2,
            ..VtConfig::new(Arch::VtResNet18, 2, 32)
        };
        let model = Model::init(config, &Device::Cpu).unwrap();
        let ema = Ema::new(&model, 0.75).unwrap();
        let name = "head.bias";
        let var = |m: &Model| m.varmap.data().lock().unwrap()[name].clone();
        let before: Vec<f32> = var(&model).as_tensor().to_vec1().unwrap();
        let shifted = (var(&model).as_tensor() + 4.0).unwrap();
        var(&model).set(&shifted).unwrap();
        ema.update(&model).unwrap();
        let after: Vec<f32> = var(&ema.model).as_tensor().to_vec1().unwrap();
        for (a, b) in after.iter().zip(&before) {
            assert!((a - (b + 1.0)).abs() < 1e-6, "{a} vs {b} + 1");
        }
    }
}
