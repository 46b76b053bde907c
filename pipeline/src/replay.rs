//! Replay a dataset CSV (plain or gzip) as events of a schema: each schema field with
//! a `source_column` is read from that column. Event times are synthesised
//! (`start + row × interval`): the public datasets carry none.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use twinguard_schemas::decode::event_object;
use twinguard_schemas::{EventSchema, FieldKind};

use crate::PipelineError;

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub file: PathBuf,
    /// Column whose value is the device id; when None, rows are spread over
    /// `devices` synthetic ids round-robin.
    pub device_column: Option<String>,
    pub devices: usize,
    pub start_ms: i64,
    pub interval_ms: i64,
    pub limit: Option<usize>,
}

/// What the replay read, for the summary.
#[derive(Debug, Default, Clone)]
pub struct ReplayStats {
    pub rows: usize,
    /// Values sent absent because they were empty, non-finite or "0 = missing".
    pub values_absent: usize,
}

fn open(path: &Path) -> Result<Box<dyn Read>, PipelineError> {
    let f = std::fs::File::open(path).map_err(|e| PipelineError::Io(format!("cannot open dataset {}: {e}", path.display())))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") { Box::new(flate2::read::GzDecoder::new(f)) } else { Box::new(f) })
}

/// Read the dataset into `(key, JSON event)` records.
pub fn load(schema: &EventSchema, opts: &ReplayOptions) -> Result<(Vec<(String, Vec<u8>)>, ReplayStats), PipelineError> {
    let origin = opts.file.display().to_string();
    let mut rdr = csv::ReaderBuilder::new().flexible(false).from_reader(open(&opts.file)?);
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| PipelineError::Io(format!("{origin}: cannot read the CSV header: {e}")))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let mut mapping = Vec::new();
    for f in &schema.fields {
        let Some(src) = &f.source_column else { continue };
        match col(src) {
            Some(i) => mapping.push((i, f)),
            None if f.required => {
                return Err(PipelineError::Io(format!(
                    "{origin}: column `{src}` (schema field `{}`, required by `{}`) is missing",
                    f.name,
                    schema.id()
                )))
            }
            None => {}
        }
    }
    if mapping.is_empty() {
        return Err(PipelineError::Io(format!("{origin}: no column matches a `source_column` of schema `{}`", schema.id())));
    }
    let dev_col = match &opts.device_column {
        Some(c) => Some(col(c).ok_or_else(|| PipelineError::Io(format!("{origin}: device column `{c}` not found")))?),
        None => None,
    };
    let prefix = schema.dataset.clone().unwrap_or_else(|| schema.name.clone());
    let mut out = Vec::new();
    let mut stats = ReplayStats::default();
    for (row, rec) in rdr.records().enumerate() {
        if opts.limit.is_some_and(|l| row >= l) {
            break;
        }
        let rec = rec.map_err(|e| PipelineError::Io(format!("{origin}: row {}: {e}", row + 2)))?;
        let device = match dev_col {
            Some(c) => format!("{prefix}-{}", rec.get(c).unwrap_or("").trim()),
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
        let t = opts.start_ms + row as i64 * opts.interval_ms;
        let obj = event_object(&device, t, m);
        out.push((device, serde_json::to_vec(&obj).expect("json")));
        stats.rows += 1;
    }
    Ok((out, stats))
}
