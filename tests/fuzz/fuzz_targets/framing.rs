//! Fuzz target: message framing and every decoder that sees untrusted bytes.
//! Run: cargo fuzz run framing --fuzz-dir tests/fuzz
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pgshard::fuzz_decoders(data);
});
