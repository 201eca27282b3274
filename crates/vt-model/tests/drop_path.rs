//! Stochastic depth on the tiny model: without drops it is the training forward pass as it
//! was; a dropped branch contributes nothing (its weights get no gradient), and each sample's
//! branches are its own.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{relative_error, set_formula_weights, tiny_config};
use vt_model::{Arch, Model, PathDrops};

fn model() -> Model {
    let model = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    set_formula_weights(&model);
    model
}

fn images(n: usize) -> Tensor {
    let values: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
        .collect();
    Tensor::from_vec(values, (n, 3, 32, 32), &Device::Cpu).unwrap()
}

fn drops(model: &Model, rate: f64, batch: usize, uniform: impl FnMut() -> f64) -> PathDrops {
    PathDrops::draw(
        rate,
        &model.config,
        batch,
        (&Device::Cpu, DType::F32),
        uniform,
    )
    .unwrap()
}

/// The gradient's largest magnitude for the named parameter (0 when it has none).
fn gradient_norm(model: &Model, logits: &Tensor, name: &str) -> f32 {
    let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let vars = model.varmap.data().lock().unwrap();
    grads.get(vars[name].as_tensor()).map_or(0.0, |g| {
        g.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    })
}

#[test]
fn a_rate_of_zero_is_the_training_pass_as_it_was() {
    let model = model();
    let x = images(4);
    let plain = model.forward_t(&x, true).unwrap();
    let none = drops(&model, 0.0, 4, || 0.0);
    let dropped = model.forward_dropped(&x, &none, false).unwrap();
    assert_eq!(
        plain.to_vec2::<f32>().unwrap(),
        dropped.to_vec2::<f32>().unwrap()
    );
}

/// Every branch whose probability is above 0 dropped for every sample: the last stem
/// block's and the transformers' weights get no gradient, the first block's (probability
/// 0) do; kept, all of them do.
#[test]
fn dropped_branches_take_no_part() {
    let x = images(3);
    for (draw, dropped) in [(0.0, true), (0.999, false)] {
        let model = model();
        let all = drops(&model, 0.5, 3, || draw);
        let logits = model.forward_dropped(&x, &all, false).unwrap();
        for name in [
            "layer3.1.conv2.weight",
            "vt.0.transformer.key.weight",
            "vt.1.transformer.ffn2.weight",
        ] {
            let norm = gradient_norm(&model, &logits, name);
            assert_eq!(norm == 0.0, dropped, "{name}: gradient {norm}");
        }
        let first = gradient_norm(&model, &logits, "layer1.0.conv2.weight");
        assert!(first > 0.0, "the first block is never dropped");
    }
}

/// With the stem frozen (evaluation mode: no batch statistics tie the samples together),
/// a sample keeps its logits whatever its neighbour's branches do, and differs from one
/// whose branches were all dropped.
#[test]
fn each_sample_has_its_own_branches() {
    let model = model();
    let one = images(1);
    let pair = Tensor::cat(&[&one, &one], 0).unwrap();
    let mut turn = 0;
    let alternate = drops(&model, 0.4, 2, || {
        turn += 1;
        if turn % 2 == 1 {
            0.999
        } else {
            0.0
        }
    });
    let both = model.forward_dropped(&pair, &alternate, true).unwrap();
    let kept = drops(&model, 0.4, 1, || 0.999);
    let alone = model.forward_dropped(&one, &kept, true).unwrap();
    let first = both.narrow(0, 0, 1).unwrap();
    let second = both.narrow(0, 1, 1).unwrap();
    assert!(relative_error(&first, &alone) < 1e-5);
    assert!(relative_error(&second, &alone) > 1e-2);
}
