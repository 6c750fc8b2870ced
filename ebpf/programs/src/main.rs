//! skiff's eBPF programs. Kernel floor: 5.10 (only helpers, map types and attach methods
//! that 5.10 has; tc programs are attached through clsact/netlink, not tcx).
#![no_std]
#![no_main]

mod pod_network;
mod service_lb;
mod nodeport;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use skiff_ebpf_common::{CounterSlot, PacketCounter};

/// Per-CPU packet/byte counters, pinned by name (`EbpfLoader::map_pin_path`) so that an
/// agent restart keeps them. Name must match `skiff_ebpf_common::COUNTER_MAP`.
#[map]
static SKIFF_COUNTERS: PerCpuArray<PacketCounter> = PerCpuArray::pinned(CounterSlot::COUNT, 0);

/// tc classifier: counts every packet and its length, never changes the verdict.
/// Uses no helpers beyond bpf_map_lookup_elem (per-CPU slot, so no atomics needed).
#[classifier]
pub fn skiff_count(ctx: TcContext) -> i32 {
    if let Some(counter) = SKIFF_COUNTERS.get_ptr_mut(CounterSlot::All as u32) {
        // SAFETY: the pointer comes from a successful map lookup and the slot is per-CPU,
        // so nothing else writes it concurrently (tc programs run with preemption disabled).
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
