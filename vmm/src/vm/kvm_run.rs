//! Every access to the vCPU's shared `kvm_run` page, in one audited place: the union member of
//! the exit being handled (port I/O, MMIO, internal error, MSR write); the `immediate_exit`
//! byte a kick sets is `watchdog.rs`'. The run loop calls these right after the
//! `KVM_RUN` that produced the exit, before the next one.

use kvm_ioctls::VcpuFd;

/// Element size of the port I/O exit being handled (1, 2 or 4). Outside a `KVM_EXIT_IO` exit
/// the value is meaningless but still in range (the union holds plain integers).
pub(super) fn io_size(vcpu: &mut VcpuFd) -> usize {
    let run = vcpu.get_kvm_run();
    // SAFETY: every member of the exit union is plain integers, so reading `io` is defined
    // whichever exit is active; callers handle a KVM_EXIT_IO exit, where it is the active one.
    let io = unsafe { run.__bindgen_anon_1.io };
    usize::from(io.size).clamp(1, 4)
}

/// The data of the port I/O exit being handled (`len` = count * size bytes).
///
/// # Safety
/// Must be called while handling a `KVM_EXIT_IO` exit, with the `len` of the data slice
/// kvm-ioctls returned for it: KVM then places those bytes at `io.data_offset` inside the
/// `kvm_run` mapping (which spans the vCPU mmap size, several pages).
pub(super) unsafe fn io_data(vcpu: &mut VcpuFd, len: usize) -> &mut [u8] {
    let run = vcpu.get_kvm_run();
    // SAFETY: plain integers, as in `io_size`.
    let off = unsafe { run.__bindgen_anon_1.io }.data_offset as usize;
    let base = run as *mut kvm_bindings::kvm_run as *mut u8;
    // SAFETY: per this function's contract, [off, off + len) lies inside the kvm_run mapping,
    // which lives as long as `vcpu` and which nothing else references during the exit.
    unsafe { std::slice::from_raw_parts_mut(base.add(off), len) }
}

/// The data of the MMIO exit being handled, at most `len` (the exit's length, at most 8) bytes.
pub(super) fn mmio_data(vcpu: &mut VcpuFd, len: usize) -> &mut [u8] {
    let run = vcpu.get_kvm_run();
    // SAFETY: plain integers and a byte array, as in `io_size`; callers handle a KVM_EXIT_MMIO
    // exit, where `mmio` is the active member. The slice stays inside its 8-byte `data`.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    let n = len.min(mmio.data.len());
    &mut mmio.data[..n]
}

/// Suberror and data words of the internal-error exit being handled.
pub(super) fn internal_error(vcpu: &mut VcpuFd) -> (u32, Vec<u64>) {
    let run = vcpu.get_kvm_run();
    // SAFETY: plain integers, as in `io_size`; callers handle a KVM_EXIT_INTERNAL_ERROR exit.
    let ie = unsafe { run.__bindgen_anon_1.internal };
    let n = (ie.ndata as usize).min(ie.data.len());
    (ie.suberror, ie.data[..n].to_vec())
}

/// Sets the `error` byte of the `KVM_EXIT_X86_WRMSR` exit being handled (1: KVM injects #GP).
/// Call only while handling that exit (`msr` is then the active member of the union; writing a
/// union field is safe, and any other member would merely be overwritten).
pub(super) fn set_msr_error(vcpu: &mut VcpuFd, error: u8) {
    vcpu.get_kvm_run().__bindgen_anon_1.msr.error = error;
}
