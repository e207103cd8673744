//! Decoding the instruction at RIP (with `iced-x86`) and computing the memory it touches, for
//! exits KVM cannot explain itself (an emulation failure names no GPA): each memory operand,
//! the implicit stack accesses and descriptor-table reads, split at page boundaries and
//! translated to GPAs by the caller's (stage-2-checked) translator.

use iced_x86::{
    Decoder, DecoderError, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::report::AccessKind;

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// Why the bytes at RIP did not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end before the instruction does (`got` bytes were readable).
    #[error("instruction truncated after {got} readable bytes")]
    Truncated {
        /// Bytes available.
        got: usize,
    },
    /// Not a valid instruction.
    #[error("invalid instruction bytes")]
    Invalid,
}

/// One page-sized piece of a memory access the instruction makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemAccess {
    /// Guest-virtual address of the piece (None: the address could not be computed, e.g. a
    /// vector-indexed gather).
    pub gva: Option<u64>,
    /// Its GPA (None: no translation).
    pub gpa: Option<u64>,
    /// Load or store (read-modify-write operands give one of each).
    pub access: AccessKind,
    /// Bytes of the piece (at most up to the end of its page).
    pub size: u32,
}

/// The vCPU state operand addresses depend on.
#[derive(Clone, Copy, Debug)]
pub struct CpuState<'a> {
    /// General registers (RIP included).
    pub regs: &'a kvm_regs,
    /// Segment and descriptor-table registers.
    pub sregs: &'a kvm_sregs,
}

/// Code size of the segment in CS: 64 (long mode), 32 or 16 (compatibility mode).
pub fn bitness(sregs: &kvm_sregs) -> u32 {
    match (sregs.cs.l, sregs.cs.db) {
        (1, _) => 64,
        (_, 1) => 32,
        _ => 16,
    }
}

/// Decodes one instruction of `bitness` (64, 32 or 16) at `rip` from `bytes`.
pub fn decode(bytes: &[u8], rip: u64, bitness: u32) -> Result<Instruction, DecodeError> {
    let mut d = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    match d.last_error() {
        DecoderError::None => Ok(insn),
        DecoderError::NoMoreBytes => Err(DecodeError::Truncated { got: bytes.len() }),
        _ => Err(DecodeError::Invalid),
    }
}

/// Value of `reg` (any width) in `cpu`; segment registers give their base as the CPU uses it
/// (in 64-bit mode 0 except FS and GS).
fn reg_value(cpu: &CpuState<'_>, insn: &Instruction, reg: Register) -> Option<u64> {
    let r = cpu.regs;
    let s = cpu.sregs;
    let long = insn.code_size() == iced_x86::CodeSize::Code64;
    let v = match reg {
        Register::ES | Register::CS | Register::SS | Register::DS if long => return Some(0),
        Register::ES => return Some(s.es.base),
        Register::CS => return Some(s.cs.base),
        Register::SS => return Some(s.ss.base),
        Register::DS => return Some(s.ds.base),
        Register::FS => return Some(s.fs.base),
        Register::GS => return Some(s.gs.base),
        Register::RIP | Register::EIP => insn.next_ip(),
        _ => match reg.full_register() {
            Register::RAX => r.rax,
            Register::RBX => r.rbx,
            Register::RCX => r.rcx,
            Register::RDX => r.rdx,
            Register::RSI => r.rsi,
            Register::RDI => r.rdi,
            Register::RBP => r.rbp,
            Register::RSP => r.rsp,
            Register::R8 => r.r8,
            Register::R9 => r.r9,
            Register::R10 => r.r10,
            Register::R11 => r.r11,
            Register::R12 => r.r12,
            Register::R13 => r.r13,
            Register::R14 => r.r14,
            Register::R15 => r.r15,
            _ => return None,
        },
    };
    // AH, BH, CH, DH are bits 8..16 of their register.
    if matches!(
        reg,
        Register::AH | Register::BH | Register::CH | Register::DH
    ) {
        return Some((v >> 8) & 0xff);
    }
    Some(match reg.size() {
        1 => v & 0xff,
        2 => v & 0xffff,
        4 => v & 0xffff_ffff,
        _ => v,
    })
}

/// The access kinds an operand access implies (read-modify-write: both).
fn kinds(a: OpAccess, mnemonic: Mnemonic) -> &'static [AccessKind] {
    match a {
        OpAccess::Read | OpAccess::CondRead => &[AccessKind::Read],
        OpAccess::Write | OpAccess::CondWrite => &[AccessKind::Write],
        OpAccess::ReadWrite | OpAccess::ReadCondWrite => &[AccessKind::Read, AccessKind::Write],
        // Cache control and prefetches name memory without loading it; on a hole they are
        // still an access to it. `lea` and hinting `nop`s compute an address only.
        OpAccess::NoMemAccess if !matches!(mnemonic, Mnemonic::Lea | Mnemonic::Nop) => {
            &[AccessKind::Read]
        }
        _ => &[],
    }
}

/// Splits `[gva, gva + size)` at page boundaries and translates each piece.
fn push_pieces(
    out: &mut Vec<MemAccess>,
    gva: Option<u64>,
    size: u64,
    access: AccessKind,
    translate: &mut dyn FnMut(u64) -> Option<u64>,
) {
    let Some(mut va) = gva else {
        out.push(MemAccess {
            gva: None,
            gpa: None,
            access,
            size: size.min(u64::from(u32::MAX)) as u32,
        });
        return;
    };
    let mut left = size.max(1);
    while left > 0 {
        let n = left.min(0x1000 - (va & 0xfff));
        out.push(MemAccess {
            gva: Some(va),
            gpa: translate(va),
            access,
            size: n as u32,
        });
        left -= n;
        va = va.wrapping_add(n);
    }
}

/// The selector a `lar`/`lsl`/`verr`/`verw`/`ltr`/`lldt` examines or a `mov sreg, reg` loads
/// (its descriptor is read from the GDT or LDT), if it is in a register. A null selector
/// reads no descriptor.
fn selector_operand(cpu: &CpuState<'_>, insn: &Instruction) -> Option<u16> {
    let op = match insn.mnemonic() {
        Mnemonic::Lar | Mnemonic::Lsl => 1,
        Mnemonic::Verr | Mnemonic::Verw | Mnemonic::Ltr | Mnemonic::Lldt => 0,
        Mnemonic::Mov
            if insn.op0_kind() == OpKind::Register && insn.op0_register().is_segment_register() =>
        {
            1
        }
        _ => return None,
    };
    match insn.op_kind(op) {
        OpKind::Register => reg_value(cpu, insn, insn.op_register(op)).map(|v| v as u16),
        _ => None,
    }
}

/// Every memory access `insn` makes, as page pieces with GPAs from `translate` (guest-virtual
/// to guest-physical; None = no translation). Operand accesses come from iced-x86's
/// instruction info (which includes implicit stack pushes and pops); `lar`, `lsl`, `verr` and
/// `verw` with a register selector add the 8-byte descriptor read from the GDT or LDT.
pub fn accesses(
    insn: &Instruction,
    cpu: &CpuState<'_>,
    translate: &mut dyn FnMut(u64) -> Option<u64>,
) -> Vec<MemAccess> {
    let mut factory = InstructionInfoFactory::new();
    let info = factory.info(insn);
    let mut out = Vec::new();
    for m in info.used_memory() {
        let gva = m.virtual_address(0, |reg, _, _| reg_value(cpu, insn, reg));
        let size = m.memory_size().size() as u64;
        for &k in kinds(m.access(), insn.mnemonic()) {
            push_pieces(&mut out, gva, size, k, translate);
        }
    }
    if let Some(sel) = selector_operand(cpu, insn).filter(|s| s & !3 != 0) {
        let table = if sel & 4 != 0 {
            cpu.sregs.ldt.base
        } else {
            cpu.sregs.gdt.base
        };
        let gva = table.wrapping_add(u64::from(sel & !7));
        push_pieces(&mut out, Some(gva), 8, AccessKind::Read, translate);
    }
    out
}

/// Decodes the instruction in `bytes` (read at `cpu.regs.rip`) and returns its memory
/// accesses translated by `translate`: the reusable "what did the instruction at RIP touch".
pub fn memory_operands(
    bytes: &[u8],
    cpu: &CpuState<'_>,
    translate: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<Vec<MemAccess>, DecodeError> {
    let insn = decode(bytes, cpu.regs.rip, bitness(cpu.sregs))?;
    Ok(accesses(&insn, cpu, translate))
}

/// `insn` in Intel syntax (`lgdt [rbx]`), for reports.
pub fn format(insn: &Instruction) -> String {
    use iced_x86::Formatter;
    let mut out = String::new();
    iced_x86::IntelFormatter::new().format(insn, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identity translation below 1 GiB, nothing above.
    fn ident(gva: u64) -> Option<u64> {
        (gva < 1 << 30).then_some(gva)
    }

    fn run(bytes: &[u8], regs: kvm_regs, sregs: kvm_sregs) -> Vec<MemAccess> {
        let cpu = CpuState {
            regs: &regs,
            sregs: &sregs,
        };
        memory_operands(bytes, &cpu, &mut ident).unwrap()
    }

    fn regs(f: impl FnOnce(&mut kvm_regs)) -> kvm_regs {
        let mut r = kvm_regs {
            rip: 0x20_0000,
            rsp: 0x30_0000,
            ..Default::default()
        };
        f(&mut r);
        r
    }

    fn one(gpa: u64, access: AccessKind, size: u32) -> MemAccess {
        MemAccess {
            gva: Some(gpa),
            gpa: Some(gpa),
            access,
            size,
        }
    }

    /// Segment registers of 64-bit mode.
    fn long() -> kvm_sregs {
        let mut s = kvm_sregs::default();
        s.cs.l = 1;
        s
    }

    #[test]
    fn cmpxchg16b_reads_and_writes_16_bytes() {
        // lock cmpxchg16b [rbx]
        let r = regs(|r| r.rbx = 0x50_0000);
        let a = run(&[0xf0, 0x48, 0x0f, 0xc7, 0x0b], r, long());
        assert_eq!(
            a,
            [
                one(0x50_0000, AccessKind::Read, 16),
                one(0x50_0000, AccessKind::Write, 16)
            ]
        );
    }

    #[test]
    fn fxsave_and_fxrstor_are_512_byte_store_and_load_split_at_pages() {
        // fxsave [rax+0xf00]: 256 bytes in one page, 256 in the next.
        let r = regs(|r| r.rax = 0x50_0000);
        let a = run(&[0x0f, 0xae, 0x80, 0x00, 0x0f, 0, 0], r, long());
        assert_eq!(
            a,
            [
                one(0x50_0f00, AccessKind::Write, 256),
                one(0x50_1000, AccessKind::Write, 256)
            ]
        );
        // fxrstor [rax]
        let a = run(&[0x0f, 0xae, 0x08], r, long());
        assert_eq!(a, [one(0x50_0000, AccessKind::Read, 512)]);
    }

    #[test]
    fn popcnt_fld_movntdqa_clwb_and_sib_addressing() {
        // popcnt rax, [rsi + rcx*8 + 8]
        let r = regs(|r| {
            r.rsi = 0x40_0000;
            r.rcx = 2;
        });
        let a = run(&[0xf3, 0x48, 0x0f, 0xb8, 0x44, 0xce, 0x08], r, long());
        assert_eq!(a, [one(0x40_0018, AccessKind::Read, 8)]);
        // fld tbyte [rdi] (x87 80-bit load)
        let r = regs(|r| r.rdi = 0x41_0000);
        let a = run(&[0xdb, 0x2f], r, long());
        assert_eq!(a, [one(0x41_0000, AccessKind::Read, 10)]);
        // movntdqa xmm0, [rdi]
        let a = run(&[0x66, 0x0f, 0x38, 0x2a, 0x07], r, long());
        assert_eq!(a, [one(0x41_0000, AccessKind::Read, 16)]);
        // clwb [rdi]: a cache-line operation on the page counts as a read of it.
        let a = run(&[0x66, 0x0f, 0xae, 0x37], r, long());
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].gpa, a[0].access), (Some(0x41_0000), AccessKind::Read));
        // lea rax, [rdi]: no access.
        assert!(run(&[0x48, 0x8d, 0x07], r, long()).is_empty());
    }

    #[test]
    fn far_call_through_memory_reads_the_pointer_and_pushes_cs_rip() {
        // call far qword [rbx] (REX.W FF /3: m16:64)
        let r = regs(|r| r.rbx = 0x42_0000);
        let a = run(&[0x48, 0xff, 0x1b], r, long());
        assert!(a.contains(&one(0x42_0000, AccessKind::Read, 10)), "{a:?}");
        let stores: Vec<_> = a.iter().filter(|x| x.access == AccessKind::Write).collect();
        assert!(!stores.is_empty(), "{a:?}");
        assert!(stores.iter().all(|x| x.gpa.unwrap() < 0x30_0000), "{a:?}");
    }

    #[test]
    fn lar_and_verr_read_the_descriptor_from_the_gdt_or_ldt() {
        let mut s = long();
        s.gdt.base = 0x43_0000;
        s.ldt.base = 0x44_0000;
        // lar eax, ecx with selector 0x18 (GDT entry 3)
        let r = regs(|r| r.rcx = 0x18);
        let a = run(&[0x0f, 0x02, 0xc1], r, s);
        assert_eq!(a, [one(0x43_0018, AccessKind::Read, 8)]);
        // verr cx with selector 0x0c (LDT entry 1)
        let r = regs(|r| r.rcx = 0x0c);
        let a = run(&[0x0f, 0x00, 0xe1], r, s);
        assert_eq!(a, [one(0x44_0008, AccessKind::Read, 8)]);
    }

    #[test]
    fn sse_integer_op_fs_base_and_untranslatable_pieces() {
        // paddd xmm0, fs:[rax] with FS base 0x3fff_f000 + rax 0x800: crosses 1 GiB, where the
        // identity translation stops.
        let r = regs(|r| r.rax = 0x800);
        let mut s = long();
        s.fs.base = 0x3fff_f7f8;
        let a = run(&[0x64, 0x66, 0x0f, 0xfe, 0x00], r, s);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], one(0x3fff_fff8, AccessKind::Read, 8));
        assert_eq!(
            a[1],
            MemAccess {
                gva: Some(0x4000_0000),
                gpa: None,
                access: AccessKind::Read,
                size: 8
            }
        );
    }

    #[test]
    fn compatibility_mode_uses_32_bit_decoding_and_segment_bases() {
        // In a 32-bit code segment 0x48 is `dec eax`, not REX.W; `mov eax, [ebx]` adds DS's base.
        let mut s = kvm_sregs::default();
        s.cs.db = 1;
        s.ds.base = 0x10_0000;
        let r = regs(|r| r.rbx = 0xffff_ffff_0000_2000);
        let a = run(&[0x8b, 0x03], r, s);
        assert_eq!(a, [one(0x10_2000, AccessKind::Read, 4)]);
        assert_eq!(decode(&[0x48], 0, 32).unwrap().mnemonic(), Mnemonic::Dec);
    }

    #[test]
    fn truncated_and_invalid_bytes_are_typed_errors() {
        // movabs rax, imm64 cut after 3 bytes
        assert_eq!(
            decode(&[0x48, 0xb8, 0x01], 0, 64),
            Err(DecodeError::Truncated { got: 3 })
        );
        assert_eq!(decode(&[], 0, 64), Err(DecodeError::Truncated { got: 0 }));
        // 0x06 (push es) is invalid in 64-bit mode
        assert_eq!(
            decode(&[0x06, 0x90, 0x90], 0, 64),
            Err(DecodeError::Invalid)
        );
    }

    proptest::proptest! {
        /// Guest bytes and registers are untrusted: any of them decode to a typed error or to
        /// pieces that each stay inside one page, never a panic.
        #[test]
        fn random_bytes_and_registers_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
            rip in proptest::prelude::any::<u64>(),
            rbx in proptest::prelude::any::<u64>(),
            rsp in proptest::prelude::any::<u64>(),
            base in proptest::prelude::any::<u64>(),
        ) {
            let r = kvm_regs { rip, rbx, rsp, rax: rbx, rsi: rsp, ..Default::default() };
            let mut s = kvm_sregs::default();
            s.cs.l = (base & 1) as u8;
            s.cs.db = (base >> 1 & 1) as u8;
            s.gdt.base = base;
            s.fs.base = base;
            s.ds.base = base;
            let cpu = CpuState { regs: &r, sregs: &s };
            if let Ok(a) = memory_operands(&bytes, &cpu, &mut ident) {
                for p in a {
                    proptest::prop_assert!(p.size >= 1);
                    if let Some(va) = p.gva {
                        proptest::prop_assert!((va & 0xfff) + u64::from(p.size) <= 0x1000);
                    }
                }
            }
        }
    }
}
