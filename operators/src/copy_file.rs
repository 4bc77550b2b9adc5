//! A shard copy spilled to disk as it arrives from a holder, so that a
//! copy's size is bounded by disk, not memory: one file per view, entries
//! in the order the holder exported them (each family together, keys
//! ascending), each `family (1 byte) | key length (u32 BE) | key | value
//! length (u32 BE) | value`. Read back by the state writer, which streams
//! it into SST files ([`crate::Store::install_view_from`]).

use crate::store::{StateEntry, StateFamily, StoreError};
use std::fs::File;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::Path;

/// Writes one view's copied entries to a file.
pub struct CopyFileWriter {
    out: BufWriter<File>,
    entries: u64,
}

impl CopyFileWriter {
    /// Creates (or truncates) the file.
    pub fn create(path: &Path) -> Result<CopyFileWriter, StoreError> {
        Ok(CopyFileWriter {
            out: BufWriter::with_capacity(1 << 20, File::create(path)?),
            entries: 0,
        })
    }

    pub fn push(&mut self, entry: &StateEntry) -> Result<(), StoreError> {
        let len = |n: usize| {
            u32::try_from(n)
                .map_err(|_| StoreError::CorruptRow(format!("a copied entry of {n} bytes")))
        };
        self.out.write_all(&[entry.family.number() as u8])?;
        self.out.write_all(&len(entry.key.len())?.to_be_bytes())?;
        self.out.write_all(&entry.key)?;
        self.out.write_all(&len(entry.value.len())?.to_be_bytes())?;
        self.out.write_all(&entry.value)?;
        self.entries += 1;
        Ok(())
    }

    /// Flushes and syncs the file; returns how many entries it holds.
    pub fn finish(self) -> Result<u64, StoreError> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(self.entries)
    }
}

/// The entries of a file written by [`CopyFileWriter`], in order. A file
/// cut short or with an unknown family yields an error, never a guess.
pub fn read_copy_file(
    path: &Path,
) -> Result<impl Iterator<Item = Result<StateEntry, StoreError>>, StoreError> {
    let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
    let what = path.display().to_string();
    let mut failed = false;
    Ok(std::iter::from_fn(move || {
        if failed {
            return None;
        }
        let mut family = [0u8; 1];
        match input.read_exact(&mut family) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return None,
            Err(e) => {
                failed = true;
                return Some(Err(e.into()));
            }
        }
        let entry = (|| {
            let family = StateFamily::from_number(u32::from(family[0])).ok_or_else(|| {
                StoreError::CorruptRow(format!("{what}: unknown state family {}", family[0]))
            })?;
            let mut field = || -> Result<Vec<u8>, StoreError> {
                let mut len = [0u8; 4];
                input.read_exact(&mut len)?;
                let mut bytes = vec![0u8; u32::from_be_bytes(len) as usize];
                input.read_exact(&mut bytes)?;
                Ok(bytes)
            };
            let key = field()?;
            let value = field()?;
            Ok(StateEntry { family, key, value })
        })();
        if entry.is_err() {
            failed = true;
        }
        Some(entry)
    }))
}
