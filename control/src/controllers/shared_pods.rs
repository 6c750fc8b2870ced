//! One pod watch for the whole controller-manager, as client-go's shared informers: each
//! pod event is decoded and cached once, then handed to every controller that watches
//! pods. Separate watches per controller meant every pod write was decoded and copied
//! into a cache five times (most of the controller-manager's CPU while the scheduler binds
//! hundreds of pods a second), and the apiserver served five more pod watches.
//!
//! The cached pods have no managedFields ([`PodWithoutManagedFields`]): no controller reads
//! them, and they are most of a pod's decoding cost.
//!
//! Controllers take `events()` as a shared trigger stream
//! (`Controller::watches_shared_stream` / `owns_shared_stream`: the pod is handed out as
//! the one `Arc`, never copied per controller) and may read `store()` instead of listing
//! pods from the apiserver.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::broadcast;

use crate::objects::{PodWithoutManagedFields, without_managed_fields};

/// Pod changes buffered per subscriber before it counts as lagging (it then gets every
/// cached pod as a trigger instead, which level-triggered controllers take in stride).
const BUFFER: usize = 16_384;

pub struct SharedPods {
    store: Store<Pod>,
    changes: broadcast::Sender<Arc<Pod>>,
}

/// The watch that fills a [`SharedPods`]; `run` it once, next to the controllers.
pub struct PodWatch {
    client: Client,
    writer: reflector::store::Writer<Pod>,
    changes: broadcast::Sender<Arc<Pod>>,
}

impl SharedPods {
    pub fn new(client: Client) -> (Arc<Self>, PodWatch) {
        let (store, writer) = reflector::store();
        let (changes, _) = broadcast::channel(BUFFER);
        let watch = PodWatch {
            client,
            writer,
            changes: changes.clone(),
        };
        (Arc::new(Self { store, changes }), watch)
    }

    /// The pod cache (ready after the first full list: `Store::wait_until_ready`).
    pub fn store(&self) -> Store<Pod> {
        self.store.clone()
    }

    /// Every pod that is added, changes or is deleted from now on (the deleted pod's last
    /// state), for `Controller::watches_shared_stream` / `owns_shared_stream`.
    pub fn events(&self) -> impl Stream<Item = Arc<Pod>> + Send + 'static {
        let rx = self.changes.subscribe();
        let store = self.store.clone();
        futures::stream::unfold((rx, store), |(mut rx, store)| async move {
            let batch: Vec<Arc<Pod>> = match rx.recv().await {
                Ok(pod) => vec![pod],
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        "a controller fell {n} pod events behind; waking it for every pod"
                    );
                    store.state()
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((futures::stream::iter(batch), (rx, store)))
        })
        .flatten()
    }
}

impl PodWatch {
    /// Watches pods, filling the cache and fanning changes out, until the stream ends.
    pub async fn run(self) {
        let api: Api<PodWithoutManagedFields> = Api::all(self.client);
        let mut changes = reflector::reflector(
            self.writer,
            without_managed_fields(watcher(api, watcher::Config::default()).default_backoff()),
        )
        .touched_objects()
        .boxed();
        while let Some(change) = changes.next().await {
            match change {
                // No subscribers is fine.
                Ok(pod) => drop(self.changes.send(Arc::new(pod))),
                Err(e) => tracing::warn!("pod watch: {e}"),
            }
        }
    }
}
