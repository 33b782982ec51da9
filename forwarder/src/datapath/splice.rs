//! The `SPLICES` map of TCP connections spliced in XDP (docs/tcp.md, "XDP
//! splice"): both entries of a connection go in together and come out together.

use anyhow::{Context as _, bail};
use aya::maps::{HashMap, MapData, PerCpuArray};
use forwarder_common::{SpliceCounter, SpliceEntry, SpliceKey};

use super::{Datapath, batch};

impl Datapath {
    /// Installs both directions of a spliced connection. If the second insert
    /// fails the first is taken out again, so a connection is spliced both ways or
    /// not at all.
    pub fn insert_splice(&mut self, pair: &[(SpliceKey, SpliceEntry); 2]) -> anyhow::Result<()> {
        let mut map = self.splices_mut()?;
        map.insert(pair[0].0, pair[0].1, 0)
            .context("inserting a SPLICES entry")?;
        if let Err(e) = map.insert(pair[1].0, pair[1].1, 0) {
            let _ = map.remove(&pair[0].0);
            return Err(e).context("inserting a SPLICES entry");
        }
        Ok(())
    }

    /// Removes the entries of `keys` (absent ones are no error: teardown may race
    /// a second scan).
    pub fn remove_splice(&mut self, keys: &[SpliceKey]) -> anyhow::Result<()> {
        let mut map = self.splices_mut()?;
        for key in keys {
            match map.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing a SPLICES entry"),
            }
        }
        Ok(())
    }

    /// Every entry of `SPLICES` (both directions of each connection).
    pub fn splices(&self) -> anyhow::Result<Vec<(SpliceKey, SpliceEntry)>> {
        let map = match self.ebpf.map("SPLICES").context("SPLICES")? {
            aya::maps::Map::HashMap(data) => data,
            _ => bail!("SPLICES is not a hash map"),
        };
        batch::read_all::<SpliceKey, SpliceEntry>(map).context("reading SPLICES")
    }

    /// The splice counters (`SpliceCounter`), summed over CPUs.
    pub fn splice_counters(&self) -> anyhow::Result<[u64; SpliceCounter::COUNT]> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("SPLICE_COUNTERS")
                .context("SPLICE_COUNTERS")?,
        )?;
        let mut counts = [0u64; SpliceCounter::COUNT];
        for (i, slot) in counts.iter_mut().enumerate() {
            *slot = map.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(counts)
    }

    /// A handle of `SPLICES` of its own (a second fd of the same map), for the TCP
    /// proxy's connection tasks, which do not hold the datapath.
    pub fn splice_map(&self) -> anyhow::Result<HashMap<MapData, SpliceKey, SpliceEntry>> {
        let map = match self.ebpf.map("SPLICES").context("SPLICES")? {
            aya::maps::Map::HashMap(data) => data,
            _ => bail!("SPLICES is not a hash map"),
        };
        let id = map.info().context("SPLICES map info")?.id();
        let data = MapData::from_id(id).context("opening SPLICES by id")?;
        HashMap::try_from(aya::maps::Map::HashMap(data)).context("SPLICES as a hash map")
    }

    fn splices_mut(&mut self) -> anyhow::Result<HashMap<&mut MapData, SpliceKey, SpliceEntry>> {
        let map = self.ebpf.map_mut("SPLICES").context("SPLICES")?;
        HashMap::try_from(map).context("SPLICES as a hash map")
    }
}
