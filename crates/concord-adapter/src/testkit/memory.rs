//! `MemorySystem`: a business system that lives in a `HashMap`, with a change feed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::Stream;
use prost_reflect::Value;
use tokio::sync::Notify;

use crate::adapter::{
    AdapterError, Applied, Apply, ApplyOp, Echoes, Fields, LocalChange, LocalOp, SystemAdapter,
};

/// The fields of one record.
pub type Record = BTreeMap<String, Value>;

#[derive(Debug, Default)]
struct State {
    records: HashMap<(String, String), Record>,
    /// Every change, in order; the cursor is the position after a change.
    log: Vec<LocalChange>,
    next_id: u64,
    applied: Vec<Apply>,
    failures: VecDeque<AdapterError>,
    /// While set, the feed shows only the changes before this position (feed lag).
    paused_at: Option<usize>,
    /// Records carry a version, bumped by every change, reported on the feed and returned by
    /// `apply`.
    versioned: bool,
    versions: HashMap<(String, String), u64>,
    /// The feed does not report what `apply` writes.
    skips_own_writes: bool,
    /// The cursors the SDK said were published, in order.
    published: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    state: Mutex<State>,
    notify: Notify,
}

/// An in-memory system: records in a map, a change feed recording every edit (including those
/// made by [`SystemAdapter::apply`], as a real change-data-capture feed would), and failure
/// injection. Cheap to clone: clones share the same records.
#[derive(Debug, Clone)]
pub struct MemorySystem {
    inner: Arc<Inner>,
}

/// A `String` value.
pub fn text(s: &str) -> Option<Value> {
    Some(Value::String(s.to_owned()))
}

impl MemorySystem {
    /// An empty system; `name` prefixes the local ids it allocates (`{name}-1`, ...).
    pub fn new(name: &str) -> MemorySystem {
        MemorySystem {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                state: Mutex::new(State::default()),
                notify: Notify::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // matters to tests: keep going.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a change of the system: bumps the record's version and, unless `own` writes are
    /// not reported, puts it on the feed. Returns the record's new version.
    fn push(&self, st: &mut State, mut change: LocalChange, own: bool) -> Option<u64> {
        let version = st
            .versions
            .entry((change.entity.clone(), change.local_id.clone()))
            .or_default();
        *version += 1;
        let version = st.versioned.then_some(*version);
        if own && st.skips_own_writes {
            return version;
        }
        change.version = version;
        change.cursor = Some((st.log.len() + 1).to_string());
        st.log.push(change);
        self.inner.notify.notify_waiters();
        version
    }

    /// Records carry a version that every change bumps: the feed reports it and `apply`
    /// returns it, so the SDK recognises its own writes exactly.
    pub fn versioned(self) -> MemorySystem {
        self.state().versioned = true;
        self
    }

    /// The feed does not report what `apply` writes (as capture triggers that skip the
    /// adapter's transactions).
    pub fn skipping_own_writes(self) -> MemorySystem {
        self.state().skips_own_writes = true;
        self
    }

    /// A user edits record `local_id` (creating it when missing): sets the given fields
    /// (`None` clears one) and reports the change on the feed.
    pub fn edit<'a>(
        &self,
        entity: &str,
        local_id: &str,
        fields: impl IntoIterator<Item = (&'a str, Option<Value>)>,
    ) {
        let fields: Fields = fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let mut st = self.state();
        let rk = (entity.to_owned(), local_id.to_owned());
        let op = if st.records.contains_key(&rk) {
            LocalOp::Upsert
        } else {
            LocalOp::Create
        };
        let rec = st.records.entry(rk).or_default();
        set_all(rec, &fields);
        let change = LocalChange {
            op,
            ..LocalChange::upsert(entity, local_id, fields)
        };
        self.push(&mut st, change, false);
    }

    /// A user creates a record; returns its new local id.
    pub fn create<'a>(
        &self,
        entity: &str,
        fields: impl IntoIterator<Item = (&'a str, Option<Value>)>,
    ) -> String {
        let id = self.allocate();
        self.edit(entity, &id, fields);
        id
    }

    /// A user deletes a record.
    pub fn delete(&self, entity: &str, local_id: &str) {
        let mut st = self.state();
        if st
            .records
            .remove(&(entity.to_owned(), local_id.to_owned()))
            .is_some()
        {
            self.push(&mut st, LocalChange::delete(entity, local_id), false);
        }
    }

    fn allocate(&self) -> String {
        let mut st = self.state();
        st.next_id += 1;
        format!("{}-{}", self.inner.name, st.next_id)
    }

    /// The fields of a record, if it exists.
    pub fn get(&self, entity: &str, local_id: &str) -> Option<Record> {
        self.state()
            .records
            .get(&(entity.to_owned(), local_id.to_owned()))
            .cloned()
    }

    /// One field of a record.
    pub fn field(&self, entity: &str, local_id: &str, field: &str) -> Option<Value> {
        self.get(entity, local_id)
            .and_then(|r| r.get(field).cloned())
    }

    /// Local ids of the records of `entity`, sorted.
    pub fn ids(&self, entity: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .state()
            .records
            .keys()
            .filter(|(e, _)| e == entity)
            .map(|(_, id)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The local id of the record of `entity` whose `field` is the string `value`.
    pub fn find(&self, entity: &str, field: &str, value: &str) -> Option<String> {
        let want = Value::String(value.to_owned());
        let st = self.state();
        let mut found: Vec<&String> = st
            .records
            .iter()
            .filter(|((e, _), r)| e == entity && r.get(field) == Some(&want))
            .map(|((_, id), _)| id)
            .collect();
        found.sort();
        found.first().map(|s| (*s).clone())
    }

    /// The feed positions the SDK confirmed as published, in order
    /// ([`SystemAdapter::published`]).
    pub fn published_cursors(&self) -> Vec<String> {
        self.state().published.clone()
    }

    /// Every change `apply` was called with, in order.
    pub fn applied(&self) -> Vec<Apply> {
        self.state().applied.clone()
    }

    /// Number of changes on the feed so far.
    pub fn feed_len(&self) -> usize {
        self.state().log.len()
    }

    /// Holds back the change feed (simulates a lagging change-data-capture feed): changes made
    /// from now on are recorded but not reported until [`MemorySystem::resume_feed`].
    pub fn pause_feed(&self) {
        let mut st = self.state();
        if st.paused_at.is_none() {
            st.paused_at = Some(st.log.len());
        }
    }

    /// Reports the changes held back by [`MemorySystem::pause_feed`], and the next ones.
    pub fn resume_feed(&self) {
        self.state().paused_at = None;
        self.inner.notify.notify_waiters();
    }

    /// Forgets the failures injected by [`MemorySystem::fail_next_applies`] not yet used.
    pub fn clear_failures(&self) {
        self.state().failures.clear();
    }

    /// Makes the next calls to `apply` fail with these errors, in order.
    pub fn fail_next_applies(&self, errors: impl IntoIterator<Item = AdapterError>) {
        self.state().failures.extend(errors);
    }
}

fn set_all(rec: &mut Record, fields: &Fields) {
    for (k, v) in fields {
        match v {
            Some(v) => {
                rec.insert(k.clone(), v.clone());
            }
            None => {
                rec.remove(k);
            }
        }
    }
}

impl SystemAdapter for MemorySystem {
    fn changes(
        &self,
        cursor: Option<String>,
    ) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static {
        let start = cursor.and_then(|c| c.parse::<usize>().ok()).unwrap_or(0);
        let me = self.clone();
        futures::stream::unfold((me, start), |(me, pos)| async move {
            loop {
                let inner = me.inner.clone();
                let notified = inner.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let next = {
                    let st = me.state();
                    if st.paused_at.is_some_and(|p| pos >= p) {
                        None
                    } else {
                        st.log.get(pos).cloned()
                    }
                };
                if let Some(c) = next {
                    return Some((Ok(c), (me, pos + 1)));
                }
                notified.await;
            }
        })
    }

    fn snapshot(&self) -> impl Stream<Item = Result<LocalChange, AdapterError>> + Send + 'static {
        let st = self.state();
        let mut items: Vec<LocalChange> = st
            .records
            .iter()
            .map(|((entity, id), rec)| {
                let fields = rec
                    .iter()
                    .map(|(k, v)| (k.clone(), Some(v.clone())))
                    .collect();
                LocalChange::upsert(entity.clone(), id.clone(), fields)
            })
            .collect();
        items.sort_by(|a, b| (&a.entity, &a.local_id).cmp(&(&b.entity, &b.local_id)));
        futures::stream::iter(items.into_iter().map(Ok))
    }

    async fn apply(&self, change: &Apply) -> Result<Applied, AdapterError> {
        let id = match &change.local_id {
            Some(id) => id.clone(),
            None => self.allocate(),
        };
        let mut st = self.state();
        if let Some(e) = st.failures.pop_front() {
            return Err(e);
        }
        st.applied.push(change.clone());
        let rk = (change.entity.clone(), id.clone());
        let local = match change.op {
            ApplyOp::Delete => st
                .records
                .remove(&rk)
                .map(|_| LocalChange::delete(change.entity.clone(), id.clone())),
            ApplyOp::Upsert => {
                let op = if st.records.contains_key(&rk) {
                    LocalOp::Upsert
                } else {
                    LocalOp::Create
                };
                set_all(st.records.entry(rk).or_default(), &change.fields);
                Some(LocalChange {
                    op,
                    ..LocalChange::upsert(change.entity.clone(), id.clone(), change.fields.clone())
                })
            }
        };
        let version = local.and_then(|c| self.push(&mut st, c, true));
        Ok(Applied {
            local_id: id,
            version,
        })
    }

    async fn published(&self, cursor: &str) -> Result<(), AdapterError> {
        self.state().published.push(cursor.to_owned());
        Ok(())
    }

    fn echoes(&self) -> Echoes {
        if self.state().skips_own_writes {
            Echoes::NotReported
        } else {
            Echoes::Reported
        }
    }
}
