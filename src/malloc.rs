//! glibc malloc settings for long-running processes, applied at start through `mallopt`.
//!
//! glibc raises its mmap threshold to the largest block freed (up to 32 MiB), after which tensor
//! buffers come from the heap and stay resident when freed; a fixed threshold keeps each large
//! buffer in a mapping of its own that is returned on free, and a trim once the learner is idle
//! returns what a step freed without a fault on every allocation (docs/memory.md measures all).

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether [`trim`] returns free heap memory; set by [`Tuning::apply`].
static TRIM: AtomicBool = AtomicBool::new(false);

/// The largest mmap threshold glibc accepts on a 64-bit target (`HEAP_MAX_SIZE / 2`).
pub const MAX_MMAP_THRESHOLD: usize = 32 << 20;

/// The allocator settings; 0 leaves a setting to glibc (and its `MALLOC_*` variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Blocks at least this large get a mapping of their own, returned to the system on free.
    pub mmap_threshold: usize,
    /// The most malloc arenas, each of which keeps the memory its threads freed.
    pub arena_max: usize,
    /// Return the heap's free memory to the system when the learner has been idle a while, and
    /// every 10 s while it learns.
    pub trim: bool,
}

/// A setting glibc refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The value is outside what glibc accepts.
    #[error("{setting}: {reason}")]
    Refused {
        /// The setting, by its flag name.
        setting: &'static str,
        /// Why.
        reason: String,
    },
}

impl Tuning {
    /// What the long-running commands apply unless told otherwise: glibc's own behaviour. A fixed
    /// 1 MiB threshold holds about 400 MiB less but makes a CPU learning step about a third
    /// slower (every large buffer faults its pages in again), so it is an opt-in.
    pub const DEFAULT: Tuning = Tuning {
        mmap_threshold: 0,
        arena_max: 0,
        trim: true,
    };

    /// Reads `LOCUS_MALLOC_MMAP_THRESHOLD`, `LOCUS_MALLOC_ARENA_MAX` and `LOCUS_MALLOC_TRIM`
    /// (an unset one keeps its default), for benches that apply what `serve` would.
    pub fn from_env() -> Result<Tuning, Error> {
        Ok(Tuning {
            mmap_threshold: read_env(
                "malloc-mmap-threshold",
                "LOCUS_MALLOC_MMAP_THRESHOLD",
                Self::DEFAULT.mmap_threshold,
            )?,
            arena_max: read_env(
                "malloc-arena-max",
                "LOCUS_MALLOC_ARENA_MAX",
                Self::DEFAULT.arena_max,
            )?,
            trim: read_env("malloc-trim", "LOCUS_MALLOC_TRIM", Self::DEFAULT.trim)?,
        })
    }

    /// Applies the settings to this process's allocator; a no-op where the C library is not glibc.
    pub fn apply(&self) -> Result<(), Error> {
        if self.mmap_threshold > MAX_MMAP_THRESHOLD {
            return Err(Error::Refused {
                setting: "malloc-mmap-threshold",
                reason: format!(
                    "{} bytes is over glibc's most, {MAX_MMAP_THRESHOLD}",
                    self.mmap_threshold
                ),
            });
        }
        if self.arena_max > i32::MAX as usize {
            return Err(Error::Refused {
                setting: "malloc-arena-max",
                reason: format!("{} is over {}", self.arena_max, i32::MAX),
            });
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            set(
                "malloc-mmap-threshold",
                libc::M_MMAP_THRESHOLD,
                self.mmap_threshold,
            )?;
            set("malloc-arena-max", libc::M_ARENA_MAX, self.arena_max)?;
        }
        TRIM.store(self.trim, Ordering::Relaxed);
        Ok(())
    }
}

/// Returns the free memory of every malloc arena to the system (`malloc_trim`) when the settings
/// ask for it; called by the learner once it has been idle a while, and every so often while it
/// is not, so the buffers of finished steps and queries stop counting as resident. A no-op where
/// the C library is not glibc.
pub fn trim() {
    if !TRIM.load(Ordering::Relaxed) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Parses environment variable `var`, or answers `default` when it is unset.
fn read_env<T>(setting: &'static str, var: &str, default: T) -> Result<T, Error>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    std::env::var(var).map_or(Ok(default), |v| {
        v.parse().map_err(|e| Error::Refused {
            setting,
            reason: format!("{var}={v}: {e}"),
        })
    })
}

/// Sets one `mallopt` parameter unless `value` is 0.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set(setting: &'static str, param: libc::c_int, value: usize) -> Result<(), Error> {
    if value == 0 {
        return Ok(());
    }
    // SAFETY: mallopt only changes allocator parameters; both values were range-checked above.
    if unsafe { libc::mallopt(param, value as libc::c_int) } == 1 {
        return Ok(());
    }
    Err(Error::Refused {
        setting,
        reason: format!("glibc refused {value}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_glibc_cannot_take_are_refused_by_their_flag() {
        let over = Tuning {
            mmap_threshold: MAX_MMAP_THRESHOLD + 1,
            arena_max: 0,
            trim: false,
        };
        let e = over.apply().unwrap_err().to_string();
        assert!(e.starts_with("malloc-mmap-threshold: "), "{e}");
        let glibc = Tuning {
            mmap_threshold: 0,
            arena_max: 0,
            trim: false,
        };
        assert!(glibc.apply().is_ok());
    }
}
