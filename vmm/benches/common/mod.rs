//! The fixture shared by the accessor bench and the `access_cost` callgrind example: 256 MiB
//! of guest RAM with 4 MiB reserved and 256 one-page holes spread over the managed range (256
//! range-map runs on each side of the lookup), and the decoder's input for one emulation
//! failure (`fxsave [rbx]` on a hole).

use allocator::Stage2;
use kvm_bindings::{kvm_regs, kvm_sregs};
use vmm::memory::{GuestRam, MemSize};
use vmm::stage2::{ModelSlots, Stage2Engine};

/// RAM size.
pub const RAM: u64 = 256 << 20;
/// A mapped GPA with no hole in its page or the next.
pub const MAPPED_GPA: u64 = 0x80_1000;
/// `fxsave [rbx]`.
pub const FXSAVE: &[u8] = &[0x0f, 0xae, 0x03];

/// RAM and a stage-2 engine (model memslots) with 256 holes.
pub fn fixture() -> (GuestRam, Stage2Engine<ModelSlots>) {
    let ram = GuestRam::new(MemSize(RAM)).unwrap();
    let mut e = Stage2Engine::new(ModelSlots::new(1024), RAM, 4 << 20).unwrap();
    for i in 0..256u64 {
        e.unmap((8 << 20 >> 12) + i * 231, 1).unwrap();
    }
    (ram, e)
}

/// Registers for [`FXSAVE`]: rbx points at the first hole.
pub fn fxsave_regs() -> (kvm_regs, kvm_sregs) {
    let r = kvm_regs {
        rip: 0x20_0000,
        rbx: 8 << 20,
        ..Default::default()
    };
    (r, kvm_sregs::default())
}
