fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ndc_descriptor.bin"))
        .compile_protos(
            &[
                "ndc/v1/subscription.proto",
                "ndc/v1/pipelines.proto",
                "ndc/v1/access.proto",
                "ndc/v1/audit.proto",
                "ndc/state/v1/state.proto",
                "ndc/cluster/v1/cluster.proto",
            ],
            &["."],
        )?;
    Ok(())
}
