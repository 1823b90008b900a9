//! Generated protobuf types and gRPC stubs for Bulwark's APIs.

/// `bulwark.ca.v1`: the certificate authority.
pub mod ca {
    pub mod v1 {
        tonic::include_proto!("bulwark.ca.v1");
    }
}

/// `bulwark.config.v1`: mesh configuration resources.
pub mod config {
    pub mod v1 {
        tonic::include_proto!("bulwark.config.v1");
    }

    /// A complete set of configuration resources: what the control plane
    /// compiles from YAML and what a sidecar applies as one unit.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct Resources {
        pub mesh: Option<v1::MeshConfig>,
        pub services: Vec<v1::Service>,
        pub endpoints: Vec<v1::ServiceEndpoints>,
        pub service_entries: Vec<v1::ServiceEntry>,
        pub routes: Vec<v1::Route>,
        pub traffic_policies: Vec<v1::TrafficPolicy>,
        pub authorization_policies: Vec<v1::AuthorizationPolicy>,
    }
}
