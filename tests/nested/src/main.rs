//! `nested`: build the outer VM and run checks in it.
//!
//! ```sh
//! cargo run -p nested -- run                 # every check
//! cargo run -p nested -- run svm-info e2e-vm # some
//! cargo run -p nested -- list
//! ```

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nested",
    about = "minivmm's nested test bed (outer VM under QEMU TCG with SVM)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the outer VM, run CHECKs in it (default: all) and report.
    Run {
        /// Checks to run (names of tests/nested/checks/*.sh).
        checks: Vec<String>,
        /// Seconds the outer VM may run before it is killed.
        #[arg(long, default_value_t = nested::DEFAULT_DEADLINE.as_secs())]
        deadline: u64,
        /// Seconds one check may run inside.
        #[arg(long, default_value_t = nested::DEFAULT_CHECK_TIMEOUT.as_secs())]
        check_timeout: u64,
        /// Outer VM boots at most: when the outer kernel locks up (a fault of
        /// the emulation below minivmm), a fresh outer VM runs the checks
        /// left, the one it hung in included.
        #[arg(long, default_value_t = nested::DEFAULT_ATTEMPTS)]
        attempts: u32,
        /// vCPUs of the outer VM.
        #[arg(long, default_value_t = nested::DEFAULT_OUTER_CPUS)]
        outer_cpus: u32,
    },
    /// List the checks.
    List,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nested: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    match Cli::parse().command {
        Cmd::List => {
            for c in nested::available_checks()? {
                println!("{c}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            checks,
            deadline,
            check_timeout,
            attempts,
            outer_cpus,
        } => {
            let mut opts = nested::Options::new(checks);
            opts.deadline = Duration::from_secs(deadline);
            opts.check_timeout = Duration::from_secs(check_timeout);
            opts.attempts = attempts;
            opts.outer_cpus = outer_cpus;
            let report = nested::run(opts)?;
            for c in &report.checks {
                println!(
                    "{} {} (status {})",
                    if c.passed() { "PASS" } else { "FAIL" },
                    c.name,
                    c.status
                );
                if !c.passed() {
                    for line in c.output.lines() {
                        println!("    {line}");
                    }
                }
            }
            for r in &report.retried {
                println!("retried: {r}");
            }
            println!(
                "nested suite: build {:.0} s, outer VM {:.0} s",
                report.build.as_secs_f64(),
                report.run.as_secs_f64()
            );
            Ok(if report.all_passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
