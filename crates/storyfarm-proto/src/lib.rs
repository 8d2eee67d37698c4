//! Generated types and gRPC stubs of `storyfarm.v1` (public API and internal task messages).

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("storyfarm.v1");

    /// Encoded `FileDescriptorSet` of every storyfarm proto file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/storyfarm_descriptor.bin"));
}
