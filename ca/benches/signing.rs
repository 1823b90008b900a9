//! What one Sign call costs the CA, step by step (no network):
//! `cargo bench -p bulwark-ca --bench signing`.

use std::time::Duration;

use bulwark_ca::authority::{Authority, check_csr};
use bulwark_ca::client::{Svid, new_csr};
use bulwark_ca::tls::{TrustBundle, Usage};
use bulwark_ca::{SpiffeId, store};
use criterion::{Criterion, criterion_group, criterion_main};
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

fn signing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let settings = store::Settings::new("bench.local");
    store::init(dir.path(), &settings, store::RootSource::Generate).unwrap();
    let material = store::load(dir.path()).unwrap();
    let bundle = TrustBundle::from_pem(&material.bundle_pem).unwrap();
    let authority = Authority::from_material(material).unwrap();
    let id: SpiffeId = "spiffe://bench.local/ns/default/sa/web".parse().unwrap();
    let (key, csr) = new_csr(&id).unwrap();
    let now = OffsetDateTime::now_utc();
    let ttl = Some(Duration::from_secs(3600));
    let issued = authority
        .sign(check_csr(&csr).unwrap(), &id, ttl, now)
        .unwrap();
    let svid =
        Svid::from_pem_parts(&key.serialize_pem(), &issued.chain_pem, &issued.bundle_pem).unwrap();

    let mut g = c.benchmark_group("ca");
    g.bench_function("check_csr", |b| b.iter(|| check_csr(&csr).unwrap()));
    g.bench_function("verify_client_chain", |b| {
        b.iter(|| {
            bundle
                .verify(
                    &svid.chain[0],
                    &svid.chain[1..],
                    UnixTime::now(),
                    Usage::Client,
                )
                .unwrap()
        })
    });
    g.bench_function("sign", |b| {
        b.iter_batched(
            || check_csr(&csr).unwrap(),
            |checked| authority.sign(checked, &id, ttl, now).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
