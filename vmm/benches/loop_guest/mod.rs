//! The 16-bit loop guest of the stage-2 benches (`stage2_backends`, `asi_transitions`): at GPA
//! 0x1000, `mov al, [0x8000]; out 0x10, al; jmp` — ring 0, so on a nested `kvm_pvm` host its
//! load is emulated and a touch of a closed page is an ordinary MMIO exit under both backends.

use kvm_ioctls::{VcpuFd, VmFd};
use vmm::memory::GuestRam;

/// The GPA the loop loads from.
pub const TOUCHED: u64 = 0x8000;

/// Writes the loop at GPA 0x1000.
pub fn write_loop(ram: &GuestRam) {
    // mov al, [0x8000]; out 0x10, al; jmp -7
    ram.write(0x1000, &[0xa0, 0x00, 0x80, 0xe6, 0x10, 0xeb, 0xf9])
        .unwrap();
}

/// vCPU 0 in real mode with flat segments at the loop.
pub fn vcpu(vm: &VmFd) -> VcpuFd {
    let v = vm.create_vcpu(0).expect("vcpu");
    let mut s = v.get_sregs().unwrap();
    for seg in [&mut s.cs, &mut s.ds, &mut s.es, &mut s.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    v.set_sregs(&s).unwrap();
    let mut r = v.get_regs().unwrap();
    r.rip = 0x1000;
    r.rflags = 2;
    v.set_regs(&r).unwrap();
    v
}
