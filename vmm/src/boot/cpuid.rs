//! Per-vCPU CPUID: what KVM supports, patched with the vCPU's APIC id and the
//! topology of the VM (one socket, one thread per core).

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID.1:ECX bit 21, x2APIC.
const CPUID1_ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX bit 31, running under a hypervisor.
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28, HTT (logical processor count field valid).
const CPUID1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xb / 0x1f level types (SDM Vol. 2A, CPUID leaf 0BH).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Patch `entries` (from KVM_GET_SUPPORTED_CPUID) for vCPU `id` of `count`.
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], id: u32, count: u32) {
    let core_bits = bits_for(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors.
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count.min(255)) << 16);
                e.ecx |= CPUID1_ECX_X2APIC | CPUID1_ECX_HYPERVISOR;
                e.edx |= CPUID1_EDX_HTT;
            }
            4 => {
                // EAX[31:26] cores per package - 1; EAX[25:14] sharing threads - 1.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 {
                    count.max(1) - 1
                } else {
                    0
                };
                e.eax = (e.eax & 0x3fff) | ((count.max(1) - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                // EDX: x2APIC id; EAX: shift to the next level; EBX: items at this level.
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = LEVEL_TYPE_SMT << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_0000 | 0x0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology() {
        let mut v = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(4, 0),
        ];
        v[4].eax = 3 << 5; // an L3 cache
        patch_cpuid(&mut v, 3, 4);
        assert_eq!(v[0].ebx >> 24, 3);
        assert_eq!((v[0].ebx >> 16) & 0xff, 4);
        assert_eq!(v[0].ebx & 0xffff, 0x0800);
        assert_ne!(v[0].ecx & CPUID1_ECX_X2APIC, 0);
        assert_ne!(v[0].ecx & CPUID1_ECX_HYPERVISOR, 0);
        assert_eq!((v[1].edx, v[1].ebx, v[1].ecx >> 8), (3, 1, LEVEL_TYPE_SMT));
        assert_eq!((v[2].eax, v[2].ebx, v[2].ecx >> 8), (2, 4, LEVEL_TYPE_CORE));
        assert_eq!(v[3].ecx & 0xff00, 0);
        assert_eq!(v[4].eax >> 26, 3);
        assert_eq!((v[4].eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn single_vcpu_needs_no_core_bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(8), 3);
    }
}
