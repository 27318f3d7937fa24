//! Counters of what the engine did, readable at any time (export them as you like).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// One counter, as exported by the adapter process's `/metrics`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counter {
    pub(crate) name: &'static str,
    pub(crate) help: &'static str,
    pub(crate) read: fn(&MetricsSnapshot) -> u64,
}

macro_rules! counters {
    ($(#[doc = $doc:literal] $name:ident),* $(,)?) => {
        /// Live counters, shared between the engine and whoever reads them.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(#[doc = $doc] pub $name: AtomicU64,)*
            changed: Notify,
        }

        /// A copy of the counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct MetricsSnapshot {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl Metrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        /// Every counter: its name, its help text and how to read it from a snapshot.
        pub(crate) const COUNTERS: &[Counter] = &[
            $(Counter {
                name: stringify!($name),
                help: $doc.trim_ascii(),
                read: |s| s.$name,
            },)*
        ];
    };
}

counters! {
    /// Local changes read from the change feed.
    local_changes,
    /// Change events published (and confirmed).
    published,
    /// Local field writes equal to the stored value: not published.
    local_unchanged,
    /// Local field writes recognised as the echoes of the SDK's own writes: not published.
    local_echoes,
    /// Local field writes an apply replaced before the feed reported them: not published.
    local_superseded,
    /// Local field writes overruled by a higher-priority owner's value: written back.
    local_overruled,
    /// Local changes that could not be published (unknown entity or field, wrong value type).
    local_invalid,
    /// Incoming events processed (applied, recorded, duplicate, stale or dead-lettered).
    incoming,
    /// Incoming events applied to the system.
    incoming_applied,
    /// Incoming events already processed (redelivered or duplicated): acknowledged only.
    incoming_duplicate,
    /// Incoming events of which no field won the merge (stale): acknowledged only.
    incoming_stale,
    /// Incoming events sent to the dead-letter exchange.
    dead_lettered,
    /// Retries after a transient failure (apply, change feed, publish).
    retries,
    /// Corrections written back to the system.
    corrections,
    /// Connections opened to the broker.
    connections,
    /// Sessions reopened because the inbox consumer stalled (messages ready, none delivered).
    inbox_stalls,
    /// Resync requests received from the router (`concord resync`).
    resync_requests,
    /// Records to publish for the resyncs received (counted when each starts).
    resync_records_total,
    /// Records published (and confirmed) for resyncs, on the resync lane.
    resync_records_published,
    /// Times the clock was found beyond twice the router's skew and reset to the wall clock.
    clock_resets,
}

impl Metrics {
    /// Waits until `done` holds for the counters (checked after every step of the engine).
    pub async fn wait_until(&self, done: impl Fn(&MetricsSnapshot) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.snapshot()) {
                return;
            }
            changed.await;
        }
    }

    /// Wakes [`Metrics::wait_until`] callers.
    pub(crate) fn touch(&self) {
        self.changed.notify_waiters();
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
