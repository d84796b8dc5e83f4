//! `minivmm agent`: talk to a running VM's guest agent over its hybrid-vsock
//! socket, one RPC per invocation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent_protocol::{
    AgentClient, CheckRequest, GetGuestTimeRequest, GuestDetailsRequest, ReadRandomRequest,
    ReseedRandomDevRequest, TouchMemoryRequest, AGENT_VSOCK_PORT,
};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct AgentArgs {
    /// The VM's hybrid-vsock unix socket (as given to `minivmm run --vsock`).
    #[arg(long)]
    vsock: PathBuf,
    /// Deadline for connecting and for the call, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    call: AgentCall,
}

#[derive(Subcommand)]
enum AgentCall {
    /// Health check.
    Check,
    /// Agent version, online vCPUs, memory, boot time, PVM or not.
    Details,
    /// N bytes from the guest's RNG (hex).
    Rng {
        /// Number of bytes.
        n: u32,
    },
    /// Feed N bytes of host entropy to the guest RNG.
    Reseed {
        /// Number of bytes.
        #[arg(default_value_t = 64)]
        n: usize,
    },
    /// The guest's wall clock and monotonic time.
    Time,
    /// Set the guest's wall clock from the host's.
    SetTime,
    /// Write PAGES pages of guest RAM with a pattern; prints their checksum.
    Touch {
        /// Number of 4 KiB pages.
        pages: u64,
        /// Byte pattern.
        #[arg(long, default_value_t = 0x5a)]
        pattern: u32,
    },
}

pub fn run(args: AgentArgs) -> Result<ExitCode> {
    let deadline = Duration::from_millis(args.timeout_ms);
    let mut client = AgentClient::connect_hybrid_vsock(&args.vsock, AGENT_VSOCK_PORT, deadline)?;
    let out: serde_json::Value = match args.call {
        AgentCall::Check => {
            let r = client.check(&CheckRequest::default(), deadline)?;
            serde_json::json!({"status": r.status().as_str_name(), "protocol_version": r.protocol_version})
        }
        AgentCall::Details => {
            let r = client.get_guest_details(&GuestDetailsRequest::default(), deadline)?;
            serde_json::json!({
                "agent_version": r.agent_version, "protocol_version": r.protocol_version,
                "online_vcpus": r.online_vcpus, "memory_bytes": r.memory_bytes,
                "boot_time_ns": r.boot_time_ns, "pvm": r.pvm, "kernel": r.kernel,
            })
        }
        AgentCall::Rng { n } => {
            let r = client.read_random(&ReadRandomRequest { n }, deadline)?;
            serde_json::json!({"bytes": hex(&r.data)})
        }
        AgentCall::Reseed { n } => {
            let mut data = vec![0u8; n];
            factory::clone::host_entropy(&mut data).context("getrandom")?;
            client.reseed_random_dev(&ReseedRandomDevRequest { data }, deadline)?;
            serde_json::json!({"reseeded_bytes": n})
        }
        AgentCall::Time => {
            let r = client.get_guest_time(&GetGuestTimeRequest::default(), deadline)?;
            serde_json::json!({"sec": r.sec, "usec": r.usec, "monotonic_ns": r.monotonic_ns})
        }
        AgentCall::SetTime => {
            let now = factory::clone::host_wall_clock();
            client.set_guest_date_time(&now, deadline)?;
            serde_json::json!({"sec": now.sec, "usec": now.usec})
        }
        AgentCall::Touch { pages, pattern } => {
            let r = client.touch_memory(&TouchMemoryRequest { pages, pattern }, deadline)?;
            serde_json::json!({"pages": r.pages, "checksum": format!("{:#018x}", r.checksum)})
        }
    };
    if args.json {
        println!("{out}");
    } else if let serde_json::Value::Object(map) = out {
        for (k, v) in map {
            println!(
                "{k}: {}",
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
