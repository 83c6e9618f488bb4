//! Enrollment and renewal requests as the broker reads them before it
//! spends a token: the JSON body, the base64 CSR inside it, and the CSR's
//! checks (PKCS#10 structure, signature, ECDSA P-256 key, extensions).
//!
//! Input: the first byte picks the layer (JSON body, or a DER CSR
//! directly, which reaches the X.509 parsers far faster). Property: no
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::api::{EnrollRequest, RenewRequest};

fn check(csr_base64: &str) {
    if let Ok(der) = data_encoding::BASE64.decode(csr_base64.trim().as_bytes()) {
        let _ = tether_pki::ca::check_csr(&der);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(request) = serde_json::from_slice::<EnrollRequest>(body) {
                check(&request.csr);
            }
        }
        1 => {
            if let Ok(request) = serde_json::from_slice::<RenewRequest>(body) {
                check(&request.csr);
            }
        }
        _ => {
            let _ = tether_pki::ca::check_csr(body);
        }
    }
});
