//! Deterministic, stratified train/validation split.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{DataError, Result};
use crate::rng::{derive_seed, hash_str, TAG_SPLIT};

/// Checks that a validation fraction is usable.
pub fn check_fraction(val_fraction: f64) -> Result<()> {
    if (0.0..1.0).contains(&val_fraction) {
        Ok(())
    } else {
        Err(DataError::Invalid(format!(
            "validation fraction must be in [0, 1), got {val_fraction}"
        )))
    }
}

/// How many of `n` images of a class go to validation: `round(n * fraction)`, at least one
/// where the fraction is above 0 (a class without validation images would go unmeasured),
/// and always leaving at least one for training.
pub fn val_count(n: usize, val_fraction: f64) -> usize {
    let k = (n as f64 * val_fraction).round() as usize;
    k.max(usize::from(val_fraction > 0.0))
        .min(n.saturating_sub(1))
}

/// Splits one class's file names into (train, val). The names are sorted first and the
/// shuffle is seeded by (seed, class name), so the result depends on neither the order the
/// source listed them in nor the other classes. Validation takes the first
/// [`val_count`] names of the shuffle that are not `copied` (a photo with a copy in training
/// would be scored after being trained on); with fewer such names it takes them all.
pub fn split_class(
    class: &str,
    mut names: Vec<String>,
    val_fraction: f64,
    seed: u64,
    copied: impl Fn(&str) -> bool,
) -> (Vec<String>, Vec<String>) {
    names.sort();
    let k = val_count(names.len(), val_fraction);
    let mut rng = StdRng::seed_from_u64(derive_seed(&[TAG_SPLIT, seed, hash_str(class)]));
    names.shuffle(&mut rng);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for name in names {
        if val.len() < k && !copied(&name) {
            val.push(name);
        } else {
            train.push(name);
        }
    }
    train.sort();
    val.sort();
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:04}.jpg")).collect()
    }

    #[test]
    fn counts_round_and_keep_one_for_training() {
        assert_eq!(val_count(600, 0.1), 60);
        assert_eq!(val_count(2191, 0.1), 219);
        assert_eq!(val_count(5, 0.1), 1);
        // A small class is still measured.
        assert_eq!(val_count(4, 0.1), 1);
        assert_eq!(val_count(2, 0.01), 1);
        assert_eq!(val_count(1, 0.5), 0);
        assert_eq!(val_count(0, 0.1), 0);
        assert_eq!(val_count(10, 0.0), 0);
    }

    fn none_copied(_: &str) -> bool {
        false
    }

    #[test]
    fn split_is_a_partition_independent_of_input_order() {
        let split_class =
            |class, names, fraction, seed| split_class(class, names, fraction, seed, none_copied);
        let (train, val) = split_class("forest", names(100), 0.2, 7);
        assert_eq!((train.len(), val.len()), (80, 20));
        let mut all: Vec<String> = train.iter().chain(&val).cloned().collect();
        all.sort();
        assert_eq!(all, names(100));
        let mut reversed = names(100);
        reversed.reverse();
        assert_eq!(
            split_class("forest", reversed, 0.2, 7),
            (train.clone(), val.clone())
        );
        assert_ne!(split_class("forest", names(100), 0.2, 8).1, val);
        assert_ne!(split_class("sea", names(100), 0.2, 7).1, val);
    }

    /// Copied names are passed over, their places taken by the next of the shuffle; the
    /// others are drawn as without copies.
    #[test]
    fn copied_names_stay_in_training() {
        let (_, val) = split_class("forest", names(20), 0.2, 7, none_copied);
        let copied = |name: &str| name == val[0];
        let (train, val_with_copies) = split_class("forest", names(20), 0.2, 7, copied);
        assert_eq!(val_with_copies.len(), 4);
        assert!(train.contains(&val[0]));
        assert!(val[1..].iter().all(|n| val_with_copies.contains(n)));
        // A class of two keeps its uncopied image for validation, whichever the draw.
        for seed in 0..16 {
            let copied = |name: &str| name == "0000.jpg";
            let (train, val) = split_class("x", names(2), 0.1, seed, copied);
            assert_eq!(
                (train, val),
                (vec!["0000.jpg".into()], vec!["0001.jpg".into()])
            );
        }
        let (train, val) = split_class("x", names(3), 0.5, 1, |_| true);
        assert_eq!((train.len(), val.len()), (3, 0));
    }

    #[test]
    fn bad_fractions_are_refused() {
        assert!(check_fraction(0.1).is_ok());
        assert!(check_fraction(1.0).is_err());
        assert!(check_fraction(-0.1).is_err());
        assert!(check_fraction(f64::NAN).is_err());
    }
}
