//! The generated API types and gRPC stubs of `proto/locus/v1`, shared by the server and the client
//! (the client never imports the server).

/// Package `locus.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("locus.v1");
}

/// The encoded descriptor set of `proto/` (with its imports), served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/locus_descriptor.bin"));
