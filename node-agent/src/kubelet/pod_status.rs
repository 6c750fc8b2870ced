//! Pure parts of pod status: the phase from container statuses (the kubelet's getPhase),
//! restart decisions, quantities for cgroup limits.

use k8s_openapi::api::core::v1::ContainerStatus;

/// Whether a container that exited with `code` runs again under `policy`.
pub fn should_restart(policy: &str, code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

/// The pod phase, as the kubelet computes it.
/// `init`: statuses of init containers in order; `apps`: of app containers.
pub fn phase(policy: &str, init: &[ContainerStatus], apps: &[ContainerStatus]) -> &'static str {
    // Init containers: all must have completed with 0.
    let mut pending_init = false;
    for s in init {
        let st = s.state.as_ref();
        match st.and_then(|s| s.terminated.as_ref()) {
            Some(t) if t.exit_code == 0 => continue,
            Some(_) if policy == "Never" => return "Failed",
            _ => {
                pending_init = true;
                break;
            }
        }
    }
    if pending_init {
        return "Pending";
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for s in apps {
        let st = s.state.clone().unwrap_or_default();
        if st.running.is_some() {
            running += 1;
        } else if let Some(t) = &st.terminated {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if s
            .last_state
            .as_ref()
            .and_then(|l| l.terminated.as_ref())
            .is_some()
        {
            stopped += 1;
        } else {
            waiting += 1;
        }
    }
    if running > 0 {
        return "Running";
    }
    if waiting == 0 && stopped > 0 {
        if policy == "Always" {
            return "Running";
        }
        if stopped == succeeded {
            return "Succeeded";
        }
        if policy == "Never" {
            return "Failed";
        }
        // OnFailure: the failed ones restart.
        return "Running";
    }
    "Pending"
}

/// A Kubernetes quantity as a number (`500m` = 0.5, `64Mi` = 67108864, `1e3` = 1000).
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("m", 1e-3),
    ];
    for (s, mul) in suffixes {
        if let Some(n) = q.strip_suffix(s) {
            return n.parse::<f64>().ok().map(|v| v * mul);
        }
    }
    q.parse::<f64>().ok().filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    };

    fn running() -> ContainerStatus {
        ContainerStatus {
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
    fn terminated(code: i32) -> ContainerStatus {
        ContainerStatus {
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
    fn waiting(after_run: bool) -> ContainerStatus {
        ContainerStatus {
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting::default()),
                ..Default::default()
            }),
            last_state: after_run.then(|| ContainerState {
                terminated: Some(ContainerStateTerminated::default()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn phases() {
        assert_eq!(phase("Always", &[], &[waiting(false)]), "Pending");
        assert_eq!(phase("Always", &[], &[running()]), "Running");
        assert_eq!(phase("Always", &[], &[waiting(true)]), "Running");
        assert_eq!(phase("Never", &[], &[terminated(0)]), "Succeeded");
        assert_eq!(phase("Never", &[], &[terminated(1)]), "Failed");
        assert_eq!(phase("OnFailure", &[], &[terminated(0)]), "Succeeded");
        assert_eq!(phase("OnFailure", &[], &[waiting(true)]), "Running");
        assert_eq!(phase("Always", &[running()], &[waiting(false)]), "Pending");
        assert_eq!(
            phase("Never", &[terminated(2)], &[waiting(false)]),
            "Failed"
        );
        assert_eq!(
            phase("Always", &[terminated(0)], &[running(), waiting(false)]),
            "Running"
        );
    }

    #[test]
    fn restarts() {
        assert!(should_restart("Always", 0));
        assert!(should_restart("OnFailure", 1));
        assert!(!should_restart("OnFailure", 0));
        assert!(!should_restart("Never", 1));
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("64Mi"), Some(67108864.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("x"), None);
    }
}
