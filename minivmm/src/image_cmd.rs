//! `minivmm image linux`: build the Linux guest image (Debian kernel +
//! initramfs with the Linux agent as `/init`) with the `linux-image` crate.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use linux_image::deb::default_cache_dir;
use linux_image::guest::{build_guest_image, GuestImageOptions};

/// `minivmm image …`.
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Write DIR/vmlinuz (Debian's amd64 kernel) and DIR/initramfs.img (the
    /// modules minivmm's devices need and the Linux agent as /init).
    ///
    /// Inputs are Debian packages only: the kernel package that
    /// linux-image-amd64 depends on is fetched with `apt-get download` into
    /// the cache (reused without network afterwards), or given with
    /// --kernel-deb. The same inputs give byte-identical output.
    Linux(LinuxImageArgs),
}

/// Arguments of `minivmm image linux`.
#[derive(Args)]
pub struct LinuxImageArgs {
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Use this kernel .deb (linux-image-*-amd64) instead of resolving one.
    #[arg(long)]
    kernel_deb: Option<PathBuf>,
    /// Package cache directory [default: $XDG_CACHE_HOME/minivmm/debs or
    /// ~/.cache/minivmm/debs].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

/// Runs `minivmm image …`.
pub fn run(cmd: ImageCommand) -> Result<std::process::ExitCode> {
    match cmd {
        ImageCommand::Linux(args) => linux(args),
    }
}

fn linux(args: LinuxImageArgs) -> Result<std::process::ExitCode> {
    let opts = GuestImageOptions {
        out: args.out.clone(),
        kernel_deb: args.kernel_deb,
        cache: args.cache.unwrap_or_else(default_cache_dir),
    };
    // Nothing may be left behind on failure: remember whether OUT existed.
    let out_existed = opts.out.exists();
    let image = match build_guest_image(&opts, &mut |line| eprintln!("image: {line}")) {
        Ok(image) => image,
        Err(e) => {
            if !out_existed {
                let _ = std::fs::remove_dir_all(&opts.out);
            }
            return Err(e.into());
        }
    };
    if args.json {
        let summary = serde_json::json!({
            "kernel_deb": image.kernel_deb,
            "release": image.release,
            "vmlinuz": image.vmlinuz,
            "initramfs": image.initramfs,
            "initramfs_bytes": image.initramfs_bytes,
            "modules": image.modules,
        });
        println!("{summary}");
    } else {
        println!("{}", image.vmlinuz.display());
        println!("{}", image.initramfs.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
