//! `locus export`: the model, with a data directory's newest good checkpoint applied, as a Hugging
//! Face directory that transformers loads directly.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use locus::model::Model;
use locus::store::checkpoint::{self, Meta};

/// Arguments of `locus export`.
#[derive(Args)]
pub struct ExportArgs {
    /// The base model: a Hugging Face model directory, a .gguf file, or `default` (SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long, default_value = "default", env = "LOCUS_MODEL")]
    model: String,
    #[command(flatten)]
    device: super::DeviceArg,
    /// A `locus serve` data directory: its newest checkpoint that verifies is applied to the model (read only; a running server may keep using it).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The directory to write (config.json, model.safetensors, tokenizer files).
    #[arg(long, value_name = "OUT")]
    hf: PathBuf,
    /// The dtype of the exported weights.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Replace OUT if it exists and is not empty.
    #[arg(long)]
    force: bool,
}

/// Weight dtypes an export can write.
#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl From<Dtype> for candle_core::DType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// A checkpoint applied to the model.
struct Applied {
    meta: Meta,
    path: PathBuf,
    /// Checkpoints newer than it that failed verification.
    skipped: usize,
}

/// Runs `locus export`.
pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let device = a.device.open()?;
    // Refuse an OUT we would not replace before spending time on the model.
    locus::export::check_target(&a.hf, a.force)?;
    if let Some(d) = &a.data_dir {
        if !d.is_dir() {
            bail!("--data-dir {}: no such directory", d.display());
        }
    }
    let model = super::load_model(&a.model, &device)?;
    let applied = match &a.data_dir {
        Some(d) => Some(apply_newest_checkpoint(&model, &a.model, d)?),
        None => None,
    };
    let exported = locus::export::write_hf(&model, &a.hf, a.dtype.into(), a.force)?;

    println!(
        "exported {} ({} layers) from {} to {}",
        model.arch.name(),
        model.arch.num_layers(),
        model.source.path,
        exported.dir.display()
    );
    match &applied {
        Some(c) => {
            println!(
                "version {} from checkpoint {}; {} groups restored: {}",
                c.meta.version,
                c.path.display(),
                c.meta.groups.len(),
                c.meta.groups.join(" ")
            );
            if c.skipped > 0 {
                println!(
                    "{} newer checkpoints failed verification and were skipped",
                    c.skipped
                );
            }
        }
        None => println!("version 0: the base model (no --data-dir)"),
    }
    let dtype = format!("{:?}", exported.dtype).to_lowercase();
    println!("{} tensors as {dtype}", exported.tensors);
    for f in &exported.files {
        println!("  {:<24} {:>12} bytes", f.name, f.bytes);
    }
    println!("  {:<24} {:>12} bytes", "total", exported.bytes());
    if let Some(c) = &applied {
        eprintln!(
            "locus: warning: journal records after record {} (batches learned since checkpoint {}) are not included; \
             checkpoint the server first (Admin.Checkpoint, `locus client checkpoint`) to export them",
            c.meta.journal_seq, c.meta.version
        );
    }
    Ok(())
}

/// Applies the newest checkpoint in `data_dir` that verifies to `model`'s variables, without
/// taking the data directory's lock or changing anything in it, so a server may be running.
fn apply_newest_checkpoint(model: &Model, spec: &str, data_dir: &Path) -> anyhow::Result<Applied> {
    // Not `Checkpoints::open`: it deletes temporary files, one of which a running server may be
    // about to rename into place.
    let (found, failed) =
        checkpoint::newest_readable(&locus::store::checkpoints_in(data_dir), model.device())?;
    for e in &failed {
        eprintln!("locus: warning: {e}; trying an older checkpoint");
    }
    let Some((path, ck)) = found else {
        if failed.is_empty() {
            bail!(
                "--data-dir {}: no checkpoints; checkpoint the server first (Admin.Checkpoint, `locus client checkpoint`), or leave out --data-dir to export the base model",
                data_dir.display()
            );
        }
        bail!(
            "--data-dir {}: none of its {} checkpoints verifies",
            data_dir.display(),
            failed.len()
        );
    };
    let hash = locus::store::model_hash(model)?;
    if ck.meta.base_hash != hash {
        bail!(
            "{}: checkpoint {} was made on a model with hash {}, but --model {spec} has hash {hash}; pass the --model that the server using --data-dir {} was started with",
            path.display(),
            ck.meta.version,
            ck.meta.base_hash,
            data_dir.display()
        );
    }
    for (name, t) in &ck.tensors {
        let var = model.vars.get(name).with_context(|| {
            format!(
                "{}: checkpoint {} holds `{name}`, which --model {spec} lacks",
                path.display(),
                ck.meta.version
            )
        })?;
        var.set(&t.to_dtype(var.dtype())?)
            .map_err(locus::Error::from)
            .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
    }
    Ok(Applied {
        meta: ck.meta,
        path,
        skipped: failed.len(),
    })
}
