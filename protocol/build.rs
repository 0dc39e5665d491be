//! Compiles `proto/` into Rust with the pure-Rust `protox` compiler, so a
//! build needs no system `protoc`. `bytes` fields become `bytes::Bytes`, which
//! lets decoding slice payloads out of the read buffer instead of copying.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/pingme/v1/pingme.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
