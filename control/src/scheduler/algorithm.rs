//! One scheduling decision over the cache: filter every node, score the ones that fit,
//! pick the best. Pure (no IO), so it is unit tested directly.

use std::collections::BTreeMap;

use rand::Rng;

use super::cache::Cache;
use super::filters::{InterPodState, filter_node, kind};
use super::pod_info::PodInfo;
use super::scores::{score_nodes, select_host};

/// Why no node fits, summarized as kube-scheduler does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitError {
    pub num_nodes: usize,
    /// How many nodes gave each reason.
    pub reasons: BTreeMap<String, usize>,
    /// Union of the failures' [`kind`] bits: which cluster changes may help.
    pub kind: u8,
}

impl FitError {
    /// The FailedScheduling message: "0/3 nodes are available: 1 node(s) had
    /// untolerated taint {dedicated: gpu}, 2 Insufficient cpu." The "count reason"
    /// strings are sorted as plain strings, exactly like kube-scheduler's
    /// `sortReasonsHistogram` (so the count takes part in the order).
    pub fn message(&self) -> String {
        if self.num_nodes == 0 {
            return "no nodes available to schedule pods".to_string();
        }
        let mut parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(reason, count)| format!("{count} {reason}"))
            .collect();
        parts.sort();
        let mut msg = format!("0/{} nodes are available:", self.num_nodes);
        if !parts.is_empty() {
            msg.push_str(&format!(" {}.", parts.join(", ")));
        }
        msg
    }
}

/// Picks the node for `pod`, or explains why there is none.
pub fn find_node(pod: &PodInfo, cache: &Cache, rng: &mut impl Rng) -> Result<String, FitError> {
    let inter_pod = InterPodState::build(pod, cache);
    let mut feasible = Vec::new();
    let mut failed = FitError {
        num_nodes: 0,
        reasons: BTreeMap::new(),
        kind: 0,
    };
    for (node, state) in cache.nodes() {
        failed.num_nodes += 1;
        match filter_node(pod, node, state, &inter_pod) {
            Ok(()) => feasible.push((node, state)),
            Err(unfit) => {
                failed.kind |= unfit.kind;
                for r in unfit.reasons {
                    *failed.reasons.entry(r).or_insert(0) += 1;
                }
            }
        }
    }
    if feasible.is_empty() {
        if failed.num_nodes == 0 {
            failed.kind = kind::NODE;
        }
        return Err(failed);
    }
    if feasible.len() == 1 {
        return Ok(feasible[0].0.name.clone());
    }
    let scores = score_nodes(pod, &feasible);
    let best = select_host(&scores, rng).unwrap_or(0);
    Ok(feasible[best].0.name.clone())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Taint;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::scheduler::cache::tests::{node, pod_info};

    #[test]
    fn message_matches_kube_scheduler() {
        let mut cache = Cache::default();
        cache.update_node(&node("a", "1", "4Gi", "110"));
        cache.update_node(&node("b", "1", "4Gi", "110"));
        let mut gpu = node("c", "8", "4Gi", "110");
        if let Some(s) = gpu.spec.as_mut() {
            s.taints = Some(vec![Taint {
                key: "dedicated".into(),
                value: Some("gpu".into()),
                effect: "NoSchedule".into(),
                time_added: None,
            }]);
        }
        cache.update_node(&gpu);
        let mut rng = StdRng::seed_from_u64(1);
        let err = find_node(&pod_info("ns/p", 2000, 0), &cache, &mut rng).expect_err("no fit");
        assert_eq!(
            err.message(),
            "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 2 Insufficient cpu."
        );
        assert_eq!(err.kind, kind::NODE | kind::POD_REMOVED);
    }

    #[test]
    fn message_sorts_count_and_reason_as_one_string() {
        let err = FitError {
            num_nodes: 12,
            reasons: [
                ("Insufficient cpu".to_string(), 10),
                ("Insufficient memory".to_string(), 2),
                ("node(s) were unschedulable".to_string(), 2),
            ]
            .into(),
            kind: 0,
        };
        assert_eq!(
            err.message(),
            "0/12 nodes are available: 10 Insufficient cpu, 2 Insufficient memory, 2 node(s) were unschedulable."
        );
    }

    #[test]
    fn no_nodes() {
        let mut rng = StdRng::seed_from_u64(1);
        let err =
            find_node(&pod_info("ns/p", 0, 0), &Cache::default(), &mut rng).expect_err("no nodes");
        assert_eq!(err.message(), "no nodes available to schedule pods");
        assert_eq!(err.kind, kind::NODE);
    }

    #[test]
    fn consecutive_decisions_see_assumed_pods_and_spread() {
        let mut cache = Cache::default();
        for n in ["a", "b", "c", "d"] {
            cache.update_node(&node(n, "2", "8Gi", "110"));
        }
        let mut rng = StdRng::seed_from_u64(3);
        let mut per_node: HashMap<String, usize> = HashMap::new();
        // 8 pods of 1 cpu fill 4 nodes of 2 cpu exactly; the 9th does not fit.
        for i in 0..8 {
            let mut p = pod_info(&format!("ns/p{i}"), 1000, 1 << 20);
            p.controller_uid = Some("rs".into());
            let p = Arc::new(p);
            let chosen = find_node(&p, &cache, &mut rng).expect("fits");
            cache.assume(p, &chosen);
            *per_node.entry(chosen).or_insert(0) += 1;
        }
        assert!(per_node.values().all(|&n| n == 2), "{per_node:?}");
        let err = find_node(&pod_info("ns/p9", 1000, 0), &cache, &mut rng).expect_err("full");
        assert_eq!(
            err.message(),
            "0/4 nodes are available: 4 Insufficient cpu."
        );
    }

    #[test]
    fn best_effort_pods_of_one_controller_spread_evenly() {
        let mut cache = Cache::default();
        for i in 0..10 {
            cache.update_node(&node(&format!("n{i}"), "4", "8Gi", "110"));
        }
        let mut rng = StdRng::seed_from_u64(5);
        for i in 0..100 {
            let mut p = pod_info(&format!("ns/p{i}"), 0, 0);
            p.non_zero_requests.milli_cpu = 100;
            p.non_zero_requests.memory = 200 << 20;
            p.controller_uid = Some("rs".into());
            let p = Arc::new(p);
            let chosen = find_node(&p, &cache, &mut rng).expect("fits");
            cache.assume(p, &chosen);
        }
        for (n, _) in cache.nodes() {
            assert_eq!(n.requested.pods, 10, "{}", n.name);
        }
    }
}
