//! `ktls-setup`: probe and prepare a host for kernel TLS offload.
//!
//! - `ktls-setup probe [--json]`: what this kernel supports, tried for real;
//!   exit 0 if the gateway can offload, 1 if not (with the reasons).
//! - `ktls-setup enable [--dry-run]`: `modprobe tls`, verify, and load it at
//!   boot (`/etc/modules-load.d/tls.conf`).
//! - `ktls-setup selftest [--quick]`: rustls handshakes on loopback,
//!   offloaded to the kernel, then data, close_notify, tickets and
//!   KeyUpdate through it; exit 0 only if every case passed.

mod enable;
mod selftest;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ktls-setup",
    version,
    about = "Probe and prepare this host for kernel TLS (kTLS) offload"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Report what kernel TLS this host supports (exit 0: the gateway can offload; 1: it cannot)
    Probe {
        /// Machine-readable output (schema: see the `probe` module docs / README)
        #[arg(long)]
        json: bool,
    },
    /// Load the tls module now (modprobe) and at boot (/etc/modules-load.d/tls.conf)
    Enable {
        /// Print what would be done, change nothing
        #[arg(long)]
        dry_run: bool,
        /// The modules-load file to write
        #[arg(long, default_value = enable::MODULES_LOAD_FILE, hide = true)]
        modules_load_file: PathBuf,
    },
    /// End-to-end test: rustls + kTLS on loopback (exit 0 only if every case passed)
    Selftest {
        /// Smaller transfers (up to 64 KiB instead of 4 MiB)
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Probe { json } => {
            let report = ktls_setup::probe();
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("ktls-setup: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{}", report.to_text());
            }
            if report.can_offload {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Cmd::Enable {
            dry_run,
            modules_load_file,
        } => match enable::run(dry_run, &modules_load_file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ktls-setup enable: {e:#}");
                ExitCode::from(1)
            }
        },
        Cmd::Selftest { quick } => {
            let t0 = Instant::now();
            match selftest::run(quick) {
                Ok((passed, failed)) => {
                    println!(
                        "selftest: {passed} passed, {failed} failed ({:.1} s)",
                        t0.elapsed().as_secs_f64()
                    );
                    if failed == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("ktls-setup selftest: {e:#}");
                    println!("selftest: 0 passed, 1 failed");
                    ExitCode::from(1)
                }
            }
        }
    }
}
