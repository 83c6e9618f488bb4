//! Each site's event timeline ([`tether_proto::events`]): recorded when a
//! session opens or ends and when a site's trust changes (enrollment,
//! renewal, re-attestation, revocation), never per packet; kept in the
//! store, bounded per site; and summarised in memory ([`History`]) so that
//! the site list can say every site's state without reading timelines.
//!
//! [`EventLog::record`] updates the summary at once and queues the store
//! write for one writer thread, which appends in the order events were
//! recorded: a session's "connected" is never stored after its
//! "disconnected", and the session's task never waits for the store.
//!
//! The summaries also say which services each site's latest session
//! announced, and at which broker ([`Announced`]): the mesh zone of every
//! broker in a fleet answers SRV names from them ([`crate::names`]), and
//! [`EventLog::announcement_changes`] wakes it when they change.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tether_proto::events::{Announced, EventKind, History, SiteEvent, TIMELINE_LIMIT};
use tether_proto::ids::SiteId;
use tokio::sync::watch;

use crate::store::{Store, StoreError, now_unix};

/// Events waiting for the store at most: beyond this (the store is down
/// or far too slow), new events are logged and dropped, not queued.
const QUEUE: usize = 65_536;

enum Job {
    Append(SiteId, SiteEvent),
    Flush(std::sync::mpsc::Sender<()>),
}

/// The sites' timelines: the store's, and a summary of each in memory.
pub struct EventLog {
    store: Arc<dyn Store>,
    histories: RwLock<HashMap<SiteId, History>>,
    queue: SyncSender<Job>,
    /// Counts the changes of any site's [`History::announced`].
    announcements: watch::Sender<u64>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl EventLog {
    /// Reads every site's timeline from `store` into the summary and
    /// starts the writer thread. Blocking.
    pub fn open(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let histories = store
            .timelines()?
            .into_iter()
            .map(|(site, timeline)| (site, History::of(&timeline)))
            .collect();
        let (queue, jobs) = std::sync::mpsc::sync_channel(QUEUE);
        let writer = store.clone();
        std::thread::Builder::new()
            .name("tether-events".into())
            .spawn(move || write_events(writer.as_ref(), jobs))
            .map_err(|e| StoreError(format!("cannot start the event writer: {e}")))?;
        Ok(Self {
            store,
            histories: RwLock::new(histories),
            queue,
            announcements: watch::Sender::new(0),
        })
    }

    /// Puts `site`'s summary through `update` and counts a change of what
    /// it announces.
    fn update(&self, site: &SiteId, update: impl FnOnce(&mut History)) {
        let changed = match self.histories.write() {
            Ok(mut h) => {
                let history = h.entry(site.clone()).or_default();
                let before = history.announced.clone();
                update(history);
                history.announced != before
            }
            Err(_) => false,
        };
        if changed {
            self.announcements.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Records that `kind` happened to `site` now, seen by `broker`.
    pub fn record(&self, site: &SiteId, broker: String, kind: EventKind) {
        let event = SiteEvent {
            at: now_unix(),
            broker,
            kind,
        };
        tracing::debug!(%site, event = event.kind.as_str(), "site event");
        self.update(site, |h| h.apply(&event));
        match self.queue.try_send(Job::Append(site.clone(), event)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                crate::metrics::site_event_dropped();
                tracing::warn!(%site, "site event dropped: the store is not keeping up");
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// What a site's events say (empty for a site without events).
    pub fn history(&self, site: &SiteId) -> History {
        self.histories
            .read()
            .ok()
            .and_then(|h| h.get(site).cloned())
            .unwrap_or_default()
    }

    /// Every site's summary.
    pub fn histories(&self) -> HashMap<SiteId, History> {
        self.histories.read().map(|h| h.clone()).unwrap_or_default()
    }

    /// For each window of `windows` (seconds), how many sites' newest
    /// certificates (as their events announced them) are still valid at
    /// `now` and expire within it; revoked sites are left out. One pass
    /// over the summaries in memory, reading nothing from the store.
    pub fn certificates_expiring(&self, now: u64, windows: &[u64]) -> Vec<usize> {
        let mut counts = vec![0; windows.len()];
        if let Ok(h) = self.histories.read() {
            for history in h.values() {
                let Some(not_after) = history.cert_not_after else {
                    continue;
                };
                if history.revoked_at.is_some() || not_after <= now {
                    continue;
                }
                for (count, window) in counts.iter_mut().zip(windows) {
                    if not_after - now <= *window {
                        *count += 1;
                    }
                }
            }
        }
        counts
    }

    /// Reads a site's timeline again and summarises it anew: after
    /// another broker (sharing the store) appended to it. Blocking.
    pub fn refresh(&self, site: &SiteId) -> Result<(), StoreError> {
        let history = History::of(&self.store.timeline(site)?);
        self.update(site, |h| *h = history);
        Ok(())
    }

    /// Reads every site's timeline again and summarises each anew: after
    /// the store's notices were lost (a watch that resumed past compacted
    /// history, a receiver that lagged), when any site's timeline may have
    /// changed unseen. Sites the store holds no timeline for keep their
    /// summary (their first event may still be on its way to the store).
    /// Blocking; one read of every timeline.
    pub fn reload(&self) -> Result<(), StoreError> {
        for (site, timeline) in self.store.timelines()? {
            let history = History::of(&timeline);
            self.update(&site, |h| *h = history);
        }
        Ok(())
    }

    /// What every site's latest session announced, for the sites whose
    /// latest session announced services.
    pub fn announcements(&self) -> BTreeMap<SiteId, Announced> {
        self.histories
            .read()
            .map(|h| {
                h.iter()
                    .filter_map(|(site, h)| Some((site.clone(), h.announced.clone()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Changes of [`EventLog::announcements`] (a count).
    pub fn announcement_changes(&self) -> watch::Receiver<u64> {
        self.announcements.subscribe()
    }

    /// A site's timeline as the store holds it. Blocking.
    pub fn timeline(&self, site: &SiteId) -> Result<tether_proto::events::Timeline, StoreError> {
        self.store.timeline(site)
    }

    /// Waits (at most `timeout`) until every event recorded so far is in
    /// the store; returns whether it is. Blocking.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = std::sync::mpsc::channel();
        if self.queue.send(Job::Flush(done)).is_err() {
            return false;
        }
        !matches!(
            wait.recv_timeout(timeout),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected)
        )
    }
}

/// The writer thread: appends queued events in order until the log is
/// dropped.
fn write_events(store: &dyn Store, jobs: Receiver<Job>) {
    for job in jobs {
        match job {
            Job::Append(site, event) => {
                if let Err(e) = store.append_event(&site, &event, TIMELINE_LIMIT) {
                    crate::metrics::site_event_dropped();
                    tracing::warn!(%site, error = %e, "site event not stored");
                }
            }
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::dns::Service;
    use tether_proto::events::{Disconnect, SiteState};

    #[test]
    fn events_reach_the_store_in_order_and_the_summary_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let log = EventLog::open(store.clone()).unwrap();
        let site = SiteId::new("ward-1").unwrap();
        for _ in 0..3 {
            log.record(
                &site,
                "b1".into(),
                EventKind::Connected {
                    transport: "h3".into(),
                    remote: "192.0.2.1:1".into(),
                    holder: None,
                    services: Vec::new(),
                },
            );
            log.record(
                &site,
                "b1".into(),
                EventKind::Disconnected {
                    reason: Disconnect::ConnectionLost,
                    detail: None,
                },
            );
        }
        assert_eq!(
            log.history(&site).state(None, false, now_unix()).0,
            SiteState::Flapping
        );
        assert!(log.flush(Duration::from_secs(10)));
        let kinds: Vec<_> = log
            .timeline(&site)
            .unwrap()
            .events()
            .map(|e| e.kind.as_str())
            .collect();
        assert_eq!(
            kinds,
            [
                "connected",
                "disconnected",
                "connected",
                "disconnected",
                "connected",
                "disconnected"
            ]
        );
        // A new log over the same store starts from what it holds.
        drop(log);
        let again = EventLog::open(store).unwrap();
        assert_eq!(
            again.history(&site).last_disconnected.map(|d| d.1),
            Some(Disconnect::ConnectionLost)
        );
    }

    #[test]
    fn announcements_follow_this_brokers_events_and_the_stores() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let here = EventLog::open(store.clone()).unwrap();
        let there = EventLog::open(store).unwrap();
        let mut changes = here.announcement_changes();
        let site = SiteId::new("ward-1").unwrap();
        let connected = |holder: &str, services: &str| EventKind::Connected {
            transport: "h3".into(),
            remote: "192.0.2.1:1".into(),
            holder: Some(holder.into()),
            services: Service::parse_list(services).unwrap(),
        };
        here.record(&site, "b1".into(), connected("b1", "dicom=104"));
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        let announced = here.announcements();
        assert_eq!(
            announced[&site].held_by("b1").map(Service::format_list),
            Some("dicom=104".to_string())
        );
        // An event that announces nothing new changes nothing.
        here.record(
            &site,
            "b1".into(),
            EventKind::Disconnected {
                reason: Disconnect::ConnectionLost,
                detail: None,
            },
        );
        assert!(!changes.has_changed().unwrap());
        // Another broker's event, read from the store, written after this
        // broker's own (two writers would otherwise race for the order).
        assert!(here.flush(Duration::from_secs(10)));
        there.record(&site, "b2".into(), connected("b2", "http=80"));
        assert!(there.flush(Duration::from_secs(10)));
        assert!(here.flush(Duration::from_secs(10)));
        here.refresh(&site).unwrap();
        assert!(changes.has_changed().unwrap());
        assert_eq!(here.announcements()[&site].holder, "b2");
        // Revoked: nothing announced.
        changes.borrow_and_update();
        here.record(&site, "b1".into(), EventKind::Revoked);
        assert!(changes.has_changed().unwrap());
        assert!(here.announcements().is_empty());
    }
}
