//! Checkpoint paths `.`, `./` and `best`, relative to the working directory: alone in this
//! test binary, which changes the process's working directory.

mod common;

use candle_core::Device;
use common::tiny_config;
use vt_model::{Arch, Model};

#[test]
fn dot_names_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let model = Model::init(tiny_config(Arch::VtResNet18), &Device::Cpu).unwrap();
    model.save(&dir).unwrap();
    // A run's missing checkpoint, named from inside the run: the resume it suggests names
    // the run as `.`.
    let run = tmp.path().join("run");
    model.save(&run.join("state")).unwrap();
    std::fs::write(run.join("config.toml"), "epochs = 2\n").unwrap();
    std::env::set_current_dir(&run).unwrap();
    let Err(err) = Model::load("best".as_ref(), &Device::Cpu) else {
        panic!("a missing checkpoint loaded");
    };
    let err = err.to_string();
    assert!(
        err.contains("`vt-train train --resume --run-dir .`"),
        "{err}"
    );
    std::env::set_current_dir(&dir).unwrap();
    for path in [".", "./"] {
        Model::load(path.as_ref(), &Device::Cpu).unwrap();
    }
    // Replacing the working directory leaves the process in the deleted old version: last.
    model.save(".".as_ref()).unwrap();
    Model::load(&dir, &Device::Cpu).unwrap();
}
