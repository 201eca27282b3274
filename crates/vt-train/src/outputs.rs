//! Where the commands' outputs (reports, pictures, averaged checkpoints) may go: never into a
//! checkpoint folder, which holds only its checkpoint (one holding other files is one that
//! training and `init --force` no longer replace), nor into the folders a training run
//! manages, whose next save or resume would refuse or remove what is there.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use vt_data::dataset::{Manifest, Split, MANIFEST_FILE};
pub use vt_model::checkpoint::is_run;
use vt_model::checkpoint::{CONFIG_FILE, WEIGHTS_FILE};

use crate::error::{Result, TrainError};
use crate::history::TOP_DIR;
use crate::metrics::{stage_bytes, Staged};
use crate::state::{BEST_DIR, LAST_DIR, STATE_DIR};

/// The folders of a run that its training writes.
pub const RUN_FOLDERS: [&str; 4] = [TOP_DIR, STATE_DIR, BEST_DIR, LAST_DIR];

/// The most of a report read to tell whether a command wrote it.
const REPORT_READ_LIMIT: u64 = 64 << 20;

/// The folder `out` (a file an option names) goes in, refused when it does not exist: the
/// write would otherwise fail on its hidden temporary, which names neither.
pub fn existing_folder_of<'a>(option: &str, out: &'a Path) -> Result<&'a Path> {
    // `sub/` names a folder, though its file name reads `sub`.
    let text = out.as_os_str().to_string_lossy();
    if out.is_dir() || text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
        return Err(TrainError::Config(format!(
            "{option} {}: a folder; give the file to write in it",
            out.display()
        )));
    }
    let folder = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(TrainError::Config(format!(
            "{option} {}: the folder {} does not exist",
            out.display(),
            folder.display()
        )));
    }
    Ok(folder)
}

/// Refuses `folder`, where `option`'s output `out` goes, when it or a folder above it is a
/// checkpoint folder, one of [`RUN_FOLDERS`] of a run (see [`is_run`]), or a data folder
/// (whose images training and eval read, and which fetch-data replaces whole).
pub fn refuse_managed_folder(option: &str, out: &Path, folder: &Path) -> Result<()> {
    refuse_file_on_path(option, out, folder)?;
    refuse_data_folder(option, out, folder)?;
    let (folder, target) = (resolved(folder), resolved(out));
    for above in folder.ancestors() {
        // An output that is the folder itself is not inside it.
        let place = if above == target { "is" } else { "inside" };
        if above.join(CONFIG_FILE).is_file() && above.join(WEIGHTS_FILE).is_file() {
            return Err(TrainError::Config(format!(
                "{option} {}: {place} the checkpoint folder {}, which must hold only its \
                 checkpoint; write it beside it",
                out.display(),
                above.display()
            )));
        }
        if let Some(run) = above.parent().filter(|_| is_run_folder(above)) {
            return Err(TrainError::Config(format!(
                "{option} {}: {place} {}, which its training run manages; write it outside \
                 it (e.g. in {})",
                out.display(),
                above.display(),
                run.display()
            )));
        }
    }
    Ok(())
}

/// Refuses `folder`, where `option`'s output `out` goes, when it or a folder above it is a
/// data folder that fetch-data imported (its manifest and its `train/`): training and eval
/// read its images, and the next fetch-data replaces it whole. Also when it is in a split of
/// a data folder in torchvision's layout (`train/`, `val/` or `test/` beside another of
/// them, a class folder holding a photo; a link so named too), whose class folders'
/// pictures training and eval would read as photos.
pub fn refuse_data_folder(option: &str, out: &Path, given_folder: &Path) -> Result<()> {
    let folder = resolved(given_folder);
    let imported = folder.ancestors().find(|above| {
        above.join(Split::Train.dir_name()).is_dir()
            && above.join(MANIFEST_FILE).is_file()
            && Manifest::read(above).is_ok()
    });
    if let Some(data) = imported {
        return Err(TrainError::Config(format!(
            "{option} {}: inside the data folder {}, whose images training and eval read and \
             which fetch-data replaces; write it outside it",
            out.display(),
            data.display()
        )));
    }
    // As given (a split may be a link to a folder of another name, as the Kaggle archive's
    // `seg_train/seg_train` invites) and as resolved.
    let given = std::path::absolute(given_folder).unwrap_or_else(|_| given_folder.to_path_buf());
    let split = [given.as_path(), folder.as_path()]
        .into_iter()
        .flat_map(Path::ancestors)
        .find_map(|above| {
            let data = above.parent()?;
            let named = above.file_name()?.to_str()?;
            let is_split = Split::ALL
                .iter()
                .any(|s| named.eq_ignore_ascii_case(s.dir_name()));
            let splits = Split::ALL
                .iter()
                .filter(|s| data.join(s.dir_name()).is_dir())
                .count();
            (is_split && splits >= 2 && has_a_class_of_images(above))
                .then(|| (above.to_path_buf(), data.to_path_buf()))
        });
    match split {
        Some((split, data)) => Err(TrainError::Config(format!(
            "{option} {}: inside {}, a split of the data folder {}, whose images training and \
             eval read; write it outside it",
            out.display(),
            split.display(),
            data.display()
        ))),
        None => Ok(()),
    }
}

/// Whether a folder of `split` holds a photo, as a class folder does (and a folder of code
/// or notes that happens to be named `test` does not, nor one of vt's outputs: a run's
/// plots, a report's plot beside its `.json`, explain's pictures).
fn has_a_class_of_images(split: &Path) -> bool {
    let entries = |folder: &Path| {
        std::fs::read_dir(folder)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
    };
    let is_photo = |file: &Path| {
        vt_data::image_files::is_image_name(file)
            && !file.to_string_lossy().ends_with(".explain.png")
            && !file.with_extension("json").is_file()
    };
    entries(split)
        .filter(|class| class.is_dir() && !is_run(class))
        .any(|class| entries(&class).any(|file| is_photo(&file)))
}

/// Refuses to replace a file the command did not write: each of `outputs` that is there must
/// be vouched for (`true`) as the command's own, a report or table it recognises, or a plot
/// beside one. A user's `results.csv` beside `--out results.json`, or a run's `metrics.csv`,
/// stays.
pub fn refuse_replacing(option: &str, out: &Path, outputs: &[(&Path, bool)]) -> Result<()> {
    let foreign = outputs
        .iter()
        .find(|(path, ours)| !ours && path.symlink_metadata().is_ok());
    match foreign {
        Some((path, _)) => Err(TrainError::Config(format!(
            "{option} {}: {} is there and this command did not write it; choose another \
             --out, or move that file away",
            out.display(),
            path.display()
        ))),
        None => Ok(()),
    }
}

/// Writes a command's report (`report_bytes` to `report`) and the files beside it, `staged`
/// (written, not yet in place), less the earlier files it vouches for that are `gone` (a
/// plot that could not be drawn this time). The report is written beside the others before
/// anything is replaced, so that a failure to write (a full disk) leaves every earlier file
/// as it was; then the report that was there goes first and the new one comes last, so a
/// kill midway leaves no report rather than an earlier one beside newer files (which
/// `compare`, or a reader of the plot, would take for one evaluation).
pub fn write_with_report(
    report: &Path,
    report_bytes: &[u8],
    staged: Vec<Staged>,
    gone: &[&Path],
) -> Result<()> {
    let new_report = stage_bytes(report, "", report_bytes)?;
    remove_file_synced(report)?;
    for path in gone {
        remove_file_synced(path)?;
    }
    for file in staged {
        file.commit()?;
    }
    new_report.commit()
}

/// Removes `path` if it is there, the removal on disk before any rename that follows it.
pub fn remove_file_synced(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            let folder = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            Ok(vt_model::checkpoint::sync_dir(folder)?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // A read-only file system refuses to remove even what is not there.
        Err(_)
            if std::fs::symlink_metadata(path)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
        {
            Ok(())
        }
        Err(e) => Err(TrainError::file_op("removing", path, e)),
    }
}

/// Refuses a `folder` that cannot be written in (a read-only file system), where `option`'s
/// output `out` goes: before the work, which would otherwise be lost at its end.
pub fn refuse_unwritable_folder(option: &str, out: &Path, folder: &Path) -> Result<()> {
    let probe = folder.join(format!(".vt-write-check-{}", std::process::id()));
    match std::fs::File::create_new(&probe) {
        Ok(_) => {
            std::fs::remove_file(&probe).map_err(|e| TrainError::file_op("removing", &probe, e))
        }
        Err(e) => Err(TrainError::Config(format!(
            "{option} {}: cannot write in {}: {e}",
            out.display(),
            folder.display()
        ))),
    }
}

/// Whether `path` is a JSON object with every one of `keys`: the report a command wrote.
pub fn is_json_with(path: &Path, keys: &[&str]) -> bool {
    let mut text = Vec::new();
    let read = std::fs::File::open(path)
        .and_then(|file| file.take(REPORT_READ_LIMIT).read_to_end(&mut text));
    match (read, serde_json::from_slice(&text)) {
        (Ok(_), Ok(serde_json::Value::Object(object))) => {
            keys.iter().all(|key| object.contains_key(*key))
        }
        _ => false,
    }
}

/// Whether the file at `path` starts with `header`: a table a command wrote.
pub fn starts_with(path: &Path, header: &str) -> bool {
    let mut start = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(header.len() as u64).read_to_end(&mut start))
        .is_ok_and(|_| start == header.as_bytes())
}

/// Refuses a `folder` (where `option`'s `out` goes) that is a file, or lies below one: the
/// OS would only say "Not a directory" once the output is written.
pub fn refuse_file_on_path(option: &str, out: &Path, folder: &Path) -> Result<()> {
    let existing = folder.ancestors().find(|above| above.exists());
    match existing.filter(|above| !above.is_dir()) {
        Some(file) => Err(TrainError::Config(format!(
            "{option} {}: {} is a file, not a folder",
            out.display(),
            file.display()
        ))),
        None => Ok(()),
    }
}

/// The run folder whose `top/` keeps `checkpoint`, if it is such a kept epoch (however the
/// path reaches it: `epoch-001` from inside `top/`, a link to `top/`).
pub fn run_keeping(checkpoint: &Path) -> Option<PathBuf> {
    let checkpoint = resolved(checkpoint);
    let top = checkpoint.parent()?;
    let run = top.parent()?;
    (top.file_name()? == TOP_DIR && is_run(run)).then(|| run.to_path_buf())
}

/// Whether `folder` holds a checkpoint (or a run's state, which is written as one): its
/// `config.json` says so, whatever else was put beside it, unless it is a run.
pub fn is_checkpoint(folder: &Path) -> bool {
    folder.join(CONFIG_FILE).is_file() && !is_run(folder)
}

/// Whether `folder` is one of [`RUN_FOLDERS`] of a run.
pub fn is_run_folder(folder: &Path) -> bool {
    let managed = folder
        .file_name()
        .is_some_and(|name| RUN_FOLDERS.iter().any(|f| name == *f));
    managed && folder.parent().is_some_and(is_run)
}

/// Refuses an output folder `out` that is itself one of [`RUN_FOLDERS`] of a run (a
/// checkpoint written there would replace the run's own), besides what
/// [`refuse_managed_folder`] refuses of the folder it goes in.
pub fn refuse_run_folder(option: &str, out: &Path) -> Result<()> {
    let folder = resolved(out);
    if is_run_folder(&folder) {
        return Err(TrainError::Config(format!(
            "{option} {}: {} is its training run's; write it outside the run's folders",
            out.display(),
            folder.display()
        )));
    }
    Ok(())
}

/// `path` with its links and `..` resolved, as far as it exists (an output folder may not
/// exist yet); below that, `..` is taken lexically, as a folder still to be made holds no
/// links (`missing/../best` is `best`).
pub fn resolved(path: &Path) -> PathBuf {
    if let Ok(real) = path.canonicalize() {
        return real;
    }
    let above = || match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => resolved(parent),
        None => std::env::current_dir().unwrap_or_default(),
    };
    match path.components().next_back() {
        Some(Component::Normal(name)) => above().join(name),
        Some(Component::ParentDir) => {
            let base = above();
            base.parent().map_or(base.clone(), Path::to_path_buf)
        }
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::METRICS_JSONL;
    use crate::train::CONFIG_TOML;

    /// A folder that takes no files is refused before the work, naming it; a writable one
    /// is left as it was.
    #[test]
    fn an_output_folder_is_checked_for_writing() {
        let root = tempfile::tempdir().unwrap();
        let report = root.path().join("r.json");
        refuse_unwritable_folder("--out", &report, root.path()).unwrap();
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        // procfs takes no new files, whoever asks (root included).
        let err = refuse_unwritable_folder("--out", Path::new("/proc/r.json"), Path::new("/proc"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--out /proc/r.json: cannot write in /proc: "),
            "{err}"
        );
    }

    /// An output's folder must exist, and the output must name a file in it.
    #[test]
    fn an_output_names_a_file_in_a_folder_that_exists() {
        let root = tempfile::tempdir().unwrap();
        let report = root.path().join("r.json");
        assert_eq!(existing_folder_of("--out", &report).unwrap(), root.path());
        assert_eq!(
            existing_folder_of("--out", Path::new("r.json")).unwrap(),
            Path::new(".")
        );
        let missing = root.path().join("nowhere/r.json");
        let err = existing_folder_of("--out", &missing)
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("nowhere does not exist"), "{err}");
        for folder in [root.path().to_path_buf(), root.path().join("sub/")] {
            let err = existing_folder_of("--out", &folder)
                .unwrap_err()
                .to_string();
            assert!(
                err.ends_with("a folder; give the file to write in it"),
                "{err}"
            );
        }
    }

    /// Files beside a report that fail to be written leave the earlier report and files as
    /// they were; written, they replace them, the report last.
    #[test]
    fn the_report_is_replaced_only_once_the_files_beside_it_are_written() {
        let root = tempfile::tempdir().unwrap();
        let report = root.path().join("r.json");
        let table = root.path().join("r.csv");
        let plot = root.path().join("r.png");
        for file in [&report, &table, &plot] {
            std::fs::write(file, "earlier").unwrap();
        }
        let staged = crate::metrics::stage_bytes(&table, "", b"later").unwrap();
        // The next file fails: what was staged is dropped, nothing replaced.
        let failed = crate::metrics::stage(&plot, "", |_| Err(TrainError::Config("full".into())));
        assert_eq!(failed.unwrap_err().to_string(), "full");
        drop(staged);
        for file in [&report, &table, &plot] {
            assert_eq!(std::fs::read_to_string(file).unwrap(), "earlier");
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 3);
        let staged = crate::metrics::stage_bytes(&table, "", b"later").unwrap();
        write_with_report(&report, b"later", vec![staged], &[&plot]).unwrap();
        assert_eq!(std::fs::read_to_string(&report).unwrap(), "later");
        assert_eq!(std::fs::read_to_string(&table).unwrap(), "later");
        assert!(!plot.exists());
    }

    #[test]
    fn only_files_vouched_for_are_replaced() {
        let root = tempfile::tempdir().unwrap();
        let report = root.path().join("r.json");
        let table = root.path().join("r.csv");
        let missing = root.path().join("r.png");
        std::fs::write(&report, r#"{"points": [], "plot": "r.png"}"#).unwrap();
        std::fs::write(&table, "path,label\n").unwrap();
        assert!(is_json_with(&report, &["points", "plot"]));
        assert!(!is_json_with(&report, &["points", "predictions"]));
        assert!(!is_json_with(&table, &["path"]));
        assert!(!is_json_with(&missing, &[]));
        assert!(starts_with(&table, "path,label\n"));
        assert!(!starts_with(&table, "path,label,prediction"));
        assert!(!starts_with(&missing, ""));
        refuse_replacing("--out", &report, &[(&report, true), (&missing, false)]).unwrap();
        let err = refuse_replacing("--out", &report, &[(&report, true), (&table, false)])
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(&format!(
                "{} is there and this command did not write it; choose another --out, or \
                 move that file away",
                table.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn outputs_stay_out_of_checkpoints_and_a_runs_folders() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("run");
        let kept = run.join(TOP_DIR).join("epoch-001");
        std::fs::create_dir_all(&kept).unwrap();
        std::fs::write(run.join(CONFIG_TOML), "").unwrap();
        std::fs::write(run.join(METRICS_JSONL), "").unwrap();
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            std::fs::write(kept.join(file), "").unwrap();
        }
        let refused = |folder: &Path| {
            refuse_managed_folder("--out", folder, folder)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&kept).contains(": is the checkpoint folder"));
        assert!(refused(&kept.join("new/deeper")).contains(": inside the checkpoint folder"));
        let err = refused(&run.join(TOP_DIR));
        assert!(err.contains(": is ") && err.contains("which its training run manages"));
        assert!(refused(&run.join(BEST_DIR).join("x")).contains("which its training run manages"));
        refuse_managed_folder("--out", &run, &run).unwrap();
        refuse_managed_folder("--out", &run, &run.join("reports")).unwrap();
        // A folder named like a run's, in a folder that is no run, is anyone's; a
        // config.toml alone is a user's options.
        std::fs::remove_file(run.join(METRICS_JSONL)).unwrap();
        refuse_managed_folder("--out", &run, &run.join(BEST_DIR)).unwrap();
        std::fs::write(run.join(METRICS_JSONL), "").unwrap();
        std::fs::remove_file(run.join(CONFIG_TOML)).unwrap();
        refuse_managed_folder("--out", &run, &run.join(BEST_DIR)).unwrap();
        // A folder holding a config.json alone is no checkpoint.
        std::fs::write(root.path().join(CONFIG_FILE), "{}").unwrap();
        refuse_managed_folder("--out", root.path(), root.path()).unwrap();
        assert_eq!(run_keeping(&kept), None);
        refuse_run_folder("--out", &run.join(BEST_DIR)).unwrap();
        std::fs::write(run.join(CONFIG_TOML), "").unwrap();
        let run = run.canonicalize().unwrap();
        assert_eq!(run_keeping(&kept), Some(run.clone()));
        // However the path reaches it.
        #[cfg(unix)]
        {
            let link = root.path().join("link-to-top");
            std::os::unix::fs::symlink(run.join(TOP_DIR), &link).unwrap();
            assert_eq!(run_keeping(&link.join("epoch-001")), Some(run.clone()));
        }
        assert_eq!(run_keeping(&run.join(BEST_DIR)), None);
        for folder in RUN_FOLDERS {
            let err = refuse_run_folder("--out", &run.join(folder)).unwrap_err();
            assert!(err.to_string().contains("is its training run's"), "{err}");
        }
        refuse_run_folder("--out", &run.join("avg")).unwrap();
        // `..` after a folder still to be made, which creating it would let through.
        for spelled in [
            "missing/../best",
            "top/missing/../../state",
            "missing/../top/x",
        ] {
            let out = run.join(spelled);
            assert!(
                refuse_run_folder("--out", &out).is_err()
                    || refuse_managed_folder("--out", &out, &out).is_err(),
                "{spelled}"
            );
        }
        assert_eq!(resolved(&run.join("a/b/../../avg")), run.join("avg"));
        // A data folder that fetch-data imported, at any depth.
        let data = root.path().join("data");
        let synthetic = vt_data::source::synthetic::SyntheticConfig {
            train_per_class: 2,
            test_per_class: 1,
            pred: 0,
            image_size: 8,
            seed: 1,
        };
        vt_data::fetch::fetch(&vt_data::fetch::FetchOptions::new(
            &data,
            vt_data::fetch::FetchSource::Synthetic(synthetic),
        ))
        .unwrap();
        assert!(refused(&data.join("train/sea")).contains("inside the data folder"));
        assert!(refused(&data).contains("inside the data folder"));
        let err = refuse_data_folder("--run-dir", &data, &data.join("runs/a")).unwrap_err();
        assert!(err.to_string().starts_with("--run-dir"), "{err}");
        // A web app's manifest.json beside a train/ folder of code is no data.
        let app = root.path().join("app");
        std::fs::create_dir_all(app.join("train")).unwrap();
        std::fs::write(app.join(MANIFEST_FILE), r#"{"name": "my pwa"}"#).unwrap();
        refuse_managed_folder("--out", &app, &app.join("reports")).unwrap();
        refuse_managed_folder("--out", &app, &app.join("train/x")).unwrap();
        // A data folder in torchvision's layout, without a manifest: its splits are refused
        // (a picture in a class folder would be read as a photo), its top and a folder
        // named `test` elsewhere are not.
        let images = root.path().join("images");
        for class in ["train/sea", "val/sea"] {
            std::fs::create_dir_all(images.join(class)).unwrap();
            std::fs::write(images.join(class).join("1.jpg"), "").unwrap();
        }
        for inside in ["val/sea", "train", "train/sea/new"] {
            let err = refused(&images.join(inside));
            let split = resolved(&images).join(inside.split('/').next().unwrap());
            assert!(
                err.contains(&format!(
                    "inside {}, a split of the data folder",
                    split.display()
                )),
                "{err}"
            );
        }
        for outside in [
            images.clone(),
            images.join("reports"),
            root.path().join("results/test"),
        ] {
            refuse_managed_folder("--out", &outside, &outside).unwrap();
        }
        // Train and test splits without val; a split that is a link to a folder of another
        // name, refused by the name it is given.
        let other = root.path().join("other");
        for class in ["train/sea", "test/sea", "store/seg_val/sea"] {
            std::fs::create_dir_all(other.join(class)).unwrap();
            std::fs::write(other.join(class).join("1.jpg"), "").unwrap();
        }
        assert!(refused(&other.join("test/sea")).contains("a split of the data folder"));
        // A project's folders of code named so are no splits.
        let project = root.path().join("project");
        for folder in ["train/models", "test/unit"] {
            std::fs::create_dir_all(project.join(folder)).unwrap();
            std::fs::write(project.join(folder).join("main.py"), "").unwrap();
        }
        let runs = project.join("train/runs/a");
        refuse_managed_folder("--run-dir", &runs, &runs).unwrap();
        // Nor are folders of vt's own outputs: a run's plots, a report's, explain's pictures.
        let outputs = root.path().join("outputs");
        for folder in ["train/exp1", "val/exp1", "val/pictures"] {
            std::fs::create_dir_all(outputs.join(folder)).unwrap();
        }
        for file in [
            "train/exp1/config.toml",
            "train/exp1/metrics.jsonl",
            "train/exp1/curves.png",
            "val/exp1/e.json",
            "val/exp1/e.png",
            "val/pictures/1.explain.png",
        ] {
            std::fs::write(outputs.join(file), "").unwrap();
        }
        for next in ["train/exp2", "val/exp2"] {
            let next = outputs.join(next);
            refuse_managed_folder("--out", &next, &next).unwrap();
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(other.join("store/seg_val"), other.join("val")).unwrap();
            let err = refused(&other.join("val/sea"));
            assert!(
                err.contains(&format!("inside {}, a split", other.join("val").display())),
                "{err}"
            );
        }
        // A file on the way, named instead of the OS's "Not a directory".
        let file = root.path().join("notes.txt");
        std::fs::write(&file, "").unwrap();
        for folder in [file.clone(), file.join("a/b")] {
            let err = refused(&folder);
            assert!(
                err.ends_with(&format!("{} is a file, not a folder", file.display())),
                "{err}"
            );
        }
    }
}
