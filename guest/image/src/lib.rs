//! The minivmm test guest as bytes: the default kernel of `minivmm run` and
//! the guest every VM test and benchmark boots. Built by this crate's build.rs
//! from `guest/testguest`.

/// The test guest ELF image.
pub static TESTGUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// Name under which the embedded guest appears in messages and manifests.
pub const TESTGUEST_NAME: &str = "builtin:testguest";

/// The line the test guest prints once it is initialised.
pub const READY_LINE: &str = "minivmm-testguest ready";

#[cfg(test)]
mod tests {
    #[test]
    fn image_is_an_elf_with_the_direct_ap_note() {
        assert_eq!(&super::TESTGUEST_ELF[..4], b"\x7fELF");
    }
}
