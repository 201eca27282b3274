//! Batching: labels, order, shuffling, drop_last, skipping, determinism, early drop.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use common::*;
use image::{ImageFormat, Rgb, RgbImage};
use vt_data::augment::AugmentConfig;
use vt_data::loader::{batches, plan_epoch, LoaderConfig, Transform};
use vt_data::transform::Normalize;

/// Image `i` is a solid colour whose red channel is `i`, so a row can be traced to its file.
fn solid_samples(dir: &Path, n: usize) -> Vec<(PathBuf, usize)> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i}.png"));
            let img = RgbImage::from_pixel(20, 16, Rgb([i as u8, 100, 200]));
            write(&path, &encode(img.into(), ImageFormat::Png));
            (path, i % 3)
        })
        .collect()
}

/// Eval without normalisation: the tensor holds the raw pixel values.
fn raw_eval(batch_size: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        shuffle: false,
        drop_last: false,
        seed: 7,
        threads: 2,
        prefetch: 2,
        transform: Transform::Eval {
            image_size: 8,
            norm: Normalize {
                mean: [0.0; 3],
                std: [1.0 / 255.0; 3],
            },
        },
    }
}

fn collect(
    samples: &[(PathBuf, usize)],
    cfg: &LoaderConfig,
    epoch: u64,
) -> Vec<(Vec<usize>, Vec<u32>, Vec<f32>)> {
    collect_on(samples, cfg, epoch, &Device::Cpu)
}

/// Each batch's sample indices, labels and images, read back from `device`.
fn collect_on(
    samples: &[(PathBuf, usize)],
    cfg: &LoaderConfig,
    epoch: u64,
    device: &Device,
) -> Vec<(Vec<usize>, Vec<u32>, Vec<f32>)> {
    batches(samples, cfg, epoch, device)
        .map(|b| {
            let b = b.unwrap();
            let images = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (b.indices, b.labels.to_vec1::<u32>().unwrap(), images)
        })
        .collect()
}

#[test]
fn batches_carry_the_right_images_and_labels_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = solid_samples(tmp.path(), 10);
    let cfg = raw_eval(4);
    let iter = batches(&samples, &cfg, 0, &Device::Cpu);
    assert_eq!(iter.len(), 3);
    let mut seen = Vec::new();
    for batch in iter {
        let batch = batch.unwrap();
        let n = batch.indices.len();
        assert_eq!(batch.images.dims(), [n, 3, 8, 8]);
        assert_eq!(batch.images.dtype(), candle_core::DType::F32);
        assert_eq!(batch.labels.dtype(), candle_core::DType::U32);
        let labels = batch.labels.to_vec1::<u32>().unwrap();
        let images = batch
            .images
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (row, &i) in batch.indices.iter().enumerate() {
            assert_eq!(labels[row] as usize, samples[i].1);
            let red = images[row * 3 * 64];
            let blue = images[row * 3 * 64 + 2 * 64];
            assert!(
                (red - i as f32).abs() < 1e-3 && (blue - 200.0).abs() < 1e-3,
                "row {row}: {red}"
            );
        }
        seen.extend(batch.indices);
    }
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
}

#[test]
fn drop_last_and_plans() {
    assert_eq!(
        plan_epoch(10, 4, false, true, 0, 0),
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
    );
    assert_eq!(plan_epoch(10, 4, false, false, 0, 0).len(), 3);
    assert_eq!(plan_epoch(8, 4, false, true, 0, 0).len(), 2);
    assert!(plan_epoch(3, 4, false, true, 0, 0).is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let samples = solid_samples(tmp.path(), 10);
    let mut cfg = raw_eval(4);
    cfg.drop_last = true;
    let got = collect(&samples, &cfg, 0);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|b| b.0.len() == 4));
}

#[test]
fn shuffling_is_per_epoch_and_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = solid_samples(tmp.path(), 23);
    let mut cfg = raw_eval(5);
    cfg.shuffle = true;
    let order = |epoch| -> Vec<usize> {
        collect(&samples, &cfg, epoch)
            .into_iter()
            .flat_map(|b| b.0)
            .collect()
    };
    let (e0, e0_again, e1) = (order(0), order(0), order(1));
    assert_eq!(e0, e0_again);
    assert_ne!(e0, e1);
    assert_ne!(e0, (0..23).collect::<Vec<_>>());
    let mut sorted = e1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..23).collect::<Vec<_>>());
}

#[test]
fn augmented_batches_do_not_depend_on_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let samples: Vec<(PathBuf, usize)> = (0..12)
        .map(|i| {
            let path = tmp.path().join(format!("{i}.jpg"));
            write(&path, &jpeg(i));
            (path, i as usize % 6)
        })
        .collect();
    let mut cfg = raw_eval(5);
    cfg.shuffle = true;
    cfg.transform = Transform::Train(AugmentConfig::notebook(16));
    cfg.threads = 1;
    let one = collect(&samples, &cfg, 3);
    cfg.threads = 4;
    cfg.prefetch = 1;
    let four = collect(&samples, &cfg, 3);
    assert_eq!(one, four);
    let other_epoch = collect(&samples, &cfg, 4);
    assert_ne!(one, other_epoch);
}

#[test]
fn unreadable_files_are_skipped_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut samples = solid_samples(tmp.path(), 6);
    write(&samples[2].0, b"corrupted after import");
    samples.push((tmp.path().join("vanished.png"), 1));
    let cfg = raw_eval(4);
    let mut iter = batches(&samples, &cfg, 0, &Device::Cpu);
    let first = iter.next().unwrap().unwrap();
    assert_eq!(first.indices, [0, 1, 3]);
    assert_eq!(first.labels.dims(), [3]);
    // Image 3 is written where the bad file's row would have been.
    let reds: Vec<f32> = (0..3)
        .map(|row| first.images.get(row).unwrap().flatten_all().unwrap())
        .map(|row| row.get(0).unwrap().to_scalar::<f32>().unwrap())
        .collect();
    assert_eq!(reds, [0.0, 1.0, 3.0]);
    let second = iter.next().unwrap().unwrap();
    assert_eq!(second.indices, [4, 5]);
    assert!(iter.next().is_none());
    let skipped = iter.skipped();
    assert_eq!(skipped.len(), 2);
    assert!(skipped.iter().any(|s| s.path == samples[2].0));
    assert!(skipped.iter().any(|s| s.path.ends_with("vanished.png")));
    // Reports (vt-train's eval) serialise the skips as they are.
    let vanished = skipped.iter().find(|s| s.path.ends_with("vanished.png"));
    let json = serde_json::to_value(vanished.unwrap()).unwrap();
    assert_eq!(json["path"], samples[6].0.to_str().unwrap());
    assert!(
        json["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{json}"
    );
}

#[test]
fn a_batch_of_only_bad_files_is_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let mut samples = solid_samples(tmp.path(), 4);
    write(&samples[0].0, b"x");
    write(&samples[1].0, b"y");
    let got = collect(&samples, &raw_eval(2), 0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, [2, 3]);
    samples.clear();
    assert!(collect(&samples, &raw_eval(2), 0).is_empty());
}

#[test]
fn dropping_the_iterator_early_stops_the_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let img = RgbImage::from_fn(1200, 800, |x, y| Rgb([x as u8, y as u8, 7]));
    let path = tmp.path().join("big.png");
    write(&path, &encode(img.into(), ImageFormat::Png));
    let samples: Vec<(PathBuf, usize)> = (0..20_000).map(|i| (path.clone(), i % 6)).collect();
    let mut cfg = raw_eval(8);
    cfg.prefetch = 2;
    let start = Instant::now();
    let mut iter = batches(&samples, &cfg, 0, &Device::Cpu);
    assert_eq!(iter.len(), 2500);
    iter.next().unwrap().unwrap();
    drop(iter);
    // The whole epoch, 20,000 decodes of a megapixel, takes minutes; dropping joins the
    // workers promptly.
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn bad_configurations_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = solid_samples(tmp.path(), 2);
    let mut cfg = raw_eval(0);
    let mut iter = batches(&samples, &cfg, 0, &Device::Cpu);
    assert!(iter.next().unwrap().is_err());
    assert!(iter.next().is_none());
    cfg.batch_size = 1;
    cfg.threads = 0;
    assert_eq!(collect(&samples, &cfg, 0).len(), 2);
}

/// On a GPU each worker stages its batches in one page-locked buffer, reused from batch to
/// batch: what arrives must be exactly the CPU's batches, over epochs, batch sizes and skipped
/// files.
#[cfg(feature = "cuda")]
#[test]
fn gpu_batches_equal_cpu_batches() {
    let gpu = match Device::new_cuda(0) {
        Ok(gpu) => gpu,
        Err(e) if std::env::var_os("VT_REQUIRE_GPU").is_some() => {
            panic!("VT_REQUIRE_GPU is set, but no CUDA device opens: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut samples: Vec<(PathBuf, usize)> = (0..23)
        .map(|i| {
            let path = tmp.path().join(format!("{i}.jpg"));
            write(&path, &jpeg(i));
            (path, i as usize % 6)
        })
        .collect();
    write(&samples[9].0, b"corrupted after import");
    samples.push((tmp.path().join("vanished.jpg"), 2));
    let mut cfg = raw_eval(5);
    cfg.shuffle = true;
    cfg.transform = Transform::Train(AugmentConfig::notebook(24));
    for threads in [1, 3] {
        cfg.threads = threads;
        for epoch in 0..3 {
            let cpu = collect_on(&samples, &cfg, epoch, &Device::Cpu);
            assert_eq!(cpu.len(), 5);
            assert_eq!(cpu.iter().map(|b| b.0.len()).sum::<usize>(), 22);
            assert_eq!(collect_on(&samples, &cfg, epoch, &gpu), cpu);
        }
    }
}
