//! The fixture shared by the accessor bench and the `access_cost` callgrind example: 256 MiB
//! of guest RAM with 4 MiB reserved and 256 one-page holes spread over the managed range (256
//! range-map runs on each side of the lookup), and the decoder's input for one emulation
//! failure (`fxsave [rbx]` on a hole).

use allocator::Stage2;
use kvm_bindings::{kvm_regs, kvm_sregs};
use vmm::addr::Gpa;
use vmm::decode::CpuState;
use vmm::guest_view::GuestView;
use vmm::memory::{GuestRam, MemSize};
use vmm::stage2::{ModelSlots, Slots, Stage2Engine};

/// RAM size.
pub const RAM: u64 = 256 << 20;
/// A mapped GPA with no hole in its page or the next.
pub const MAPPED_GPA: u64 = 0x80_1000;
/// `fxsave [rbx]`.
pub const FXSAVE: &[u8] = &[0x0f, 0xae, 0x03];

/// RAM, a stage-2 engine (model memslots) with 256 holes, and registers for [`FXSAVE`]
/// (rbx points at the first hole).
pub struct Fixture {
    /// Guest RAM.
    pub ram: GuestRam,
    /// The engine whose range map the view consults.
    pub engine: Stage2Engine<Slots<ModelSlots>>,
    regs: kvm_regs,
    sregs: kvm_sregs,
}

impl Fixture {
    /// Builds the fixture.
    pub fn new() -> Fixture {
        let ram = GuestRam::new(MemSize(RAM)).unwrap();
        let mut engine =
            Stage2Engine::new(Slots::new(ModelSlots::new(1024), RAM), RAM, Gpa(4 << 20)).unwrap();
        for i in 0..256u64 {
            engine.unmap((8 << 20 >> 12) + i * 231, 1).unwrap();
        }
        let regs = kvm_regs {
            rip: 0x20_0000,
            rbx: 8 << 20,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.l = 1; // 64-bit code
        Fixture {
            ram,
            engine,
            regs,
            sregs,
        }
    }

    /// The checked view.
    pub fn view(&self) -> GuestView<'_> {
        GuestView::new(&self.ram, &self.engine)
    }

    /// The registers for [`FXSAVE`].
    pub fn cpu(&self) -> CpuState<'_> {
        CpuState {
            regs: &self.regs,
            sregs: &self.sregs,
        }
    }
}
