//! skiff-cri-log: the per-container log copier containerd's runc shim starts through
//! `binary://` task IO (`skiff-cri-log --cri-log FILE [--max-size BYTES]
//! [--max-files N]`, the container's stdout and stderr pipes on fds 3 and 4, the ready
//! pipe on fd 5). Writes CRI-format lines and rotates FILE by size; see
//! skiff_agent::kubelet::cri_log. std only and apart from the agent library, so the
//! binary stays small and starts fast (one runs per container).

#[allow(dead_code)]
#[path = "../kubelet/cri_log/copier.rs"]
mod copier;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match copier::parse_args(&args) {
        Ok(a) => std::process::exit(copier::run_from_shim(&a)),
        Err(e) => {
            eprintln!(
                "skiff-cri-log: {e}\nusage: skiff-cri-log --cri-log FILE [--max-size BYTES] \
                 [--max-files N] (started by containerd's runc shim with fds 3, 4 and 5)"
            );
            std::process::exit(2);
        }
    }
}
