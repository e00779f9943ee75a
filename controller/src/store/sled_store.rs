//! [`Store`] on sled 0.34. sled holds an exclusive lock on its directory: one process only, which
//! is why the admin CLI talks to the daemon instead of opening the database.
use std::path::Path;

use super::{Durability, Store, StoreError, Table};

pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    /// Opens (or creates) the database. sled releases its directory lock from a background
    /// thread after the previous handle is dropped, so a reopen in the same process (or a restart
    /// that follows a stop closely) can briefly see the lock held: that case is retried for up to
    /// two seconds before it is reported.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match sled::Config::new().path(path).flush_every_ms(Some(500)).open() {
                Ok(db) => return Ok(Self { db }),
                Err(e) if is_lock_busy(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(StoreError::Open { path: path.display().to_string(), source: Box::new(e) }),
            }
        }
    }

    fn tree(&self, table: Table) -> Result<sled::Tree, StoreError> {
        self.db.open_tree(table.name()).map_err(|e| io(table, e))
    }

    fn settle(&self, table: Table, d: Durability) -> Result<(), StoreError> {
        if d == Durability::Flush {
            self.db.flush().map_err(|e| io(table, e))?;
        }
        Ok(())
    }
}

fn is_lock_busy(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn io(table: Table, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Io { table: table.name(), source: Box::new(e) }
}

impl Store for SledStore {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(table)?.get(key.as_bytes()).map_err(|e| io(table, e))?.map(|v| v.to_vec()))
    }

    fn put(&self, table: Table, key: &str, value: &[u8], d: Durability) -> Result<(), StoreError> {
        self.tree(table)?.insert(key.as_bytes(), value).map_err(|e| io(table, e))?;
        self.settle(table, d)
    }

    fn remove(&self, table: Table, key: &str, d: Durability) -> Result<bool, StoreError> {
        let old = self.tree(table)?.remove(key.as_bytes()).map_err(|e| io(table, e))?;
        self.settle(table, d)?;
        Ok(old.is_some())
    }

    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(table)?.iter() {
            let (k, v) = item.map_err(|e| io(table, e))?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    fn list_prefix(&self, table: Table, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(table)?.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item.map_err(|e| io(table, e))?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    fn range_from(&self, table: Table, from: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(table)?.range(from.as_bytes()..).take(limit) {
            let (k, v) = item.map_err(|e| io(table, e))?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    fn last(&self, table: Table, n: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(table)?.iter().rev().take(n) {
            let (k, v) = item.map_err(|e| io(table, e))?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        out.reverse();
        Ok(out)
    }

    fn count(&self, table: Table) -> Result<usize, StoreError> {
        Ok(self.tree(table)?.len())
    }

    fn pop_first(&self, table: Table) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree(table)?
            .pop_min()
            .map_err(|e| io(table, e))?
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned()))
    }

    fn compare_and_swap(
        &self,
        table: Table,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
        d: Durability,
    ) -> Result<bool, StoreError> {
        let swapped =
            self.tree(table)?.compare_and_swap(key.as_bytes(), expected, new).map_err(|e| io(table, e))?.is_ok();
        if swapped {
            self.settle(table, d)?;
        }
        Ok(swapped)
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Rec {
        n: u32,
    }

    #[test]
    fn flushed_writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            put_json(&s, Table::Tokens, "a", &Rec { n: 1 }, Durability::Flush).unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(get_json::<Rec>(&s, Table::Tokens, "a").unwrap(), Some(Rec { n: 1 }));
        assert_eq!(get_json::<Rec>(&s, Table::Nodes, "a").unwrap(), None);
    }

    #[test]
    fn update_can_refuse_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        put_json(&s, Table::Tokens, "t", &Rec { n: 1 }, Durability::Flush).unwrap();
        let r = update_json(&s, Table::Tokens, "t", Durability::Flush, |cur: Option<Rec>| {
            let cur = cur.unwrap();
            if cur.n == 0 {
                Err("empty")
            } else {
                Ok(Update::Put(Rec { n: cur.n - 1 }))
            }
        })
        .unwrap();
        assert_eq!(r, Ok(Some(Rec { n: 0 })));
        let r = update_json(&s, Table::Tokens, "t", Durability::Flush, |cur: Option<Rec>| {
            let cur = cur.unwrap();
            if cur.n == 0 {
                Err("empty")
            } else {
                Ok(Update::Put(Rec { n: cur.n - 1 }))
            }
        })
        .unwrap();
        assert_eq!(r, Err("empty"));
        assert_eq!(get_json::<Rec>(&s, Table::Tokens, "t").unwrap(), Some(Rec { n: 0 }));
    }

    #[test]
    fn concurrent_decrements_never_go_below_zero() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
        put_json(&*s, Table::Tokens, "t", &Rec { n: 10 }, Durability::Lazy).unwrap();
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (s, ok) = (s.clone(), ok.clone());
                std::thread::spawn(move || {
                    for _ in 0..5 {
                        let r = update_json(&*s, Table::Tokens, "t", Durability::Lazy, |cur: Option<Rec>| {
                            let cur = cur.unwrap();
                            if cur.n == 0 {
                                Err(())
                            } else {
                                Ok(Update::Put(Rec { n: cur.n - 1 }))
                            }
                        })
                        .unwrap();
                        if r.is_ok() {
                            ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(ok.load(std::sync::atomic::Ordering::SeqCst), 10);
    }
}
