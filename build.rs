//! Compiles the CUDA kernels in `cuda/*.cu` when the `cuda` feature is on; does nothing otherwise.
//! One fatbin per kernel source holds machine code (SASS) for the target compute capability
//! (`CUDA_COMPUTE_CAP`, default 80), its PTX, and compute_80 PTX: the driver runs the SASS on that
//! GPU family and JIT-compiles the PTX for any other GPU from Ampere on. PTX alone made every fresh
//! machine JIT the decode kernels on first use (≈ 15 s on an H100).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Oldest compute capability the kernels support (bf16 conversions, warp match).
const MIN_CAP: u32 = 80;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(message) = build_kernels() {
        // A failed build script prints its stderr; exit with a clear reason instead of a backtrace.
        eprintln!("error: saap `cuda` feature: {message}");
        std::process::exit(1);
    }
}

fn build_kernels() -> Result<(), String> {
    for var in ["NVCC", "CUDA_ROOT", "CUDA_COMPUTE_CAP", "NVCC_APPEND_FLAGS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=cuda");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let src_dir = Path::new("cuda");
    let cap =
        match std::env::var("CUDA_COMPUTE_CAP") {
            Ok(s) => s.trim().replace('.', "").parse::<u32>().map_err(|_| {
                format!("CUDA_COMPUTE_CAP={s:?} is not a compute capability like 90")
            })?,
            Err(_) => MIN_CAP,
        };
    if cap < MIN_CAP {
        return Err(format!(
            "CUDA_COMPUTE_CAP={cap}: the kernels need compute capability {MIN_CAP} or newer"
        ));
    }
    let nvcc = nvcc_path();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(src_dir)
        .map_err(|e| format!("cannot list {}: {e}", src_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    // All nvcc runs at once: the decode kernels take a while and the runs are independent.
    let mut runs = Vec::new();
    for src in &sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("bad kernel file name {}", src.display()))?;
        let mut child = Command::new(&nvcc);
        child.args(["--fatbin", "-O3", "-std=c++17"]).arg(format!(
            "-gencode=arch=compute_{cap},code=[sm_{cap},compute_{cap}]"
        ));
        if cap != MIN_CAP {
            child.arg(format!(
                "-gencode=arch=compute_{MIN_CAP},code=compute_{MIN_CAP}"
            ));
        }
        let child = child
            .arg("-I")
            .arg(src_dir)
            .arg("-o")
            .arg(out_dir.join(format!("{stem}.fatbin")))
            .arg(src)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run nvcc ({}): {e}. Install the CUDA toolkit, put nvcc on PATH \
                     or set NVCC / CUDA_ROOT, or build without `--features cuda`",
                    nvcc.display()
                )
            })?;
        runs.push((child, src));
    }
    for (mut child, src) in runs {
        let status = child.wait().map_err(|e| format!("nvcc: {e}"))?;
        if !status.success() {
            return Err(format!(
                "nvcc failed ({status}) on {} for sm_{cap}",
                src.display()
            ));
        }
    }
    Ok(())
}

/// `NVCC`, else `CUDA_ROOT/bin/nvcc`, else `nvcc` from PATH.
fn nvcc_path() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return nvcc.into();
    }
    if let Some(root) = std::env::var_os("CUDA_ROOT") {
        let candidate = Path::new(&root).join("bin").join("nvcc");
        if candidate.exists() {
            return candidate;
        }
    }
    PathBuf::from("nvcc")
}
