//! The guest command line: space-separated tokens, unknown ones ignored.
//!
//! Tokens the test guest reads:
//! - `action=<what>`: see [`Action`]; the last one wins.
//! - `cpus=<n>`: how many vCPUs the VMM started (default 1); the guest waits
//!   for that many to report in before it says ready.
//! - `virtio_mmio.device=<size>@<addr>:<irq>`: a virtio-mmio device (Linux
//!   syntax); the kernel routes its IOAPIC pin and hands it to the agent.
//! - `lapic_bus_hz=<n>`: LAPIC timer input rate if not KVM's 1 GHz.
//!
//! The agent reads its own tokens (`vsock_connect=`) from the same text.

#![cfg_attr(test, allow(dead_code))]

/// The most vCPUs the guest has per-CPU areas for (see `percpu`).
pub const MAX_CPUS: u32 = 64;

/// The most virtio-mmio devices the guest records.
pub const MAX_VIRTIO_MMIO: usize = testguest_abi::MAX_DEVICES;

/// What the guest does once it is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// No `action=`: the agent serves (or, without devices, idles) forever.
    Idle,
    /// `action=reset`: reset the VM through the i8042.
    Reset,
    /// `action=count`: print `count <n>` lines forever.
    Count,
    /// `action=touch:<pages>:<byte>`: fill pages from 16 MiB up, then reset.
    Touch { pages: u64, byte: u8 },
    /// `action=ticks:<n>`: idle until n timer ticks have passed, then reset.
    Ticks(u64),
    /// `action=cpus`: print how many vCPUs reported in, then reset.
    Cpus,
    /// `action=fault`: execute UD2, to test the fault report (then reset).
    Fault,
    /// `action=panic`: panic, to test the panic report (then reset).
    Panic,
    /// An `action=` value the guest does not understand (reported, then reset).
    Invalid(&'a str),
}

/// A `virtio_mmio.device=` token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub size: u64,
    pub addr: u64,
    pub irq: u32,
}

/// Everything the guest takes from its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmdline<'a> {
    pub action: Action<'a>,
    pub cpus: u32,
    pub virtio_mmio: [Option<VirtioMmioDevice>; MAX_VIRTIO_MMIO],
    pub lapic_bus_hz: Option<u64>,
}

impl<'a> Cmdline<'a> {
    /// Parses a command line. Never fails: bad values become defaults or
    /// `Action::Invalid`.
    pub fn parse(text: &'a str) -> Self {
        let mut out = Cmdline {
            action: Action::Idle,
            cpus: 1,
            virtio_mmio: [None; MAX_VIRTIO_MMIO],
            lapic_bus_hz: None,
        };
        let mut nvirtio = 0;
        for (key, value) in KeyValues::new(text) {
            match key {
                "action" => out.action = parse_action(value),
                "cpus" => {
                    out.cpus = match parse_u64(value) {
                        Some(n) if n >= 1 => n.min(u64::from(MAX_CPUS)) as u32,
                        _ => 1,
                    }
                }
                "lapic_bus_hz" => out.lapic_bus_hz = parse_u64(value).filter(|&hz| hz > 0),
                "virtio_mmio.device" => {
                    if let Some(dev) = parse_virtio_mmio(value) {
                        if nvirtio < MAX_VIRTIO_MMIO {
                            out.virtio_mmio[nvirtio] = Some(dev);
                            nvirtio += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }
}

/// The `key=value` tokens of a command line, in one pass over its bytes
/// (tokens without `=` are skipped). Hand-rolled rather than
/// `split_ascii_whitespace` + `split_once`: the guest may run under an
/// instruction emulator, where every instruction per byte costs.
struct KeyValues<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> KeyValues<'a> {
    fn new(text: &'a str) -> Self {
        KeyValues { text, pos: 0 }
    }
}

impl<'a> Iterator for KeyValues<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = self.text.as_bytes();
        loop {
            while self.pos < bytes.len() && bytes[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if self.pos >= bytes.len() {
                return None;
            }
            let start = self.pos;
            let mut eq = None;
            while self.pos < bytes.len() && !bytes[self.pos].is_ascii_whitespace() {
                if bytes[self.pos] == b'=' && eq.is_none() {
                    eq = Some(self.pos);
                }
                self.pos += 1;
            }
            if let Some(eq) = eq {
                // Both ends are at ASCII bytes, so these are char boundaries.
                return Some((&self.text[start..eq], &self.text[eq + 1..self.pos]));
            }
        }
    }
}

/// Splits at the first `sep` (a byte loop: cheaper than the generic `str`
/// searchers for these few-byte strings).
fn split_at_byte(s: &str, sep: u8) -> Option<(&str, &str)> {
    let i = s.bytes().position(|b| b == sep)?;
    // `sep` is ASCII, so both sides are on char boundaries.
    Some((&s[..i], &s[i + 1..]))
}

fn parse_action(v: &str) -> Action<'_> {
    let (name, args) = match split_at_byte(v, b':') {
        Some((name, args)) => (name, Some(args)),
        None => (v, None),
    };
    let parsed = match (name, args) {
        ("reset", None) => Some(Action::Reset),
        ("count", None) => Some(Action::Count),
        ("cpus", None) => Some(Action::Cpus),
        ("fault", None) => Some(Action::Fault),
        ("panic", None) => Some(Action::Panic),
        ("ticks", Some(n)) => parse_u64(n).map(Action::Ticks),
        ("touch", Some(args)) => split_at_byte(args, b':').and_then(|(pages, byte)| {
            match (parse_u64(pages), parse_u64(byte)) {
                (Some(pages), Some(byte)) if byte <= 0xff => Some(Action::Touch {
                    pages,
                    byte: byte as u8,
                }),
                _ => None,
            }
        }),
        _ => None,
    };
    parsed.unwrap_or(Action::Invalid(v))
}

/// A decimal or `0x` hexadecimal number without overflow.
pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// A size with an optional K/M/G suffix (powers of 1024), as Linux's memparse.
fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(num)?.checked_mul(1u64 << shift)
}

fn parse_virtio_mmio(v: &str) -> Option<VirtioMmioDevice> {
    let (size, rest) = split_at_byte(v, b'@')?;
    let (addr, irq) = split_at_byte(rest, b':')?;
    // Linux allows a trailing ":<id>" after the irq.
    let irq = split_at_byte(irq, b':').map_or(irq, |(irq, _id)| irq);
    let irq = parse_u64(irq)?;
    Some(VirtioMmioDevice {
        size: parse_size(size)?,
        addr: parse_u64(addr)?,
        irq: u32::try_from(irq).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_tokens() {
        let c = Cmdline::parse("");
        assert_eq!(c.action, Action::Idle);
        assert_eq!(c.cpus, 1);
        assert!(c.virtio_mmio.iter().all(Option::is_none));
        assert_eq!(c.lapic_bus_hz, None);
        assert_eq!(
            Cmdline::parse("lapic_bus_hz=25000000").lapic_bus_hz,
            Some(25_000_000)
        );
        assert_eq!(Cmdline::parse("lapic_bus_hz=0").lapic_bus_hz, None);
    }

    #[test]
    fn actions() {
        assert_eq!(
            Cmdline::parse("console=ttyS0 action=reset").action,
            Action::Reset
        );
        assert_eq!(Cmdline::parse("action=count").action, Action::Count);
        assert_eq!(Cmdline::parse("action=cpus").action, Action::Cpus);
        assert_eq!(Cmdline::parse("action=fault").action, Action::Fault);
        assert_eq!(Cmdline::parse("action=panic").action, Action::Panic);
        assert_eq!(
            Cmdline::parse("action=ticks:100").action,
            Action::Ticks(100)
        );
        assert_eq!(
            Cmdline::parse("action=ticks:0x10").action,
            Action::Ticks(16)
        );
        assert_eq!(
            Cmdline::parse("action=touch:16:0xab").action,
            Action::Touch {
                pages: 16,
                byte: 0xab
            }
        );
        assert_eq!(
            Cmdline::parse("action=touch:0x10:171").action,
            Action::Touch {
                pages: 16,
                byte: 0xab
            }
        );
        assert_eq!(
            Cmdline::parse("action=reset action=count").action,
            Action::Count
        );
        assert_eq!(
            Cmdline::parse("action noaction=reset xaction=count").action,
            Action::Idle
        );
    }

    #[test]
    fn bad_actions_are_reported() {
        assert_eq!(
            Cmdline::parse("action=touch:16:0x100").action,
            Action::Invalid("touch:16:0x100")
        );
        assert_eq!(
            Cmdline::parse("action=touch:16").action,
            Action::Invalid("touch:16")
        );
        assert_eq!(
            Cmdline::parse("action=ticks:x").action,
            Action::Invalid("ticks:x")
        );
        assert_eq!(
            Cmdline::parse("action=ticks:1:2").action,
            Action::Invalid("ticks:1:2")
        );
        assert_eq!(Cmdline::parse("action=").action, Action::Invalid(""));
        assert_eq!(
            Cmdline::parse("action=dance").action,
            Action::Invalid("dance")
        );
    }

    #[test]
    fn cpus_token() {
        assert_eq!(Cmdline::parse("cpus=2").cpus, 2);
        assert_eq!(Cmdline::parse("cpus=0").cpus, 1);
        assert_eq!(Cmdline::parse("cpus=junk").cpus, 1);
        assert_eq!(Cmdline::parse("cpus=100000").cpus, MAX_CPUS);
    }

    #[test]
    fn virtio_devices() {
        let c = Cmdline::parse(
            "virtio_mmio.device=4K@0xd0000000:5 foo virtio_mmio.device=0x200@0xd0001000:6:1 virtio_mmio.device=bad",
        );
        assert_eq!(
            c.virtio_mmio[0],
            Some(VirtioMmioDevice {
                size: 4096,
                addr: 0xd000_0000,
                irq: 5
            })
        );
        assert_eq!(
            c.virtio_mmio[1],
            Some(VirtioMmioDevice {
                size: 0x200,
                addr: 0xd000_1000,
                irq: 6
            })
        );
        assert_eq!(c.virtio_mmio[2], None);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64("0xffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("0xffffffffffffffffG"), None);
    }
}
