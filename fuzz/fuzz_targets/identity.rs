//! SPIFFE ID parsing and the CA's CSR checks, both fed by untrusted
//! callers. The first byte picks what the rest is:
//! 0: a SPIFFE ID string; an accepted one must print back unchanged.
//! 1: a CSR's DER, wrapped in PEM here so mutations reach the parsers.
//! else: the CSR PEM text as sent.
#![no_main]

use base64::Engine;
use bulwark_ca::authority::check_csr;
use bulwark_ca::identity::SpiffeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode {
        0 => {
            let Ok(s) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(id) = s.parse::<SpiffeId>() {
                assert_eq!(id.to_string(), s, "an accepted ID prints as given");
                let again: SpiffeId = id.to_string().parse().expect("printed ID parses");
                assert_eq!(again, id);
            }
        }
        1 => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(rest);
            let pem = format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n"
            );
            check(&pem);
        }
        _ => {
            if let Ok(s) = std::str::from_utf8(rest) {
                check(s);
            }
        }
    }
});

fn check(pem: &str) {
    if let Ok(csr) = check_csr(pem) {
        // What the CA will put in the certificate is a valid ID.
        let id = csr.identity.to_string();
        assert_eq!(id.parse::<SpiffeId>().as_ref(), Ok(&csr.identity));
    }
}
