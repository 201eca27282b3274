//! Checkpoint paths `.` and `./`, relative to the working directory: alone in this test
//! binary, which changes the process's working directory.

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
    std::env::set_current_dir(&dir).unwrap();
    for path in [".", "./"] {
        Model::load(path.as_ref(), &Device::Cpu).unwrap();
    }
    // Replacing the working directory leaves the process in the deleted old version: last.
    model.save(".".as_ref()).unwrap();
    Model::load(&dir, &Device::Cpu).unwrap();
}
