//! Builds the Linux guest image from Debian's real kernel package (fetched
//! with `apt-get download` into the default cache on first use, reused
//! after) twice, and checks the result is complete and byte-identical.

use std::io::Read;

use linux_image::deb::default_cache_dir;
use linux_image::guest::{build_guest_image, GuestImageOptions, GUEST_MODULES, LINUX_AGENT};

#[test]
fn guest_image_is_complete_and_deterministic() {
    let base = std::env::temp_dir().join(format!("linux-image-guest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let build = |name: &str| {
        let opts = GuestImageOptions {
            out: base.join(name),
            kernel_deb: None,
            cache: default_cache_dir(),
        };
        build_guest_image(&opts, &mut |line| eprintln!("{line}"))
            .unwrap_or_else(|e| panic!("building the Linux guest image: {e}"))
    };
    let first = build("a");
    let second = build("b");

    for name in ["vmlinuz", "initramfs.img"] {
        let a = std::fs::read(base.join("a").join(name)).unwrap();
        let b = std::fs::read(base.join("b").join(name)).unwrap();
        assert!(
            a == b,
            "{name} differs between two builds of the same inputs"
        );
    }
    assert_eq!(first.modules, second.modules);
    for m in GUEST_MODULES {
        assert!(
            first.modules.iter().any(|n| n == m),
            "{m} missing: {:?}",
            first.modules
        );
    }
    // Dependencies come before the modules needing them.
    let pos = |m: &str| first.modules.iter().position(|n| n == m).unwrap();
    assert!(pos("vsock") < pos("vmw_vsock_virtio_transport"));
    assert!(pos("fuse") < pos("virtiofs"));

    let vmlinuz = std::fs::read(&first.vmlinuz).unwrap();
    assert_eq!(&vmlinuz[0x202..0x206], b"HdrS", "a bzImage");

    let gz = std::fs::read(&first.initramfs).unwrap();
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut cpio)
        .unwrap();
    let contains = |needle: &[u8]| cpio.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"init\0"));
    assert!(contains(&LINUX_AGENT[..4096]), "the agent is in the image");
    let list = format!("/lib/modules/{}/kernel/", first.release);
    assert!(contains(list.as_bytes()), "module list with {list}");
    std::fs::remove_dir_all(&base).unwrap();
}
