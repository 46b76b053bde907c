//! Dataset files: replay a dataset CSV (plain or gzip) as events of a schema: each schema field with
//! a `source_column` is read from that column. Event times are synthesised
//! (`start + row × interval`): the public datasets carry none. Also the offline
//! dataset recipe ([`DatasetSpec`]) and the file digest the model card records.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use twinguard_schemas::decode::event_object;
use twinguard_schemas::{EventSchema, FieldKind};

use crate::TrainError;

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub file: PathBuf,
    /// Column whose value is the device id; when None, rows are spread over
    /// `devices` synthetic ids round-robin.
    pub device_column: Option<String>,
    /// Column holding each row's event time (RFC 3339, integer milliseconds since the
    /// epoch, or seconds with a fraction as Zeek writes them); when None, rows are `interval_ms` apart from `start_ms`.
    pub time_column: Option<String>,
    pub devices: usize,
    pub start_ms: i64,
    pub interval_ms: i64,
    pub limit: Option<usize>,
    /// Shuffle the rows (seeded) before replaying them: for datasets whose row
    /// order is an artefact of how they were assembled (CICIoMT2024 rows are grouped
    /// by capture file), so no state carried across rows can learn that order.
    pub shuffle_seed: Option<u64>,
}

/// What the replay read, for the summary.
#[derive(Debug, Default, Clone)]
pub struct ReplayStats {
    pub rows: usize,
    /// Each event's data row in the file (0 = the first row after the header), in
    /// replay order: ties scores back to the file's rows.
    pub file_rows: Vec<usize>,
    /// Values sent absent because they were empty, non-finite or "0 = missing".
    pub values_absent: usize,
}

fn open(path: &Path) -> Result<Box<dyn Read>, TrainError> {
    let f = std::fs::File::open(path).map_err(|e| TrainError::dataset(path, format!("cannot open the dataset: {e}")))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") { Box::new(flate2::read::GzDecoder::new(f)) } else { Box::new(f) })
}

/// The header and rows of a dataset file: CSV (plain or .gz), or a Zeek log
/// (tab-separated, `#`-prefixed header lines naming the `#fields`, `-` for an unset
/// field and `(empty)` for an empty set, both read as missing). At most `limit` rows.
fn read_table(path: &Path, limit: Option<usize>) -> Result<(Vec<String>, Vec<csv::StringRecord>), TrainError> {
    let mut text = String::new();
    open(path)?.read_to_string(&mut text).map_err(|e| TrainError::dataset(path, format!("cannot read the dataset (UTF-8 text expected): {e}")))?;
    let limit = limit.unwrap_or(usize::MAX);
    if text.starts_with("#separator") {
        let mut headers: Option<Vec<String>> = None;
        let mut rows = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if let Some(rest) = line.strip_prefix("#fields\t") {
                headers = Some(rest.split('\t').map(str::to_string).collect());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let h = headers.as_ref().ok_or_else(|| TrainError::dataset(path, format!("line {}: a Zeek row before its `#fields` line", n + 1)))?;
            let cells: Vec<&str> = line.split('\t').map(|c| if c == "-" || c == "(empty)" { "" } else { c }).collect();
            if cells.len() != h.len() {
                return Err(TrainError::dataset(path, format!("line {}: {} tab-separated values, `#fields` names {}", n + 1, cells.len(), h.len())));
            }
            if rows.len() == limit {
                break;
            }
            rows.push(csv::StringRecord::from(cells));
        }
        let headers = headers.ok_or_else(|| TrainError::dataset(path, "a Zeek log without a `#fields` line"))?;
        return Ok((headers, rows));
    }
    let mut rdr = csv::ReaderBuilder::new().flexible(false).from_reader(text.as_bytes());
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| TrainError::dataset(path, format!("cannot read the CSV header: {e}")))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let mut rows = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        if i == limit {
            break;
        }
        rows.push(rec.map_err(|e| TrainError::dataset(path, format!("row {}: {e}", i + 2)))?);
    }
    Ok((headers, rows))
}

/// Read the dataset into `(key, JSON event)` records.
pub fn load(schema: &EventSchema, opts: &ReplayOptions) -> Result<(Vec<(String, Vec<u8>)>, ReplayStats), TrainError> {
    let (headers, records) = read_table(&opts.file, opts.shuffle_seed.is_none().then_some(opts.limit).flatten())?;
    let col = |name: &str| headers.iter().position(|h| h == name);
    let mut mapping = Vec::new();
    for f in &schema.fields {
        let Some(src) = &f.source_column else { continue };
        match col(src) {
            Some(i) => mapping.push((i, f)),
            None if f.required => {
                return Err(TrainError::dataset(
                    &opts.file,
                    format!("column `{src}` (schema field `{}`, required by `{}`) is missing",
                    f.name,
                    schema.id()
                )))
            }
            None => {}
        }
    }
    if mapping.is_empty() {
        return Err(TrainError::dataset(&opts.file, format!("no column matches a `source_column` of schema `{}`", schema.id())));
    }
    let dev_col = match &opts.device_column {
        Some(c) => Some(col(c).ok_or_else(|| TrainError::dataset(&opts.file, format!("device column `{c}` not found")))?),
        None => None,
    };
    let time_col = match &opts.time_column {
        Some(c) => Some(col(c).ok_or_else(|| TrainError::dataset(&opts.file, format!("time column `{c}` not found")))?),
        None => None,
    };
    let prefix = schema.dataset.clone().unwrap_or_else(|| schema.name.clone());
    let mut rows: Vec<(usize, csv::StringRecord)> = records.into_iter().enumerate().collect();
    if let Some(seed) = opts.shuffle_seed {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        rows.truncate(opts.limit.unwrap_or(usize::MAX));
    }
    let mut out = Vec::new();
    let mut stats = ReplayStats::default();
    for (row, (file_row, rec)) in rows.into_iter().enumerate() {
        stats.file_rows.push(file_row);
        let device = match dev_col {
            // The device's own id, unchanged: what the pipeline keys its twin by.
            Some(c) => rec.get(c).unwrap_or("").trim().to_string(),
            None => format!("{prefix}-{}", row % opts.devices.max(1)),
        };
        let mut m = Map::new();
        for (i, f) in &mapping {
            let raw = rec.get(*i).unwrap_or("").trim();
            let v = match f.kind {
                FieldKind::String => (!raw.is_empty()).then(|| Value::String(raw.to_string())),
                FieldKind::F64 => raw
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && !(f.zero_is_missing && *x == 0.0))
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number),
                FieldKind::I64 => raw.parse::<f64>().ok().filter(|x| x.fract() == 0.0 && x.is_finite()).map(|x| Value::from(x as i64)),
            };
            match v {
                Some(v) => {
                    m.insert(f.name.clone(), v);
                }
                None => stats.values_absent += 1,
            }
        }
        let t = match time_col {
            Some(c) => parse_time(rec.get(c).unwrap_or("")).ok_or_else(|| {
                TrainError::dataset(&opts.file, format!("row {}: `{}` is not an event time (RFC 3339, or integer ms since the epoch)", file_row + 2, rec.get(c).unwrap_or("")))
            })?,
            None => opts.start_ms + row as i64 * opts.interval_ms,
        };
        let obj = event_object(&device, t, m);
        out.push((device, serde_json::to_vec(&obj).expect("json")));
        stats.rows += 1;
    }
    Ok((out, stats))
}


/// An event time: RFC 3339, or integer milliseconds since the epoch.
fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    // Seconds with a fraction, as Zeek writes `ts` (1545136440.123456).
    if let Some(secs) = s.parse::<f64>().ok().filter(|x| x.is_finite() && s.contains('.')) {
        return Some((secs * 1000.0).round() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
}

/// Where the events come from and how they are replayed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub file: PathBuf,
    pub schema: String,
    /// Devices the rows are spread over (round-robin).
    pub devices: usize,
    pub interval_ms: i64,
    pub limit: Option<usize>,
    /// Set for stratified splits: rows are replayed in this seeded random order.
    pub shuffle_seed: Option<u64>,
    /// The device id's column (default: `devices` synthetic ids round-robin).
    #[serde(default)]
    pub device_column: Option<String>,
    /// The event time's column (default: rows `interval_ms` apart).
    #[serde(default)]
    pub time_column: Option<String>,
}

/// Fixed start of offline event time (features depend on gaps, never on the epoch).
pub const OFFLINE_START_MS: i64 = 1_700_000_000_000;

impl DatasetSpec {
    /// The dataset's events, in replay order, as `(key, JSON)` records.
    pub fn load(&self, schema: &EventSchema) -> Result<Vec<(String, Vec<u8>)>, TrainError> {
        Ok(self.load_with_rows(schema)?.0)
    }

    /// [`load`](Self::load), with each event's data row in the file.
    pub fn load_with_rows(&self, schema: &EventSchema) -> Result<(Vec<(String, Vec<u8>)>, Vec<usize>), TrainError> {
        let opts = ReplayOptions {
            file: self.file.clone(),
            device_column: self.device_column.clone(),
            time_column: self.time_column.clone(),
            devices: self.devices,
            start_ms: OFFLINE_START_MS,
            interval_ms: self.interval_ms,
            limit: self.limit,
            shuffle_seed: self.shuffle_seed,
        };
        let (records, stats) = load(schema, &opts)?;
        Ok((records, stats.file_rows))
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &std::path::Path) -> Result<String, TrainError> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| TrainError::dataset(path, format!("cannot read: {e}")))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinguard_schemas::{DecodeLimits, Decoder, RawRecord, RejectCode};

    fn dataset(rel: &str) -> PathBuf {
        twinguard_schemas::testing::manifest_dir().join("../../shared/datasets").join(rel)
    }

    fn decode(schema: &EventSchema, recs: &[(String, Vec<u8>)]) -> (usize, Vec<twinguard_schemas::Reject>) {
        let raw: Vec<RawRecord<'_>> = recs
            .iter()
            .enumerate()
            .map(|(i, (k, v))| RawRecord { partition: 0, offset: i as i64, key: Some(k.as_bytes()), payload: Some(v) })
            .collect();
        let out = Decoder::new(schema.clone(), DecodeLimits::default()).decode(&raw, chrono::Utc::now().timestamp_millis()).unwrap();
        (out.batch.num_rows(), out.rejects)
    }

    #[test]
    fn wustl_rows_become_valid_flow_vitals_events() {
        let schema = EventSchema::builtin("wustl-flow-vitals/v1").unwrap();
        let opts = ReplayOptions {
            file: dataset("wustl-ehms-2020/train.csv"),
            device_column: None,
            time_column: None,
            devices: 1,
            start_ms: 1_750_000_000_000,
            interval_ms: 100,
            limit: Some(3000),
            shuffle_seed: None,
        };
        let (recs, stats) = load(&schema, &opts).unwrap();
        assert_eq!(stats.rows, 3000);
        assert!(stats.values_absent > 0, "WUSTL's 0 = missing vitals are sent absent");
        let (rows, rejects) = decode(&schema, &recs);
        assert!(rejects.is_empty(), "{:?}", &rejects[..rejects.len().min(3)]);
        assert_eq!(rows, 3000);
        let first: serde_json::Value = serde_json::from_slice(&recs[0].1).unwrap();
        assert_eq!(first["src_mac"], "84:3a:4b:0f:5b:94");
        assert_eq!(first["label"], "normal");
        assert!(first.get("spo2").is_none(), "SpO2 0 in the CSV means not measured");
    }

    #[test]
    fn ciciomt_rows_decode_and_infinite_rates_are_sent_absent() {
        let schema = EventSchema::builtin("ciciomt-flow-window/v1").unwrap();
        let opts = ReplayOptions {
            file: dataset("ciciomt2024/train_sample.csv.gz"),
            device_column: None,
            time_column: None,
            devices: 16,
            start_ms: 1_750_000_000_000,
            interval_ms: 10,
            limit: Some(5000),
            shuffle_seed: None,
        };
        let (recs, stats) = load(&schema, &opts).unwrap();
        assert_eq!(stats.rows, 5000);
        let (rows, rejects) = decode(&schema, &recs);
        // Rows with empty required cells are not silently fixed: they are rejected,
        // with the field named, when the pipeline decodes them.
        assert!(rejects.iter().all(|r| r.code == RejectCode::MissingField), "{:?}", &rejects[..rejects.len().min(3)]);
        assert_eq!(rows + rejects.len(), 5000);
        assert!(rows > 4500, "{rows} of 5000 decode");
        let with_inf_rate = recs.iter().filter(|(_, v)| !String::from_utf8_lossy(v).contains("\"rate\"")).count();
        assert!(with_inf_rate > 0, "the sample's infinite Rate values are sent absent");
    }

    #[test]
    fn a_missing_required_column_is_named() {
        let dir = std::env::temp_dir().join(format!("tg-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.csv");
        std::fs::write(&f, "SrcBytes,DstBytes\n1,2\n").unwrap();
        let schema = EventSchema::builtin("wustl-flow-vitals/v1").unwrap();
        let opts = ReplayOptions { file: f, device_column: None, time_column: None, devices: 1, start_ms: 0, interval_ms: 1, limit: None, shuffle_seed: None };
        let e = load(&schema, &opts).unwrap_err().to_string();
        assert!(e.contains("SrcLoad") && e.contains("src_load"), "{e}");
    }

    /// A Zeek connection log replays as it comes: `#` header lines, tab-separated
    /// values, `-` as missing, the event time from `ts` (seconds with a fraction),
    /// the device id from a column unchanged.
    #[test]
    fn zeek_logs_replay_with_their_own_times_and_device_ids() {
        let dir = std::env::temp_dir().join(format!("twinguard-zeek-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("conn.log.labeled");
        std::fs::write(
            &log,
            "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n#path\tconn\n\
             #fields\tts\tuid\tid.orig_h\tduration\torig_bytes\tlabel\n\
             #types\ttime\tstring\taddr\tinterval\tcount\tstring\n\
             1545136440.123456\tC1\t192.168.1.5\t0.25\t300\tBenign\n\
             1545136441.5\tC2\t192.168.1.7\t-\t(empty)\tMalicious\n\
             #close\t2018-12-18-12-34-00\n",
        )
        .unwrap();
        let schema = EventSchema::parse(
            "name = \"zeek-conn\"\nversion = 1\n\
             [[fields]]\nname = \"duration\"\ntype = \"f64\"\nrole = \"metric\"\nsource_column = \"duration\"\n\
             [[fields]]\nname = \"orig_bytes\"\ntype = \"f64\"\nrole = \"metric\"\nsource_column = \"orig_bytes\"\n\
             [[fields]]\nname = \"label\"\ntype = \"string\"\nrole = \"label\"\nsource_column = \"label\"\n",
            "test",
        )
        .unwrap();
        let opts = ReplayOptions {
            file: log,
            device_column: Some("id.orig_h".into()),
            time_column: Some("ts".into()),
            devices: 1,
            start_ms: 0,
            interval_ms: 1,
            limit: None,
            shuffle_seed: None,
        };
        let (recs, stats) = load(&schema, &opts).unwrap();
        assert_eq!((stats.rows, stats.values_absent), (2, 2), "`-` and `(empty)` are missing values");
        assert_eq!((recs[0].0.as_str(), recs[1].0.as_str()), ("192.168.1.5", "192.168.1.7"));
        let (events, rejects) = decode(&schema, &recs);
        assert!(rejects.is_empty(), "{rejects:?}");
        assert_eq!(events, 2);
        let first: serde_json::Value = serde_json::from_slice(&recs[0].1).unwrap();
        assert_eq!(first["event_time"], "2018-12-18T12:34:00.123Z");
        assert_eq!(first["device_id"], "192.168.1.5");
        assert!(first.get("duration").is_some() && serde_json::from_slice::<serde_json::Value>(&recs[1].1).unwrap().get("duration").is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
