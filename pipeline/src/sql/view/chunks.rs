//! The twins table held once, as Arrow chunks keyed by device and rebuilt only
//! where rows change (`TwinChunks`).

use super::*;

/// Columns of the `twins` table that are strings (what [`TwinRow::string_bytes`] counts).
pub(super) fn twins_string_columns() -> Vec<usize> {
    Table::Twins.schema().fields().iter().enumerate().filter(|(_, f)| f.data_type() == &DataType::Utf8).map(|(i, _)| i).collect()
}

/// The `twins` table as chunks sorted by `device_id`, each a [`RecordBatch`] of at
/// most `max_rows` rows and (but for a single larger row) `max_bytes` string bytes,
/// keyed by its first device. A refresh rebuilds only the chunks its changes fall
/// in (merging the changed rows into them), and the snapshot shares the chunks, so
/// the fleet is held once, as exactly sized Arrow buffers: no row structs, no
/// per-row strings, no second copy of unchanged rows while a refresh builds.
pub(super) struct TwinChunks {
    chunks: BTreeMap<String, RecordBatch>,
    max_rows: usize,
    max_bytes: usize,
    strings: Vec<usize>,
    rows: usize,
    mem_bytes: usize,
}

/// Where a row of a rebuilt chunk comes from: the old chunk (0) or the changed rows (1).
pub(super) type Source = (usize, usize);

impl TwinChunks {
    pub(super) fn new(max_rows: usize, max_bytes: usize) -> Self {
        TwinChunks { chunks: BTreeMap::new(), max_rows: max_rows.max(1), max_bytes, strings: twins_string_columns(), rows: 0, mem_bytes: 0 }
    }

    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of the Arrow buffers held (all chunks).
    pub(super) fn mem_bytes(&self) -> usize {
        self.mem_bytes
    }

    /// The table as published: the chunks in device order (one empty batch if none).
    pub(super) fn batches(&self) -> Vec<RecordBatch> {
        if self.chunks.is_empty() {
            return vec![RecordBatch::new_empty(Table::Twins.schema())];
        }
        self.chunks.values().cloned().collect()
    }

    pub(super) fn ids(b: &RecordBatch) -> &arrow::array::StringArray {
        b.column(0).as_any().downcast_ref().expect("device_id is Utf8")
    }

    pub(super) fn put(&mut self, b: RecordBatch) {
        if b.num_rows() == 0 {
            return;
        }
        self.rows += b.num_rows();
        self.mem_bytes += b.get_array_memory_size();
        self.chunks.insert(Self::ids(&b).value(0).to_string(), b);
    }

    pub(super) fn take(&mut self, first: &str) -> Option<RecordBatch> {
        let b = self.chunks.remove(first)?;
        self.rows -= b.num_rows();
        self.mem_bytes -= b.get_array_memory_size();
        Some(b)
    }

    /// The row of `device`, read back from the columns.
    #[cfg(test)]
    pub(super) fn get(&self, device: &str) -> Option<TwinRow> {
        let (_, b) = self.chunks.range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(device))).next_back()?;
        let ids = Self::ids(b);
        let (mut lo, mut hi) = (0, ids.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if ids.value(mid) < device {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo < ids.len() && ids.value(lo) == device).then(|| row_at(b, lo))
    }

    /// Every row of `partition` leaves (only the chunks holding one are rebuilt).
    pub(super) fn drop_partition(&mut self, partition: i32) {
        let hit: Vec<String> = self
            .chunks
            .iter()
            .filter(|(_, b)| b.column(1).as_any().downcast_ref::<arrow::array::Int32Array>().expect("partition is Int32").values().contains(&partition))
            .map(|(k, _)| k.clone())
            .collect();
        for k in hit {
            let b = &self.chunks[&k];
            let keep = arrow::compute::kernels::cmp::neq(b.column(1), &arrow::array::Int32Array::new_scalar(partition)).expect("Int32 comparison");
            // Exactly sized again (filtering allocates for the rows kept).
            let kept = arrow::compute::filter_record_batch(b, &keep).expect("filter the chunk");
            self.take(&k);
            self.put(kept);
        }
    }

    /// Fold `changes` (device → new row, or `None`: the row leaves) in, rebuilding
    /// the chunks they fall in; a chunk that grows past the bounds is split.
    pub(super) fn apply(&mut self, changes: &BTreeMap<String, Option<TwinRow>>) {
        // The chunk a device falls in: the last one starting at or before it (the
        // first chunk for a device before all of them).
        let firsts: Vec<String> = self.chunks.keys().cloned().collect();
        let mut groups: BTreeMap<Option<usize>, Vec<(&str, Option<&TwinRow>)>> = BTreeMap::new();
        for (k, v) in changes {
            let at = (!firsts.is_empty()).then(|| firsts.partition_point(|f| f.as_str() <= k.as_str()).saturating_sub(1));
            groups.entry(at).or_default().push((k, v.as_ref()));
        }
        for (at, changes) in groups {
            // Built before the old chunk is replaced: a refresh that fails half-way
            // leaves every chunk whole (and the changes pending, to be applied again).
            let merged = self.merge(at.map(|i| &self.chunks[&firsts[i]]), &changes);
            if let Some(i) = at {
                self.take(&firsts[i]);
            }
            for b in merged {
                self.put(b);
            }
        }
    }

    /// One chunk (`old`, if any) with its sorted `changes` merged in, as chunks
    /// within the bounds.
    pub(super) fn merge(&self, old: Option<&RecordBatch>, changes: &[(&str, Option<&TwinRow>)]) -> Vec<RecordBatch> {
        let fresh_rows: Vec<&TwinRow> = changes.iter().filter_map(|(_, r)| *r).collect();
        let fresh = twins_batch(&mut fresh_rows.iter().copied());
        let old_ids = old.map(Self::ids);
        let n_old = old_ids.map_or(0, |a| a.len());
        let old_bytes = |i: usize| -> usize {
            let b = old.expect("an old row");
            self.strings
                .iter()
                .map(|&c| {
                    let o = b.column(c).as_any().downcast_ref::<arrow::array::StringArray>().expect("Utf8 column").value_offsets();
                    (o[i + 1] - o[i]) as usize
                })
                .sum()
        };
        // Merge by device: a changed device takes its new row (or none), others keep theirs.
        let mut order: Vec<(Source, usize)> = Vec::with_capacity(n_old + fresh_rows.len());
        let (mut i, mut j, mut f) = (0, 0, 0);
        while i < n_old || j < changes.len() {
            let o = (i < n_old).then(|| old_ids.expect("old ids").value(i));
            let c = changes.get(j);
            match (o, c) {
                (Some(o), Some((k, _))) if o < *k => {
                    order.push(((0, i), old_bytes(i)));
                    i += 1;
                }
                (Some(_), None) => {
                    order.push(((0, i), old_bytes(i)));
                    i += 1;
                }
                (o, Some((k, row))) => {
                    if o == Some(*k) {
                        i += 1; // replaced or removed
                    }
                    if let Some(r) = row {
                        order.push(((1, f), r.string_bytes()));
                        f += 1;
                    }
                    j += 1;
                }
                (None, None) => unreachable!("loop condition"),
            }
        }
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (n, (_, b)) in order.iter().enumerate() {
            if n > start && (n - start >= self.max_rows || bytes + b > self.max_bytes) {
                out.push(Self::gather(old, &fresh, &order[start..n]));
                (start, bytes) = (n, 0);
            }
            bytes += b;
        }
        if order.len() > start {
            out.push(Self::gather(old, &fresh, &order[start..]));
        }
        out
    }

    /// The rows `picks` of `old` and `fresh`, in that order, as one exactly sized batch.
    pub(super) fn gather(old: Option<&RecordBatch>, fresh: &RecordBatch, picks: &[(Source, usize)]) -> RecordBatch {
        let idx: Vec<Source> = picks.iter().map(|(s, _)| *s).collect();
        let cols = (0..fresh.num_columns())
            .map(|c| {
                let empty;
                let o: &dyn arrow::array::Array = match old {
                    Some(b) => b.column(c).as_ref(),
                    None => {
                        empty = fresh.column(c).slice(0, 0);
                        empty.as_ref()
                    }
                };
                arrow::compute::interleave(&[o, fresh.column(c).as_ref()], &idx).expect("columns of the twins table")
            })
            .collect();
        batch(Table::Twins, cols)
    }
}

/// Row `i` of a `twins` batch, read back.
#[cfg(test)]
pub(super) fn row_at(b: &RecordBatch, i: usize) -> TwinRow {
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, Int32Type, Int64Type, TimestampMillisecondType};
    let s = |c: usize| b.column(c).as_string::<i32>().value(i).to_string();
    let os = |c: usize| {
        let a = b.column(c).as_string::<i32>();
        a.is_valid(i).then(|| a.value(i).to_string())
    };
    let i32c = |c: usize| b.column(c).as_primitive::<Int32Type>().value(i);
    let i64c = |c: usize| b.column(c).as_primitive::<Int64Type>().value(i);
    let ts = |c: usize| b.column(c).as_primitive::<TimestampMillisecondType>().value(i);
    let f = |c: usize| b.column(c).as_primitive::<Float64Type>().value(i);
    let score = b.column(10).as_primitive::<Float64Type>();
    TwinRow {
        device_id: s(0),
        partition: i32c(1),
        schema: s(2),
        device_type: os(3),
        criticality: os(4),
        first_seen_ms: ts(5),
        last_seen_ms: ts(6),
        events: i64c(7),
        anomalies: i64c(8),
        rate_per_s: f(9),
        score: score.is_valid(i).then(|| score.value(i)),
        risk: f(11),
        class: os(12),
        firmware: os(13),
        reported: s(14),
        desired: s(15),
        delta: s(16),
        in_sync: b.column(17).as_boolean().value(i),
        pending_commands: i32c(18),
        incident_id: os(19),
        latest: s(20),
        baselines: s(21),
        identity: s(22),
        peers: i32c(23),
        last_offset: i64c(24),
    }
}
