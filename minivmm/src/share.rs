//! `--share DIR[,tag=T]`: parsing, and one virtiofsd per share whose
//! unexpected exit stops the VM with a message naming the daemon.

use std::path::PathBuf;
use std::sync::mpsc;

use anyhow::{bail, Result};
use devices::virtio::fs::daemon::{Virtiofsd, VirtiofsdConfig};

/// The tag of a share given without one.
pub const DEFAULT_TAG: &str = "share";

/// One `--share` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareArg {
    /// The host directory.
    pub dir: PathBuf,
    /// The tag the guest finds it by.
    pub tag: String,
}

/// Parse `DIR[,tag=T]`.
pub fn parse_share(s: &str) -> Result<ShareArg, String> {
    let mut parts = s.split(',');
    let dir = parts.next().unwrap_or_default();
    if dir.is_empty() {
        return Err("the directory is missing (DIR[,tag=T])".into());
    }
    let mut tag = DEFAULT_TAG.to_string();
    for p in parts {
        match p.split_once('=') {
            Some(("tag", t)) if !t.is_empty() => tag = t.to_string(),
            _ => return Err(format!("unknown share option {p:?} (DIR[,tag=T])")),
        }
    }
    Ok(ShareArg {
        dir: PathBuf::from(dir),
        tag,
    })
}

/// The running daemons of a VM's shares; dropping them stops them.
pub struct Daemons {
    /// (tag, daemon), in the order of the shares.
    pub daemons: Vec<(String, Virtiofsd)>,
    /// One message per daemon that exited unexpectedly.
    pub exits: mpsc::Receiver<String>,
}

impl Daemons {
    /// The VM's virtio-fs devices.
    pub fn fs_config(&self) -> Vec<vmm::FsShare> {
        self.daemons
            .iter()
            .map(|(tag, d)| vmm::FsShare {
                tag: tag.clone(),
                socket: d.socket_path().to_path_buf(),
            })
            .collect()
    }
}

/// Start one virtiofsd per share (sockets in the temp directory, named
/// after `vm_id`). Duplicate tags and bad directories fail before any starts;
/// on error every daemon already started is stopped.
pub fn start_daemons(vm_id: &str, shares: &[ShareArg]) -> Result<Daemons> {
    for (i, s) in shares.iter().enumerate() {
        if shares[..i].iter().any(|o| o.tag == s.tag) {
            bail!("share tag {:?} is given twice", s.tag);
        }
        if !s.dir.is_dir() {
            bail!("share directory {} is not a directory", s.dir.display());
        }
    }
    let (tx, exits) = mpsc::channel();
    let mut daemons = Vec::new();
    for (i, s) in shares.iter().enumerate() {
        let socket =
            std::env::temp_dir().join(format!("minivmm-{}-fs{i}.sock", std::process::id()));
        let config = VirtiofsdConfig::new(&s.dir, socket);
        let tx = tx.clone();
        let tag = s.tag.clone();
        let dir = s.dir.clone();
        let d = Virtiofsd::start(
            vm_id,
            &config,
            Box::new(move |status| {
                let _ = tx.send(format!(
                    "virtiofsd for share {tag:?} ({}) exited unexpectedly ({status})",
                    dir.display()
                ));
            }),
        )?;
        daemons.push((s.tag.clone(), d));
    }
    Ok(Daemons { daemons, exits })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_arguments() {
        assert_eq!(
            parse_share("/a/b").unwrap(),
            ShareArg {
                dir: "/a/b".into(),
                tag: "share".into()
            }
        );
        assert_eq!(parse_share("d,tag=x").unwrap().tag, "x");
        assert!(parse_share(",tag=x").is_err());
        assert!(parse_share("d,cache=never").is_err());
        assert!(parse_share("d,tag=").is_err());
    }
}
