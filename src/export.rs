//! A model as a Hugging Face directory that transformers loads directly: `config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.
//!
//! The loaders already keep every weight under its Hugging Face name and in its layout (GGUF names
//! are mapped and Q/K rows un-permuted at load; GPT-2's `Conv1D` weights stay `(in, out)` as
//! transformers stores them), so the inverse mapping is the identity: tensors are written as they
//! are, converted only to the requested dtype.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenize::TokenizerInfo;

/// One file of an export and its size.
#[derive(Debug, Clone)]
pub struct ExportedFile {
    /// Its name inside the directory.
    pub name: &'static str,
    /// Its size in bytes.
    pub bytes: u64,
}

/// What [`write_hf`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The finished directory.
    pub dir: PathBuf,
    /// The dtype of the weights in `model.safetensors`.
    pub dtype: DType,
    /// Number of tensors in `model.safetensors`.
    pub tensors: usize,
    /// Every file, in the order written.
    pub files: Vec<ExportedFile>,
}

impl Exported {
    /// Total size of the files in bytes.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// Writes `model` into `out` as a Hugging Face directory with its weights in `dtype` (f32, f16 or
/// bf16). The files go into a temporary sibling directory, are fsync'ed, and the directory is
/// renamed to `out`, so `out` never holds a partial export. An `out` that exists and is not empty
/// is refused unless `replace` is set.
pub fn write_hf(model: &Model, out: &Path, dtype: DType, replace: bool) -> Result<Exported> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Invalid(format!(
            "cannot export weights as {dtype:?} (f32, f16 and bf16 can be)"
        )));
    }
    let occupied = check_target(out, replace)?;
    // Everything that can fail without touching the disk is done before anything is written.
    let info = model.tokenizer.info();
    let config = config_json(model, dtype)?;
    let tokenizer = model.tokenizer.to_json()?;
    let tokenizer_config = tokenizer_config_json(model);
    let generation = Value::Object(special_ids(info));
    let tensors = model
        .vars
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_detached_tensor().to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;

    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("{}: not a directory name", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.export-{}", std::process::id()));
    if tmp.exists() {
        // Left by an earlier run that died with the same process id.
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = (|| {
        let mut files = vec![write_file(&tmp, "config.json", &pretty(&config))?];
        files.push(write_weights(&tmp, &tensors)?);
        files.push(write_file(&tmp, "tokenizer.json", tokenizer.as_bytes())?);
        files.push(write_file(
            &tmp,
            "tokenizer_config.json",
            &pretty(&tokenizer_config),
        )?);
        files.push(write_file(
            &tmp,
            "generation_config.json",
            &pretty(&generation),
        )?);
        sync(&tmp)?;
        place(&tmp, out, name, occupied)?;
        sync(&parent)?;
        Ok(files)
    })();
    let files = match written {
        Ok(files) => files,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    Ok(Exported {
        dir: out.to_path_buf(),
        dtype,
        tensors: tensors.len(),
        files,
    })
}

/// Refuses an `out` that must not be replaced; returns whether it exists and holds anything.
/// Cheap, so a caller can run it before loading a model as well.
pub fn check_target(out: &Path, replace: bool) -> Result<bool> {
    let meta = match fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(out, e)),
    };
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: exists and is not a directory; not replacing it",
            out.display()
        )));
    }
    let empty = fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .next()
        .is_none();
    if !empty && !replace {
        return Err(Error::Invalid(format!(
            "{}: exists and is not empty; not replacing it (--force does)",
            out.display()
        )));
    }
    Ok(!empty)
}

/// `config.json`: the architecture's own fields, the special token ids and the stored dtype.
fn config_json(model: &Model, dtype: DType) -> Result<Value> {
    let mut cfg = model.arch.hf_config().map_err(|reason| {
        Error::Invalid(format!(
            "{} cannot be written as a Hugging Face model: {reason}",
            model.source.path
        ))
    })?;
    let m = cfg
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("an architecture's hf_config is not an object".into()))?;
    m.extend(special_ids(model.tokenizer.info()));
    let dtype = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    // transformers 5 reads `dtype`, 4.x `torch_dtype`.
    m.insert("dtype".into(), dtype.into());
    m.insert("torch_dtype".into(), dtype.into());
    Ok(cfg)
}

/// `bos_token_id`, `eos_token_id` (one id or a list) and `pad_token_id`, where known.
fn special_ids(info: &TokenizerInfo) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(id) = info.bos {
        m.insert("bos_token_id".into(), id.into());
    }
    match info.eos.as_slice() {
        [] => {}
        [id] => {
            m.insert("eos_token_id".into(), (*id).into());
        }
        ids => {
            m.insert("eos_token_id".into(), json!(ids));
        }
    }
    if let Some(id) = info.pad {
        m.insert("pad_token_id".into(), id.into());
    }
    m
}

/// `tokenizer_config.json`: the generic fast tokenizer class (a model-specific class may rebuild
/// parts of `tokenizer.json` instead of using it as saved), the special tokens and chat template.
fn tokenizer_config_json(model: &Model) -> Value {
    let tok = &model.tokenizer;
    let info = tok.info();
    let mut m = Map::new();
    m.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    // Decoding must give back the text locus decodes, without transformers' space clean-up.
    m.insert("clean_up_tokenization_spaces".into(), false.into());
    let named = [
        ("bos_token", info.bos),
        ("eos_token", info.eos.first().copied()),
        ("pad_token", info.pad),
    ];
    for (key, id) in named {
        if let Some(token) = id.and_then(|id| tok.id_to_token(id)) {
            m.insert(key.into(), token.into());
        }
    }
    if let Some(template) = &info.chat_template {
        m.insert("chat_template".into(), template.clone().into());
    }
    Value::Object(m)
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("JSON values always serialize");
    bytes.push(b'\n');
    bytes
}

/// Writes and fsyncs one file.
fn write_file(dir: &Path, name: &'static str, bytes: &[u8]) -> Result<ExportedFile> {
    let path = dir.join(name);
    File::create(&path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|e| Error::io(&path, e))?;
    Ok(ExportedFile {
        name,
        bytes: bytes.len() as u64,
    })
}

/// Writes `model.safetensors` (streamed, not assembled in memory) after `config.json`, and
/// fsyncs it.
fn write_weights(dir: &Path, tensors: &[(String, candle_core::Tensor)]) -> Result<ExportedFile> {
    let name = "model.safetensors";
    let path = dir.join(name);
    // transformers refuses safetensors files whose metadata names another framework.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        &path,
    )
    .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    // safetensors writes through a private temporary file (mode 0600); give the weights the
    // permissions of the other files, which the umask set.
    let config = dir.join("config.json");
    let perms = fs::metadata(&config)
        .map_err(|e| Error::io(&config, e))?
        .permissions();
    fs::set_permissions(&path, perms).map_err(|e| Error::io(&path, e))?;
    sync(&path)?;
    let bytes = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
    Ok(ExportedFile { name, bytes })
}

/// Fsyncs a file or a directory (a directory so that the names created in it survive a crash).
fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Renames the finished `tmp` to `out`. A rename replaces an absent or empty `out` atomically; an
/// occupied one is first moved aside, so a reader may briefly find no `out`, never a partial one.
fn place(tmp: &Path, out: &Path, name: &str, occupied: bool) -> Result<()> {
    if !occupied {
        return fs::rename(tmp, out).map_err(|e| Error::io(out, e));
    }
    let aside = tmp.with_file_name(format!(".{name}.replaced-{}", std::process::id()));
    if aside.exists() {
        // Left by an earlier run that died with the same process id.
        fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
    }
    fs::rename(out, &aside).map_err(|e| Error::io(out, e))?;
    if let Err(e) = fs::rename(tmp, out) {
        // Put the old directory back rather than leave nothing under `out`.
        let _ = fs::rename(&aside, out);
        return Err(Error::io(out, e));
    }
    if let Err(e) = fs::remove_dir_all(&aside) {
        // The export is complete; only the old copy is left behind.
        tracing::warn!(
            "{}: the replaced export could not be removed: {e}",
            aside.display()
        );
    }
    Ok(())
}
