//! Recording core/v1 Events the way client-go's `record` package does, so a burst of
//! events neither floods the apiserver nor holds up the work that caused it:
//!
//! - [`EventRecorder::record`] never waits: it queues the event (1000 deep; a full
//!   queue drops it, as client-go's broadcaster does) and one writer task sends them
//!   one at a time, so events take a small share of the apiserver next to bindings and
//!   pod writes;
//! - the [`Correlator`] in front of the writer does what client-go's EventCorrelator
//!   does: an event seen before (same object, reason and message) becomes a PATCH of
//!   the existing Event's count and lastTimestamp; once more than 10 different messages
//!   share an object and reason within 10 minutes they are combined into one Event
//!   ("(combined from similar events): ..."); and each source/object pair has a token
//!   bucket (burst 25, one more every 5 minutes) past which events are dropped. A
//!   ReplicaSet creating 1000 pods thus writes ~25 SuccessfulCreate Events, not 1000.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;

use crate::controllers::now;

/// Events waiting for the writer; more are dropped (client-go: 1000 as well).
const QUEUE_LENGTH: usize = 1000;
/// Distinct messages per object and reason before they are combined (client-go's
/// defaultAggregateMaxEvents).
const AGGREGATE_MAX_EVENTS: usize = 10;
/// How long an aggregation or a seen event is remembered (defaultAggregateIntervalInSeconds).
const AGGREGATE_INTERVAL: Duration = Duration::from_secs(600);
/// Events per source and object without waiting (defaultSpamBurst).
const SPAM_BURST: f64 = 25.0;
/// One more event per source and object every 5 minutes (defaultSpamQPS = 1/300).
const SPAM_REFILL: Duration = Duration::from_secs(300);
/// Entries kept per correlator table before old ones are pruned (client-go's LRU size).
const MAX_CACHE_ENTRIES: usize = 4096;
const COMBINED_PREFIX: &str = "(combined from similar events): ";

/// Queues Events for one process. Cheap to clone; all clones share the writer.
#[derive(Clone)]
pub struct EventRecorder {
    tx: mpsc::Sender<Event>,
}

impl EventRecorder {
    /// Starts the writer task on the current tokio runtime.
    pub fn new(client: Client) -> EventRecorder {
        let (tx, rx) = mpsc::channel(QUEUE_LENGTH);
        tokio::spawn(write_events(client, rx));
        EventRecorder { tx }
    }

    /// Records an Event about `obj` from `component` (what `kubectl describe` lists).
    /// Best effort and never blocks: failing to record must not fail the caller.
    pub fn record<K>(&self, component: &str, obj: &K, type_: &str, reason: &str, message: &str)
    where
        K: Resource<DynamicType = ()>,
    {
        let event = new_event(component, obj, type_, reason, message);
        if let Err(e) = self.tx.try_send(event) {
            tracing::debug!("dropping event {reason} for {}: {e}", obj.name_any());
        }
    }
}

/// A fresh Event (count 1) about `obj`.
fn new_event<K>(component: &str, obj: &K, type_: &str, reason: &str, message: &str) -> Event
where
    K: Resource<DynamicType = ()>,
{
    let ns = obj
        .meta()
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let ts = now();
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(&obj.name_any())),
            namespace: Some(ns),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: obj.meta().name.clone(),
            namespace: obj.meta().namespace.clone(),
            uid: obj.meta().uid.clone(),
            resource_version: obj.meta().resource_version.clone(),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(type_.into()),
        source: Some(EventSource {
            component: Some(component.into()),
            host: None,
        }),
        reporting_component: Some(component.into()),
        reporting_instance: Some(component.into()),
        first_timestamp: Some(ts.clone()),
        last_timestamp: Some(ts),
        count: Some(1),
        ..Default::default()
    }
}

/// Kubernetes names events `<object>.<hex timestamp>`; the object part is cut so a long
/// object name still gives a valid (<= 253 bytes) name.
fn event_name(object: &str) -> String {
    let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let object = object.get(..253 - 17).unwrap_or(object);
    format!("{object}.{nanos:x}")
}

/// The writer: correlates each event, then creates or patches it, one at a time.
async fn write_events(client: Client, mut rx: mpsc::Receiver<Event>) {
    let mut correlator = Correlator::default();
    while let Some(event) = rx.recv().await {
        match correlator.correlate(event, Instant::now()) {
            Correlated::Skip => {}
            Correlated::Create(event) => create(&client, &event).await,
            Correlated::Update(event) => {
                let patch = serde_json::json!({
                    "count": event.count,
                    "lastTimestamp": event.last_timestamp,
                    "message": event.message,
                });
                match events_api(&client, &event)
                    .patch(
                        &event.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(_) => {}
                    // Expired or deleted meanwhile: write it anew (client-go does the same).
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        let mut fresh = event;
                        fresh.metadata.resource_version = None;
                        create(&client, &fresh).await;
                    }
                    Err(e) => tracing::debug!("updating event {}: {e}", event.name_any()),
                }
            }
        }
    }
}

/// The Events of `event`'s namespace.
fn events_api(client: &Client, event: &Event) -> Api<Event> {
    Api::namespaced(
        client.clone(),
        event.metadata.namespace.as_deref().unwrap_or("default"),
    )
}

async fn create(client: &Client, event: &Event) {
    if let Err(e) = events_api(client, event)
        .create(&PostParams::default(), event)
        .await
    {
        tracing::debug!(
            "recording event {} for {}: {e}",
            event.reason.as_deref().unwrap_or_default(),
            event.involved_object.name.as_deref().unwrap_or_default()
        );
    }
}

/// What to do with one recorded event.
#[derive(Debug, PartialEq)]
enum Correlated {
    /// Dropped by the spam filter.
    Skip,
    /// A new Event object.
    Create(Event),
    /// An Event written before: patch its count, lastTimestamp and message.
    Update(Event),
}

/// client-go's EventCorrelator: aggregation, the spam filter, then deduplication (only
/// events that are written are remembered, so a repeat is never a PATCH of an event
/// that was dropped).
#[derive(Default)]
struct Correlator {
    /// Aggregate key (source, object, type, reason) -> the messages seen.
    aggregates: HashMap<String, Aggregate>,
    /// Event key -> the Event object already written for it.
    seen: HashMap<String, Seen>,
    /// Spam key (source, object, type) -> token bucket.
    buckets: HashMap<String, Bucket>,
}

struct Aggregate {
    messages: HashSet<String>,
    last: Instant,
}

struct Seen {
    name: String,
    count: i32,
    first_timestamp: Option<Time>,
    last: Instant,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Correlator {
    fn correlate(&mut self, mut event: Event, now: Instant) -> Correlated {
        let object = object_key(&event);
        let aggregate_key = format!(
            "{object}\u{0}{}\u{0}{}",
            event.type_.as_deref().unwrap_or_default(),
            event.reason.as_deref().unwrap_or_default()
        );
        let message = event.message.clone().unwrap_or_default();
        prune(&mut self.aggregates, now, |a| a.last);
        let aggregate = self
            .aggregates
            .entry(aggregate_key.clone())
            .or_insert_with(|| Aggregate {
                messages: HashSet::new(),
                last: now,
            });
        if now.duration_since(aggregate.last) > AGGREGATE_INTERVAL {
            aggregate.messages.clear();
        }
        aggregate.last = now;
        aggregate.messages.insert(message.clone());
        // Below the threshold every message is its own event; from then on they share
        // one combined event keyed by object and reason alone.
        let event_key = if aggregate.messages.len() < AGGREGATE_MAX_EVENTS {
            format!("{aggregate_key}\u{0}{message}")
        } else {
            event.message = Some(format!("{COMBINED_PREFIX}{message}"));
            aggregate_key
        };

        let spam_key = format!(
            "{object}\u{0}{}",
            event.type_.as_deref().unwrap_or_default()
        );
        prune(&mut self.buckets, now, |b| b.last);
        let bucket = self.buckets.entry(spam_key).or_insert(Bucket {
            tokens: SPAM_BURST,
            last: now,
        });
        let refill = now.duration_since(bucket.last).as_secs_f64() / SPAM_REFILL.as_secs_f64();
        bucket.tokens = (bucket.tokens + refill).min(SPAM_BURST);
        bucket.last = now;
        if bucket.tokens < 1.0 {
            return Correlated::Skip;
        }
        bucket.tokens -= 1.0;

        prune(&mut self.seen, now, |s| s.last);
        let update = match self.seen.get_mut(&event_key) {
            Some(seen) if now.duration_since(seen.last) <= AGGREGATE_INTERVAL => {
                seen.count = seen.count.saturating_add(1);
                seen.last = now;
                event.metadata.name = Some(seen.name.clone());
                event.count = Some(seen.count);
                event.first_timestamp = seen.first_timestamp.clone();
                true
            }
            _ => {
                self.seen.insert(
                    event_key,
                    Seen {
                        name: event.name_any(),
                        count: 1,
                        first_timestamp: event.first_timestamp.clone(),
                        last: now,
                    },
                );
                false
            }
        };

        if update {
            Correlated::Update(event)
        } else {
            Correlated::Create(event)
        }
    }
}

/// The source and involved object of an event, as one key.
fn object_key(event: &Event) -> String {
    let source = event.source.as_ref();
    let o = &event.involved_object;
    [
        source.and_then(|s| s.component.as_deref()),
        source.and_then(|s| s.host.as_deref()),
        o.kind.as_deref(),
        o.namespace.as_deref(),
        o.name.as_deref(),
        o.uid.as_deref(),
        o.api_version.as_deref(),
        o.field_path.as_deref(),
    ]
    .map(Option::unwrap_or_default)
    .join("\u{0}")
}

/// Bounds a correlator table: past [`MAX_CACHE_ENTRIES`], entries idle for longer than
/// the aggregation interval go (a full bucket or a forgotten event behaves as new).
fn prune<V>(table: &mut HashMap<String, V>, now: Instant, last: impl Fn(&V) -> Instant) {
    if table.len() < MAX_CACHE_ENTRIES {
        return;
    }
    table.retain(|_, v| now.duration_since(last(v)) <= AGGREGATE_INTERVAL);
    if table.len() >= MAX_CACHE_ENTRIES {
        // Everything is recent: forget it all rather than grow without bound.
        table.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn event(obj: &str, reason: &str, message: &str) -> Event {
        new_event("test", &pod(obj), "Normal", reason, message)
    }

    #[test]
    fn repeated_event_patches_the_first_with_a_count() {
        let mut c = Correlator::default();
        let t = Instant::now();
        let Correlated::Create(first) = c.correlate(event("a", "Pulled", "pulled x"), t) else {
            panic!("first event must be created");
        };
        let Correlated::Update(again) =
            c.correlate(event("a", "Pulled", "pulled x"), t + Duration::from_secs(1))
        else {
            panic!("a repeat must update the existing event");
        };
        assert_eq!(again.metadata.name, first.metadata.name);
        assert_eq!(again.count, Some(2));
        assert_eq!(again.first_timestamp, first.first_timestamp);
        // Another message or another object is a new event.
        assert!(matches!(
            c.correlate(event("a", "Pulled", "pulled y"), t),
            Correlated::Create(_)
        ));
        assert!(matches!(
            c.correlate(event("b", "Pulled", "pulled x"), t),
            Correlated::Create(_)
        ));
    }

    #[test]
    fn many_messages_for_one_reason_are_combined() {
        let mut c = Correlator::default();
        let t = Instant::now();
        for i in 0..AGGREGATE_MAX_EVENTS - 1 {
            let r = c.correlate(
                event("rs", "SuccessfulCreate", &format!("Created pod: p{i}")),
                t,
            );
            assert!(matches!(r, Correlated::Create(_)), "event {i}: {r:?}");
        }
        let Correlated::Create(combined) =
            c.correlate(event("rs", "SuccessfulCreate", "Created pod: p9"), t)
        else {
            panic!("the tenth message starts a combined event");
        };
        assert_eq!(
            combined.message.as_deref(),
            Some("(combined from similar events): Created pod: p9")
        );
        let Correlated::Update(next) =
            c.correlate(event("rs", "SuccessfulCreate", "Created pod: p10"), t)
        else {
            panic!("later messages update the combined event");
        };
        assert_eq!(next.metadata.name, combined.metadata.name);
        assert_eq!(next.count, Some(2));
        assert_eq!(
            next.message.as_deref(),
            Some("(combined from similar events): Created pod: p10")
        );
    }

    #[test]
    fn spam_filter_allows_a_burst_then_one_per_five_minutes() {
        let mut c = Correlator::default();
        let t = Instant::now();
        let mut written = 0;
        for i in 0..100 {
            // Distinct reasons, so neither dedup nor aggregation hides the limit.
            let r = c.correlate(event("noisy", &format!("R{i}"), "m"), t);
            if r != Correlated::Skip {
                written += 1;
            }
        }
        assert_eq!(written, SPAM_BURST as usize);
        assert_eq!(
            c.correlate(event("noisy", "Later", "m"), t),
            Correlated::Skip
        );
        assert!(matches!(
            c.correlate(event("noisy", "Later", "m"), t + SPAM_REFILL),
            Correlated::Create(_)
        ));
        // Other objects have their own bucket.
        assert!(matches!(
            c.correlate(event("quiet", "R0", "m"), t),
            Correlated::Create(_)
        ));
    }

    #[test]
    fn tables_stay_bounded() {
        let mut c = Correlator::default();
        let t = Instant::now();
        for i in 0..MAX_CACHE_ENTRIES * 2 {
            c.correlate(event(&format!("p{i}"), "Scheduled", "ok"), t);
        }
        assert!(c.seen.len() <= MAX_CACHE_ENTRIES);
        assert!(c.aggregates.len() <= MAX_CACHE_ENTRIES);
        assert!(c.buckets.len() <= MAX_CACHE_ENTRIES);
    }
}
