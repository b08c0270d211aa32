//! Scale-out through Azure Blob Storage: the writer publishes to a container of Azurite (the Azure
//! Storage emulator, npm's `azurite`, on an ephemeral port, started by
//! tests/support/azurite_server.py) and two readers follow it, as tests/object_store.rs does
//! through S3. Skipped, with a note, where `azurite-blob` is not on PATH, except under CI, where
//! that is a failure.

mod common;
#[path = "support/emulator.rs"]
mod emulator;
mod serving;

use emulator::{missing_bucket_is_reported, run_with_env, Emulator};
use serving::{large_file_round_trips, writer_and_two_readers};

const CONTAINER: &str = "locus-published";

#[test]
fn readers_follow_the_writer_through_azure() {
    let Some(azurite) = Emulator::start(
        "Azure (Azurite)",
        &["sh", "-c", "command -v azurite-blob"],
        "npm install -g azurite",
        "azurite_server.py",
        &[CONTAINER],
    ) else {
        return;
    };
    // The emulator's well-known account and key; the client reads the endpoint itself.
    let env = [
        ("AZURE_STORAGE_USE_EMULATOR", "true"),
        ("AZURITE_BLOB_STORAGE_URL", azurite.endpoint.as_str()),
    ];
    run_with_env(&env, async {
        writer_and_two_readers(&format!("az://{CONTAINER}/models/smol")).await;
        missing_bucket_is_reported("az://no-such-container/x").await;
        large_file_round_trips(&format!("az://{CONTAINER}/large")).await;
    });
}
