//! The `locus serve` child process under soak: starting it, waiting for its model, reading its
//! memory and descriptors from /proc, and stopping it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use locus::client::Client;

use crate::common::spawn_serving;

/// How long a start may take to load (and restore) the model.
const READY_WITHIN: Duration = Duration::from_secs(300);

/// What to run: the binary, the model and the data directory every start shares.
pub struct Setup {
    pub bin: PathBuf,
    pub model: String,
    pub data: PathBuf,
}

/// A running `locus serve`.
pub struct Server {
    child: Child,
    pub addr: String,
}

impl Server {
    /// Starts the binary on 127.0.0.1:0 with a checkpoint every 10 updates, so that checkpoints
    /// and journal compaction happen during the soak; `cwd` keeps any `locus.toml` out.
    pub fn start(setup: &Setup, cwd: &Path) -> Server {
        let mut command = Command::new(&setup.bin);
        command
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--model",
                &setup.model,
            ])
            .arg("--data-dir")
            .arg(&setup.data)
            .args(["--checkpoint-every", "10"])
            .env("RUST_LOG", "warn")
            .env_remove("LOCUS_CONFIG")
            .env_remove("LOCUS_DATA_DIR")
            .current_dir(cwd);
        // SAFETY: prctl(2) only, between fork and exec: a soak that is killed takes its server
        // along instead of leaving it running.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (child, addr) = spawn_serving(&mut command);
        Server { child, addr }
    }

    /// The process id, for /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client, once the model is loaded and restored (Info answers only then).
    pub async fn ready(&mut self) -> anyhow::Result<Client> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(mut c) = Client::connect(&self.addr, None).await {
                if c.info().await.is_ok() {
                    return Ok(c);
                }
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("locus serve exited with {status} before it was ready");
            }
            anyhow::ensure!(Instant::now() < deadline, "not ready in {READY_WITHIN:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits for the graceful stop (streams drained, a checkpoint written).
    pub fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        let pid = libc::pid_t::try_from(self.pid())?;
        // SAFETY: kill(2) on our own child, which has not been waited for, so the pid is still ours.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            anyhow::bail!("SIGTERM: {}", std::io::Error::last_os_error());
        }
        Ok(self.child.wait()?)
    }
}

/// A server left behind, by an error or at the end, is killed.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let mb = locus::memory::rss_mb_of(pid);
    mb.is_finite().then_some((mb * 1024.0) as u64)
}

/// Open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}
