//! Scale-out through object storage: the writer publishes to an S3 bucket (moto's S3-compatible
//! server on an ephemeral port, started by tests/support/s3_server.py) and two readers follow it.
//! Skipped, with a note, where moto is not importable, except under CI, where that is a failure.
//! Azure and GCS emulators run the same scenario in tests/object_store_azure.rs and
//! tests/object_store_gcs.rs, each alone in its binary since each sets the environment.

mod common;
#[path = "support/emulator.rs"]
mod emulator;
mod serving;

use emulator::{missing_bucket_is_reported, moto, run_with_s3};
use serving::{large_file_round_trips, writer_and_two_readers};

const BUCKET: &str = "locus-published";

#[test]
fn readers_follow_the_writer_through_s3() {
    let Some(s3) = moto(&[BUCKET]) else {
        return;
    };
    run_with_s3(&s3.endpoint, async {
        writer_and_two_readers(&format!("s3://{BUCKET}/models/smol")).await;
        missing_bucket_is_reported("s3://no-such-bucket/x").await;
        large_file_round_trips(&format!("s3://{BUCKET}/large")).await;
    });
}
