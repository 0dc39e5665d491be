//! The UniFFI bindings generator, built from the same `uniffi` version as
//! the library (the generated code and the library's scaffolding must
//! match). Behind the `cli` feature: `bindings/generate.sh` runs it.

fn main() {
    uniffi::uniffi_bindgen_main();
}
