//! `veil replay` without the VMM: `cargo run -p replay --release --example replay -- TRACE [options]`.
//! (`--kvm` needs the `veil` binary.)

use clap::Parser;

/// Replay a Linux page-allocation trace through direct-map policies (model only).
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: replay::cli::ReplayArgs,
}

fn main() {
    let cli = Cli::parse();
    match replay::cli::run(&cli.args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
