//! `cargo xtask <command>`: skiff's project tasks.
//!
//! One file per subcommand. To add one (e.g. `up`, `down`, `bench`): create
//! `src/<name>.rs` with an `Args` struct (`clap::Args`) and a `run(&Args) -> Result<()>`,
//! declare the module below and add a variant to [`Command`] plus its arm in `main`.

mod bench;
mod build_ebpf;
mod down;
mod images;
mod setup;
mod test;
mod up;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "skiff project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install everything the project needs (idempotent; a second run changes nothing).
    Setup(setup::Args),
    /// Build the eBPF programs (ebpf/programs) with nightly and bpf-linker.
    BuildEbpf(build_ebpf::Args),
    /// setup, build-ebpf, fmt --check, clippy -D warnings, then cargo test.
    Test(test::Args),
    /// The main job: set up, start the control plane in the background, apply the sample workload.
    Up(up::Args),
    /// Stop what `up` started (by pid) and remove its state.
    Down(down::Args),
    /// Build the sample images (skiff/echo, skiff/busybox) and push them to the local
    /// registry on 10.90.0.1:5000 (the test bridge's host address; started if not running).
    Images(images::Args),
    /// Benchmarks: `cargo xtask bench api`.
    Bench {
        /// Which benchmark, then its own arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print the path of the newest kubectl installed by `setup` (from PyPI).
    KubectlLatest,
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Setup(args) => setup::run(args),
        Command::BuildEbpf(args) => build_ebpf::run(args).map(|_| ()),
        Command::Test(args) => test::run(args),
        Command::Up(args) => up::run(args),
        Command::Down(args) => down::run(args),
        Command::Images(args) => images::run(args),
        Command::Bench { args } => bench::run(args),
        Command::KubectlLatest => setup::kubectl_latest_path().map(|p| println!("{}", p.display())),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
