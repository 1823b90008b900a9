//! Generated protobuf types and gRPC stubs for Bulwark's APIs.

/// `bulwark.ca.v1`: the certificate authority.
pub mod ca {
    pub mod v1 {
        tonic::include_proto!("bulwark.ca.v1");
    }
}
