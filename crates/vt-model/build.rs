//! With the `cuda` feature, compiles `src/kernels/cuda/*.cu` to PTX with nvcc (as
//! candle-kernels does), for `kernels::cuda` to load at run time.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    if let Err(e) = compile_kernels() {
        panic!("vt-model: compiling the CUDA kernels failed: {e}");
    }
}

#[cfg(feature = "cuda")]
fn compile_kernels() -> cudaforge::Result<()> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    cudaforge::KernelBuilder::new()
        .source_dir("src/kernels/cuda")
        .arg("-std=c++17")
        .arg("-O3")
        // `a * b + c` rounds twice, as the CPU kernels compute it.
        .arg("--fmad=false")
        .build_ptx()?
        .write(out_dir.join("ptx.rs"))
}
