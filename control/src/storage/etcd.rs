//! etcd backend (etcd v3 API through etcd-client).
//!
//! Keys are used exactly as given (the apiserver passes /registry/<resource>/<ns>/<name>),
//! revision = etcd revision = resourceVersion. Conditional writes are etcd transactions:
//! - create: `create_revision(key) == 0` then put, else get (-> AlreadyExists);
//! - update/delete: `mod_revision(key) == expected` (or `version(key) > 0` without an
//!   expectation) then put/delete, else get (absent -> NotFound, present -> Conflict).
//!
//! Availability: the client connects lazily (tonic channel), so `connect` never waits for
//! etcd; every request is bounded by a timeout and transport failures become
//! `StorageError::Unavailable` (503 at the apiserver). The channel reconnects by itself
//! when etcd comes back.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};

use super::{
    EventKind, KeyValue, ListResult, Result, Revision, StorageError, Store, WatchEvent, WatchStream,
};

/// Upper bound for every unary request (and for establishing a watch).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    timeout: Duration,
}

/// Maps an etcd-client error: anything about reaching etcd is `Unavailable`.
fn map_err(e: etcd_client::Error) -> StorageError {
    use etcd_client::Error as E;
    match &e {
        E::GRpcStatus(status) => {
            let msg = status.message();
            match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown => StorageError::Unavailable(format!("etcd: {e}")),
                tonic::Code::OutOfRange if msg.contains("compacted") => StorageError::Compacted {
                    requested: 0,
                    oldest: 0,
                },
                _ => StorageError::Internal(format!("etcd: {e}")),
            }
        }
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => {
            StorageError::Unavailable(format!("etcd: {e}"))
        }
        _ => StorageError::Internal(format!("etcd: {e}")),
    }
}

fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: kv
            .key_str()
            .map_err(|e| StorageError::Internal(format!("non-UTF-8 key in etcd: {e}")))?
            .to_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

/// The first key after every key starting with `prefix` (etcd's "prefix end").
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty prefix (or all 0xff): the whole key space.
    vec![0]
}

impl EtcdStore {
    /// Creates a client for `endpoints` ("127.0.0.1:2379" or "http://..."). Connects
    /// lazily: it returns at once even if etcd is down; requests then fail with
    /// `Unavailable` until etcd answers.
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        Self::connect_with_timeout(endpoints, REQUEST_TIMEOUT).await
    }

    pub async fn connect_with_timeout(endpoints: &[String], timeout: Duration) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| {
                StorageError::Unavailable(format!(
                    "etcd: connecting to {endpoints:?} timed out after {timeout:?}"
                ))
            })?
            .map_err(map_err)?;
        Ok(Self { client, timeout })
    }

    /// The underlying client (tests use it for maintenance calls such as compaction).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    async fn call<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(map_err),
            Err(_) => Err(StorageError::Unavailable(format!(
                "etcd: request timed out after {:?}",
                self.timeout
            ))),
        }
    }

    /// Runs `when(compare) then(op) else(get key)`. On failure returns the current value.
    async fn cas(
        &self,
        key: &str,
        compare: Compare,
        op: TxnOp,
    ) -> Result<std::result::Result<etcd_client::TxnResponse, Option<KeyValue>>> {
        let txn = Txn::new()
            .when([compare])
            .and_then([op])
            .or_else([TxnOp::get(key, None)]);
        let mut client = self.client.clone();
        let resp = self.call(client.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Ok(resp));
        }
        let current = match resp.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().map(convert).transpose()?,
            _ => None,
        };
        Ok(Err(current))
    }

    fn expect_compare(key: &str, expected: Option<Revision>) -> Compare {
        match expected {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
            None => Compare::version(key, CompareOp::Greater, 0),
        }
    }

    fn failed(key: &str, expected: Option<Revision>, current: Option<KeyValue>) -> StorageError {
        match current {
            None => StorageError::NotFound(key.to_owned()),
            Some(kv) => StorageError::Conflict {
                key: key.to_owned(),
                expected: expected.unwrap_or_default(),
                actual: kv.mod_revision,
            },
        }
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StorageError::Internal("etcd response without header".into()))
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut client = self.client.clone();
        let resp = self.call(client.get(key, None)).await?;
        resp.kvs().first().map(convert).transpose()
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListResult> {
        let start: Vec<u8> = match start_after {
            Some(after) if after >= prefix => {
                let mut k = after.as_bytes().to_vec();
                k.push(0);
                k
            }
            _ => prefix.as_bytes().to_vec(),
        };
        let mut options = GetOptions::new().with_range(prefix_end(prefix));
        if let Some(limit) = limit {
            // One extra item tells whether there are more.
            options = options.with_limit(limit as i64 + 1);
        }
        let mut client = self.client.clone();
        let resp = self.call(client.get(start, Some(options))).await?;
        let revision = header_revision(resp.header())?;
        let mut items = resp.kvs().iter().map(convert).collect::<Result<Vec<_>>>()?;
        let more = match limit {
            Some(limit) if items.len() > limit => {
                items.truncate(limit);
                true
            }
            _ => false,
        };
        Ok(ListResult {
            items,
            revision,
            more,
        })
    }

    async fn count(&self, prefix: &str) -> Result<i64> {
        let options = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_count_only();
        let mut client = self.client.clone();
        let resp = self.call(client.get(prefix, Some(options))).await?;
        Ok(resp.count())
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let compare = Compare::create_revision(key, CompareOp::Equal, 0);
        match self.cas(key, compare, TxnOp::put(key, value, None)).await? {
            Ok(resp) => header_revision(resp.header()),
            Err(_) => Err(StorageError::AlreadyExists(key.to_owned())),
        }
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<Revision>,
    ) -> Result<Revision> {
        let compare = Self::expect_compare(key, expected);
        match self.cas(key, compare, TxnOp::put(key, value, None)).await? {
            Ok(resp) => header_revision(resp.header()),
            Err(current) => Err(Self::failed(key, expected, current)),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let compare = Self::expect_compare(key, expected);
        let op = TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()));
        match self.cas(key, compare, op).await? {
            Ok(resp) => {
                let revision = header_revision(resp.header())?;
                let prev = match resp.op_responses().into_iter().next() {
                    Some(TxnOpResponse::Delete(del)) => del.prev_kvs().first().map(convert),
                    _ => None,
                };
                match prev {
                    Some(prev) => Ok((revision, prev?)),
                    None => Err(StorageError::NotFound(key.to_owned())),
                }
            }
            Err(current) => Err(Self::failed(key, expected, current)),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        let mut client = self.client.clone();
        let resp = self
            .call(client.get("\0", Some(GetOptions::new().with_count_only())))
            .await?;
        header_revision(resp.header())
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let start = after + 1;
        // Fail synchronously when `after` is compacted: a range read at `start` fails with
        // "required revision has been compacted" exactly when a watch from `start` would.
        let mut client = self.client.clone();
        let probe = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_count_only()
            .with_revision(start);
        let current = {
            let resp = self
                .call(client.get("\0", Some(GetOptions::new().with_count_only())))
                .await?;
            header_revision(resp.header())?
        };
        if start <= current {
            match self.call(client.get(prefix, Some(probe))).await {
                Ok(_) => {}
                Err(StorageError::Compacted { .. }) => {
                    return Err(StorageError::Compacted {
                        requested: after,
                        oldest: compacted_revision(&mut client, self.timeout)
                            .await
                            .unwrap_or(start),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let options = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_prev_key()
            .with_start_revision(start);
        let stream = self.call(client.watch(prefix, Some(options))).await?;
        let state = EtcdWatch {
            stream,
            pending: Vec::new().into_iter(),
            after,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, EtcdWatch::next)))
    }
}

/// Best effort: etcd does not expose the compaction revision directly; a watch from
/// revision 1 is answered with it.
async fn compacted_revision(client: &mut Client, timeout: Duration) -> Option<Revision> {
    let fut = async {
        let mut ws = client
            .watch("\0", Some(WatchOptions::new().with_start_revision(1)))
            .await
            .ok()?;
        for _ in 0..4 {
            let resp = ws.message().await.ok()??;
            if resp.compact_revision() > 0 {
                return Some(resp.compact_revision() - 1);
            }
        }
        None
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

struct EtcdWatch {
    stream: etcd_client::WatchStream,
    pending: std::vec::IntoIter<WatchEvent>,
    /// Revision of the last delivered event.
    after: Revision,
    done: bool,
}

impl EtcdWatch {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if self.done {
                return None;
            }
            if let Some(event) = self.pending.next() {
                self.after = event.revision;
                return Some((Ok(event), self));
            }
            let resp = match self.stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    self.done = true;
                    return Some((
                        Err(StorageError::Unavailable(
                            "etcd: watch stream closed".into(),
                        )),
                        self,
                    ));
                }
                Err(e) => {
                    self.done = true;
                    return Some((Err(map_err(e)), self));
                }
            };
            if resp.compact_revision() > 0 {
                self.done = true;
                let err = StorageError::Compacted {
                    requested: self.after,
                    oldest: resp.compact_revision() - 1,
                };
                return Some((Err(err), self));
            }
            if resp.canceled() {
                self.done = true;
                let reason = resp.cancel_reason().to_owned();
                return Some((
                    Err(StorageError::Unavailable(format!(
                        "etcd: watch canceled: {reason}"
                    ))),
                    self,
                ));
            }
            let mut events = Vec::with_capacity(resp.events().len());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = match kv.key_str() {
                    Ok(k) => k.to_owned(),
                    Err(e) => {
                        self.done = true;
                        return Some((
                            Err(StorageError::Internal(format!(
                                "non-UTF-8 key in etcd: {e}"
                            ))),
                            self,
                        ));
                    }
                };
                let revision = kv.mod_revision();
                if revision <= self.after {
                    continue;
                }
                let event = match ev.event_type() {
                    EventType::Put => WatchEvent::new(
                        if kv.create_revision() == kv.mod_revision() {
                            EventKind::Added
                        } else {
                            EventKind::Modified
                        },
                        key,
                        kv.value().to_vec(),
                        revision,
                    ),
                    EventType::Delete => WatchEvent::new(
                        EventKind::Deleted,
                        key,
                        ev.prev_kv().map(|p| p.value().to_vec()).unwrap_or_default(),
                        revision,
                    ),
                };
                events.push(event);
            }
            self.pending = events.into_iter();
        }
    }
}
