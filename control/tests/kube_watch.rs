//! kube-rs against skiff-apiserver: a `watcher` + `reflector` on ConfigMaps stays
//! consistent through 1000 writes (creates, updates, deletes) with an apiserver restart
//! in the middle. At the end the reflector's store equals a fresh list (names and
//! resourceVersions), and the fresh list equals every acknowledged write.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{ApiServer, Backend};

const WRITES: usize = 1000;
const NS: &str = "watch";

fn cm(name: &str, i: usize) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some([("gen".to_string(), i.to_string())].into()),
            ..Default::default()
        },
        data: Some([("i".to_string(), i.to_string())].into()),
        ..Default::default()
    }
}

fn rv(o: &ConfigMap) -> String {
    o.metadata.resource_version.clone().unwrap_or_default()
}

fn name(o: &ConfigMap) -> String {
    o.metadata.name.clone().unwrap_or_default()
}

/// Retries a read until the apiserver answers (after a restart, pooled connections to the
/// old process fail once).
async fn wait_answering(api: &Api<ConfigMap>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match api.list(&Default::default()).await {
            Ok(_) => return,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("waiting for the apiserver after restart: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("apiserver does not answer after restart: {e}"),
        }
    }
}

async fn reflector_survives_writes_and_restart(backend: Backend) {
    let mut server = tokio::task::block_in_place(|| ApiServer::start(backend));
    let port = server.port;
    let client = server.kube_client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("creating namespace");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NS);

    let (reader, writer) = reflector::store::<ConfigMap>();
    let errors = Arc::new(AtomicUsize::new(0));
    let events = Arc::new(AtomicUsize::new(0));
    let stream = reflector(
        writer,
        watcher(api.clone(), watcher::Config::default()).default_backoff(),
    );
    let (errs, evs) = (errors.clone(), events.clone());
    let pump = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => evs.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    eprintln!("watcher error (recovers with backoff): {e}");
                    errs.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    });
    tokio::time::timeout(Duration::from_secs(30), reader.wait_until_ready())
        .await
        .expect("reflector not ready within 30s")
        .expect("reflector writer dropped");

    // What every acknowledged write says the state is: name -> (object, resourceVersion).
    let mut expected: BTreeMap<String, ConfigMap> = BTreeMap::new();
    let mut rng = StdRng::seed_from_u64(0x5eed_5c1f);
    let mut next_id = 0usize;
    let mut last_rv: u64 = 0;
    let mut check_rv = |o: &ConfigMap, what: &str| {
        let n: u64 = rv(o)
            .parse()
            .unwrap_or_else(|_| panic!("{what}: resourceVersion {:?} is not a number", rv(o)));
        assert!(
            n > last_rv,
            "{what}: resourceVersion {n} not above the previous write's {last_rv}"
        );
        last_rv = n;
    };
    for i in 0..WRITES {
        if i == WRITES / 2 {
            tokio::task::block_in_place(|| server.restart());
            assert_eq!(
                server.port, port,
                "the restarted apiserver must keep its port for the watcher to reconnect"
            );
            wait_answering(&api).await;
        }
        let roll = rng.random_range(0..10);
        let pick = |rng: &mut StdRng, m: &BTreeMap<String, ConfigMap>| -> String {
            let k = rng.random_range(0..m.len());
            m.keys().nth(k).unwrap().clone()
        };
        if expected.len() < 5 || roll < 4 {
            let n = format!("cm-{next_id}");
            next_id += 1;
            let o = api
                .create(&PostParams::default(), &cm(&n, i))
                .await
                .unwrap_or_else(|e| panic!("write {i}: create {n}: {e}"));
            check_rv(&o, &format!("write {i}: create {n}"));
            expected.insert(n, o);
        } else if roll < 6 {
            // PUT with the resourceVersion of our last write (optimistic concurrency).
            let n = pick(&mut rng, &expected);
            let mut o = expected[&n].clone();
            o.data = Some([("i".to_string(), i.to_string())].into());
            let o = api
                .replace(&n, &PostParams::default(), &o)
                .await
                .unwrap_or_else(|e| panic!("write {i}: replace {n}: {e}"));
            check_rv(&o, &format!("write {i}: replace {n}"));
            expected.insert(n, o);
        } else if roll < 8 {
            let n = pick(&mut rng, &expected);
            let p = serde_json::json!({"metadata": {"labels": {"gen": i.to_string()}}});
            let o = api
                .patch(&n, &PatchParams::default(), &Patch::Merge(&p))
                .await
                .unwrap_or_else(|e| panic!("write {i}: merge patch {n}: {e}"));
            check_rv(&o, &format!("write {i}: patch {n}"));
            expected.insert(n, o);
        } else {
            let n = pick(&mut rng, &expected);
            api.delete(&n, &DeleteParams::default())
                .await
                .unwrap_or_else(|e| panic!("write {i}: delete {n}: {e}"));
            expected.remove(&n);
        }
    }

    let want: BTreeMap<String, String> = expected.iter().map(|(k, o)| (k.clone(), rv(o))).collect();
    let fresh = api.list(&Default::default()).await.expect("fresh list");
    let listed: BTreeMap<String, String> = fresh.items.iter().map(|o| (name(o), rv(o))).collect();
    assert_eq!(listed.len(), fresh.items.len(), "duplicate names in a list");
    if listed != want {
        let lost: Vec<_> = want
            .iter()
            .filter(|(k, v)| listed.get(*k) != Some(v))
            .collect();
        let extra: Vec<_> = listed
            .iter()
            .filter(|(k, _)| !want.contains_key(*k))
            .collect();
        panic!(
            "acknowledged writes lost: {} objects differ from the last write ({lost:?}); {} unexpected objects ({extra:?})",
            lost.len(),
            extra.len()
        );
    }

    // The reflector converges on the fresh list (bounded wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let cached: BTreeMap<String, String> =
            reader.state().iter().map(|o| (name(o), rv(o))).collect();
        if cached == listed {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let missing: Vec<_> = listed
                .iter()
                .filter(|(k, v)| cached.get(*k) != Some(v))
                .take(10)
                .collect();
            let stale: Vec<_> = cached
                .iter()
                .filter(|(k, v)| listed.get(*k) != Some(v))
                .take(10)
                .collect();
            panic!(
                "reflector store differs from a fresh list after 60s: {} cached vs {} listed; missing/outdated in cache (first 10): {missing:?}; cached but not listed (first 10): {stale:?}; watcher errors: {}, events: {}\n{}",
                cached.len(),
                listed.len(),
                errors.load(Ordering::Relaxed),
                events.load(Ordering::Relaxed),
                server.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        events.load(Ordering::Relaxed) >= WRITES / 2,
        "the watcher saw too few events: {}",
        events.load(Ordering::Relaxed)
    );
    pump.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_reflector_survives_1000_writes_and_restart() {
    tokio::time::timeout(
        Duration::from_secs(300),
        reflector_survives_writes_and_restart(Backend::Embedded),
    )
    .await
    .expect("test exceeded 300s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_reflector_survives_1000_writes_and_restart() {
    tokio::time::timeout(
        Duration::from_secs(300),
        reflector_survives_writes_and_restart(Backend::Etcd),
    )
    .await
    .expect("test exceeded 300s");
}
