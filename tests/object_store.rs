//! Scale-out through object storage: the writer publishes to an S3 bucket (moto's S3-compatible
//! server on an ephemeral port, started by tests/support/s3_server.py) and two readers follow it.
//! Skipped, with a note, where moto is not importable, except under CI, where that is a failure.
//! Azure and GCS emulators run the same scenario in tests/object_store_azure.rs and
//! tests/object_store_gcs.rs, each alone in its binary since each sets the environment.

mod common;
#[path = "support/emulator.rs"]
mod emulator;
mod serving;

use emulator::{missing_bucket_is_reported, run_with_env, Emulator};
use serving::{large_file_round_trips, writer_and_two_readers};

const BUCKET: &str = "locus-published";

#[test]
fn readers_follow_the_writer_through_s3() {
    let Some(s3) = Emulator::start(
        "S3 (moto)",
        &["python3", "-c", "import moto.server, boto3, flask"],
        "python3 -m pip install 'moto[server]'",
        "s3_server.py",
        &[BUCKET],
    ) else {
        return;
    };
    let env = [
        ("AWS_ENDPOINT", s3.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    run_with_env(&env, async {
        writer_and_two_readers(&format!("s3://{BUCKET}/models/smol")).await;
        missing_bucket_is_reported("s3://no-such-bucket/x").await;
        large_file_round_trips(&format!("s3://{BUCKET}/large")).await;
    });
}
