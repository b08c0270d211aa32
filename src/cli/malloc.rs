//! `--malloc-mmap-threshold`, `--malloc-arena-max` and `--malloc-trim`, flattened into the long-running commands.

use anyhow::Context;
use clap::Args;
use locus::malloc::{Tuning, MAX_MMAP_THRESHOLD};

/// The allocator flags (docs/memory.md).
#[derive(Args)]
pub struct MallocArgs {
    /// Allocations of at least this many bytes get a mapping of their own, returned to the system
    /// when freed (at most 32 MiB; 0: glibc's own threshold, which grows to the largest block
    /// freed and then keeps freed tensors resident).
    #[arg(long, default_value_t = Tuning::DEFAULT.mmap_threshold as u32, env = "LOCUS_MALLOC_MMAP_THRESHOLD",
          value_parser = clap::value_parser!(u32).range(0..=MAX_MMAP_THRESHOLD as i64))]
    malloc_mmap_threshold: u32,
    /// The most glibc malloc arenas (0: glibc's own limit, 8 per core).
    #[arg(long, default_value_t = Tuning::DEFAULT.arena_max as u32, env = "LOCUS_MALLOC_ARENA_MAX",
          value_parser = clap::value_parser!(u32).range(0..=1024))]
    malloc_arena_max: u32,
    /// Return free heap memory to the system once the learner has been idle for a second
    /// (glibc's `malloc_trim`; false keeps what steps and queries freed resident).
    #[arg(long, default_value_t = Tuning::DEFAULT.trim, env = "LOCUS_MALLOC_TRIM",
          action = clap::ArgAction::Set)]
    malloc_trim: bool,
}

impl MallocArgs {
    /// Applies the settings; commands call it first, before their threads allocate.
    pub fn apply(&self) -> anyhow::Result<()> {
        Tuning {
            mmap_threshold: self.malloc_mmap_threshold as usize,
            arena_max: self.malloc_arena_max as usize,
            trim: self.malloc_trim,
        }
        .apply()
        .context("allocator settings")
    }
}
