// Generates the prost/tonic code for the snapshot protocol. protoc comes from
// protoc-bin-vendored so a clean machine needs nothing installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &["proto/keyway/snapshot/v1/snapshot.proto"],
            &["proto"],
        )?;
    Ok(())
}
