//! Scores: among the nodes that fit, which is best? Each plugin gives 0..=100 per node;
//! the weighted sum picks the node, ties broken at random so equal nodes share the load.
//! Weights are kube-scheduler's defaults.

use rand::Rng;

use super::cache::{NodeInfo, NodeState};
use super::filters::{node_selector_term_matches, tolerates};
use super::pod_info::PodInfo;

pub const MAX_NODE_SCORE: i64 = 100;
pub const WEIGHT_LEAST_ALLOCATED: i64 = 1;
pub const WEIGHT_BALANCED_ALLOCATION: i64 = 1;
pub const WEIGHT_SPREAD: i64 = 2;
pub const WEIGHT_NODE_AFFINITY: i64 = 2;
pub const WEIGHT_TAINT_TOLERATION: i64 = 3;

/// Weighted total score of every candidate node, in the order given.
pub fn score_nodes(pod: &PodInfo, nodes: &[(&NodeInfo, &NodeState)]) -> Vec<i64> {
    let spread = spread_scores(pod, nodes);
    let affinity = node_affinity_scores(pod, nodes);
    let taints = taint_toleration_scores(pod, nodes);
    nodes
        .iter()
        .enumerate()
        .map(|(i, (node, state))| {
            WEIGHT_LEAST_ALLOCATED * least_allocated(pod, node, state)
                + WEIGHT_BALANCED_ALLOCATION * balanced_allocation(pod, node, state)
                + WEIGHT_SPREAD * spread[i]
                + WEIGHT_NODE_AFFINITY * affinity[i]
                + WEIGHT_TAINT_TOLERATION * taints[i]
        })
        .collect()
}

/// cpu and memory after placing the pod, for scoring (scoring defaults included).
fn requested_after(pod: &PodInfo, node: &NodeInfo) -> (i64, i64) {
    (
        node.non_zero_requested
            .milli_cpu
            .saturating_add(pod.non_zero_requests.milli_cpu),
        node.non_zero_requested
            .memory
            .saturating_add(pod.non_zero_requests.memory),
    )
}

/// NodeResourcesFit LeastAllocated: the average free fraction of cpu and memory.
pub fn least_allocated(pod: &PodInfo, node: &NodeInfo, state: &NodeState) -> i64 {
    let free = |requested: i64, capacity: i64| -> i64 {
        if capacity <= 0 || requested > capacity {
            return 0;
        }
        ((capacity - requested) as i128 * MAX_NODE_SCORE as i128 / capacity as i128) as i64
    };
    let (cpu, memory) = requested_after(pod, node);
    (free(cpu, state.allocatable.milli_cpu) + free(memory, state.allocatable.memory)) / 2
}

/// NodeResourcesBalancedAllocation: prefer nodes whose cpu and memory use stay even.
pub fn balanced_allocation(pod: &PodInfo, node: &NodeInfo, state: &NodeState) -> i64 {
    let fraction = |requested: i64, capacity: i64| -> f64 {
        if capacity <= 0 {
            return 1.0;
        }
        (requested as f64 / capacity as f64).min(1.0)
    };
    let (cpu, memory) = requested_after(pod, node);
    let std_dev = (fraction(cpu, state.allocatable.milli_cpu)
        - fraction(memory, state.allocatable.memory))
    .abs()
        / 2.0;
    ((1.0 - std_dev) * MAX_NODE_SCORE as f64) as i64
}

/// Default spreading: fewer pods of the same controller on a node scores higher.
pub fn spread_scores(pod: &PodInfo, nodes: &[(&NodeInfo, &NodeState)]) -> Vec<i64> {
    let Some(uid) = pod.controller_uid.as_deref() else {
        return vec![MAX_NODE_SCORE; nodes.len()];
    };
    let counts: Vec<i64> = nodes
        .iter()
        .map(|(n, _)| i64::from(n.siblings(uid)))
        .collect();
    let max = counts.iter().copied().max().unwrap_or(0);
    counts
        .iter()
        .map(|&c| {
            if max == 0 {
                MAX_NODE_SCORE
            } else {
                MAX_NODE_SCORE * (max - c) / max
            }
        })
        .collect()
}

/// Preferred node affinity: sum of the weights of matching terms, scaled to 0..=100.
pub fn node_affinity_scores(pod: &PodInfo, nodes: &[(&NodeInfo, &NodeState)]) -> Vec<i64> {
    let raw: Vec<i64> = nodes
        .iter()
        .map(|(n, s)| {
            pod.preferred_node_affinity
                .iter()
                .filter(|(_, term)| node_selector_term_matches(term, &s.labels, &n.name))
                .map(|(w, _)| i64::from(*w))
                .sum()
        })
        .collect();
    normalize(raw, false)
}

/// TaintToleration: fewer untolerated PreferNoSchedule taints scores higher.
pub fn taint_toleration_scores(pod: &PodInfo, nodes: &[(&NodeInfo, &NodeState)]) -> Vec<i64> {
    let soft: Vec<_> = pod
        .tolerations
        .iter()
        .filter(|t| matches!(t.effect.as_deref(), None | Some("" | "PreferNoSchedule")))
        .collect();
    let raw: Vec<i64> = nodes
        .iter()
        .map(|(_, s)| {
            s.taints
                .iter()
                .filter(|taint| taint.effect == "PreferNoSchedule")
                .filter(|taint| !soft.iter().any(|t| tolerates(t, taint)))
                .count() as i64
        })
        .collect();
    normalize(raw, true)
}

/// kube-scheduler's DefaultNormalizeScore: scale so the largest raw value is 100
/// (reversed: the largest becomes 0).
fn normalize(raw: Vec<i64>, reverse: bool) -> Vec<i64> {
    let max = raw.iter().copied().max().unwrap_or(0);
    if max <= 0 {
        let all = if reverse { MAX_NODE_SCORE } else { 0 };
        return vec![all; raw.len()];
    }
    raw.into_iter()
        .map(|r| {
            let s = MAX_NODE_SCORE * r.max(0) / max;
            if reverse { MAX_NODE_SCORE - s } else { s }
        })
        .collect()
}

/// Index of the highest score; among equal scores each is equally likely (reservoir
/// sampling, as kube-scheduler's selectHost).
pub fn select_host(scores: &[i64], rng: &mut impl Rng) -> Option<usize> {
    let mut best: Option<(usize, i64)> = None;
    let mut ties = 0u32;
    for (i, &s) in scores.iter().enumerate() {
        match best {
            Some((_, b)) if s < b => {}
            Some((_, b)) if s == b => {
                ties += 1;
                if rng.random_range(0..ties) == 0 {
                    best = Some((i, s));
                }
            }
            _ => {
                best = Some((i, s));
                ties = 1;
            }
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Taint};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::scheduler::cache::Cache;
    use crate::scheduler::cache::tests::{node, pod_info};

    fn candidates(cache: &Cache, names: &[&str]) -> Vec<(NodeInfo, NodeState)> {
        names
            .iter()
            .map(|n| {
                let info = cache.node(n).expect("node").clone();
                let state = info.node.clone().expect("state");
                (info, state)
            })
            .collect()
    }

    fn refs(c: &[(NodeInfo, NodeState)]) -> Vec<(&NodeInfo, &NodeState)> {
        c.iter().map(|(n, s)| (n, s)).collect()
    }

    #[test]
    fn least_allocated_prefers_the_emptier_node() {
        let mut cache = Cache::default();
        cache.update_node(&node("busy", "4", "8Gi", "110"));
        cache.update_node(&node("idle", "4", "8Gi", "110"));
        cache.add_bound_pod(Arc::new(pod_info("ns/x", 2000, 4 << 30)), "busy");
        let pod = pod_info("ns/p", 1000, 1 << 30);
        let c = candidates(&cache, &["busy", "idle"]);
        let (busy, idle) = (&c[0], &c[1]);
        // busy: cpu (4000-3000)/4000 = 25, memory (8-5)/8 = 37 -> 31.
        assert_eq!(least_allocated(&pod, &busy.0, &busy.1), 31);
        // idle: cpu 75, memory 87 -> 81.
        assert_eq!(least_allocated(&pod, &idle.0, &idle.1), 81);
        let scores = score_nodes(&pod, &refs(&c));
        assert!(scores[1] > scores[0], "{scores:?}");
    }

    #[test]
    fn spreading_prefers_nodes_with_fewer_siblings() {
        let mut cache = Cache::default();
        for n in ["a", "b", "c"] {
            cache.update_node(&node(n, "100", "100Gi", "110"));
        }
        let sibling = |key: &str| {
            let mut p = pod_info(key, 1, 1);
            p.controller_uid = Some("rs-1".into());
            Arc::new(p)
        };
        cache.add_bound_pod(sibling("ns/s0"), "a");
        cache.add_bound_pod(sibling("ns/s1"), "a");
        cache.assume(sibling("ns/s2"), "b");
        // An unrelated pod does not count.
        cache.add_bound_pod(Arc::new(pod_info("ns/other", 1, 1)), "c");
        let pod = sibling("ns/new");
        let c = candidates(&cache, &["a", "b", "c"]);
        assert_eq!(spread_scores(&pod, &refs(&c)), vec![0, 50, 100]);
        let scores = score_nodes(&pod, &refs(&c));
        assert!(scores[2] > scores[1] && scores[1] > scores[0], "{scores:?}");
        // Without a controller, spreading has no opinion.
        assert_eq!(
            spread_scores(&pod_info("ns/solo", 1, 1), &refs(&c)),
            vec![100, 100, 100]
        );
    }

    #[test]
    fn preferred_node_affinity_and_soft_taints() {
        let mut cache = Cache::default();
        let mut ssd = node("ssd", "4", "8Gi", "110");
        ssd.metadata.labels = Some([("disk".to_string(), "ssd".to_string())].into());
        let mut tainted = node("tainted", "4", "8Gi", "110");
        if let Some(s) = tainted.spec.as_mut() {
            s.taints = Some(vec![Taint {
                key: "spot".into(),
                effect: "PreferNoSchedule".into(),
                ..Default::default()
            }]);
        }
        cache.update_node(&ssd);
        cache.update_node(&tainted);
        cache.update_node(&node("plain", "4", "8Gi", "110"));
        let c = candidates(&cache, &["ssd", "tainted", "plain"]);

        let mut pod = pod_info("ns/p", 0, 0);
        pod.preferred_node_affinity = vec![(
            10,
            NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: "disk".into(),
                    operator: "In".into(),
                    values: Some(vec!["ssd".into()]),
                }]),
                match_fields: None,
            },
        )];
        assert_eq!(node_affinity_scores(&pod, &refs(&c)), vec![100, 0, 0]);
        assert_eq!(taint_toleration_scores(&pod, &refs(&c)), vec![100, 0, 100]);
        let scores = score_nodes(&pod, &refs(&c));
        assert!(scores[0] > scores[2] && scores[2] > scores[1], "{scores:?}");
    }

    #[test]
    fn ties_are_shared_between_equal_nodes() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut picked = [0u32; 4];
        for _ in 0..400 {
            let i = select_host(&[5, 9, 9, 9], &mut rng).expect("a node");
            picked[i] += 1;
        }
        assert_eq!(picked[0], 0);
        assert!(picked[1..].iter().all(|&n| n > 80), "{picked:?}");
        assert_eq!(select_host(&[], &mut rng), None);
    }
}
