//! Compiles the bus record schema (`proto/pingme/bus/v1`) with the
//! pure-Rust `protox` compiler, so a build needs no system `protoc`.
//! `bytes` fields become `bytes::Bytes`: decoding a record slices message
//! bodies and encoded frames out of the record's buffer instead of copying.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/pingme/bus/v1/records.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
