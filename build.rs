//! Compiles `proto/` into Rust with protox (a pure-Rust protobuf compiler), so building needs no
//! `protoc`, and writes the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/locus/v1/locus.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("locus_descriptor.bin"), fds.encode_to_vec())?;
    // Messages serialize to JSON (`locus client --json`) with the proto field names; enums and
    // timestamps go through src/proto.rs's helpers so they read as names and RFC 3339 times.
    let mut build = tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .message_attribute(".locus.v1", "#[derive(serde::Serialize)]");
    for (field, with) in [
        ("UpdatedGroup.module", "module"),
        ("GroupNorm.module", "module"),
        ("UpdateReport.span_rules", "span_rules"),
        ("CompleteChunk.finish_reason", "finish_reason"),
        ("Document.timestamp", "timestamp"),
        ("VersionInfo.created", "timestamp"),
    ] {
        let attribute = format!("#[serde(serialize_with = \"crate::proto::json::{with}\")]");
        build = build.field_attribute(format!(".locus.v1.{field}"), attribute);
    }
    build.compile_fds(fds)?;
    Ok(())
}
