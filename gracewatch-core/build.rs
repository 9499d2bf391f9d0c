//! Builds the eBPF programs from `gracewatch-ebpf` (with the nightly
//! toolchain and bpf-linker that `cargo xtask setup` installs) and embeds the
//! object in the binary.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../gracewatch-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gracewatch-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
