//! Growing a clone (issue 10): a template of 1 vCPU / 256 MiB, a clone grown
//! to 2 vCPUs / 512 MiB through vCPU hot-add and virtio-mem, with real VMs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_protocol::{GuestDetailsRequest, OnlineCpuMemRequest, TouchMemoryRequest};
use factory::{create_template, CloneOptions, CreateOptions, GuestSpec, TemplateHandle};

const CALL: Duration = Duration::from_secs(10);
const PAGE: u64 = 4096;

/// A template directory on /dev/shm, removed when dropped.
struct TemplateDir(PathBuf);

impl TemplateDir {
    fn create(name: &str, vcpus: u32, mem_mib: u64) -> Self {
        let dir = PathBuf::from(format!(
            "/dev/shm/minivmm-e2e-grow-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        create_template(
            &dir,
            &GuestSpec::testguest(vcpus, mem_mib),
            &CreateOptions::default(),
        )
        .expect("build template");
        TemplateDir(dir)
    }
}

impl Drop for TemplateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sha(path: &Path) -> String {
    snapshot::sha256_hex(&std::fs::read(path).unwrap())
}

#[test]
fn a_clone_grows_to_two_vcpus_and_512_mib_and_uses_the_added_memory() {
    let t = TemplateDir::create("2x512", 1, 256);
    let handle = TemplateHandle::open(&t.0, None).unwrap();
    let memory = handle.template().memory_path();
    let before = sha(&memory);
    let mut c = handle.clone_vm(CloneOptions::default()).unwrap();

    let d = c
        .agent
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .unwrap();
    assert_eq!(d.online_vcpus, 1);
    assert!(d.memory_bytes < 256 << 20);
    // Not grown yet: asking the guest for more than it has is refused.
    assert!(c
        .agent
        .online_cpu_mem(
            &OnlineCpuMemRequest {
                nb_cpus: 2,
                memory_bytes: 512 << 20,
            },
            CALL,
        )
        .is_err());

    let g = c.grow(2, 512).expect("grow");
    eprintln!("grow: {g:?}");
    assert_eq!(c.vm.vcpu_count(), 2);
    let d = c
        .agent
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .unwrap();
    assert_eq!(d.online_vcpus, 2);
    assert!(d.memory_bytes >= 512 << 20, "{} bytes", d.memory_bytes);
    let plugged = c.vm.plugged_memory();
    assert!(plugged >= 256 << 20, "{plugged} bytes plugged");
    let region = c.vm.hotplug_region().expect("virtio-mem region");
    assert!(region.addr() >= 4 << 30, "region at {:#x}", region.addr());

    // Touch everything the guest has: its scratch RAM, then the plugged
    // memory. The pattern must land in the virtio-mem region, up to the last
    // plugged page and not beyond.
    let r = c
        .agent
        .touch_memory(
            &TouchMemoryRequest {
                pages: 1 << 22,
                pattern: 0xc3,
            },
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        r.pages * PAGE > plugged,
        "{} pages touched, {plugged} bytes plugged",
        r.pages
    );
    let mut page = vec![0u8; PAGE as usize];
    region.read(0, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0xc3), "first plugged page");
    region.read(plugged - PAGE, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0xc3), "last plugged page");
    region.read(plugged, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0), "first unplugged page");

    // The memory is anonymous: the template file did not change.
    drop(c);
    assert_eq!(sha(&memory), before, "the template memory file changed");
}

#[test]
fn growth_beyond_the_region_is_refused_and_a_grown_vm_is_not_saved() {
    let t = TemplateDir::create("limits", 1, 128);
    let handle = TemplateHandle::open(&t.0, None).unwrap();
    let mut c = handle.clone_vm(CloneOptions::default()).unwrap();
    let region = c.vm.hotplug_region().expect("virtio-mem region");
    // More than the region, or not in whole blocks: refused, nothing asked.
    assert!(c.vm.grow_memory(region.size() + (2 << 20)).is_err());
    assert!(c.vm.grow_memory(4096).is_err());
    assert_eq!(c.vm.plugged_memory(), 0);
    // Growing to what the clone has is a no-op; it still answers.
    c.grow(1, 128).expect("no-op grow");
    assert_eq!(c.vm.vcpu_count(), 1);
    // Add one vCPU without memory: the guest counts it in.
    c.grow(2, 0).expect("grow vCPUs only");
    let d = c
        .agent
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .unwrap();
    assert_eq!(d.online_vcpus, 2);
    assert_eq!(c.vm.plugged_memory(), 0);
    // A VM with plugged memory cannot be saved (its contents are not in
    // the memory file).
    c.grow(2, 256).expect("grow memory");
    c.vm.pause().unwrap();
    assert!(matches!(c.vm.save(), Err(vmm::VmError::HotplugPlugged(_))));
    // vCPUs are added only to a running VM.
    assert!(c.vm.add_vcpus(1).is_err());
    assert_eq!(c.vm.vcpu_count(), 2);
    c.vm.resume().unwrap();
    c.grow(3, 256).expect("grow after resume");
    assert_eq!(c.vm.vcpu_count(), 3);
}
