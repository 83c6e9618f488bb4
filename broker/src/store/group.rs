//! Group commit for the embedded store: writers that arrive while a write
//! transaction is being committed share the next one, so N concurrent
//! writes cost one `fsync` instead of N, and each writer still returns only
//! after the commit that carries its write is durable.
//!
//! One of the waiting writers leads: it takes every queued write, runs them
//! in order in one redb write transaction and commits it. Each write sees
//! the writes queued before it (as if they had committed alone first), so a
//! compare-and-set inside a write keeps its meaning. If any write of a
//! batch fails, the batch's transaction is dropped (nothing of it is
//! stored) and each of its writes runs again in a transaction of its own,
//! so one failing write cannot fail or half-apply another.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use redb::{Database, WriteTransaction};

use super::StoreError;

/// A write: runs inside a write transaction; may run twice (see the module
/// documentation), so it must not keep state between runs.
type Run = Box<dyn FnMut(&WriteTransaction) -> Result<(), StoreError> + Send>;

struct Job {
    run: Run,
    done: Arc<Mutex<Option<Result<(), StoreError>>>>,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    leading: bool,
}

/// The writers of one database.
#[derive(Default)]
pub(super) struct GroupCommit {
    queue: Mutex<Queue>,
    changed: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a write is caught (`run_one`); a poisoned lock holds
    // consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GroupCommit {
    /// Runs `f` in a write transaction shared with the writers queued at the
    /// same time and returns its value once that transaction is committed.
    /// Blocking.
    pub(super) fn write<T, F>(&self, db: &Database, mut f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let out = Arc::new(Mutex::new(None));
        let done = Arc::new(Mutex::new(None));
        let slot = out.clone();
        let job = Job {
            run: Box::new(move |txn| {
                let value = f(txn)?;
                *lock(&slot) = Some(value);
                Ok(())
            }),
            done: done.clone(),
        };
        let mut queue = lock(&self.queue);
        queue.jobs.push(job);
        loop {
            if let Some(result) = lock(&done).take() {
                drop(queue);
                result?;
                return lock(&out)
                    .take()
                    .ok_or_else(|| StoreError("a store write returned no value".into()));
            }
            if !queue.leading {
                // Our write is still queued and nobody commits: lead one
                // batch (which holds our write).
                queue.leading = true;
                let batch = std::mem::take(&mut queue.jobs);
                drop(queue);
                run_batch(db, batch);
                queue = lock(&self.queue);
                queue.leading = false;
                self.changed.notify_all();
                continue;
            }
            queue = self.changed.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Runs one write, turning a panic into an error.
fn run_one(run: &mut Run, txn: &WriteTransaction) -> Result<(), StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(txn)))
        .unwrap_or_else(|_| Err(StoreError("a store write panicked".into())))
}

/// One transaction for `jobs`: `Ok` if each ran and the commit succeeded.
fn commit_all(db: &Database, jobs: &mut [Job]) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    for job in jobs.iter_mut() {
        // Dropping `txn` on an error aborts it.
        run_one(&mut job.run, &txn)?;
    }
    txn.commit()?;
    Ok(())
}

fn run_batch(db: &Database, mut jobs: Vec<Job>) {
    if jobs.len() > 1 && commit_all(db, &mut jobs).is_ok() {
        for job in &jobs {
            *lock(&job.done) = Some(Ok(()));
        }
        return;
    }
    // Alone (or again, alone, after the batch failed): each write's own
    // result.
    for job in &mut jobs {
        let result = commit_all(db, std::slice::from_mut(job));
        *lock(&job.done) = Some(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    use std::sync::Barrier;

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    fn db() -> (tempfile::TempDir, Arc<Database>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db")).unwrap();
        (dir, Arc::new(db))
    }

    fn read(db: &Database, key: &str) -> Option<u64> {
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(T).ok()?;
        table.get(key).unwrap().map(|v| v.value())
    }

    #[test]
    fn concurrent_writers_share_commits_and_each_write_is_stored() {
        let (_dir, db) = db();
        let group = Arc::new(GroupCommit::default());
        let writers = 16;
        let each = 20;
        let barrier = Arc::new(Barrier::new(writers));
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let (db, group, barrier) = (db.clone(), group.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    for i in 0..each {
                        // A read-modify-write of a shared counter: lost
                        // updates would show in the total.
                        let key = format!("w{w}-{i}");
                        let seen = group
                            .write(&db, move |txn| {
                                let mut t = txn.open_table(T)?;
                                let n = t.get("count")?.map(|v| v.value()).unwrap_or(0);
                                t.insert("count", n + 1)?;
                                t.insert(key.as_str(), n)?;
                                Ok(n)
                            })
                            .unwrap();
                        // Durable on return: visible to a new reader.
                        assert_eq!(read(&db, &format!("w{w}-{i}")), Some(seen));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(read(&db, "count"), Some((writers * each) as u64));
    }

    #[test]
    fn a_failing_write_leaves_the_others_of_its_batch_stored() {
        let (_dir, db) = db();
        let group = Arc::new(GroupCommit::default());
        // The first write holds the lead until the next four are queued, so
        // those four run as one batch.
        let (started_tx, started) = std::sync::mpsc::channel();
        let lead = {
            let (db, group2) = (db.clone(), group.clone());
            std::thread::spawn(move || {
                group2
                    .clone()
                    .write(&db, move |txn| {
                        started_tx.send(()).unwrap();
                        let deadline =
                            std::time::Instant::now() + std::time::Duration::from_secs(10);
                        while lock(&group2.queue).jobs.len() < 4 {
                            assert!(std::time::Instant::now() < deadline, "writers never queued");
                            std::thread::yield_now();
                        }
                        txn.open_table(T)?.insert("lead", 1)?;
                        Ok(())
                    })
                    .unwrap();
            })
        };
        // The lead is leading before the others write.
        started
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writes: Vec<_> = (0..4u64)
            .map(|i| {
                let (db, group2, runs) = (db.clone(), group.clone(), runs.clone());
                let writer = std::thread::spawn(move || {
                    let group = group2;
                    group.write(&db, move |txn| {
                        if i == 0 {
                            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        // Writes, then fails: its write must not be kept.
                        txn.open_table(T)?.insert(format!("k{i}").as_str(), i)?;
                        if i == 2 {
                            return Err(StoreError("refused".into()));
                        }
                        Ok(i)
                    })
                });
                // Queued in order, so the batch runs write 0 before write 2
                // fails.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while lock(&group.queue).jobs.len() < i as usize + 1 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "writer {i} never queued"
                    );
                    std::thread::yield_now();
                }
                writer
            })
            .collect();
        lead.join().unwrap();
        let results: Vec<_> = writes.into_iter().map(|t| t.join().unwrap()).collect();
        for (i, r) in results.iter().enumerate() {
            if i == 2 {
                assert_eq!(r.as_ref().unwrap_err().0, "refused");
                assert_eq!(read(&db, "k2"), None);
            } else {
                assert_eq!(*r.as_ref().unwrap(), i as u64);
                assert_eq!(read(&db, &format!("k{i}")), Some(i as u64));
            }
        }
        assert_eq!(read(&db, "lead"), Some(1));
        // Once in the failed batch, once alone.
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_panicking_write_is_an_error_and_the_store_keeps_working() {
        let (_dir, db) = db();
        let group = GroupCommit::default();
        let r: Result<(), _> = group.write(&db, |_| panic!("boom"));
        assert!(r.unwrap_err().0.contains("panicked"));
        group
            .write(&db, |txn| {
                txn.open_table(T)?.insert("after", 7)?;
                Ok(())
            })
            .unwrap();
        assert_eq!(read(&db, "after"), Some(7));
    }
}
