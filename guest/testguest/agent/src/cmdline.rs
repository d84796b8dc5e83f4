//! The agent's tokens on the kernel command line (the kernel reads its own):
//! `vsock_connect=<port>` (up to `MAX_VSOCK_CONNECT`): once ready, connect to
//! the host (CID 2) on that port and say hello.

use alloc::vec::Vec;

/// The most `vsock_connect=` ports honoured.
pub const MAX_VSOCK_CONNECT: usize = 4;

/// The `vsock_connect=` ports, in command line order (bad values skipped).
pub fn vsock_connect_ports(cmdline: &str) -> Vec<u32> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|token| token.strip_prefix("vsock_connect="))
        .filter_map(parse_u32)
        .filter(|&port| port != 0)
        .take(MAX_VSOCK_CONNECT)
        .collect()
}

/// A decimal or `0x` hexadecimal u32.
fn parse_u32(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(
            vsock_connect_ports(
                "a=b vsock_connect=5000 vsock_connect=0 vsock_connect=x vsock_connect=0x10"
            ),
            [5000, 16]
        );
        assert_eq!(
            vsock_connect_ports(
                "vsock_connect=1 vsock_connect=2 vsock_connect=3 vsock_connect=4 vsock_connect=5"
            ),
            [1, 2, 3, 4]
        );
        assert!(vsock_connect_ports("vsock_connect=4294967296 xvsock_connect=3").is_empty());
    }
}
