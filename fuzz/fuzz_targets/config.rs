//! Config text → documents → validation → compilation, as `xds validate`
//! and the control plane's directory watch run it. Any input must give
//! resources or `file:line` errors, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The loader reads files as UTF-8; anything else is refused before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match bulwark_xds::compile_str(Path::new("fuzz.yaml"), text) {
        Ok(resources) => {
            let _ = bulwark_xds::document_counts(&resources);
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a failure carries at least one error");
            let _ = errors.to_string();
        }
    }
});
