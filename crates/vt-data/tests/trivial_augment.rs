//! TrivialAugmentWide's operations against torchvision's own `_apply_op` on PIL images: the
//! fixtures under expected/trivial_augment/, written by tools/reference/data_fixtures.py
//! (PNG inputs and outputs, so no decoder difference enters; magnitudes as repr strings).

mod common;

use std::path::PathBuf;

use image::RgbImage;
use serde_json::Value;
use vt_data::trivial_augment::{apply_op, Op, NUM_MAGNITUDE_BINS};

fn dir() -> PathBuf {
    common::fixtures().join("expected").join("trivial_augment")
}

fn png(name: &str) -> RgbImage {
    image::open(dir().join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .to_rgb8()
}

fn index() -> Value {
    let text = std::fs::read_to_string(dir().join("index.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A magnitude written as Python's repr: parsing it gives the exact double.
fn magnitude(v: &Value) -> f64 {
    v.as_str().unwrap().parse().unwrap()
}

/// The magnitude TrivialAugmentWide's forward passes for (op, bin, sign), from our tables.
fn our_magnitude(op: Op, bin: Option<usize>, negative: bool) -> f64 {
    let m = match (op.magnitudes(), bin) {
        (Some(table), Some(bin)) => f64::from(table[bin]),
        (None, None) => 0.0,
        _ => panic!("{op}: bin {bin:?} does not fit its table"),
    };
    if negative {
        -m
    } else {
        m
    }
}

#[test]
fn ops_and_magnitude_tables_match_torchvision() {
    let index = index();
    let names: Vec<&str> = index["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let ours: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
    assert_eq!(ours, names, "op order (the drawn index picks from it)");
    for op in Op::ALL {
        let table = &index["tables"][op.name()];
        assert_eq!(op.signed(), table["signed"].as_bool().unwrap(), "{op}");
        match (op.magnitudes(), table["magnitudes"].as_array()) {
            (None, None) => {}
            (Some(ours), Some(theirs)) => {
                assert_eq!(theirs.len(), NUM_MAGNITUDE_BINS, "{op}");
                for (bin, (m, t)) in ours.iter().zip(theirs).enumerate() {
                    assert_eq!(f64::from(*m), magnitude(t), "{op} bin {bin}");
                }
            }
            (ours, theirs) => panic!("{op}: ours {ours:?}, torchvision {theirs:?}"),
        }
    }
}

#[test]
fn every_op_matches_pil_pixel_for_pixel() {
    let index = index();
    let cases = index["cases"].as_array().unwrap();
    let mut covered = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for case in cases {
        let op: Op = case["op"].as_str().unwrap().parse().unwrap();
        let bin = case["bin"].as_u64().map(|b| b as usize);
        let negative = case["negative"].as_bool().unwrap();
        let m = our_magnitude(op, bin, negative);
        assert_eq!(m, magnitude(&case["magnitude"]), "{case}");
        let input = png(case["input"].as_str().unwrap());
        let name = case["output"].as_str().unwrap();
        let theirs = png(name);
        let ours = apply_op(&input, op, m).unwrap();
        assert_eq!(ours.dimensions(), theirs.dimensions(), "{name}");
        let (differ, max) = ours
            .iter()
            .zip(theirs.iter())
            .filter(|(a, b)| a != b)
            .fold((0, 0), |(n, max), (a, b)| (n + 1, max.max(a.abs_diff(*b))));
        if differ > 0 {
            failures.push(format!("{name}: {differ} values differ, by up to {max}"));
        }
        covered.insert(op);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(covered.len(), Op::ALL.len(), "every op has a golden case");
}
