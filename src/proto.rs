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

/// JSON forms of the fields serde cannot derive: enum numbers as their proto names, timestamps as
/// RFC 3339 text.
pub mod json {
    use serde::Serializer;

    use super::v1 as pb;

    /// A layer group's module by name (`MODULE_ATTN`).
    pub fn module<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(pb::Module::try_from(*v).unwrap_or_default().as_str_name())
    }

    /// A step's span rules by name (`SPAN_RULE_ENTITY`).
    pub fn span_rules<S: Serializer>(v: &[i32], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            v.iter()
                .map(|r| pb::SpanRule::try_from(*r).unwrap_or_default().as_str_name()),
        )
    }

    /// Why a completion ended, by name (`FINISH_REASON_STOP`).
    pub fn finish_reason<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(
            pb::FinishReason::try_from(*v)
                .unwrap_or_default()
                .as_str_name(),
        )
    }

    /// A timestamp as RFC 3339 text, or null.
    pub fn timestamp<S: Serializer>(
        v: &Option<prost_types::Timestamp>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => s.serialize_str(&t.to_string()),
            None => s.serialize_none(),
        }
    }
}
