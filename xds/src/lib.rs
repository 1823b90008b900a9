//! The Bulwark control plane: the YAML config users write ([`model`]),
//! reading it ([`load`]), the checks applied before anything is served
//! ([`validate`]), its compilation into the `bulwark.config.v1` resources
//! sidecars apply ([`compile`]), and the server that delivers them
//! ([`server`]).
//!
//! Offline, most callers need only [`load_and_compile`]:
//!
//! ```no_run
//! # use std::path::Path;
//! match bulwark_xds::load_and_compile(Path::new("deploy/examples")) {
//!     Ok(resources) => println!("{} services", resources.services.len()),
//!     Err(errors) => eprintln!("{errors}"), // one `file:line: message` per line
//! }
//! ```
//!
//! The server ([`serve`], or [`ControlPlane`] to learn its ports first)
//! is built from small parts:
//!
//! - [`watch`]: polls the config directory, debounces, recompiles, and keeps
//!   the last good config when an edit is invalid;
//! - [`registry`]: workloads announced by connected sidecars, as endpoints of
//!   the services they serve, withdrawn a grace period after they leave;
//! - [`snapshot`]: config + registry endpoints + trust bundle, as per-type
//!   maps of name → (content-hash version, encoding), identical on every
//!   replica for identical inputs;
//! - [`server`]: the mTLS delta discovery stream (ACK/NACK, flow control,
//!   one snapshot's changes pushed per type in [`type_url::ALL`] order);
//! - [`status`]: per sidecar what it holds and whether the mesh converged,
//!   served with the metrics by [`admin`] and read back with [`fetch_status`].
//!
//! [`type_url::ALL`]: bulwark_proto::config::type_url::ALL

pub mod admin;
mod canonical;
pub mod compile;
pub mod crds;
pub mod credentials;
pub mod duration;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod heap;
pub mod inject;
pub mod load;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod snapshot;
pub mod status;
mod stream;
pub mod validate;
pub mod watch;
pub mod webhook;

use std::path::Path;

use bulwark_proto::config::Resources;

pub use compile::compile;
pub use load::{ConfigError, ConfigErrors, Loaded, load_path};
pub use validate::validate;

pub use server::{ControlPlane, Handle, ServeError, ServeOptions, serve};
pub use snapshot::Snapshot;
pub use status::{StatusReport, fetch as fetch_status};
pub use stream::ProtocolError;

/// Reads `path` (a file, or a directory of `*.yaml`/`*.yml`), validates it
/// and compiles it. Every resource carries its [`Source`](bulwark_proto::config::v1::Source)
/// (file, line, kind, name, namespace). On failure returns every problem
/// found, parse errors and validation errors together, sorted by file and
/// line.
pub fn load_and_compile(path: &Path) -> Result<Resources, ConfigErrors> {
    finish(load::load_lenient(path))
}

/// As [`load_and_compile`], for YAML already in memory; `file` is the name
/// errors and sources carry.
pub fn compile_str(file: &Path, yaml: &str) -> Result<Resources, ConfigErrors> {
    finish(load::load_str_lenient(file, yaml))
}

fn finish(loading: load::Loading) -> Result<Resources, ConfigErrors> {
    let mut errors = loading.errors;
    // Validate what did parse too, so one run reports everything.
    errors.extend(validate::check(&loading.documents, &loading.unparsed));
    if errors.is_empty() {
        Ok(compile(&loading.documents))
    } else {
        Err(ConfigErrors::sorted(errors))
    }
}

/// How many documents of each kind `resources` were compiled from (derived
/// endpoint lists are not documents), in [`model::Kind::ALL`] order.
pub fn document_counts(resources: &Resources) -> Vec<(model::Kind, usize)> {
    use model::Kind;
    let counts = [
        (Kind::MeshConfig, usize::from(resources.mesh.is_some())),
        (Kind::Service, resources.services.len()),
        (Kind::ServiceEntry, resources.service_entries.len()),
        (Kind::Route, resources.routes.len()),
        (Kind::TrafficPolicy, resources.traffic_policies.len()),
        (
            Kind::AuthorizationPolicy,
            resources.authorization_policies.len(),
        ),
        (Kind::Gateway, resources.gateways.len()),
        (
            Kind::RequestAuthentication,
            resources.request_authentications.len(),
        ),
    ];
    counts.into_iter().filter(|(_, n)| *n > 0).collect()
}
