//! Generated protobuf types and gRPC stubs for Bulwark's APIs.

/// The gRPC codec of every Bulwark service and client.
pub mod codec {
    use tonic::codec::BufferSettings;
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// First size of a stream's encode buffer.
    pub const BUFFER_SIZE: usize = 4 * 1024;
    /// First size of a stream's decode buffer. Smaller: what a control plane
    /// decodes (ACKs, subscriptions), one buffer per connected sidecar, is
    /// mostly a few hundred bytes. The buffer grows to a larger message when
    /// one comes (a sidecar's to its largest response, a reconnecting
    /// sidecar's first request on the control plane).
    pub const DECODE_BUFFER_SIZE: usize = 1024;
    /// An encoder hands each message to HTTP/2 on its own (which batches
    /// writes anyway): batching ready messages into one buffer grew it to
    /// the batch, and the buffer never shrinks (see [`Codec`]).
    pub const YIELD_THRESHOLD: usize = 1;

    /// Protobuf over gRPC, as `tonic_prost::ProstCodec`, with smaller
    /// buffers: a stream keeps its buffers (grown to the largest message or
    /// batch it handled) for as long as it lives, and a control plane holds
    /// one discovery stream per sidecar (tonic's defaults, 8 KiB growing to
    /// batches of 32 KiB and more, cost every stream 65 kB after a sync).
    #[derive(Debug)]
    pub struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

    impl<T, U> Default for Codec<T, U> {
        fn default() -> Self {
            Self(std::marker::PhantomData)
        }
    }

    fn settings(buffer_size: usize) -> BufferSettings {
        BufferSettings::new(buffer_size, YIELD_THRESHOLD)
    }

    impl<T, U> tonic::codec::Codec for Codec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(settings(BUFFER_SIZE))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(settings(DECODE_BUFFER_SIZE))
        }
    }
}

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
        pub trust_bundle: Option<v1::TrustBundle>,
        pub gateways: Vec<v1::Gateway>,
        pub request_authentications: Vec<v1::RequestAuthentication>,
    }

    /// Type URLs of the resources on the discovery stream.
    pub mod type_url {
        pub const MESH_CONFIG: &str = "type.googleapis.com/bulwark.config.v1.MeshConfig";
        pub const SERVICE: &str = "type.googleapis.com/bulwark.config.v1.Service";
        pub const SERVICE_ENDPOINTS: &str =
            "type.googleapis.com/bulwark.config.v1.ServiceEndpoints";
        pub const SERVICE_ENTRY: &str = "type.googleapis.com/bulwark.config.v1.ServiceEntry";
        pub const ROUTE: &str = "type.googleapis.com/bulwark.config.v1.Route";
        pub const TRAFFIC_POLICY: &str = "type.googleapis.com/bulwark.config.v1.TrafficPolicy";
        pub const AUTHORIZATION_POLICY: &str =
            "type.googleapis.com/bulwark.config.v1.AuthorizationPolicy";
        pub const TRUST_BUNDLE: &str = "type.googleapis.com/bulwark.config.v1.TrustBundle";
        pub const GATEWAY: &str = "type.googleapis.com/bulwark.config.v1.Gateway";
        pub const REQUEST_AUTHENTICATION: &str =
            "type.googleapis.com/bulwark.config.v1.RequestAuthentication";
        /// Every type, in the order a sidecar subscribes (and a server pushes).
        pub const ALL: [&str; 10] = [
            TRUST_BUNDLE,
            MESH_CONFIG,
            SERVICE,
            SERVICE_ENTRY,
            SERVICE_ENDPOINTS,
            AUTHORIZATION_POLICY,
            TRAFFIC_POLICY,
            ROUTE,
            REQUEST_AUTHENTICATION,
            GATEWAY,
        ];
    }
}

/// `bulwark.xds.v1`: the discovery stream.
pub mod xds {
    pub mod v1 {
        tonic::include_proto!("bulwark.xds.v1");
    }
}
