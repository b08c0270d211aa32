//! glibc malloc settings for long-running processes, applied at start through `mallopt`.
//!
//! glibc raises its mmap threshold to the largest block freed (up to 32 MiB), after which tensor
//! buffers come from the heap and stay resident when freed; a fixed threshold keeps each large
//! buffer in a mapping of its own that is returned on free (docs/memory.md measures both).

/// The largest mmap threshold glibc accepts on a 64-bit target (`HEAP_MAX_SIZE / 2`).
pub const MAX_MMAP_THRESHOLD: usize = 32 << 20;

/// The allocator settings; 0 leaves a setting to glibc (and its `MALLOC_*` variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Blocks at least this large get a mapping of their own, returned to the system on free.
    pub mmap_threshold: usize,
    /// The most malloc arenas, each of which keeps the memory its threads freed.
    pub arena_max: usize,
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
    };

    /// Reads `LOCUS_MALLOC_MMAP_THRESHOLD` and `LOCUS_MALLOC_ARENA_MAX` (an unset one keeps its
    /// default), for benches that apply what `serve` would.
    pub fn from_env() -> Result<Tuning, Error> {
        let read = |setting: &'static str, var: &str, default: usize| {
            std::env::var(var).map_or(Ok(default), |v| {
                v.parse().map_err(|e| Error::Refused {
                    setting,
                    reason: format!("{var}={v}: {e}"),
                })
            })
        };
        Ok(Tuning {
            mmap_threshold: read(
                "malloc-mmap-threshold",
                "LOCUS_MALLOC_MMAP_THRESHOLD",
                Self::DEFAULT.mmap_threshold,
            )?,
            arena_max: read(
                "malloc-arena-max",
                "LOCUS_MALLOC_ARENA_MAX",
                Self::DEFAULT.arena_max,
            )?,
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
        Ok(())
    }
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
        };
        let e = over.apply().unwrap_err().to_string();
        assert!(e.starts_with("malloc-mmap-threshold: "), "{e}");
        let glibc = Tuning {
            mmap_threshold: 0,
            arena_max: 0,
        };
        assert!(glibc.apply().is_ok());
    }
}
