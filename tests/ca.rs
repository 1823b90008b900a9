//! End-to-end tests of the CA: the real `bulwark` binary, real TLS, real
//! gRPC clients, and `openssl` to check what it issues.

mod common;

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use bulwark_ca::client::{CaClient, ClientError, Credential, Svid, new_csr};
use bulwark_ca::tls::TrustBundle;
use bulwark_ca::{SpiffeId, authority, store};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const API: &str = "spiffe://cluster.local/ns/default/sa/api";

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn client(ca: &Ca) -> CaClient {
    CaClient::new(
        ca.addr.to_string(),
        TrustBundle::from_pem(&ca.bundle_pem()).unwrap(),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Splits a PEM bundle into its certificates (PEM each).
fn split_pem(pem: &str) -> Vec<String> {
    pem.split_inclusive("-----END CERTIFICATE-----\n")
        .map(|s| s.trim_start().to_string())
        .filter(|s| s.contains("BEGIN CERTIFICATE"))
        .collect()
}

fn openssl_verify(dir: &std::path::Path, bundle: &str, chain_pem: &str, purpose: &str) -> String {
    let certs = split_pem(chain_pem);
    std::fs::write(dir.join("v-bundle.pem"), bundle).unwrap();
    std::fs::write(dir.join("v-leaf.pem"), &certs[0]).unwrap();
    std::fs::write(dir.join("v-inter.pem"), certs[1..].concat()).unwrap();
    let out = Command::new("openssl")
        .current_dir(dir)
        .args([
            "verify",
            "-CAfile",
            "v-bundle.pem",
            "-untrusted",
            "v-inter.pem",
            "-purpose",
            purpose,
            "v-leaf.pem",
        ])
        .output()
        .expect("openssl is installed (see .ci/run)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn refused(r: Result<impl std::fmt::Debug, (ClientError, Option<Duration>)>) -> (Code, String) {
    match r {
        Err((ClientError::Refused { code, message }, _)) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn csr_with(sans: Vec<SanType>, ca: bool) -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// A valid CSR with one byte of its signature flipped.
fn csr_bad_signature(identity: &SpiffeId) -> String {
    let (_, pem) = new_csr(identity).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let n = der.len();
    der[n - 3] ^= 0x55;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

/// Signs a leaf directly with the CA directory's intermediate, at `now`.
fn local_leaf(ca_dir: &std::path::Path, identity: &SpiffeId, now: time::OffsetDateTime) -> Svid {
    let auth = authority::Authority::from_material(store::load(ca_dir).unwrap()).unwrap();
    let (key, csr) = new_csr(identity).unwrap();
    let checked = authority::check_csr(&csr).unwrap();
    let issued = auth
        .sign(checked, identity, Some(Duration::from_secs(60)), now)
        .unwrap();
    Svid::from_pem_parts(&key.serialize_pem(), &issued.chain_pem, &issued.bundle_pem).unwrap()
}

#[test]
fn issued_chain_verifies_with_openssl_for_client_and_server_use() {
    let work = tempdir();
    let ca = Ca::start(work.path(), &[], &[]);
    let token_file = work.path().join("web.token");
    std::fs::write(&token_file, ca.token(WEB)).unwrap();
    let out = work.path().join("svid");
    run_ok(&[
        "cert",
        "request",
        "--ca",
        &ca.addr.to_string(),
        "--ca-cert",
        ca.dir.join("bundle.pem").to_str().unwrap(),
        "--identity",
        WEB,
        "--token-file",
        token_file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "key.pem must be private");
    let chain = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let bundle = std::fs::read_to_string(out.join("bundle.pem")).unwrap();
    assert_eq!(split_pem(&chain).len(), 2, "leaf then intermediate");
    for purpose in ["sslclient", "sslserver"] {
        let v = openssl_verify(work.path(), &bundle, &chain, purpose);
        assert!(
            v.contains("v-leaf.pem: OK"),
            "openssl verify -purpose {purpose}: {v}"
        );
    }
    // SPIFFE X.509-SVID rules, read back with x509-parser.
    let leaf = rustls_pki_types_pem(&split_pem(&chain)[0]);
    let (_, c) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let san = c.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN is critical with an empty subject");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, vec![format!("URI({WEB})")]);
    assert!(!c.is_ca());
    let bc = c.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = c.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = c.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(
        c.extensions()
            .iter()
            .any(|e| e.oid.to_id_string() == "2.5.29.14"),
        "SKI present"
    );
    assert!(
        c.extensions()
            .iter()
            .any(|e| e.oid.to_id_string() == "2.5.29.35"),
        "AKI present"
    );
    let life = c.validity().not_after.timestamp() - c.validity().not_before.timestamp();
    assert!(
        (24 * 3600..=24 * 3600 + 300).contains(&life),
        "default TTL 24h (+5 min backdate), got {life}s"
    );
    assert!(
        c.validity().not_before.timestamp()
            < time::OffsetDateTime::now_utc().unix_timestamp() - 200,
        "notBefore backdated"
    );
    // The issuance is on record.
    let recs = ca.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["outcome"], "issued");
    assert_eq!(recs[0]["auth"], "token");
    assert_eq!(recs[0]["identity"], WEB);
    assert!(recs[0]["serial"].as_str().unwrap().len() >= 30);
    assert!(
        ca.metrics_text()
            .contains("bulwark_ca_certificates_issued_total{auth=\"token\"} 1")
    );
}

fn rustls_pki_types_pem(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

#[test]
fn refusals_carry_precise_status_and_are_recorded() {
    let work = tempdir();
    let ca = Ca::start(work.path(), &[], &[]);
    let c = client(&ca);
    let web = id(WEB);
    let token = ca.token(WEB);
    let rt = rt();
    let call = |csr: &str, cred: Credential<'_>| rt.block_on(c.sign_once(&web, csr, &cred, None));
    let (_, good_csr) = new_csr(&web).unwrap();

    // CSR for another identity than the token's.
    let (_, api_csr) = new_csr(&id(API)).unwrap();
    let (code, msg) = refused(call(&api_csr, Credential::Token(&token)));
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains(API) && msg.contains(WEB), "{msg}");

    // Forged (edited claims), malformed, expired tokens.
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        r#"{{"sub":"{API}","iat":0,"exp":99999999999,"jti":"x"}}"#
    ));
    let forged = parts.join(".");
    let (code, msg) = refused(call(&good_csr, Credential::Token(&forged)));
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("signature is invalid"), "{msg}");
    let (code, msg) = refused(call(&good_csr, Credential::Token("not-a-token")));
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("malformed"), "{msg}");
    let material = store::load(&ca.dir).unwrap();
    let key = bulwark_ca::token::TokenKey::from_bytes(&material.token_secret);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expired = key.mint(&web, now - 7200, 3600);
    let (code, msg) = refused(call(&good_csr, Credential::Token(&expired)));
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("expired"), "{msg}");

    // A token of another trust domain: minted with this CA's key (the server
    // must still refuse it), and one minted by another CA entirely.
    let foreign_id = id("spiffe://other.example/ns/default/sa/web");
    let foreign_tok = key.mint(&foreign_id, now, 600);
    let (_, foreign_csr) = new_csr(&foreign_id).unwrap();
    let mut c_any = c.clone();
    c_any.ca_identity = Some(bulwark_ca::server::ca_identity("cluster.local"));
    let (code, msg) = refused(rt.block_on(c_any.sign_once(
        &foreign_id,
        &foreign_csr,
        &Credential::Token(&foreign_tok),
        None,
    )));
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("other.example"), "{msg}");
    let other_ca =
        bulwark_ca::token::TokenKey::from_bytes(b"another CA's secret").mint(&web, now, 600);
    let (code, _) = refused(call(&good_csr, Credential::Token(&other_ca)));
    assert_eq!(code, Code::Unauthenticated);
    // `ca token` itself refuses to mint for a foreign trust domain.
    let out = run(&[
        "ca",
        "token",
        "--dir",
        ca.dir.to_str().unwrap(),
        "--identity",
        "spiffe://other.example/ns/a/sa/b",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust domain"));
    // Nor for the mesh's own services, nor for longer than a day; and the
    // CA refuses those identities and lifetimes whoever minted the token.
    let dir = ca.dir.to_str().unwrap();
    for (identity, ttl, says) in [
        (
            "spiffe://cluster.local/ns/bulwark-system/sa/bulwark-xds",
            "1h",
            "reserved",
        ),
        (
            "spiffe://cluster.local/ns/bulwark-system/sa/bulwark-ca",
            "1h",
            "reserved",
        ),
        (WEB, "25h", "--ttl must be between 1m and 24h"),
        (WEB, "10s", "--ttl must be between 1m and 24h"),
    ] {
        let out = run(&[
            "ca",
            "token",
            "--dir",
            dir,
            "--identity",
            identity,
            "--ttl",
            ttl,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{identity} {ttl}: {err}"
        );
    }
    let xds = bulwark_ca::SpiffeId::control_plane("cluster.local").unwrap();
    let (_, xds_csr) = new_csr(&xds).unwrap();
    let xds_tok = key.mint(&xds, now, 600);
    let (code, msg) =
        refused(rt.block_on(c_any.sign_once(&xds, &xds_csr, &Credential::Token(&xds_tok), None)));
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("reserved"), "{msg}");
    let long = key.mint(&web, now, 2 * 24 * 3600);
    let (code, msg) = refused(call(&good_csr, Credential::Token(&long)));
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("at most 86400s"), "{msg}");

    // Bad CSRs.
    let cases = [
        (csr_with(vec![uri(WEB), uri(API)], false), "2 URI SANs"),
        (
            csr_with(
                vec![SanType::DnsName("web.default.svc".try_into().unwrap())],
                false,
            ),
            "DNS name",
        ),
        (
            csr_with(
                vec![uri(WEB), SanType::DnsName("web".try_into().unwrap())],
                false,
            ),
            "DNS name",
        ),
        (csr_with(vec![uri(WEB)], true), "CA certificate"),
        (csr_bad_signature(&web), "signature does not verify"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .to_string(),
            "malformed",
        ),
        ("hello".to_string(), "not a PEM"),
        (format!("{}{}", good_csr, "x".repeat(20_000)), "larger than"),
    ];
    for (csr, expect) in &cases {
        let (code, msg) = refused(call(csr, Credential::Token(&token)));
        assert_eq!(code, Code::InvalidArgument, "{expect}: {msg}");
        assert!(msg.contains(expect), "expected {expect:?} in {msg:?}");
    }
    // No credentials at all.
    let (code, msg) = refused(rt.block_on(async {
        let (_, csr) = new_csr(&web).unwrap();
        // Token of zero length is sent as no header: use the raw gRPC client.
        c.sign_once(&web, &csr, &Credential::Token(""), None).await
    }));
    assert_eq!(code, Code::Unauthenticated, "{msg}");

    // Every refusal is on record, with its code; nothing was issued.
    let recs = ca.records();
    let refusals: Vec<_> = recs.iter().filter(|r| r["outcome"] == "refused").collect();
    assert_eq!(refusals.len(), 9 + cases.len(), "{recs:#?}");
    assert!(recs.iter().all(|r| r["outcome"] == "refused"));
    assert!(
        refusals
            .iter()
            .all(|r| r["code"].is_string() && r["reason"].is_string() && r["peer"].is_string())
    );
    assert_eq!(
        refusals
            .iter()
            .filter(|r| r["code"] == "INVALID_ARGUMENT")
            .count(),
        cases.len()
    );
    assert_eq!(
        refusals
            .iter()
            .filter(|r| r["code"] == "PERMISSION_DENIED")
            .count(),
        3
    );
    let m = ca.metrics_text();
    assert!(
        m.contains("bulwark_ca_sign_errors_total{reason=\"reserved_identity\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("bulwark_ca_sign_errors_total{reason=\"invalid_csr\"} 8"),
        "{m}"
    );
    // And the CA still serves good requests.
    rt.block_on(c.issue(&web, Credential::Token(&token), None))
        .unwrap();
}

#[test]
fn renewal_over_mtls_needs_no_token_and_refuses_bad_client_certs() {
    let work = tempdir();
    let ca = Ca::start(work.path(), &[], &[]);
    let c = client(&ca);
    let web = id(WEB);
    let rt = rt();
    let first = rt
        .block_on(c.issue(
            &web,
            Credential::Token(&ca.token(WEB)),
            Some(Duration::from_secs(600)),
        ))
        .unwrap();
    // Renewal with the SVID alone.
    let renewed = rt
        .block_on(c.issue(&web, Credential::Svid(&first, None), None))
        .unwrap();
    assert_ne!(renewed.serial, first.serial);
    assert_eq!(renewed.identity, web);
    assert_eq!(ca.records().last().unwrap()["auth"], "mtls");

    // Renewal CSR for another identity than the client certificate's.
    let (_, api_csr) = new_csr(&id(API)).unwrap();
    let (code, msg) =
        refused(rt.block_on(c.sign_once(&web, &api_csr, &Credential::Svid(&first, None), None)));
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains(API), "{msg}");

    // An expired client certificate.
    let (_, csr) = new_csr(&web).unwrap();
    let expired = local_leaf(
        &ca.dir,
        &web,
        time::OffsetDateTime::now_utc() - Duration::from_secs(2400),
    );
    let (code, msg) =
        refused(rt.block_on(c.sign_once(&web, &csr, &Credential::Svid(&expired, None), None)));
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("expired"), "{msg}");

    // A certificate from another CA with the same trust domain and identity.
    let other = work.path().join("other");
    std::fs::create_dir(&other).unwrap();
    run_ok(&["ca", "init", "--dir", other.join("ca").to_str().unwrap()]);
    let foreign = local_leaf(&other.join("ca"), &web, time::OffsetDateTime::now_utc());
    let (code, msg) =
        refused(rt.block_on(c.sign_once(&web, &csr, &Credential::Svid(&foreign, None), None)));
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("client certificate refused"), "{msg}");
    let recs = ca.records();
    let bad: Vec<_> = recs
        .iter()
        .filter(|r| r["code"] == "UNAUTHENTICATED")
        .collect();
    assert_eq!(bad.len(), 2);
}

#[test]
fn root_rotation_keeps_old_and_new_leaves_valid_then_prunes_old_root() {
    let work = tempdir();
    let ca = Ca::start(
        work.path(),
        &["--max-ttl", "1h", "--default-ttl", "30m"],
        &[],
    );
    let c = client(&ca);
    let web = id(WEB);
    let rt = rt();
    let token = ca.token(WEB);
    let before = rt
        .block_on(c.issue(&web, Credential::Token(&token), None))
        .unwrap();
    let old_root = ca.bundle_pem();

    let out = run_ok(&[
        "ca",
        "rotate-root",
        "--dir",
        ca.dir.to_str().unwrap(),
        "--activate-after",
        "4s",
    ]);
    assert!(out.contains("bundle holds 2 roots"), "{out}");
    let bundle = ca.bundle_pem();
    assert_eq!(split_pem(&bundle).len(), 2);
    assert!(bundle.contains(old_root.trim()));

    // Phase 1: the new root is distributed with renewals; the old
    // intermediate still signs, so peers that have not renewed yet still
    // verify new leaves.
    let distributed = wait_for(
        "renewals to carry both roots",
        Duration::from_secs(20),
        || {
            let s = rt
                .block_on(c.issue(&web, Credential::Svid(&before, None), None))
                .unwrap();
            (split_pem(&s.bundle_pem).len() == 2).then_some(s)
        },
    );
    assert_eq!(
        split_pem(&distributed.chain_pem)[1],
        split_pem(&before.chain_pem)[1]
    );

    // Phase 2: the running CA switches to the new intermediate by itself.
    let after = wait_for(
        "the CA to sign with the new intermediate",
        Duration::from_secs(20),
        || {
            let s = rt
                .block_on(c.issue(&web, Credential::Svid(&distributed, None), None))
                .unwrap();
            (split_pem(&s.chain_pem)[1] != split_pem(&before.chain_pem)[1]).then_some(s)
        },
    );
    let bundle = ca.bundle_pem();
    assert_eq!(
        split_pem(&after.bundle_pem).len(),
        2,
        "clients get both roots during the overlap"
    );
    for leaf in [&before, &after] {
        let v = openssl_verify(work.path(), &bundle, &leaf.chain_pem, "sslclient");
        assert!(v.contains("v-leaf.pem: OK"), "{v}");
    }
    // Renewal with a leaf from the old root still works during the overlap.
    rt.block_on(c.issue(&web, Credential::Svid(&before, None), None))
        .unwrap();

    // Not prunable yet...
    assert_eq!(
        store::prune_bundle(&ca.dir, time::OffsetDateTime::now_utc().unix_timestamp()).unwrap(),
        0
    );
    // ...but once everything the old root signed has expired (max TTL + slack), it goes.
    let later = time::OffsetDateTime::now_utc().unix_timestamp() + 3600 + 301;
    assert_eq!(store::prune_bundle(&ca.dir, later).unwrap(), 1);
    let pruned = ca.bundle_pem();
    assert_eq!(split_pem(&pruned).len(), 1);
    assert!(!pruned.contains(old_root.trim()));
    assert!(
        openssl_verify(work.path(), &pruned, &after.chain_pem, "sslclient")
            .contains("v-leaf.pem: OK")
    );
    assert!(
        !openssl_verify(work.path(), &pruned, &before.chain_pem, "sslclient")
            .contains("v-leaf.pem: OK")
    );
}

#[test]
fn leaf_ttl_is_clamped_to_the_intermediate_and_the_maximum() {
    let work = tempdir();
    let ca = Ca::start(
        work.path(),
        &["--intermediate-ttl", "2h", "--max-ttl", "7d"],
        &[],
    );
    let c = client(&ca);
    let web = id(WEB);
    let rt = rt();
    let svid = rt
        .block_on(c.issue(
            &web,
            Credential::Token(&ca.token(WEB)),
            Some(Duration::from_secs(5 * 3600)),
        ))
        .unwrap();
    let inter = rustls_pki_types_pem(&split_pem(&svid.chain_pem)[1]);
    let (_, ic) = x509_parser::parse_x509_certificate(&inter).unwrap();
    assert_eq!(
        svid.not_after,
        ic.validity().not_after.timestamp(),
        "clamped to the intermediate"
    );

    let work2 = tempdir();
    let ca2 = Ca::start(
        work2.path(),
        &["--max-ttl", "1h", "--default-ttl", "1h"],
        &[],
    );
    let c2 = client(&ca2);
    let s = rt
        .block_on(c2.issue(
            &web,
            Credential::Token(&ca2.token(WEB)),
            Some(Duration::from_secs(48 * 3600)),
        ))
        .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        s.not_after <= now + 3600 && s.not_after > now + 3500,
        "capped at max TTL"
    );
    // Below the minimum: refused, not silently raised.
    let (_, csr) = new_csr(&web).unwrap();
    let (code, _) = refused(rt.block_on(c2.sign_once(
        &web,
        &csr,
        &Credential::Svid(&s, None),
        Some(Duration::from_secs(5)),
    )));
    assert_eq!(code, Code::InvalidArgument);
}

/// Junk credentials cost the sender nothing, so their refusals are
/// recorded at a bounded rate: a flood neither fills the CA's disk nor
/// keeps the next issuance off the record.
#[test]
fn a_flood_of_junk_tokens_is_counted_not_recorded_line_by_line() {
    let work = tempdir();
    let ca = Ca::start(work.path(), &[], &[]);
    let c = client(&ca);
    let token = ca.token(WEB);
    let rt = rt();
    let web = id(WEB);
    let (_, csr) = new_csr(&web).unwrap();
    let n = 600;
    let refused_all = rt.block_on(async {
        let mut refused = 0;
        for _ in 0..n {
            if c.sign_once(&web, &csr, &Credential::Token("junk"), None)
                .await
                .is_err()
            {
                refused += 1;
            }
        }
        refused
    });
    assert_eq!(refused_all, n, "every junk token is refused");
    let svid = rt.block_on(c.issue(&web, Credential::Token(&token), None));
    assert!(svid.is_ok(), "{svid:?}");
    let recs = ca.records();
    let recorded = recs.iter().filter(|r| r["outcome"] == "refused").count();
    println!("{n} junk tokens: {recorded} refusals recorded");
    assert!(recorded < n / 2, "{recorded} of {n} refusals recorded");
    assert_eq!(recs.last().unwrap()["outcome"], "issued");
    // Each record after a gap counts the refusals left out before it.
    let left_out: u64 = recs
        .iter()
        .filter_map(|r| r["refusals_not_recorded"].as_u64())
        .sum();
    assert!(left_out > 0);
    assert_eq!(recorded as u64 + left_out, n as u64);
    // The metric still counts every one.
    let metrics = ca.metrics_text();
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("bulwark_ca_sign_errors_total{") && l.contains("bad_token"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, n as f64, "{metrics}");
}

#[test]
fn over_the_rate_limit_clients_back_off_and_all_eventually_succeed() {
    let work = tempdir();
    let ca = Ca::start(
        work.path(),
        &[],
        // 40 at once against 5 a second: limited unless they all arrived
        // over 7 s, whatever this machine's load.
        &["--sign-rate", "5", "--sign-burst", "5"],
    );
    let c = client(&ca);
    let token = ca.token(WEB);
    let rt = rt();
    let n = 40;
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let c = c.clone();
            let t = token.clone();
            tasks.push(tokio::spawn(async move {
                c.issue(&id(WEB), Credential::Token(&t), None).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{failures:?}");
    let recs = ca.records();
    let limited = recs
        .iter()
        .filter(|r| r["code"] == "RESOURCE_EXHAUSTED")
        .count();
    assert!(limited > 0, "the limit was reached");
    assert_eq!(recs.iter().filter(|r| r["outcome"] == "issued").count(), n);
}

#[test]
fn ca_refuses_to_start_with_a_key_readable_by_others() {
    let work = tempdir();
    let dir = work.path().join("ca");
    run_ok(&["ca", "init", "--dir", dir.to_str().unwrap()]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("intermediate.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = run(&[
        "ca",
        "serve",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("intermediate.key") && err.contains("chmod 600"),
        "{err}"
    );
    // And `init` never overwrites an existing CA.
    let out = run(&["ca", "init", "--dir", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
}

#[test]
fn plug_in_ca_chains_leaves_to_the_organisation_root() {
    let work = tempdir();
    let w = work.path();
    // The organisation's root, made with openssl.
    let sh = |args: &[&str]| {
        let o = Command::new("openssl")
            .current_dir(w)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "org.key",
    ]);
    sh(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "org.key",
        "-subj",
        "/O=Example Org/CN=Example Root",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "org.pem",
    ]);
    let ca = Ca::start(
        w,
        &["--import-root", "org.pem", "org.key"].map(|a| {
            if a.starts_with("org") {
                w.join(a).to_str().unwrap().to_string().leak() as &str
            } else {
                a
            }
        }),
        &[],
    );
    assert!(
        ca.bundle_pem()
            .contains(std::fs::read_to_string(w.join("org.pem")).unwrap().trim())
    );
    let rt = rt();
    let svid = rt
        .block_on(client(&ca).issue(&id(WEB), Credential::Token(&ca.token(WEB)), None))
        .unwrap();
    let org = std::fs::read_to_string(w.join("org.pem")).unwrap();
    assert!(openssl_verify(w, &org, &svid.chain_pem, "sslclient").contains("v-leaf.pem: OK"));

    // An intermediate the organisation signed offline: its root key never reaches the CA.
    sh(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "int.key",
    ]);
    sh(&[
        "req",
        "-new",
        "-key",
        "int.key",
        "-subj",
        "/O=Example Org/CN=Mesh Intermediate",
        "-out",
        "int.csr",
    ]);
    std::fs::write(w.join("ext.cnf"), "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n").unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "int.csr",
        "-CA",
        "org.pem",
        "-CAkey",
        "org.key",
        "-CAcreateserial",
        "-days",
        "20",
        "-extfile",
        "ext.cnf",
        "-out",
        "int.pem",
    ]);
    let d2 = w.join("ca2");
    run_ok(&[
        "ca",
        "init",
        "--dir",
        d2.to_str().unwrap(),
        "--import-intermediate",
        w.join("int.pem").to_str().unwrap(),
        w.join("int.key").to_str().unwrap(),
        "--root",
        w.join("org.pem").to_str().unwrap(),
    ]);
    assert!(!d2.join("root.key").exists());
    let w2 = w.join("w2");
    std::fs::create_dir(&w2).unwrap();
    let ca2 = Ca::serve(&w2, &d2, &[]);
    let svid2 = rt
        .block_on(client(&ca2).issue(&id(WEB), Credential::Token(&ca2.token(WEB)), None))
        .unwrap();
    assert!(openssl_verify(w, &org, &svid2.chain_pem, "sslserver").contains("v-leaf.pem: OK"));
    // A mismatched key is refused at init.
    let out = run(&[
        "ca",
        "init",
        "--dir",
        w.join("ca3").to_str().unwrap(),
        "--import-intermediate",
        w.join("int.pem").to_str().unwrap(),
        w.join("org.key").to_str().unwrap(),
        "--root",
        w.join("org.pem").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not belong"));
}

#[test]
fn garbage_and_plaintext_on_the_ca_port_are_refused_without_harm() {
    use std::io::{Read, Write};
    let work = tempdir();
    let ca = Ca::start(work.path(), &[], &[]);
    let failures = |ca: &Ca| -> u64 {
        let m = ca.metrics_text();
        let line = m
            .lines()
            .find(|l| l.starts_with("bulwark_ca_tls_handshake_failures_total"))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // The readiness probe's bare connect counts too; wait for it to settle.
    let base = wait_for(
        "the probe connection to be counted",
        Duration::from_secs(5),
        || {
            let n = failures(&ca);
            (n >= 1).then_some(n)
        },
    );
    for payload in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
        &[0u8; 4096][..],
    ] {
        let mut s = std::net::TcpStream::connect(ca.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(payload);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut buf = [0u8; 1024];
        // The CA closes the connection (possibly after a TLS alert).
        let _ = s.read(&mut buf);
    }
    wait_for(
        "handshake failures to be counted",
        Duration::from_secs(5),
        || (failures(&ca) == base + 3).then_some(()),
    );
    let rt = rt();
    rt.block_on(client(&ca).issue(&id(WEB), Credential::Token(&ca.token(WEB)), None))
        .unwrap();
}

/// Benchmark, not a timed test: the CA's signing capacity, as CSRs signed
/// per second of the CA process's own CPU (user + system, all threads), so
/// what the clients cost (keys, CSRs, their half of TLS) is not counted on
/// whatever core they run. Eight clients renew over mTLS, once with a new
/// connection per CSR (a sidecar's renewal) and once over kept connections.
/// `cargo test --release --test ca -- --ignored --nocapture ca_signing_throughput`
#[test]
#[ignore]
fn ca_signing_throughput() {
    let work = tempdir();
    let ca = Ca::start(
        work.path(),
        &[],
        &["--sign-rate", "100000", "--sign-burst", "100000"],
    );
    let c = client(&ca);
    let rt = rt();
    let web = id(WEB);
    let seed = rt
        .block_on(c.issue(&web, Credential::Token(&ca.token(WEB)), None))
        .unwrap();
    const CLIENTS: usize = 8;
    // About a second of CA CPU per mode: the CPU time is read in 10 ms ticks.
    const PER_CLIENT: usize = 750;
    for kept in [false, true] {
        // CSRs (keys and signatures) are made before the clock starts.
        let csrs: Vec<Vec<String>> = (0..CLIENTS)
            .map(|_| (0..PER_CLIENT).map(|_| new_csr(&web).unwrap().1).collect())
            .collect();
        let cpu0 = cpu_seconds(ca.proc.pid());
        let start = std::time::Instant::now();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for csrs in csrs {
                let (c, s, web) = (c.clone(), seed.clone(), web.clone());
                tasks.push(tokio::spawn(async move {
                    let cred = Credential::Svid(&s, None);
                    if kept {
                        let mut session = c.session(&web, &cred).await.unwrap();
                        for csr in &csrs {
                            session.sign(csr, None).await.unwrap();
                        }
                    } else {
                        for csr in &csrs {
                            c.sign_once(&web, csr, &cred, None).await.unwrap();
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds(ca.proc.pid()) - cpu0;
        let n = CLIENTS * PER_CLIENT;
        println!(
            "mode={} clients={CLIENTS} signatures={n} elapsed={secs:.2}s rate={:.0}/s ca_cpu={cpu:.2}s ca_cpu_per_signature={:.0}us per_core_rate={:.0}/s",
            if kept {
                "kept-connection"
            } else {
                "connection-per-csr"
            },
            n as f64 / secs,
            cpu * 1e6 / n as f64,
            n as f64 / cpu,
        );
    }
}

/// The CA decodes messages up to `MAX_MESSAGE` bytes: a request of exactly
/// that size is read and refused for its content (not a CSR); one byte more
/// is refused by its size with tonic's OUT_OF_RANGE, before the CA looks at
/// it. Either way the CA goes on issuing to everyone else.
#[test]
fn sign_requests_at_the_size_limit_are_read_and_one_byte_over_is_refused() {
    use bulwark_ca::server::MAX_MESSAGE;
    let work = tempdir();
    let ca = Ca::start(work.path(), &[], &[]);
    let c = client(&ca);
    let web = id(WEB);
    let token = ca.token(WEB);
    let rt = rt();
    // SignRequest { csr_pem: s }: one tag byte, a 3-byte length, then s.
    let csr_of = |size: usize| "x".repeat(size - 4);

    let (code, msg) = refused(rt.block_on(c.sign_once(
        &web,
        &csr_of(MAX_MESSAGE),
        &Credential::Token(&token),
        None,
    )));
    assert_eq!(code, Code::InvalidArgument, "{msg}");

    let (code, msg) = refused(rt.block_on(c.sign_once(
        &web,
        &csr_of(MAX_MESSAGE + 1),
        &Credential::Token(&token),
        None,
    )));
    assert_eq!(code, Code::OutOfRange, "{msg}");
    assert!(msg.contains("message length too large"), "{msg}");

    // Still serving: the same client and a new one both get certificates.
    let (_, csr) = new_csr(&web).unwrap();
    rt.block_on(c.sign_once(&web, &csr, &Credential::Token(&token), None))
        .unwrap();
    rt.block_on(client(&ca).issue(&web, Credential::Token(&ca.token(WEB)), None))
        .unwrap();
}
