//! The scheduling queue, modelled on kube-scheduler's: an active queue (highest
//! priority first, then oldest), a backoff queue of pods waiting out their per-pod
//! backoff, and a set of unschedulable pods that only move back when a cluster event
//! might let them fit (or after a timeout). Pods being scheduled or bound are "in
//! flight" and stay known so watch updates for them do not enqueue them twice.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use super::filters::kind;

#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// An unschedulable pod is retried at least this often, events or not.
    pub unschedulable_timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            unschedulable_timeout: Duration::from_secs(60),
        }
    }
}

/// A change in the cluster that may let waiting pods fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A Node was added or changed in a way that matters for scheduling.
    NodeChanged,
    /// A pod stopped holding resources (deleted, finished, assumption dropped).
    PodRemoved,
    /// A pod was bound to a node.
    PodAdded,
    /// An assigned pod's labels or node changed.
    PodChanged,
}

impl ClusterEvent {
    /// Which failure kinds this event may resolve.
    fn helps(self) -> u8 {
        match self {
            ClusterEvent::NodeChanged => kind::NODE | kind::POD_REMOVED | kind::POD_ADDED,
            ClusterEvent::PodRemoved => kind::POD_REMOVED,
            ClusterEvent::PodAdded => kind::POD_ADDED,
            ClusterEvent::PodChanged => kind::POD_REMOVED | kind::POD_ADDED,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active,
    Backoff,
    Unschedulable,
    InFlight,
}

#[derive(Debug)]
struct Entry {
    pod: Arc<Pod>,
    state: State,
    /// Failed attempts so far, for the exponential backoff.
    attempts: u32,
    backoff_until: Instant,
    unschedulable_since: Instant,
    /// [`kind`] bits of the last failure.
    failure: u8,
    /// The last FailedScheduling message reported, so it is only written on change.
    last_message: Option<String>,
    /// Matches the heap item that is current for this pod (older items are stale).
    seq: u64,
}

/// Active queue order: priority desc, then creation time, then arrival.
#[derive(Debug, PartialEq, Eq)]
struct ActiveItem {
    priority: i32,
    created_micros: i64,
    seq: u64,
    key: String,
}

impl Ord for ActiveItem {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.created_micros.cmp(&self.created_micros))
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for ActiveItem {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A pod handed out for scheduling.
#[derive(Debug, Clone)]
pub struct Popped {
    pub key: String,
    pub pod: Arc<Pod>,
}

#[derive(Debug, Default)]
pub struct SchedulingQueue {
    cfg: QueueConfig,
    entries: HashMap<String, Entry>,
    active: BinaryHeap<ActiveItem>,
    backoff: BinaryHeap<Reverse<(Instant, u64, String)>>,
    unschedulable: HashSet<String>,
    seq: u64,
}

impl SchedulingQueue {
    pub fn new(cfg: QueueConfig) -> SchedulingQueue {
        SchedulingQueue {
            cfg,
            ..Default::default()
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// A pod that wants scheduling, new or updated. New pods go to the active queue; an
    /// unschedulable pod whose spec or labels changed gets another try (after its
    /// backoff); otherwise only the stored object is refreshed. True when the pod
    /// became active (the scheduling loop should wake).
    pub fn add_or_update(&mut self, key: &str, pod: Arc<Pod>, now: Instant) -> bool {
        match self.entries.get_mut(key) {
            None => {
                let last_message = unschedulable_message(&pod);
                self.entries.insert(
                    key.to_string(),
                    Entry {
                        pod,
                        state: State::InFlight,
                        attempts: 0,
                        backoff_until: now,
                        unschedulable_since: now,
                        failure: 0,
                        last_message,
                        seq: 0,
                    },
                );
                self.push_active(key);
                true
            }
            Some(e) => {
                let changed =
                    e.pod.spec != pod.spec || e.pod.metadata.labels != pod.metadata.labels;
                e.pod = pod;
                changed && e.state == State::Unschedulable && self.reactivate(key, now)
            }
        }
    }

    /// Forgets a pod (deleted, bound, or no longer ours).
    pub fn remove(&mut self, key: &str) {
        self.entries.remove(key);
        self.unschedulable.remove(key);
    }

    /// The next pod to schedule, moving pods whose backoff has expired to the active
    /// queue first. The pod is in flight until [`Self::done`], [`Self::unschedulable`]
    /// or [`Self::retry_after_error`].
    pub fn pop(&mut self, now: Instant) -> Option<Popped> {
        self.flush_backoff(now);
        while let Some(item) = self.active.pop() {
            let Some(e) = self.entries.get_mut(&item.key) else {
                continue;
            };
            if e.state != State::Active || e.seq != item.seq {
                continue;
            }
            e.state = State::InFlight;
            return Some(Popped {
                key: item.key,
                pod: e.pod.clone(),
            });
        }
        None
    }

    /// When the earliest backed-off pod becomes ready.
    pub fn next_backoff_expiry(&self) -> Option<Instant> {
        self.backoff.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Scheduling is finished for this pod (bound, or given up).
    pub fn done(&mut self, key: &str) {
        self.remove(key);
    }

    /// No node fits. The pod waits for a helpful event (or the timeout), and in any
    /// case for its backoff.
    pub fn unschedulable(&mut self, key: &str, failure: u8, now: Instant) {
        let backoff = self.next_backoff(key);
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.failure = failure;
        e.backoff_until = now + backoff;
        e.unschedulable_since = now;
        e.state = State::Unschedulable;
        self.unschedulable.insert(key.to_string());
    }

    /// Binding failed for a reason worth retrying: back off, then try again.
    pub fn retry_after_error(&mut self, key: &str, now: Instant) {
        let backoff = self.next_backoff(key);
        if let Some(e) = self.entries.get_mut(key) {
            e.backoff_until = now + backoff;
            self.push_backoff(key);
        }
    }

    /// Records the message reported for a pod; true when it differs from the last one
    /// (only then is it worth writing status and an Event again).
    pub fn set_message(&mut self, key: &str, message: &str) -> bool {
        let Some(e) = self.entries.get_mut(key) else {
            return false;
        };
        if e.last_message.as_deref() == Some(message) {
            return false;
        }
        e.last_message = Some(message.to_string());
        true
    }

    /// Moves the unschedulable pods this event may help back to the queues. Returns
    /// true when any pod became active, so the scheduling loop should wake.
    pub fn on_event(&mut self, event: ClusterEvent, now: Instant) -> bool {
        let helps = event.helps();
        let keys: Vec<String> = self
            .unschedulable
            .iter()
            .filter(|k| self.entries.get(*k).is_some_and(|e| e.failure & helps != 0))
            .cloned()
            .collect();
        let mut woke = false;
        for key in keys {
            woke |= self.reactivate(&key, now);
        }
        woke
    }

    /// Retries pods that have been unschedulable longer than the timeout. Returns true
    /// when any pod became active.
    pub fn flush_unschedulable_timeout(&mut self, now: Instant) -> bool {
        let timeout = self.cfg.unschedulable_timeout;
        let keys: Vec<String> = self
            .unschedulable
            .iter()
            .filter(|k| {
                self.entries.get(*k).is_some_and(|e| {
                    now.saturating_duration_since(e.unschedulable_since) >= timeout
                })
            })
            .cloned()
            .collect();
        let mut woke = false;
        for key in keys {
            woke |= self.reactivate(&key, now);
        }
        woke
    }

    /// Unschedulable -> active, or -> backoff while the pod's backoff runs.
    fn reactivate(&mut self, key: &str, now: Instant) -> bool {
        self.unschedulable.remove(key);
        let Some(e) = self.entries.get(key) else {
            return false;
        };
        if e.backoff_until <= now {
            self.push_active(key);
            true
        } else {
            self.push_backoff(key);
            false
        }
    }

    fn flush_backoff(&mut self, now: Instant) {
        while let Some(Reverse((at, seq, _))) = self.backoff.peek() {
            if *at > now {
                break;
            }
            let seq = *seq;
            let Some(Reverse((_, _, key))) = self.backoff.pop() else {
                break;
            };
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.state == State::Backoff && e.seq == seq)
            {
                self.push_active(&key);
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn push_active(&mut self, key: &str) {
        let seq = self.next_seq();
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.state = State::Active;
        e.seq = seq;
        let spec = e.pod.spec.as_ref();
        self.active.push(ActiveItem {
            priority: spec.and_then(|s| s.priority).unwrap_or(0),
            created_micros: e
                .pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(i64::MAX, |t| t.0.as_microsecond()),
            seq,
            key: key.to_string(),
        });
    }

    fn push_backoff(&mut self, key: &str) {
        let seq = self.next_seq();
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.state = State::Backoff;
        e.seq = seq;
        self.backoff
            .push(Reverse((e.backoff_until, seq, key.to_string())));
    }

    /// Counts a failed attempt: 1 s, 2 s, 4 s ... up to the maximum.
    fn next_backoff(&mut self, key: &str) -> Duration {
        let Some(e) = self.entries.get_mut(key) else {
            return Duration::ZERO;
        };
        e.attempts = e.attempts.saturating_add(1);
        self.cfg
            .initial_backoff
            .saturating_mul(1u32 << (e.attempts - 1).min(16))
            .min(self.cfg.max_backoff)
    }
}

/// The message of a PodScheduled=False/Unschedulable condition the pod already carries
/// (after a scheduler restart the same message is not reported again).
fn unschedulable_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
        .message
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

    fn pod(name: &str, priority: i32, created_secs: i64) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                creation_timestamp: Timestamp::from_second(created_secs).ok().map(Time),
                ..Default::default()
            },
            spec: Some(PodSpec {
                priority: Some(priority),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn pop_key(q: &mut SchedulingQueue, now: Instant) -> Option<String> {
        q.pop(now).map(|p| p.key)
    }

    #[test]
    fn priority_then_creation_order() {
        let mut q = SchedulingQueue::new(QueueConfig::default());
        let now = Instant::now();
        q.add_or_update("ns/old", pod("old", 0, 100), now);
        q.add_or_update("ns/new", pod("new", 0, 200), now);
        q.add_or_update("ns/vip", pod("vip", 10, 300), now);
        assert_eq!(pop_key(&mut q, now).as_deref(), Some("ns/vip"));
        assert_eq!(pop_key(&mut q, now).as_deref(), Some("ns/old"));
        assert_eq!(pop_key(&mut q, now).as_deref(), Some("ns/new"));
        assert_eq!(pop_key(&mut q, now), None);
        // In flight: an update does not enqueue the pod a second time.
        q.add_or_update("ns/old", pod("old", 0, 100), now);
        assert_eq!(pop_key(&mut q, now), None);
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn unschedulable_pods_wait_for_a_helpful_event_and_their_backoff() {
        let mut q = SchedulingQueue::new(QueueConfig::default());
        let t0 = Instant::now();
        q.add_or_update("ns/p", pod("p", 0, 1), t0);
        assert!(q.pop(t0).is_some());
        q.unschedulable("ns/p", kind::POD_REMOVED, t0);
        assert_eq!(pop_key(&mut q, t0 + Duration::from_secs(5)), None);
        // A pod being added does not help a pod that needs room.
        assert!(!q.on_event(ClusterEvent::PodAdded, t0 + Duration::from_secs(5)));
        assert_eq!(pop_key(&mut q, t0 + Duration::from_secs(5)), None);
        // A pod going away does; its 1 s backoff is over.
        assert!(q.on_event(ClusterEvent::PodRemoved, t0 + Duration::from_secs(5)));
        assert_eq!(
            pop_key(&mut q, t0 + Duration::from_secs(5)).as_deref(),
            Some("ns/p")
        );

        // Second failure: 2 s backoff. An event right away parks it in backoff.
        let t1 = t0 + Duration::from_secs(5);
        q.unschedulable("ns/p", kind::NODE, t1);
        assert!(!q.on_event(ClusterEvent::NodeChanged, t1));
        assert_eq!(pop_key(&mut q, t1 + Duration::from_millis(1999)), None);
        assert_eq!(q.next_backoff_expiry(), Some(t1 + Duration::from_secs(2)));
        assert_eq!(
            pop_key(&mut q, t1 + Duration::from_secs(2)).as_deref(),
            Some("ns/p")
        );
    }

    #[test]
    fn backoff_is_capped_and_timeout_retries_without_events() {
        let mut q = SchedulingQueue::new(QueueConfig::default());
        let mut now = Instant::now();
        q.add_or_update("ns/p", pod("p", 0, 1), now);
        for _ in 0..10 {
            assert!(q.pop(now).is_some());
            q.retry_after_error("ns/p", now);
            now += Duration::from_secs(10);
        }
        assert!(q.pop(now).is_some());
        q.retry_after_error("ns/p", now);
        assert_eq!(q.next_backoff_expiry(), Some(now + Duration::from_secs(10)));
        now += Duration::from_secs(10);
        assert!(q.pop(now).is_some());

        q.unschedulable("ns/p", kind::NODE, now);
        assert!(!q.flush_unschedulable_timeout(now + Duration::from_secs(59)));
        assert!(q.flush_unschedulable_timeout(now + Duration::from_secs(60)));
        assert_eq!(
            pop_key(&mut q, now + Duration::from_secs(60)).as_deref(),
            Some("ns/p")
        );
    }

    #[test]
    fn spec_change_retries_an_unschedulable_pod_but_status_change_does_not() {
        let mut q = SchedulingQueue::new(QueueConfig::default());
        let t0 = Instant::now();
        q.add_or_update("ns/p", pod("p", 0, 1), t0);
        assert!(q.pop(t0).is_some());
        q.unschedulable("ns/p", kind::NODE, t0);
        let later = t0 + Duration::from_secs(2);
        let mut with_status = (*pod("p", 0, 1)).clone();
        with_status.status = Some(Default::default());
        q.add_or_update("ns/p", Arc::new(with_status), later);
        assert_eq!(pop_key(&mut q, later), None);
        q.add_or_update("ns/p", pod("p", 5, 1), later);
        assert_eq!(pop_key(&mut q, later).as_deref(), Some("ns/p"));
    }

    #[test]
    fn messages_are_reported_once_and_removed_pods_vanish() {
        let mut q = SchedulingQueue::new(QueueConfig::default());
        let t0 = Instant::now();
        q.add_or_update("ns/p", pod("p", 0, 1), t0);
        assert!(q.set_message("ns/p", "0/1 nodes are available: 1 Too many pods."));
        assert!(!q.set_message("ns/p", "0/1 nodes are available: 1 Too many pods."));
        assert!(q.set_message("ns/p", "0/2 nodes are available: 2 Too many pods."));
        q.remove("ns/p");
        assert_eq!(pop_key(&mut q, t0), None);
        assert!(!q.set_message("ns/p", "x"));
    }
}
