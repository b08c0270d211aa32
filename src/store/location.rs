//! Where published versions live: a directory, or object storage (S3, GCS, Azure) by URL.
//!
//! Every kind goes through `object_store`, so writer and readers see one interface with the
//! guarantees publishing needs: a put replaces a whole file at once (a directory gets a temporary
//! file, fsync and rename; object stores replace whole objects), so a listing never shows half a
//! file. Credentials, regions and endpoints come from the usual environment variables (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`), which is how Kubernetes secrets and workload identities hand them over.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::{
    ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload, RetryConfig, WriteMultipart,
};
use tokio::runtime::Runtime;
use url::Url;

use super::{Result, StoreError};

/// Files larger than this go up in parts of this size: one request is capped (5 GiB on S3, less
/// than a full checkpoint of a 1.3B-parameter model), and a failed part is retried alone.
const PART: usize = 32 << 20;
/// Parts uploaded at once.
const PARTS_IN_FLIGHT: usize = 4;

/// A directory or an object-store prefix holding published files, with blocking access.
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    root: Key,
    url: String,
    io: Arc<Io>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Location {
    /// The location `spec` names: a path, a `file://` URL, or an `s3://`, `gs://`, `az://`,
    /// `abfs://` or `https://` object-store URL. A directory is created when missing.
    pub fn parse(spec: &str) -> Result<Location> {
        let (store, root, url): (Arc<dyn ObjectStore>, Key, String) = match kind(spec)? {
            Kind::Dir(dir) => {
                let (store, root) = local(&dir)?;
                (store, root, spec.to_string())
            }
            Kind::Remote { scheme, url, root } => {
                let store = remote(scheme, &url).map_err(|e| invalid(spec, e.to_string()))?;
                (store, root, spec.trim_end_matches('/').to_string())
            }
        };
        let io = Io::new().map_err(|e| invalid(spec, format!("starting its I/O thread: {e}")))?;
        Ok(Location {
            store,
            root,
            url,
            io: Arc::new(io),
        })
    }

    /// The location as given, for logs and errors.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The file `name` (a `/`-separated path under the location), for logs and errors.
    pub fn describe(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}/{name}", self.url))
    }

    fn key(&self, name: &str) -> Key {
        name.split('/').fold(self.root.clone(), Key::join)
    }

    fn failed(&self, name: &str, cause: object_store::Error) -> StoreError {
        StoreError::Remote {
            file: self.describe(name).display().to_string(),
            cause: Box::new(cause),
        }
    }

    /// Writes `bytes` as `name`, replacing any earlier file whole.
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        if bytes.len() <= PART {
            let key = self.key(name);
            return self
                .io
                .block_on(self.store.put(&key, PutPayload::from(bytes)))
                .map(drop)
                .map_err(|e| self.failed(name, e));
        }
        let bytes = Bytes::from(bytes);
        let parts = (0..bytes.len())
            .step_by(PART)
            .map(|start| Ok(bytes.slice(start..(start + PART).min(bytes.len()))));
        self.put_parts(name, parts)
    }

    /// Copies the local file at `path` to `name`, reading it a part at a time, so a checkpoint
    /// larger than memory can be published; returns its size.
    pub fn put_file(&self, name: &str, path: &Path) -> Result<u64> {
        let mut file = File::open(path).map_err(|e| StoreError::io(path, e))?;
        let size = file.metadata().map_err(|e| StoreError::io(path, e))?.len();
        if size <= PART as u64 {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes)
                .map_err(|e| StoreError::io(path, e))?;
            self.put(name, bytes)?;
            return Ok(size);
        }
        let parts = std::iter::from_fn(|| {
            let mut part = Vec::with_capacity(PART);
            match (&mut file).take(PART as u64).read_to_end(&mut part) {
                Ok(0) => None,
                Ok(_) => Some(Ok(Bytes::from(part))),
                Err(e) => Some(Err(StoreError::io(path, e))),
            }
        });
        self.put_parts(name, parts)?;
        Ok(size)
    }

    /// Uploads `parts` as one multipart object: it appears only when the upload completes, so
    /// readers still see it whole.
    fn put_parts(&self, name: &str, parts: impl Iterator<Item = Result<Bytes>>) -> Result<()> {
        let key = self.key(name);
        let failed = |e| self.failed(name, e);
        self.io.block_on(async {
            let started = self.store.put_multipart(&key).await.map_err(failed)?;
            let mut upload = WriteMultipart::new_with_chunk_size(started, PART);
            for part in parts {
                let part = match part {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = upload.abort().await;
                        return Err(e);
                    }
                };
                upload
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(failed)?;
                upload.put(part);
            }
            upload.finish().await.map(drop).map_err(failed)
        })
    }

    /// The bytes of `name`.
    pub fn get(&self, name: &str) -> Result<Vec<u8>> {
        let key = self.key(name);
        self.io
            .block_on(async { self.store.get(&key).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| self.failed(name, e))
    }

    /// Removes `name`; one already gone is no error.
    pub fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name);
        match self.io.block_on(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed(name, e)),
        }
    }

    /// Names of the files directly under `dir` (none where it does not exist).
    pub fn list(&self, dir: &str) -> Result<Vec<String>> {
        let key = self.key(dir);
        let listed = self.io.block_on(self.store.list_with_delimiter(Some(&key)));
        match listed {
            Ok(found) => Ok(found
                .objects
                .into_iter()
                .filter_map(|o| o.location.filename().map(str::to_string))
                .collect()),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.failed(dir, e)),
        }
    }
}

/// Checks that `spec` names a location of a supported kind, without touching it.
pub fn check(spec: &str) -> Result<()> {
    kind(spec).map(drop)
}

/// What a location spec names.
enum Kind {
    Dir(PathBuf),
    Remote {
        scheme: ObjectStoreScheme,
        url: Url,
        /// The prefix inside the bucket or container.
        root: Key,
    },
}

/// The client for an object-store URL, configured from the environment as the cloud SDKs are,
/// with retries bounded so that an unreachable store delays an update by seconds, not minutes.
fn remote(scheme: ObjectStoreScheme, url: &Url) -> object_store::Result<Arc<dyn ObjectStore>> {
    let retry = RetryConfig {
        max_retries: 4,
        retry_timeout: Duration::from_secs(20),
        ..RetryConfig::default()
    };
    Ok(match scheme {
        ObjectStoreScheme::AmazonS3 => Arc::new(
            AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .build()?,
        ),
        ObjectStoreScheme::GoogleCloudStorage => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .build()?,
        ),
        _ => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .build()?,
        ),
    })
}

fn kind(spec: &str) -> Result<Kind> {
    if !spec.contains("://") {
        return Ok(Kind::Dir(spec.into()));
    }
    let url = Url::parse(spec).map_err(|e| invalid(spec, format!("not a URL: {e}")))?;
    let (scheme, path) =
        ObjectStoreScheme::parse(&url).map_err(|e| invalid(spec, e.to_string()))?;
    match scheme {
        ObjectStoreScheme::Local => url
            .to_file_path()
            .map(Kind::Dir)
            .map_err(|()| invalid(spec, "a file:// URL needs an absolute path")),
        ObjectStoreScheme::AmazonS3
        | ObjectStoreScheme::GoogleCloudStorage
        | ObjectStoreScheme::MicrosoftAzure => Ok(Kind::Remote {
            root: Key::parse(path).map_err(|e| invalid(spec, e.to_string()))?,
            scheme,
            url,
        }),
        _ => Err(invalid(
            spec,
            "use a directory, file://, s3://, gs://, or az:// (abfs://, Azure or S3 https://) URL",
        )),
    }
}

fn invalid(spec: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Location {
        location: spec.to_string(),
        reason: reason.into(),
    }
}

/// A directory as an object store rooted at it, created when missing, with every write synced.
fn local(dir: &Path) -> Result<(Arc<dyn ObjectStore>, Key)> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    let store = LocalFileSystem::new_with_prefix(dir)
        .map_err(|e| invalid(&dir.display().to_string(), e.to_string()))?
        .with_fsync(true);
    Ok((Arc::new(store), Key::default()))
}

/// The runtime that drives object-store requests for callers on plain threads (the learner, the
/// blocking pool), so publishing never needs the server's runtime and works from any thread.
struct Io(Option<Runtime>);

impl Io {
    fn new() -> std::io::Result<Io> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("locus-store-io")
            .enable_all()
            .build()
            .map(|rt| Io(Some(rt)))
    }

    fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.0
            .as_ref()
            .expect("runtime lives until drop")
            .block_on(fut)
    }
}

impl Drop for Io {
    /// The last handle may go away inside the server's runtime, where a blocking shutdown panics.
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
