//! `minivmm agent`: talk to a running VM's guest agent over its hybrid-vsock
//! socket, one RPC per invocation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::io::{Read, Write};

use agent_protocol::{
    AgentClient, CheckRequest, ClientError, FsListRequest, FsPathRequest, FsReadRequest,
    FsWriteRequest, GetGuestTimeRequest, GuestDetailsRequest, ReadRandomRequest,
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
    /// How long to wait, in seconds, for a VM that is still starting: its
    /// socket not there yet, or its agent not listening yet (a Linux guest
    /// takes seconds to boot). 0 fails at once.
    #[arg(long, default_value_t = 120)]
    wait: u64,
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
    /// Write the file PATH of a virtio-fs share (relative to the shared
    /// directory) to stdout, byte for byte.
    FsRead {
        /// Path relative to the share's root.
        path: String,
        /// Tag of the share (default: the guest's first share).
        #[arg(long, default_value = "")]
        tag: String,
    },
    /// Make the file PATH of a virtio-fs share hold exactly stdin.
    FsWrite {
        /// Path relative to the share's root (its directory must exist).
        path: String,
        /// Tag of the share (default: the guest's first share).
        #[arg(long, default_value = "")]
        tag: String,
    },
    /// Create the directory PATH on a virtio-fs share.
    FsMkdir {
        /// Path relative to the share's root (its parent must exist).
        path: String,
        /// Tag of the share (default: the guest's first share).
        #[arg(long, default_value = "")]
        tag: String,
    },
    /// Remove the file PATH from a virtio-fs share.
    FsRm {
        /// Path relative to the share's root.
        path: String,
        /// Tag of the share (default: the guest's first share).
        #[arg(long, default_value = "")]
        tag: String,
    },
    /// List the directory PATH of a virtio-fs share, one name per line.
    FsLs {
        /// Path relative to the share's root ("." for the root).
        #[arg(default_value = ".")]
        path: String,
        /// Tag of the share (default: the guest's first share).
        #[arg(long, default_value = "")]
        tag: String,
    },
}

/// Bytes asked for per FsRead call (the agent answers at most 256 KiB).
const FS_READ_CHUNK: u32 = 256 * 1024;
/// Bytes sent per FsWrite call: the test guest's agent buffers at most 64 KiB
/// of an incomplete request.
const FS_WRITE_CHUNK: usize = 32 * 1024;

/// FsRead calls until a short answer; the whole file.
pub fn fs_read_all(
    client: &mut AgentClient,
    tag: &str,
    path: &str,
    deadline: Duration,
) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    loop {
        let r = client.fs_read(
            &FsReadRequest {
                tag: tag.into(),
                path: path.into(),
                offset: data.len() as u64,
                len: FS_READ_CHUNK,
            },
            deadline,
        )?;
        let n = r.data.len();
        data.extend_from_slice(&r.data);
        if n < FS_READ_CHUNK as usize {
            return Ok(data);
        }
    }
}

/// FsWrite calls in chunks; the file ends up holding exactly `data`.
pub fn fs_write_all(
    client: &mut AgentClient,
    tag: &str,
    path: &str,
    data: &[u8],
    deadline: Duration,
) -> Result<()> {
    let mut offset = 0usize;
    loop {
        let chunk = &data[offset..(offset + FS_WRITE_CHUNK).min(data.len())];
        let r = client.fs_write(
            &FsWriteRequest {
                tag: tag.into(),
                path: path.into(),
                offset: offset as u64,
                data: chunk.to_vec(),
            },
            deadline,
        )?;
        if r.written as usize != chunk.len() {
            anyhow::bail!(
                "{path}: the guest wrote {} of {} bytes at offset {offset}",
                r.written,
                chunk.len()
            );
        }
        offset += chunk.len();
        if offset >= data.len() {
            return Ok(());
        }
    }
}

/// Connect to the agent, retrying while the VM is still coming up (socket
/// missing or refused, handshake rejected because the guest does not listen
/// yet) until `wait` has passed; any other error is final at once.
fn connect(vsock: &std::path::Path, deadline: Duration, wait: Duration) -> Result<AgentClient> {
    let start = std::time::Instant::now();
    // Nothing to subscribe to inside the guest: poll, backing off to 200 ms.
    let mut pause = Duration::from_millis(5);
    loop {
        match AgentClient::connect_hybrid_vsock(vsock, AGENT_VSOCK_PORT, deadline) {
            Ok(c) => return Ok(c),
            Err(
                e @ (ClientError::NoVm { .. }
                | ClientError::ConnectionRefused { .. }
                | ClientError::HandshakeRejected { .. }
                | ClientError::Closed { .. }),
            ) if start.elapsed() + pause < wait => {
                tracing::debug!("agent not reachable yet: {e}");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

pub fn run(args: AgentArgs) -> Result<ExitCode> {
    let deadline = Duration::from_millis(args.timeout_ms);
    let mut client = connect(&args.vsock, deadline, Duration::from_secs(args.wait))?;
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
        AgentCall::FsRead { path, tag } => {
            let data = fs_read_all(&mut client, &tag, &path, deadline)?;
            let mut out = std::io::stdout().lock();
            out.write_all(&data).context("writing stdout")?;
            out.flush().context("writing stdout")?;
            return Ok(ExitCode::SUCCESS);
        }
        AgentCall::FsWrite { path, tag } => {
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .context("reading stdin")?;
            fs_write_all(&mut client, &tag, &path, &data, deadline)?;
            if !args.json {
                return Ok(ExitCode::SUCCESS);
            }
            serde_json::json!({"written": data.len()})
        }
        AgentCall::FsMkdir { path, tag } => {
            client.fs_mkdir(
                &FsPathRequest {
                    tag,
                    path: path.clone(),
                },
                deadline,
            )?;
            serde_json::json!({"created": path})
        }
        AgentCall::FsRm { path, tag } => {
            client.fs_unlink(
                &FsPathRequest {
                    tag,
                    path: path.clone(),
                },
                deadline,
            )?;
            serde_json::json!({"removed": path})
        }
        AgentCall::FsLs { path, tag } => {
            let r = client.fs_list(&FsListRequest { tag, path }, deadline)?;
            if !args.json {
                for name in &r.names {
                    println!("{name}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            serde_json::json!({"names": r.names})
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
