//! Turning a path into a `Model`: Hugging Face directories, GGUF files, or the default model.

pub mod default;
pub mod gguf;
pub mod hf;

use std::path::Path;

use candle_core::Device;

use super::Model;
use crate::error::{Error, Result};

/// Loads `spec`: `default` (fetched on first use), a Hugging Face model directory, or a `.gguf` file.
pub fn load(spec: &str, device: &Device) -> Result<Model> {
    if spec == "default" {
        let path = default::ensure()?;
        return gguf::load(&path, device);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        hf::load(path, device)
    } else if path.is_file() {
        gguf::load(path, device)
    } else {
        Err(Error::model(
            path,
            "no such file or directory (pass a Hugging Face model directory, a .gguf file, or `default`)",
        ))
    }
}
