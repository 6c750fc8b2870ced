//! Map key/value types shared between skiff's eBPF programs (`ebpf/programs`, built for
//! `bpfel-unknown-none`) and userspace (`skiff-agent`, with the `user` feature).
//!
//! Rules for every type in this crate:
//! - `#[repr(C)]`, only fixed-size integer fields, padding spelled out as `_pad` fields
//!   (the kernel copies raw bytes; implicit padding would leak uninitialised memory and
//!   differ between the two compilers);
//! - size and field offsets asserted at compile time, so a layout change breaks the build
//!   of both sides instead of silently corrupting maps;
//! - `aya::Pod` only behind the `user` feature (the eBPF side is `no_std` and has no aya).
#![no_std]

use core::mem::{offset_of, size_of};

/// Name of the per-CPU packet counter map of the `skiff_count` program (the symbol name of
/// the `#[map]` static in `ebpf/programs`, and the file name it is pinned under).
pub const COUNTER_MAP: &str = "SKIFF_COUNTERS";
/// Name of the tc classifier that counts packets.
pub const COUNT_PROGRAM: &str = "skiff_count";

/// Slots of [`COUNTER_MAP`] (a `PerCpuArray<PacketCounter>`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterSlot {
    /// Every packet the classifier saw.
    All = 0,
}

impl CounterSlot {
    /// Number of slots, i.e. `max_entries` of the map.
    pub const COUNT: u32 = 1;
}

/// Per-CPU packet counter value. Userspace sums the per-CPU values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounter {
    pub packets: u64,
    pub bytes: u64,
}

impl PacketCounter {
    /// Adds another counter (used to sum per-CPU values).
    pub fn add(&mut self, other: &PacketCounter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

const _: () = assert!(size_of::<PacketCounter>() == 16);
const _: () = assert!(offset_of!(PacketCounter, packets) == 0);
const _: () = assert!(offset_of!(PacketCounter, bytes) == 8);

#[cfg(feature = "user")]
// SAFETY: repr(C), only u64 fields, no padding (asserted above); every bit pattern is valid.
unsafe impl aya::Pod for PacketCounter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sums_fields() {
        let mut a = PacketCounter {
            packets: 1,
            bytes: 100,
        };
        a.add(&PacketCounter {
            packets: 2,
            bytes: 50,
        });
        assert_eq!(
            a,
            PacketCounter {
                packets: 3,
                bytes: 150
            }
        );
    }
}
