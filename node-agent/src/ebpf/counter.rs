//! The packet counter: tc classifier `skiff_count` plus its per-CPU map `SKIFF_COUNTERS`.
//! Data comes from the kernel (every packet crossing the hook), the program only counts,
//! userspace sums the per-CPU slots.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType,
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, qdisc_add_clsact},
    },
};
use skiff_ebpf_common::{COUNT_PROGRAM, COUNTER_MAP, CounterSlot, PacketCounter};

use super::{EbpfError, ObjectSource, bpffs, netns, require_root};

/// Which tc hook of the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl From<Direction> for TcAttachType {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        }
    }
}

struct Attachment {
    interface: String,
    netns: Option<PathBuf>,
    link: SchedClassifierLinkId,
}

/// `skiff_count` loaded into the kernel, with its map pinned under `pin_dir`.
/// Dropping it detaches the classifier; the pinned map stays (remove the pin directory
/// to free it).
pub struct PacketCounterProgram {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attachment: Option<Attachment>,
}

impl PacketCounterProgram {
    /// Loads the object and the classifier. Maps are pinned under (or reused from)
    /// `pin_dir`, which must be on bpffs, e.g. /sys/fs/bpf/skiff/<node>.
    pub fn load(object: &ObjectSource, pin_dir: &Path) -> Result<Self, EbpfError> {
        require_root()?;
        let bytes = object.bytes()?;
        bpffs::ensure_pin_dir(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(pin_dir)
            .load(&bytes)
            .map_err(|source| EbpfError::Load { source })?;
        let program = classifier(&mut ebpf)?;
        program.load().map_err(|source| EbpfError::Program {
            name: COUNT_PROGRAM.into(),
            source,
        })?;
        tracing::info!(pin_dir = %pin_dir.display(), "loaded {COUNT_PROGRAM}");
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            attachment: None,
        })
    }

    /// Attaches the classifier to `interface` (inside the network namespace `netns` if
    /// given) through a clsact qdisc and a netlink tc filter, which kernel 5.10 supports.
    pub fn attach(
        &mut self,
        interface: &str,
        direction: Direction,
        netns: Option<&Path>,
    ) -> Result<(), EbpfError> {
        self.detach()?;
        let program = classifier(&mut self.ebpf)?;
        let link = netns::run_in(netns, || {
            if nix::net::if_::if_nametoindex(interface).is_err() {
                return Err(EbpfError::NoSuchInterface {
                    interface: interface.into(),
                    netns: netns.map(Path::to_path_buf),
                });
            }
            match qdisc_add_clsact(interface) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(EbpfError::Qdisc {
                        interface: interface.into(),
                        source,
                    });
                }
            }
            program
                .attach_with_options(
                    interface,
                    direction.into(),
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .map_err(|source| EbpfError::Program {
                    name: COUNT_PROGRAM.into(),
                    source,
                })
        })?;
        tracing::info!(interface, ?direction, netns = ?netns, "attached {COUNT_PROGRAM}");
        self.attachment = Some(Attachment {
            interface: interface.into(),
            netns: netns.map(Path::to_path_buf),
            link,
        });
        Ok(())
    }

    /// Removes the tc filter, if attached (in the namespace it was attached in).
    pub fn detach(&mut self) -> Result<(), EbpfError> {
        let Some(Attachment {
            interface,
            netns,
            link,
        }) = self.attachment.take()
        else {
            return Ok(());
        };
        let program = classifier(&mut self.ebpf)?;
        netns::run_in(netns.as_deref(), || {
            program.detach(link).map_err(|source| EbpfError::Program {
                name: COUNT_PROGRAM.into(),
                source,
            })
        })?;
        tracing::info!(interface, "detached {COUNT_PROGRAM}");
        Ok(())
    }

    /// The directory the maps are pinned under.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The per-CPU values of the counter.
    pub fn per_cpu_counters(&self) -> Result<Vec<PacketCounter>, EbpfError> {
        let map = self.ebpf.map(COUNTER_MAP).ok_or(EbpfError::NotInObject {
            kind: "map",
            name: COUNTER_MAP.into(),
        })?;
        let array = PerCpuArray::<_, PacketCounter>::try_from(map).map_err(map_err)?;
        per_cpu(&array)
    }

    /// The counter summed over all CPUs.
    pub fn counters(&self) -> Result<PacketCounter, EbpfError> {
        Ok(sum(&self.per_cpu_counters()?))
    }
}

impl Drop for PacketCounterProgram {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!("detaching {COUNT_PROGRAM} on drop: {e}");
        }
    }
}

/// Reads the counters from the map pinned under `pin_dir` (by a running or previous
/// agent), without loading anything: what `skiff-net` does.
pub fn read_pinned_counters(pin_dir: &Path) -> Result<PacketCounter, EbpfError> {
    require_root()?;
    let data = MapData::from_pin(pin_dir.join(COUNTER_MAP)).map_err(map_err)?;
    let array =
        PerCpuArray::<_, PacketCounter>::try_from(Map::PerCpuArray(data)).map_err(map_err)?;
    Ok(sum(&per_cpu(&array)?))
}

fn classifier(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, EbpfError> {
    let not_found = || EbpfError::NotInObject {
        kind: "program",
        name: COUNT_PROGRAM.into(),
    };
    ebpf.program_mut(COUNT_PROGRAM)
        .ok_or_else(not_found)?
        .try_into()
        .map_err(|source| EbpfError::Program {
            name: COUNT_PROGRAM.into(),
            source,
        })
}

fn per_cpu<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, PacketCounter>,
) -> Result<Vec<PacketCounter>, EbpfError> {
    let values = array.get(&(CounterSlot::All as u32), 0).map_err(map_err)?;
    Ok(values.iter().copied().collect())
}

fn sum(values: &[PacketCounter]) -> PacketCounter {
    values.iter().fold(PacketCounter::default(), |mut acc, v| {
        acc.add(v);
        acc
    })
}

fn map_err(source: aya::maps::MapError) -> EbpfError {
    EbpfError::Map {
        name: COUNTER_MAP.into(),
        source,
    }
}
