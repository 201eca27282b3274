//! Importing local sources: folders, zips, synthetic data, the real sample.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use image::{GrayImage, ImageFormat, Luma};
use vt_data::dataset::{DuplicateGroup, ImageFolder, Manifest, Split};
use vt_data::fetch::{fetch, FetchOptions, FetchSource};
use vt_data::import::{lock_for_reading, Importer};
use vt_data::layout::OUTSIDE_SPLITS;
use vt_data::source::parquet::{import_parquet, ParquetSplit};
use vt_data::source::synthetic::SyntheticConfig;
use vt_data::DataError;

fn from_path(data_dir: &Path, source: &Path) -> FetchOptions {
    FetchOptions::new(data_dir, FetchSource::Path(source.to_path_buf()))
}

/// A few tiny synthetic images: the quickest complete import.
fn tiny_synthetic(data_dir: &Path, seed: u64) -> FetchOptions {
    let mut opts = FetchOptions::new(
        data_dir,
        FetchSource::Synthetic(SyntheticConfig {
            train_per_class: 2,
            test_per_class: 0,
            pred: 0,
            image_size: 8,
            seed,
        }),
    );
    opts.seed = seed;
    opts
}

/// A Kaggle-style folder (with the doubled names) holding the awkward cases.
fn awkward_folder(root: &Path) {
    for (class, n) in [("buildings", 10), ("forest", 20)] {
        for i in 0..n {
            write(
                &root.join(format!("seg_train/seg_train/{class}/{i}.jpg")),
                &jpeg(i),
            );
        }
        write(
            &root.join(format!("seg_test/seg_test/{class}/t{class}.jpg")),
            &jpeg(99),
        );
    }
    let good = jpeg(5);
    write(
        &root.join("seg_train/seg_train/forest/corrupt.jpg"),
        b"\xff\xd8\xff\xe0 garbage",
    );
    write(&root.join("seg_train/seg_train/forest/empty.jpg"), b"");
    write(
        &root.join("seg_train/seg_train/forest/truncated.jpg"),
        &good[..good.len() / 3],
    );
    // A real photo cut in half, and one missing only its end-of-image marker.
    let photo = fs::read(fixtures().join("rgb.jpg")).unwrap();
    write(
        &root.join("seg_train/seg_train/forest/half.jpg"),
        &photo[..photo.len() / 2],
    );
    write(
        &root.join("seg_train/seg_train/forest/no_end.jpg"),
        &photo[..photo.len() - 2],
    );
    write(&root.join("seg_train/seg_train/forest/.DS_Store"), b"junk");
    write(&root.join("seg_train/seg_train/stray.jpg"), &jpeg(1));
    write(&root.join("README.txt"), b"not an image");
    for name in ["grey.jpg", "palette.png", "rgba.png", "cmyk.jpg"] {
        let bytes = fs::read(fixtures().join(name)).unwrap();
        write(
            &root.join(format!("seg_train/seg_train/buildings/{name}")),
            &bytes,
        );
    }
    let png = encode(
        GrayImage::from_pixel(30, 20, Luma([77])).into(),
        ImageFormat::Png,
    );
    write(&root.join("seg_pred/seg_pred/7606.jpg"), &png);
    write(&root.join("seg_pred/seg_pred/1.jpg"), &jpeg(3));
}

#[test]
fn a_folder_with_awkward_files_imports_and_reports_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    awkward_folder(&src);
    let data = tmp.path().join("data");
    let m = fetch(&from_path(&data, &src)).unwrap();

    assert_eq!(m.source, "folder");
    assert_eq!(m.classes, ["buildings", "forest"]);
    // 10 + 4 colour-type variants in buildings, 20 in forest; 10% each to val.
    assert_eq!(m.splits.train["buildings"] + m.splits.val["buildings"], 14);
    assert_eq!(m.splits.val["buildings"], 1);
    assert_eq!(m.splits.val["forest"], 2);
    assert_eq!(m.splits.train["forest"], 18);
    assert_eq!(m.splits.test["forest"], 1);
    assert_eq!(m.splits.pred, 2);
    let mut skipped: Vec<&str> = m.skipped.iter().map(|s| s.path.as_str()).collect();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "seg_train/seg_train/forest/corrupt.jpg",
            "seg_train/seg_train/forest/empty.jpg",
            "seg_train/seg_train/forest/half.jpg",
            "seg_train/seg_train/forest/no_end.jpg",
            "seg_train/seg_train/forest/truncated.jpg",
            "seg_train/seg_train/stray.jpg",
        ]
    );
    for s in &m.skipped {
        assert!(!s.reason.is_empty() && s.reason.trim() == s.reason, "{s:?}");
        if s.path.ends_with("half.jpg") || s.path.ends_with("no_end.jpg") {
            assert!(s.reason.contains("truncated"), "{s:?}");
        }
    }
    assert_eq!(Manifest::read(&data).unwrap(), m);

    // The PNG named .jpg keeps its bytes and gets its real extension.
    assert!(data.join("pred/7606.png").is_file());
    assert_eq!(sorted_names(&data.join("pred")).len(), 2);
    // The colour-type variants survive as they were.
    let all = tree(&data);
    for name in ["grey.jpg", "palette.png", "rgba.png", "cmyk.jpg"] {
        let hits: Vec<&String> = all
            .iter()
            .filter(|p| p.ends_with(&format!("/{name}")))
            .collect();
        assert_eq!(hits.len(), 1, "{name} in {all:?}");
        assert_eq!(
            fs::read(data.join(hits[0])).unwrap(),
            fs::read(fixtures().join(name)).unwrap()
        );
    }
    // ImageFolder sees the same counts with manifest labels.
    for split in Split::ALL {
        let folder = ImageFolder::open(&data, split).unwrap();
        assert_eq!(folder.classes, m.classes);
        assert_eq!(folder.len(), m.count(split), "{split}");
        for (path, label) in &folder.samples {
            assert!(path.starts_with(data.join(split.dir_name()).join(&m.classes[*label])));
        }
    }
}

#[test]
fn reimporting_neither_duplicates_nor_loses_and_leaves_no_debris() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    awkward_folder(&src);
    let data = tmp.path().join("data");
    let first = fetch(&from_path(&data, &src)).unwrap();
    let files = tree(&data);
    let second = fetch(&from_path(&data, &src)).unwrap();
    assert_eq!(first, second);
    assert_eq!(tree(&data), files);
    // The lock file stays on purpose (see `Importer::new`); staging and old copies go.
    assert_eq!(sorted_names(tmp.path()), [".data.lock", "data", "src"]);

    // A different seed moves validation images but keeps the counts. (Buildings and forest
    // share ten photos, which stay in training whichever the seed.)
    let mut opts = from_path(&data, &src);
    opts.seed = 1234;
    let third = fetch(&opts).unwrap();
    assert_eq!(third.seed, 1234);
    assert_eq!(tree(&data).len(), files.len());
    let labelled = |m: &Manifest| m.count(Split::Train) + m.count(Split::Val);
    assert_eq!(labelled(&third), labelled(&first));
    assert_eq!(third.count(Split::Val), first.count(Split::Val));
    assert_eq!(third.duplicates, first.duplicates);
}

#[test]
fn a_failed_import_keeps_the_previous_data() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    awkward_folder(&src);
    let data = tmp.path().join("data");
    let before = fetch(&from_path(&data, &src)).unwrap();
    let empty = tmp.path().join("empty");
    fs::create_dir_all(empty.join("seg_pred")).unwrap();
    let err = fetch(&from_path(&data, &empty)).unwrap_err().to_string();
    assert!(err.contains("no usable training images"), "{err}");
    assert_eq!(Manifest::read(&data).unwrap(), before);
    assert!(!tmp.path().join(".data.incoming").exists());
    let missing = fetch(&from_path(&data, &tmp.path().join("nope"))).unwrap_err();
    assert!(missing.to_string().contains("no such file"), "{missing}");
}

#[test]
fn an_import_interrupted_between_its_renames_is_put_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let before = fetch(&tiny_synthetic(&data, 0)).unwrap();
    // What a crash after renaming the previous import away, before renaming the new one in,
    // leaves behind.
    let aside = tmp.path().join(".data.old");
    fs::rename(&data, &aside).unwrap();

    // The next import, even one that fails, starts by putting the previous one back.
    let empty = tmp.path().join("empty");
    fs::create_dir_all(empty.join("seg_pred")).unwrap();
    let err = fetch(&from_path(&data, &empty)).unwrap_err().to_string();
    assert!(err.contains("no usable training images"), "{err}");
    assert_eq!(Manifest::read(&data).unwrap(), before);
    assert!(!aside.exists());

    // A completed import replaces it as usual and leaves nothing aside.
    fs::rename(&data, &aside).unwrap();
    assert_eq!(fetch(&tiny_synthetic(&data, 1)).unwrap().seed, 1);
    assert_eq!(sorted_names(tmp.path()), [".data.lock", "data", "empty"]);

    // A crash while deleting the previous import leaves part of it, manifest included,
    // under another name: never put back as the data, even with none there, and removed.
    let partial = tmp.path().join(".data.deleting");
    fs::rename(&data, &partial).unwrap();
    fs::remove_dir_all(partial.join("test")).unwrap();
    let err = fetch(&from_path(&data, &empty)).unwrap_err().to_string();
    assert!(err.contains("no usable training images"), "{err}");
    assert!(!data.exists() && !partial.exists());
    assert_eq!(sorted_names(tmp.path()), [".data.lock", "empty"]);
}

/// The folder an import replaces needs a name of its own: the import is built beside it.
#[test]
fn a_data_dir_named_by_dots_is_refused_saying_why_or_read_as_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("x")).unwrap();
    let err = fetch(&tiny_synthetic(&tmp.path().join("x/.."), 0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("name it by its own name (as ../intel)"),
        "{err}"
    );
    assert_eq!(sorted_names(tmp.path()), ["x"]);
    // `x/.` is `x`.
    fetch(&tiny_synthetic(&tmp.path().join("x/."), 0)).unwrap();
    assert!(tmp.path().join("x/manifest.json").is_file());
    assert_eq!(sorted_names(tmp.path()), [".x.lock", "x"]);
}

#[test]
fn the_source_may_not_live_inside_the_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("manifest.json"), "{}").unwrap();
    awkward_folder(&data.join("raw"));
    let err = fetch(&from_path(&data, &data.join("raw"))).unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");
}

#[test]
fn a_data_dir_that_does_not_exist_yet_may_not_be_inside_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    three_forest_photos(&src);
    let err = fetch(&from_path(&src.join("data/intel"), &src)).unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");
    assert!(!src.join("data").exists());
}

/// A link back up the tree is followed once, not until the kernel's link limit.
#[cfg(unix)]
#[test]
fn a_folder_linked_into_itself_imports_each_image_once() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    three_forest_photos(&src);
    std::os::unix::fs::symlink("..", src.join("seg_train/seg_train/forest/more")).unwrap();
    let mut opts = from_path(&tmp.path().join("data"), &src);
    opts.val_fraction = 0.0;
    let m = fetch(&opts).unwrap();
    assert_eq!(m.splits.train["forest"], 3, "{:?}", m.splits);
    assert_eq!(m.duplicates, Some(Vec::new()));
}

/// An entry that inflates past the size it declares (as a zip bomb's does) is skipped
/// after reading one byte more than that, not inflated whole.
#[test]
fn a_zip_entry_larger_than_it_declares_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let bomb = "seg_train/seg_train/forest/bomb.jpg";
    let mut zip = zip_bytes(&[
        ("seg_train/seg_train/forest/0.jpg".into(), jpeg(0)),
        ("seg_train/seg_train/sea/0.jpg".into(), jpeg(1)),
        (bomb.into(), vec![0; 1 << 20]),
    ]);
    // The uncompressed size, in the local header (30 bytes before the name, at offset 22)
    // and in the central directory's entry (46 before, at 24): 1000 bytes.
    let at: Vec<usize> = zip
        .windows(bomb.len())
        .enumerate()
        .filter(|(_, w)| *w == bomb.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 2);
    zip[at[0] - 30 + 22..at[0] - 30 + 26].copy_from_slice(&1000u32.to_le_bytes());
    zip[at[1] - 46 + 24..at[1] - 46 + 28].copy_from_slice(&1000u32.to_le_bytes());
    let path = tmp.path().join("bomb.zip");
    fs::write(&path, zip).unwrap();
    let m = fetch(&from_path(&tmp.path().join("data"), &path)).unwrap();
    assert_eq!(m.splits.train["forest"] + m.splits.val["forest"], 1);
    let skipped = m.skipped.iter().find(|s| s.path == bomb).unwrap();
    assert!(
        skipped
            .reason
            .contains("more than the 1000 bytes it declares"),
        "{}",
        skipped.reason
    );
}

/// Folders linked to each other are listed once each through a link, not along every path
/// of links; a linked-in folder of images is still imported.
#[cfg(unix)]
#[test]
fn folders_linked_to_each_other_are_listed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let train = src.join("seg_train/seg_train");
    three_forest_photos(&src);
    write(&tmp.path().join("more/a.jpg"), &jpeg(10));
    std::os::unix::fs::symlink(tmp.path().join("more"), train.join("forest/more")).unwrap();
    // Four folders each linking to every other one.
    for i in 0..4 {
        fs::create_dir_all(src.join(format!("extra/d{i}"))).unwrap();
    }
    for i in 0..4 {
        for j in (0..4).filter(|&j| j != i) {
            let link = src.join(format!("extra/d{i}/to{j}"));
            std::os::unix::fs::symlink(src.join(format!("extra/d{j}")), link).unwrap();
        }
    }
    // Two links into one outside folder, one to a folder inside the other's: each photo once.
    write(&tmp.path().join("more/sub/b.jpg"), &jpeg(11));
    std::os::unix::fs::symlink(tmp.path().join("more/sub"), train.join("forest/aa")).unwrap();
    // And one to the folder above the source, which holds it and other photos.
    std::os::unix::fs::symlink(tmp.path(), train.join("sea/up")).unwrap();
    write(&tmp.path().join("other/c.jpg"), &jpeg(12));
    let mut opts = from_path(&tmp.path().join("data"), &src);
    opts.val_fraction = 0.0;
    let m = fetch(&opts).unwrap();
    assert_eq!(m.splits.train["forest"], 5, "{:?}", m.splits);
    assert_eq!(m.splits.train["sea"], 1, "{:?}", m.splits);
    assert_eq!(m.duplicates, Some(Vec::new()));
}

/// Two photos of one name in two folders of a class: the one filed under the name is the
/// same whether the source is the folder or a zip of it, whatever the archive's order.
#[test]
fn photos_sharing_a_name_are_filed_alike_from_a_zip_and_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let entries = [
        // `a-b` sorts before `a/` as text, after it as a path.
        ("seg_train/sea/a-b/1.jpg", jpeg(2)),
        ("seg_train/sea/a/1.jpg", jpeg(1)),
        ("seg_train/forest/f.jpg", jpeg(3)),
    ]
    .map(|(name, bytes)| (name.to_string(), bytes));
    for (name, bytes) in &entries {
        write(&src.join(name), bytes);
    }
    let zip = tmp.path().join("src.zip");
    fs::write(&zip, zip_bytes(&entries)).unwrap();
    // As some Windows tools write names.
    let backslashed = tmp.path().join("backslashed.zip");
    let windows_names = entries
        .clone()
        .map(|(name, bytes)| (name.replace('/', "\\"), bytes));
    fs::write(&backslashed, zip_bytes(&windows_names)).unwrap();
    let mut filed = Vec::new();
    for (source, data) in [
        (&src, "from-folder"),
        (&zip, "from-zip"),
        (&backslashed, "from-backslashed"),
    ] {
        let data = tmp.path().join(data);
        let mut opts = from_path(&data, source);
        opts.val_fraction = 0.0;
        let m = fetch(&opts).unwrap();
        assert_eq!(m.splits.train["sea"], 2);
        filed.push((fs::read(data.join("train/sea/1.jpg")).unwrap(), m.renamed));
    }
    assert_eq!(filed[0], filed[1]);
    assert_eq!(filed[0].0, filed[2].0);
    assert_eq!(filed[0].0, jpeg(1));
    // A Windows name that climbs out of its folders is refused as a '/' one is.
    let climbing = tmp.path().join("climbing.zip");
    let with_climber = [
        windows_names.to_vec(),
        vec![("seg_train\\..\\..\\evil.jpg".to_string(), jpeg(9))],
    ]
    .concat();
    fs::write(&climbing, zip_bytes(&with_climber)).unwrap();
    let m = fetch(&from_path(&tmp.path().join("from-climbing"), &climbing)).unwrap();
    assert!(
        m.skipped.iter().any(
            |s| s.path == "seg_train/../../evil.jpg" && s.reason == vt_data::layout::CLIMBS_OUT
        ),
        "{:?}",
        m.skipped
    );
}

/// A link to a class folder of the source is not followed, whether its name sorts before
/// or after the folder's: the class it would make has no photos of its own.
#[cfg(unix)]
#[test]
fn a_link_to_a_class_folder_of_the_source_is_not_followed() {
    for link in ["aaa", "zzz"] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        three_forest_photos(&src);
        write(&src.join("seg_train/seg_train/glacier/g.jpg"), &jpeg(41));
        std::os::unix::fs::symlink("sea", src.join("seg_train/seg_train").join(link)).unwrap();
        let err = fetch(&from_path(&tmp.path().join("data"), &src))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("\"{link}\"")) && err.contains("no usable images"),
            "{err}"
        );
        assert!(
            err.contains("a folder imported already as part of class \"sea\""),
            "{err}"
        );
    }
}

/// A class linked to a folder of the source outside the layout (`photos/forest`) gets its
/// photos, which that folder's own path imports nowhere (listed first, it is no stray).
#[cfg(unix)]
#[test]
fn a_class_linked_to_a_folder_outside_the_layout_gets_its_photos() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("seg_train/sea/s.jpg"), &jpeg(1));
    write(&src.join("photos/forest/f.jpg"), &jpeg(2));
    write(&src.join("photos/forest/more/g.jpg"), &jpeg(3));
    std::os::unix::fs::symlink("../photos/forest", src.join("seg_train/forest")).unwrap();
    // A loop inside it is not followed: the folder above holds other photos.
    std::os::unix::fs::symlink("..", src.join("photos/forest/up")).unwrap();
    write(&src.join("photos/misc/m.jpg"), &jpeg(4));
    // The test split's class, likewise.
    write(&src.join("photos/test-forest/t.jpg"), &jpeg(5));
    fs::create_dir_all(src.join("seg_test")).unwrap();
    std::os::unix::fs::symlink("../photos/test-forest", src.join("seg_test/forest")).unwrap();
    let mut opts = from_path(&tmp.path().join("data"), &src);
    opts.val_fraction = 0.0;
    let m = fetch(&opts).unwrap();
    assert_eq!(m.splits.train["forest"], 2, "{:?}", m.splits);
    assert_eq!(m.splits.train["sea"], 1, "{:?}", m.splits);
    assert_eq!(m.splits.test["forest"], 1, "{:?}", m.splits);
    let skipped: Vec<(&str, &str)> = m
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(skipped, [("photos/misc/m.jpg", OUTSIDE_SPLITS)]);
}

/// A class linked to a folder inside another class's linked folder: its photos are filed
/// once, under the class that reached them first, and the manifest says why the other has
/// none of them (an error naming the link when it has no photos at all).
#[cfg(unix)]
#[test]
fn a_link_into_another_classs_linked_folder_is_listed_as_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("seg_train/forest/f.jpg"), &jpeg(1));
    write(&tmp.path().join("seapics/s.jpg"), &jpeg(2));
    write(&tmp.path().join("seapics/more/m.jpg"), &jpeg(3));
    std::os::unix::fs::symlink(tmp.path().join("seapics"), src.join("seg_train/sea")).unwrap();
    let street = src.join("seg_train/street");
    std::os::unix::fs::symlink(tmp.path().join("seapics/more"), &street).unwrap();
    let err = fetch(&from_path(&tmp.path().join("data"), &src))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"street\"")
            && err.contains("seg_train/street (a link to")
            && err.contains("imported already as part of class \"sea\""),
        "{err}"
    );
    // With photos of its own, the class is imported with them; the link is listed.
    fs::remove_file(&street).unwrap();
    write(&street.join("own.jpg"), &jpeg(4));
    std::os::unix::fs::symlink(tmp.path().join("seapics/more"), street.join("more")).unwrap();
    let mut opts = from_path(&tmp.path().join("data"), &src);
    opts.val_fraction = 0.0;
    let m = fetch(&opts).unwrap();
    assert_eq!(m.splits.train["sea"], 2, "{:?}", m.splits);
    assert_eq!(m.splits.train["street"], 1, "{:?}", m.splits);
    assert!(
        m.skipped
            .iter()
            .any(|s| s.path == "seg_train/street/more"
                && s.reason.contains("as part of class \"sea\"")),
        "{:?}",
        m.skipped
    );
}

#[test]
fn a_kaggle_zip_imports_like_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = tmp.path().join("archive.zip");
    let mut bytes = kaggle_zip(&["glacier", "sea"], 10, 3, 4);
    fs::write(&zip, &bytes).unwrap();
    let data = tmp.path().join("data");
    let m = fetch(&from_path(&data, &zip)).unwrap();
    assert_eq!(m.source, "zip");
    assert_eq!(m.classes, ["glacier", "sea"]);
    assert_eq!(
        (
            m.splits.train["sea"],
            m.splits.val["sea"],
            m.splits.test["sea"]
        ),
        (9, 1, 3)
    );
    assert_eq!(m.splits.pred, 4);
    assert!(m.skipped.is_empty());

    // A truncated archive is refused before anything is touched.
    bytes.truncate(bytes.len() - 100);
    fs::write(&zip, &bytes).unwrap();
    let err = fetch(&from_path(&data, &zip)).unwrap_err().to_string();
    assert!(err.contains("not a usable zip"), "{err}");
    // The user's own file: deleting it and fetching again would not help.
    assert!(!err.contains("again"), "{err}");
    assert_eq!(Manifest::read(&data).unwrap(), m);
}

#[test]
fn a_zip_with_dot_slash_entries_imports() {
    // As bsdtar and Windows' `tar -a -cf x.zip .` write them.
    let tmp = tempfile::tempdir().unwrap();
    let zip = tmp.path().join("dot.zip");
    let mut entries = vec![("./.DS_Store".to_string(), b"junk".to_vec())];
    for i in 0..3 {
        entries.push((format!("./seg_train/seg_train/sea/{i}.jpg"), jpeg(i)));
    }
    entries.push(("./seg_test/seg_test/sea/t.jpg".into(), jpeg(9)));
    entries.push(("./seg_train/seg_train/forest/f.jpg".into(), jpeg(10)));
    fs::write(&zip, zip_bytes(&entries)).unwrap();
    let m = fetch(&from_path(&tmp.path().join("data"), &zip)).unwrap();
    assert_eq!(m.classes, ["forest", "sea"]);
    assert_eq!(m.splits.train["sea"] + m.splits.val["sea"], 3);
    assert_eq!(m.splits.test["sea"], 1);
    assert!(m.skipped.is_empty(), "{:?}", m.skipped);
}

#[test]
fn only_an_earlier_import_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    // A project folder that happens to hold a manifest.json.
    let webapp = tmp.path().join("webapp");
    write(&webapp.join("manifest.json"), br#"{"name":"my pwa"}"#);
    write(&webapp.join("src/app.js"), b"x");
    let err = fetch(&tiny_synthetic(&webapp, 0)).unwrap_err().to_string();
    assert!(
        err.contains("refusing to replace") && err.contains("webapp"),
        "{err}"
    );
    assert!(webapp.join("src/app.js").is_file());
    // Nor is a file.
    let file = webapp.join("src/app.js");
    let err = fetch(&tiny_synthetic(&file, 0)).unwrap_err().to_string();
    assert!(err.contains("is a file"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    // vt's manifest without the import's folders is not an import either.
    let data = tmp.path().join("data");
    let m = fetch(&tiny_synthetic(&data, 0)).unwrap();
    let lookalike = tmp.path().join("lookalike");
    write(&lookalike.join("notes.txt"), b"mine");
    m.write(&lookalike).unwrap();
    let err = fetch(&tiny_synthetic(&lookalike, 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no train/ folder"), "{err}");
    assert!(lookalike.join("notes.txt").is_file());

    // Nor one holding what someone put beside the import: it would be deleted with it.
    write(&data.join("runs/r1/config.toml"), b"mine");
    write(&data.join("notes.txt"), b"mine");
    let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err().to_string();
    assert!(
        err.contains("it holds notes.txt, runs, which the new import would delete"),
        "{err}"
    );
    assert!(data.join("runs/r1/config.toml").is_file());
    fs::remove_dir_all(data.join("runs")).unwrap();
    fs::remove_file(data.join("notes.txt")).unwrap();
    for (clutter, bytes) in [
        (".DS_Store", &b"\0\0\0\x01Bud1"[..]),
        ("Thumbs.db", &b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"[..]),
        ("._manifest.json", &b"\0\x05\x16\x07"[..]),
    ] {
        write(&data.join(clutter), bytes);
    }

    // A real earlier import is replaced.
    assert_eq!(fetch(&tiny_synthetic(&data, 1)).unwrap().seed, 1);
    assert_eq!(
        sorted_names(tmp.path())
            .iter()
            .filter(|n| n.contains("incoming"))
            .count(),
        0
    );
}

/// A photo, a class or notes put inside an import's folders would go with it too; what the
/// import wrote there itself, or a file manager's clutter, does not stop it.
#[test]
fn what_was_added_inside_an_import_is_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fetch(&tiny_synthetic(&data, 0)).unwrap();
    let class = fs::read_dir(data.join("train"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .into_owned();
    let added = [
        format!("train/{class}/mine.jpg"),
        "train/newclass/a.jpg".to_string(),
        format!("val/{class}/notes/thesis.txt"),
        "pred/labels.csv".to_string(),
    ];
    for (seed, path) in (100..).zip(&added) {
        write(&data.join(path), &jpeg(seed));
        let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err().to_string();
        assert!(
            err.contains("which the new import would delete"),
            "{path}: {err}"
        );
        assert!(data.join(path).is_file(), "{path}");
    }
    let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err().to_string();
    for named in [
        format!("train/{class}/mine.jpg"),
        "train/newclass".to_string(),
        format!("val/{class}/notes"),
        "pred/labels.csv".to_string(),
    ] {
        assert!(err.contains(&named), "{named}: {err}");
    }
    for path in &added {
        fs::remove_file(data.join(path)).unwrap();
    }
    fs::remove_dir(data.join("train/newclass")).unwrap();
    fs::remove_dir(data.join(format!("val/{class}/notes"))).unwrap();
    // A photo put in place of one deleted is noticed by its name.
    let theirs = fs::read_dir(data.join("train").join(&class))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::remove_file(&theirs).unwrap();
    let mine = data.join(format!("train/{class}/mine.jpg"));
    write(&mine, &jpeg(200));
    let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err().to_string();
    assert!(err.contains(&format!("train/{class}/mine.jpg")), "{err}");
    // A photo edited in place is noticed by its size.
    let edited = fs::read_dir(data.join("val").join(&class))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let original = fs::read(&edited).unwrap();
    write(&edited, &[original.as_slice(), b"edited"].concat());
    let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err().to_string();
    let name = edited.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(&format!("val/{class}/{name} (changed since the import)")),
        "{err}"
    );
    write(&edited, &original);
    // A damaged list is refused, naming its line, rather than read as unchecked.
    let list = data.join(".imported-files");
    let listed = fs::read_to_string(&list).unwrap();
    let lines: Vec<&str> = listed.lines().collect();
    let path = |line: &str| line.split_once('\t').unwrap().0.to_string();
    for (line, damaged) in [
        (1, format!("{}\t99999999999999999999999", path(lines[0]))),
        (1, format!("{}x", lines[0])),
        (1, path(lines[0])),
        (2, path(lines[1])),
    ] {
        let mut damaged_list = lines.clone();
        damaged_list[line - 1] = &damaged;
        fs::write(&list, damaged_list.join("\n") + "\n").unwrap();
        let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err().to_string();
        assert!(
            err.contains(&format!(".imported-files is damaged: line {line}")),
            "{damaged:?}: {err}"
        );
    }
    fs::write(&list, &listed).unwrap();
    // Many additions: the first few are named, the others counted.
    for i in 0..12 {
        write(&data.join(format!("pred/mine-{i:02}.jpg")), b"x");
    }
    let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err().to_string();
    assert!(err.contains("and 3 more, which the new import"), "{err}");
    for i in 0..12 {
        fs::remove_file(data.join(format!("pred/mine-{i:02}.jpg"))).unwrap();
    }
    // What file managers leave is no one's work; a user's files and folders of their names
    // are, known by their contents.
    let users = [
        "Thumbs.db/thesis.tex".to_string(),
        format!("train/{class}/.DS_Store/notes.txt"),
        format!("val/{class}/._mywork"),
        "pred/desktop.ini".to_string(),
    ];
    for path in &users {
        write(&data.join(path), b"[my notes]\nprecious");
    }
    // A pipe of such a name is named too, not opened (which would block the import).
    #[cfg(unix)]
    let pipe = data.join(format!("val/{class}/.DS_Store"));
    #[cfg(unix)]
    assert!(std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap()
        .success());
    let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err().to_string();
    for path in &users {
        let named = path
            .trim_end_matches("/thesis.tex")
            .trim_end_matches("/notes.txt");
        assert!(err.contains(named), "{named}: {err}");
        fs::remove_file(data.join(path)).unwrap();
    }
    #[cfg(unix)]
    {
        assert!(err.contains(&format!("val/{class}/.DS_Store")), "{err}");
        fs::remove_file(&pipe).unwrap();
    }
    fs::remove_dir(data.join("Thumbs.db")).unwrap();
    fs::remove_dir(data.join(format!("train/{class}/.DS_Store"))).unwrap();
    // An import by a version that listed no files: more files than it wrote are noticed.
    fs::remove_file(data.join(".imported-files")).unwrap();
    write(&theirs, &jpeg(201));
    let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "1 more file(s) in train/{class} than the import wrote"
        )),
        "{err}"
    );
    fs::remove_file(&mine).unwrap();
    // Explorer writes UTF-16 with its byte order mark.
    let utf16: Vec<u8> = [0xff, 0xfe]
        .into_iter()
        .chain(
            "[{BE098140-A513-11D0-A3A4-00C04FD706EC}]\r\n"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        )
        .collect();
    let left_by_file_managers = [
        (
            format!("train/{class}/.DS_Store"),
            &b"\0\0\0\x01Bud1\0\0"[..],
        ),
        (
            format!("val/{class}/._photo.jpg"),
            &b"\0\x05\x16\x07\0\x02"[..],
        ),
        (
            "Thumbs.db".to_string(),
            &b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\0"[..],
        ),
        (
            "pred/desktop.ini".to_string(),
            &b"\r\n[.ShellClassInfo]"[..],
        ),
        ("train/desktop.ini".to_string(), &utf16[..]),
    ];
    for (path, bytes) in &left_by_file_managers {
        write(&data.join(path), bytes);
    }
    assert_eq!(fetch(&tiny_synthetic(&data, 1)).unwrap().seed, 1);
    assert!(data.join(".imported-files").is_file());
}

#[cfg(unix)]
#[test]
fn a_symlinked_data_dir_keeps_its_link_and_updates_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let link = out.join("link");
    std::os::unix::fs::symlink("../big/intel", &link).unwrap();
    let target = tmp.path().join("big/intel");
    // Dangling at first: the target is created; then it is replaced.
    for seed in [1, 2] {
        let m = fetch(&tiny_synthetic(&link, seed)).unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(Manifest::read(&target).unwrap(), m);
    }
    assert_eq!(sorted_names(&out), ["link"]);
    assert_eq!(
        sorted_names(&tmp.path().join("big")),
        [".intel.lock", "intel"]
    );
}

#[test]
fn a_second_import_into_the_same_dir_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let running = Importer::new(&data, "synthetic", "test", 0.1, 0).unwrap();
    let err = fetch(&tiny_synthetic(&data, 0)).unwrap_err();
    assert!(matches!(err, DataError::Locked(_)), "{err}");
    assert!(
        err.to_string().contains("another fetch-data is writing"),
        "{err}"
    );
    #[cfg(unix)]
    {
        // Through a link, the lock is the target's.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        let err = fetch(&tiny_synthetic(&link, 0)).unwrap_err();
        assert!(matches!(err, DataError::Locked(_)), "{err}");
    }
    drop(running);
    fetch(&tiny_synthetic(&data, 0)).unwrap();
}

/// A reader (a training run) shares the import's lock: no import replaces the folder while
/// it reads, and it does not start while an import runs. A folder no import made has no lock.
#[test]
fn imports_and_readers_of_a_data_dir_exclude_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fetch(&tiny_synthetic(&data, 0)).unwrap();
    let reading = lock_for_reading(&data).unwrap();
    assert!(reading.is_some());
    assert!(
        lock_for_reading(&data).unwrap().is_some(),
        "readers share it"
    );
    let err = fetch(&tiny_synthetic(&data, 1)).unwrap_err();
    assert!(
        err.to_string().contains("or a training run is reading it"),
        "{err}"
    );
    drop(reading);
    let running = Importer::new(&data, "synthetic", "test", 0.1, 0).unwrap();
    for named in [data.clone(), data.join("train/..")] {
        let err = lock_for_reading(&named).unwrap_err();
        assert!(matches!(err, DataError::Importing(_)), "{err}");
    }
    drop(running);
    assert_eq!(fetch(&tiny_synthetic(&data, 1)).unwrap().seed, 1);
    let elsewhere = tmp.path().join("mine");
    fs::create_dir_all(elsewhere.join("train/sea")).unwrap();
    assert!(lock_for_reading(&elsewhere).unwrap().is_none());
    assert!(!tmp.path().join(".mine.lock").exists());
    // An import without its lock file (copied elsewhere) gets one: imports are kept out.
    let copy = tmp.path().join("copy");
    fs::rename(&data, &copy).unwrap();
    let reading = lock_for_reading(&copy).unwrap();
    assert!(reading.is_some());
    let err = fetch(&tiny_synthetic(&copy, 2)).unwrap_err();
    assert!(matches!(err, DataError::Locked(_)), "{err}");
}

/// A Kaggle-layout source where forest has three training photos, and sea (a data set needs
/// two classes) one.
fn three_forest_photos(src: &std::path::Path) {
    for i in 0..3 {
        write(
            &src.join(format!("seg_train/seg_train/forest/{i}.jpg")),
            &jpeg(i),
        );
    }
    write(&src.join("seg_train/seg_train/sea/0.jpg"), &jpeg(40));
}

#[test]
fn identical_images_are_listed_and_never_split_between_train_and_val() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // forest: one photo under 8 names beside 12 others, so that the seeded split would put
    // some of its copies in validation; a copy of it under sea; a test photo that is also a
    // training photo of sea; two identical test photos.
    let (copied, leaked, twice) = (jpeg(100), jpeg(101), jpeg(102));
    for i in 0..8 {
        write(&src.join(format!("seg_train/forest/copy{i}.jpg")), &copied);
    }
    for i in 0..12 {
        write(&src.join(format!("seg_train/forest/{i}.jpg")), &jpeg(i));
        write(&src.join(format!("seg_train/sea/{i}.jpg")), &jpeg(20 + i));
    }
    write(&src.join("seg_train/sea/copy.jpg"), &copied);
    write(&src.join("seg_train/sea/leaked.jpg"), &leaked);
    write(&src.join("seg_test/sea/leaked.jpg"), &leaked);
    write(&src.join("seg_test/forest/a.jpg"), &twice);
    write(&src.join("seg_test/forest/b.jpg"), &twice);
    let data = tmp.path().join("data");
    let mut opts = from_path(&data, &src);
    opts.val_fraction = 0.5;
    let m = fetch(&opts).unwrap();

    // Every copy stays in training, whatever the seeded split drew; the other photos split
    // as before: half of forest's 12 and of sea's 14 (less its copies) go to validation.
    assert_eq!(
        sorted_names(&data.join("val/forest")).len()
            + sorted_names(&data.join("train/forest")).len(),
        20
    );
    let val_forest = sorted_names(&data.join("val/forest"));
    assert!(
        val_forest.iter().all(|n| !n.starts_with("copy")),
        "{val_forest:?}"
    );
    assert!(sorted_names(&data.join("train/sea")).contains(&"copy.jpg".to_string()));
    // Photos without copies took the copies' places: as many go to validation as without.
    assert_eq!(val_forest.len(), 10);
    assert_eq!(m.splits.val["forest"], 10);
    assert_eq!(m.splits.train["forest"], 10);
    assert_eq!((m.splits.train["sea"], m.splits.val["sea"]), (7, 7));

    let mut copies: Vec<String> = (0..8)
        .map(|i| format!("train/forest/copy{i}.jpg"))
        .collect();
    copies.push("train/sea/copy.jpg".into());
    // The leaked sea photo may be in train or val: it has no other copy in those.
    let leaked_split = if sorted_names(&data.join("val/sea")).contains(&"leaked.jpg".to_string()) {
        "val"
    } else {
        "train"
    };
    let expected = [
        DuplicateGroup {
            files: vec!["test/forest/a.jpg".into(), "test/forest/b.jpg".into()],
            conflicting_labels: false,
        },
        DuplicateGroup {
            files: vec![
                "test/sea/leaked.jpg".into(),
                format!("{leaked_split}/sea/leaked.jpg"),
            ],
            conflicting_labels: false,
        },
        DuplicateGroup {
            files: copies,
            conflicting_labels: true,
        },
    ];
    assert_eq!(m.duplicates.as_deref(), Some(&expected[..]));
    assert_eq!(
        expected
            .iter()
            .map(DuplicateGroup::leaks_into_test)
            .collect::<Vec<_>>(),
        [false, true, false]
    );
    // The manifest on disk says the same.
    assert_eq!(
        Manifest::read(&data).unwrap().duplicates.as_deref(),
        Some(&expected[..])
    );
}

/// A small class whose seeded draw meets a photo filed twice still gets its validation
/// image, whatever the seed: the copies stay in training and another photo takes their place.
#[test]
fn a_small_class_with_copies_keeps_a_validation_image() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("seg_train/x/1.jpg"), &jpeg(1));
    write(&src.join("seg_train/x/2.jpg"), &jpeg(1));
    for i in 3..=4 {
        write(&src.join(format!("seg_train/x/{i}.jpg")), &jpeg(i));
    }
    for i in 0..4 {
        write(&src.join(format!("seg_train/y/{i}.jpg")), &jpeg(10 + i));
    }
    for seed in 0..8 {
        let data = tmp.path().join(format!("data{seed}"));
        let mut opts = from_path(&data, &src);
        opts.seed = seed;
        let m = fetch(&opts).unwrap();
        let val = sorted_names(&data.join("val/x"));
        assert_eq!(m.splits.val["x"], 1, "seed {seed}");
        assert!(val == ["3.jpg"] || val == ["4.jpg"], "seed {seed}: {val:?}");
    }
}

#[test]
fn a_test_class_without_training_images_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    three_forest_photos(&src);
    write(&src.join("seg_test/seg_test/Forest/1.jpg"), &jpeg(7));
    let data = tmp.path().join("data");
    let err = fetch(&from_path(&data, &src)).unwrap_err().to_string();
    assert!(
        err.contains(r#""Forest""#) && err.contains(r#"training classes are "forest""#),
        "{err}"
    );
    assert!(!data.exists());

    // The same through a parquet mirror with class names as labels: names outside the known
    // classes are taken as they are, so their case must match.
    let train = tmp.path().join("train.parquet");
    let test = tmp.path().join("test.parquet");
    write_parquet_named(&train, &[(jpeg(1), "oak"), (jpeg(2), "oak")]);
    write_parquet_named(&test, &[(jpeg(3), "Oak")]);
    let classes = vec!["forest".to_string()];
    let mut importer = Importer::new(&data, "hf", "mirror", 0.1, 0).unwrap();
    for (path, split) in [(&train, ParquetSplit::Train), (&test, ParquetSplit::Test)] {
        import_parquet(path, "x.parquet", split, &classes, &mut importer).unwrap();
    }
    let err = importer.finish().unwrap_err().to_string();
    assert!(err.contains(r#""Oak""#), "{err}");
    assert!(!data.exists());
}

#[test]
fn unusable_files_are_skipped_with_a_plain_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    three_forest_photos(&src);
    // Beside the split folders: another layout's split, reported; other files ignored.
    write(&src.join("val/forest/1.jpg"), &jpeg(5));
    write(&src.join("notes.txt"), b"what the photos are");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(
            "gone.jpg",
            src.join("seg_train/seg_train/forest/dangling.jpg"),
        )
        .unwrap();
        // Outside the layout, a dangling link is ignored like any other stray file.
        std::os::unix::fs::symlink("gone", src.join("README")).unwrap();
    }
    #[cfg(unix)]
    {
        // Read, a FIFO would block the import forever and /dev/zero fill memory.
        std::os::unix::fs::symlink("/dev/null", src.join("seg_train/seg_train/forest/null.jpg"))
            .unwrap();
        let fifo = src.join("seg_train/seg_train/forest/fifo.jpg");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
    }
    let m = fetch(&from_path(&tmp.path().join("data"), &src)).unwrap();
    assert_eq!(m.classes, ["forest", "sea"]);
    assert_eq!(m.splits.train["forest"] + m.splits.val["forest"], 3);
    let reason = |path: &str| {
        m.skipped
            .iter()
            .find(|s| s.path == path)
            .map(|s| s.reason.clone())
            .unwrap_or_else(|| panic!("{path} not in {:?}", m.skipped))
    };
    assert_eq!(reason("val/forest/1.jpg"), OUTSIDE_SPLITS);
    #[cfg(unix)]
    {
        let dangling = reason("seg_train/seg_train/forest/dangling.jpg");
        assert!(dangling.contains("cannot read"), "{dangling}");
        for special in ["null.jpg", "fifo.jpg"] {
            let path = format!("seg_train/seg_train/forest/{special}");
            assert_eq!(reason(&path), "not a regular file");
        }
        assert_eq!(m.skipped.len(), 4, "{:?}", m.skipped);
    }
}

/// A user's own classes and files keep their names, in any script; a file that cannot
/// (another of its name, a separator) is listed with its source path. A name that cannot name
/// a class stops the import rather than drop the class.
#[test]
fn names_of_any_script_are_kept_and_renamed_files_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("seg_train/forêt/猫 (1).jpg"), &jpeg(1));
    write(&src.join("seg_train/forêt/a.jpg"), &jpeg(2));
    write(&src.join("seg_train/forêt/trip/a.jpg"), &jpeg(3));
    write(&src.join("seg_train/Main St/b|c.jpg"), &jpeg(4));
    write(&src.join("seg_train/Main St/scan"), &jpeg(6));
    let data = tmp.path().join("data");
    let m = fetch(&FetchOptions {
        val_fraction: 0.0,
        ..from_path(&data, &src)
    })
    .unwrap();
    assert_eq!(m.classes, ["Main St", "forêt"]);
    assert!(data.join("train/forêt/猫 (1).jpg").is_file());
    assert_eq!(
        m.renamed,
        [
            ("train/Main St/b_c.jpg", "seg_train/Main St/b|c.jpg"),
            ("train/Main St/scan.jpg", "seg_train/Main St/scan"),
            ("train/forêt/a-1.jpg", "seg_train/forêt/trip/a.jpg"),
        ]
        .map(|(to, from)| (to.to_string(), from.to_string()))
        .into()
    );
    for name in ["a-1.jpg", "a.jpg"] {
        assert!(data.join("train/forêt").join(name).is_file());
    }

    write(&src.join("seg_train/sea /0.jpg"), &jpeg(5));
    let err = fetch(&from_path(&tmp.path().join("other"), &src))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"class "sea " "#) && err.contains("starts or ends with white space"),
        "{err}"
    );
}

/// File names that are not UTF-8 (Latin-1 ones from an old archive) are renamed, each listed
/// with its own source path: `\xNN` for the bytes that are not UTF-8.
#[cfg(unix)]
#[test]
fn names_that_are_not_utf8_are_renamed_and_told_apart() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let sea = src.join("seg_train/sea");
    // And one whose name reads as such an escape.
    for (seed, name) in [
        (1, &b"caf\xe9.jpg"[..]),
        (2, b"caf\xe8.jpg"),
        (4, b"caf\\xe8.jpg"),
    ] {
        write(&sea.join(std::ffi::OsStr::from_bytes(name)), &jpeg(seed));
    }
    write(&src.join("seg_train/forest/plain.jpg"), &jpeg(3));
    let data = tmp.path().join("data");
    let m = fetch(&FetchOptions {
        val_fraction: 0.0,
        ..from_path(&data, &src)
    })
    .unwrap();
    assert_eq!(
        m.renamed,
        [
            ("train/sea/caf_-1.jpg", "seg_train/sea/caf\\xe9.jpg"),
            ("train/sea/caf_.jpg", "seg_train/sea/caf\\xe8.jpg"),
            ("train/sea/caf_xe8.jpg", "seg_train/sea/caf\\\\xe8.jpg"),
        ]
        .map(|(to, from)| (to.to_string(), from.to_string()))
        .into()
    );
    assert_eq!(fs::read(data.join("train/sea/caf_.jpg")).unwrap(), jpeg(2));
}

/// On Unix a backslash is one of a name's characters, not a folder separator: a file so named
/// is renamed (listed with its own path), a class so named refused, not split into a class
/// and a subfolder (and merged with a class of the first part's name).
#[cfg(unix)]
#[test]
fn a_backslash_in_a_folders_names_is_no_separator() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("seg_train/cats/0.jpg"), &jpeg(1));
    write(&src.join("seg_train/cats/d\\e.jpg"), &jpeg(2));
    write(&src.join("seg_train/sea/0.jpg"), &jpeg(3));
    let m = fetch(&FetchOptions {
        val_fraction: 0.0,
        ..from_path(&tmp.path().join("data"), &src)
    })
    .unwrap();
    assert_eq!(m.classes, ["cats", "sea"]);
    assert_eq!(
        m.renamed,
        [(
            "train/cats/d_e.jpg".to_string(),
            "seg_train/cats/d\\\\e.jpg".to_string()
        )]
        .into()
    );
    write(&src.join("seg_train/cats\\dogs/0.jpg"), &jpeg(4));
    let err = fetch(&from_path(&tmp.path().join("other"), &src))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"class "cats\\dogs" "#) && err.contains("holds a path separator"),
        "{err}"
    );
}

/// Info-ZIP's `zip -r` on Linux stores UTF-8 names without the flag that says so: they are
/// read as UTF-8, not CP437, as the same folder's import reads them.
#[test]
fn utf8_names_of_a_zip_without_the_utf8_flag_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let mut zip = zip_bytes(&[
        ("seg_train/forêt/1.jpg".into(), jpeg(1)),
        ("seg_train/猫/1.jpg".into(), jpeg(2)),
    ]);
    // Bit 11 of the flags of each local header (at 6) and central directory header (at 8).
    for (signature, flags_at) in [(b"PK\x03\x04", 6), (b"PK\x01\x02", 8)] {
        let headers: Vec<usize> = zip
            .windows(4)
            .enumerate()
            .filter(|(_, w)| w == signature)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(headers.len(), 2);
        for at in headers {
            assert_ne!(zip[at + flags_at + 1] & 0x08, 0, "written with the flag");
            zip[at + flags_at + 1] &= !0x08;
        }
    }
    let path = tmp.path().join("info-zip.zip");
    fs::write(&path, zip).unwrap();
    let m = fetch(&FetchOptions {
        val_fraction: 0.0,
        ..from_path(&tmp.path().join("data"), &path)
    })
    .unwrap();
    assert_eq!(m.classes, ["forêt", "猫"]);
}

/// A folder in torchvision's layout is not imported, and the error says what to do.
#[test]
fn a_torchvision_layout_is_pointed_to_vt_train() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for (split, class) in [("train", "cat"), ("train", "dog"), ("val", "cat")] {
        write(&src.join(format!("{split}/{class}/1.jpg")), &jpeg(1));
    }
    let err = fetch(&from_path(&tmp.path().join("data"), &src))
        .unwrap_err()
        .to_string();
    assert!(err.contains("train/cat/1.jpg (not in seg_train/"), "{err}");
    assert!(err.contains("vt-train train --data DIR reads it"), "{err}");
}

/// In the user's own archive, unreadable entries are skipped, named by their names.
#[test]
fn unreadable_zip_entries_are_skipped_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (bad_crc, bad_header) = (
        "seg_train/seg_train/sea/1.jpg",
        "seg_train/seg_train/sea/2.jpg",
    );
    let mut entries: Vec<(String, Vec<u8>)> = (0..3)
        .flat_map(|i| {
            [
                (format!("seg_train/seg_train/sea/{i}.jpg"), jpeg(i)),
                (format!("seg_train/seg_train/forest/{i}.jpg"), jpeg(10 + i)),
            ]
        })
        .collect();
    entries.sort();
    let mut zip = zip_bytes(&entries);
    corrupt_entry(&mut zip, bad_crc);
    // The local header's signature, 30 bytes before its name.
    let at = zip
        .windows(bad_header.len())
        .position(|w| w == bad_header.as_bytes())
        .unwrap();
    zip[at - 30] = b'X';
    let path = tmp.path().join("broken.zip");
    fs::write(&path, zip).unwrap();
    let m = fetch(&from_path(&tmp.path().join("data"), &path)).unwrap();
    let skipped: Vec<&str> = m.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(skipped, [bad_crc, bad_header], "{:?}", m.skipped);
    assert_eq!(m.splits.train["sea"] + m.splits.val["sea"], 1);
}

/// A second entry of the same name hides the first from the zip reader: the hidden one is
/// listed as skipped rather than lost without a word.
#[test]
fn zip_entries_of_the_same_name_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut entries: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| (format!("seg_train/seg_train/sea/{i}.jpg"), jpeg(i)))
        .collect();
    entries.push(("seg_train/seg_train/forest/x.jpg".into(), jpeg(10)));
    entries.push(("seg_train/seg_train/forest/y.jpg".into(), jpeg(11)));
    let mut zip = zip_bytes(&entries);
    // y.jpg renamed x.jpg, in its local header and its central directory record.
    let y = b"seg_train/seg_train/forest/y.jpg";
    let at: Vec<usize> = zip
        .windows(y.len())
        .enumerate()
        .filter(|(_, w)| w == y)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 2);
    for i in at {
        zip[i + y.len() - 5] = b'x';
    }
    let path = tmp.path().join("twice.zip");
    fs::write(&path, zip).unwrap();
    let m = fetch(&from_path(&tmp.path().join("data"), &path)).unwrap();
    assert_eq!(m.splits.train["forest"] + m.splits.val["forest"], 1);
    let skipped: Vec<&str> = m.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        skipped,
        ["seg_train/seg_train/forest/x.jpg"],
        "{:?}",
        m.skipped
    );
}

/// A data set of one class is refused; one without usable training images, or with a class
/// folder without any (torchvision's ImageFolder refuses it too), says why its files were
/// skipped.
#[test]
fn one_class_or_no_usable_image_is_refused_with_the_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for i in 0..3 {
        write(&src.join(format!("seg_train/forest/{i}.jpg")), &jpeg(i));
    }
    let data = tmp.path().join("data");
    let err = fetch(&from_path(&data, &src)).unwrap_err().to_string();
    assert!(
        err.contains("only 1 class") && err.contains("\"forest\""),
        "{err}"
    );
    assert!(!data.exists());

    for i in 0..3 {
        write(
            &src.join(format!("seg_train/mountain/{i}.jpg")),
            &jpeg(i + 3),
        );
    }
    fs::create_dir_all(src.join("seg_train/sea")).unwrap();
    write(&src.join("seg_train/street/a.tif"), b"II*\0 a TIFF");
    let err = fetch(&from_path(&data, &src)).unwrap_err().to_string();
    assert!(
        err.contains(r#""sea", "street" in"#) && err.contains("have no usable images"),
        "{err}"
    );
    // The reasons are those of the empty classes' files.
    assert!(err.contains(": seg_train/street/a.tif ("), "{err}");
    assert!(!data.exists());

    let src = tmp.path().join("broken");
    write(&src.join("seg_train/forest/a.jpg"), b"not an image");
    let err = fetch(&from_path(&data, &src)).unwrap_err().to_string();
    assert!(
        err.contains("seg_train/forest/a.jpg (the data is not an image"),
        "{err}"
    );
}

#[test]
fn a_zip_without_training_images_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = tmp.path().join("other.zip");
    fs::write(&zip, zip_bytes(&[("photos/cat.jpg".into(), jpeg(1))])).unwrap();
    let err = fetch(&from_path(&tmp.path().join("data"), &zip)).unwrap_err();
    assert!(err.to_string().contains("seg_train"), "{err}");
    assert!(!tmp.path().join("data").exists());
}

#[test]
fn synthetic_data_is_deterministic_and_labelled_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SyntheticConfig {
        train_per_class: 10,
        test_per_class: 2,
        pred: 3,
        image_size: 32,
        seed: 5,
    };
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let ma = fetch(&FetchOptions::new(&a, FetchSource::Synthetic(cfg.clone()))).unwrap();
    let mb = fetch(&FetchOptions::new(&b, FetchSource::Synthetic(cfg))).unwrap();
    assert_eq!(ma, mb);
    assert_eq!(ma.source, "synthetic");
    assert_eq!(ma.classes.len(), 6);
    assert_eq!(ma.count(Split::Train) + ma.count(Split::Val), 60);
    assert_eq!(ma.count(Split::Val), 6);
    assert_eq!(ma.count(Split::Test), 12);
    assert_eq!(ma.splits.pred, 3);
    let files = tree(&a);
    assert_eq!(files, tree(&b));
    for f in files.iter().filter(|f| f.ends_with(".jpg")) {
        assert!(
            f.rsplit('/').next().unwrap().starts_with("synthetic-"),
            "{f}"
        );
        assert_eq!(fs::read(a.join(f)).unwrap(), fs::read(b.join(f)).unwrap());
    }
}

#[test]
fn image_folder_without_a_manifest_uses_sorted_folders_and_explains_missing_splits() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("train/zebra/1.jpg"), &jpeg(1));
    write(&tmp.path().join("train/ant/1.jpg"), &jpeg(2));
    write(&tmp.path().join("train/ant/0.jpg"), &jpeg(3));
    // Subfolders are read, as torchvision's ImageFolder reads them; other files are not.
    write(&tmp.path().join("train/ant/2023 trip/5.png"), &jpeg(4));
    write(&tmp.path().join("train/ant/notes.txt"), b"not a photo");
    write(&tmp.path().join("train/ant/.DS_Store"), b"");
    let folder = ImageFolder::open(tmp.path(), Split::Train).unwrap();
    assert_eq!(folder.classes, ["ant", "zebra"]);
    let labels: Vec<usize> = folder.samples.iter().map(|s| s.1).collect();
    assert_eq!(labels, [0, 0, 0, 1]);
    assert!(folder.samples[0].0.ends_with("ant/0.jpg"));
    assert!(folder.samples[1].0.ends_with("ant/1.jpg"));
    assert!(folder.samples[2].0.ends_with("ant/2023 trip/5.png"));
    // Links to folders are followed, as torchvision follows them; a link back up is not.
    #[cfg(unix)]
    {
        write(&tmp.path().join("elsewhere/7.jpg"), &jpeg(5));
        let ant = tmp.path().join("train/ant");
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), ant.join("more")).unwrap();
        std::os::unix::fs::symlink("..", ant.join("up")).unwrap();
        // Back from the linked folder to above the class: zebra's images are no ant's.
        std::os::unix::fs::symlink(tmp.path().join("train"), tmp.path().join("elsewhere/back"))
            .unwrap();
        let folder = ImageFolder::open(tmp.path(), Split::Train).unwrap();
        let ants: Vec<&Path> = folder.samples[..4].iter().map(|s| s.0.as_path()).collect();
        assert!(ants[3].ends_with("ant/more/7.jpg"), "{ants:?}");
        assert_eq!(folder.samples[4..].len(), 1, "{:?}", folder.samples);
        // A class folder whose name is not text is refused, not left out.
        use std::os::unix::ffi::OsStrExt;
        let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9");
        fs::create_dir(tmp.path().join("train").join(latin1)).unwrap();
        let err = ImageFolder::open(tmp.path(), Split::Train).unwrap_err();
        assert!(err.to_string().contains("name must be UTF-8"), "{err}");
    }
    let err = ImageFolder::open(tmp.path(), Split::Val)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cargo xtask fetch-data"), "{err}");
    assert!(Manifest::read(tmp.path())
        .unwrap_err()
        .to_string()
        .contains("cargo xtask fetch-data"));
}

/// `--from .../seg_train` (a split of the archive, not the archive) says which folder to give.
#[test]
fn a_split_folder_given_as_the_source_names_the_folder_above() {
    let tmp = tempfile::tempdir().unwrap();
    let seg_train = tmp.path().join("archive/seg_train");
    write(&seg_train.join("forest/1.jpg"), &jpeg(1));
    write(&seg_train.join("sea/1.jpg"), &jpeg(2));
    let err = fetch(&from_path(&tmp.path().join("data"), &seg_train))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("give the folder that holds seg_train, not seg_train itself"),
        "{err}"
    );
    assert!(!tmp.path().join("data").exists());
}

/// An import without duplicates says so: `"duplicates": []`, not a missing key.
#[test]
fn the_manifest_lists_duplicates_even_when_there_are_none() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let m = fetch(&tiny_synthetic(&data, 1)).unwrap();
    assert_eq!(m.duplicates, Some(Vec::new()));
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(data.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(json["duplicates"], serde_json::json!([]));
}

/// With a manifest, a split's folder that is not one of its classes (added by hand, or `Sea`
/// beside `sea`) is refused by name: its images would otherwise be left out unsaid.
#[test]
fn image_folder_refuses_folders_that_are_not_the_manifests_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let m = fetch(&tiny_synthetic(&data, 1)).unwrap();
    // Hidden folders are not the user's classes (file managers make them).
    fs::create_dir_all(data.join("train/.thumbnails")).unwrap();
    assert_eq!(
        ImageFolder::open(&data, Split::Train).unwrap().len(),
        m.count(Split::Train)
    );
    write(&data.join("train/Sea/1.jpg"), &jpeg(1));
    let err = ImageFolder::open(&data, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Sea is not a folder of one of the classes of manifest.json"),
        "{err}"
    );
    assert!(ImageFolder::open(&data, Split::Val).is_ok());
}

#[test]
fn the_real_intel_sample_imports() {
    let Some(sample) = intel_sample() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("intel");
    let m = fetch(&from_path(&data, &sample)).unwrap();
    assert_eq!(
        m.classes,
        [
            "buildings",
            "forest",
            "glacier",
            "mountain",
            "sea",
            "street"
        ]
    );
    for class in &m.classes {
        assert_eq!(m.splits.train[class] + m.splits.val[class], 600, "{class}");
        assert_eq!(m.splits.val[class], 60, "{class}");
        assert_eq!(m.splits.test[class], 0, "{class}");
    }
    assert_eq!(m.splits.pred, 100);
    assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    // The sample's one photo filed twice, as buildings and as street (the full set has a few
    // such, see its README).
    assert_eq!(
        m.duplicates.as_deref(),
        Some(
            &[DuplicateGroup {
                files: vec![
                    "train/buildings/5069.jpg".into(),
                    "train/street/2764.jpg".into()
                ],
                conflicting_labels: true,
            }][..]
        )
    );
    assert!(data.join("pred/7606.png").is_file());
    assert_eq!(ImageFolder::open(&data, Split::Test).unwrap().len(), 0);
}
