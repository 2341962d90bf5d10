//! Generates the ONNX protobuf types from the vendored `proto/onnx.proto` with the pure-Rust
//! `protox` compiler, so the build needs no system `protoc` and downloads nothing.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["proto/onnx.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    // Zero-copy decode of large initializers.
    config.bytes([".onnx.TensorProto.raw_data"]);
    config.compile_fds(descriptors)?;
    Ok(())
}
