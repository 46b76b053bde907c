//! Telemetry schema definitions: a schema is a TOML file (see `schemas/README.md`);
//! two are built in. A new schema is a file plus a config line, never code.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;

use crate::{fields, SchemaError};

/// Built-in schema definitions, embedded at compile time.
const BUILTIN: &[(&str, &str)] = &[
    ("wustl-flow-vitals/v1", include_str!("../defs/wustl-flow-vitals.v1.toml")),
    ("ciciomt-flow-window/v1", include_str!("../defs/ciciomt-flow-window.v1.toml")),
];

/// Value type of a field on the wire and in Arrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    /// JSON number, finite; Arrow `Float64`.
    F64,
    /// JSON integer; Arrow `Int64`.
    I64,
    /// JSON string; Arrow `Utf8`.
    String,
}

/// What the twin does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Numeric behaviour: the twin keeps a running baseline of it.
    Metric,
    /// Identity binding (address, MAC): learned during warm-up, a new value is drift.
    Identity,
    /// Communication peer: the twin keeps a bounded set of peers.
    Peer,
    /// Firmware hash: a change is drift.
    Firmware,
    /// Latest reported property, kept as-is.
    Property,
    /// Ground truth carried by replayed datasets; passed to verdicts, never a feature.
    Label,
}

/// Transform applied before a metric enters its baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    #[default]
    None,
    /// `ln(1 + max(x, 0))`, for heavy-tailed non-negative counts and rates.
    Log1p,
}

impl Transform {
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Transform::None => x,
            Transform::Log1p => x.max(0.0).ln_1p(),
        }
    }
}

/// Default `max_len` of a string field (bytes).
pub const DEFAULT_MAX_STRING_LEN: usize = 256;
/// Largest `max_len` a schema may set (bytes): twins keep several such strings, and
/// a twin must stay far below the broker's message size.
pub const MAX_STRING_LEN_LIMIT: usize = 4096;

/// One field of an event schema.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDef {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FieldKind,
    pub role: Role,
    #[serde(default)]
    pub required: bool,
    /// Inclusive lower bound for numeric fields.
    pub min: Option<f64>,
    /// Inclusive upper bound for numeric fields.
    pub max: Option<f64>,
    /// Longest accepted value of a string field, in bytes (default
    /// [`DEFAULT_MAX_STRING_LEN`]); a longer one is rejected as `out_of_range`. This
    /// bounds what a twin can accumulate (bindings, peers, firmware, properties).
    pub max_len: Option<usize>,
    #[serde(default)]
    pub transform: Transform,
    /// Column of the dataset CSV this field is read from by `twinguard replay`.
    pub source_column: Option<String>,
    /// In the dataset, 0 means "not measured" (replay sends the field absent).
    #[serde(default)]
    pub zero_is_missing: bool,
    /// Protected health information (a patient vital sign): alerts carry its
    /// deviation only, never its value or the patient's baseline.
    #[serde(default)]
    pub phi: bool,
    #[serde(default)]
    pub description: String,
}

impl FieldDef {
    /// Longest accepted value of this (string) field, in bytes.
    pub fn max_len(&self) -> usize {
        self.max_len.unwrap_or(DEFAULT_MAX_STRING_LEN)
    }
}

/// How the values of a schema's `label` field become classes and families, for a
/// dataset onboarded by files (`[labels]` in the schema file). Without it, the
/// built-in taxonomy of the public datasets applies.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelMap {
    /// Raw label values that mean normal traffic (trimmed, any case).
    pub normal: Vec<String>,
    /// Raw value → fine class; an unlisted value is its own class.
    #[serde(default)]
    pub classes: std::collections::BTreeMap<String, String>,
    /// Fine class → family; an unlisted class is its own family.
    #[serde(default)]
    pub families: std::collections::BTreeMap<String, String>,
}

/// The class name of normal traffic.
pub const NORMAL_CLASS: &str = "normal";

impl LabelMap {
    /// The fine class of a raw label value.
    pub fn fine_class(&self, raw: &str) -> String {
        let r = raw.trim();
        if self.normal.iter().any(|n| n.trim().eq_ignore_ascii_case(r)) {
            return NORMAL_CLASS.to_string();
        }
        self.classes.get(r).cloned().unwrap_or_else(|| r.to_string())
    }

    /// The family of a fine class.
    pub fn family(&self, fine: &str) -> String {
        if fine == NORMAL_CLASS {
            return NORMAL_CLASS.to_string();
        }
        self.families.get(fine).cloned().unwrap_or_else(|| fine.to_string())
    }
}

/// A versioned telemetry schema. Every event carries `device_id` and `event_time`
/// in addition to the declared fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSchema {
    pub name: String,
    pub version: u32,
    #[serde(default)]
    pub description: String,
    /// Dataset this schema mirrors, if any (informational).
    pub dataset: Option<String>,
    pub fields: Vec<FieldDef>,
    /// Label taxonomy of a dataset onboarded by files.
    #[serde(default)]
    pub labels: Option<LabelMap>,
    /// The definition's text as parsed (a model trained on a schema file carries
    /// it, so `eval` and the pipeline need nothing else).
    #[serde(skip)]
    pub definition: String,
}

impl EventSchema {
    /// Names of the built-in schemas, as `name/vN`.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// A built-in schema by `name/vN` (or bare `name` for its latest version).
    pub fn builtin(id: &str) -> Result<Self, SchemaError> {
        let found = BUILTIN
            .iter()
            .find(|(n, _)| *n == id || n.split('/').next() == Some(id))
            .ok_or_else(|| {
                SchemaError::UnknownBuiltin(id.to_string(), Self::builtin_names().join(", "))
            })?;
        Self::parse(found.1, &format!("built-in `{}`", found.0))
    }

    /// Load a schema definition file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse and validate a schema definition.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SchemaError> {
        let invalid = |message: String| SchemaError::Invalid { origin: origin.to_string(), message };
        let mut schema: EventSchema = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        schema.definition = text.to_string();
        if schema.name.is_empty() || schema.name.contains('/') {
            return Err(invalid(format!("`name` must be non-empty without '/': {:?}", schema.name)));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, f) in schema.fields.iter().enumerate() {
            let at = format!("fields[{i}] `{}`", f.name);
            let reserved = [fields::DEVICE_ID, fields::EVENT_TIME, fields::SCHEMA];
            if f.name.is_empty() || f.name.starts_with('_') || reserved.contains(&f.name.as_str()) {
                return Err(invalid(format!("{at}: name is empty, reserved or starts with '_'")));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(invalid(format!("{at}: duplicate field name")));
            }
            let numeric = f.kind != FieldKind::String;
            match f.role {
                Role::Metric if f.kind != FieldKind::F64 => {
                    return Err(invalid(format!("{at}: role `metric` needs type `f64`")))
                }
                Role::Identity | Role::Peer | Role::Firmware if numeric => {
                    return Err(invalid(format!("{at}: this role needs type `string`")))
                }
                _ => {}
            }
            if numeric && f.max_len.is_some() {
                return Err(invalid(format!("{at}: `max_len` only applies to string fields")));
            }
            if let Some(n) = f.max_len {
                if n == 0 || n > MAX_STRING_LEN_LIMIT {
                    return Err(invalid(format!("{at}: `max_len` {n} must be in 1..={MAX_STRING_LEN_LIMIT}")));
                }
            }
            if !numeric && (f.min.is_some() || f.max.is_some()) {
                return Err(invalid(format!("{at}: `min`/`max` only apply to numeric fields")));
            }
            if let (Some(lo), Some(hi)) = (f.min, f.max) {
                if !(lo <= hi) {
                    return Err(invalid(format!("{at}: `min` {lo} is above `max` {hi}")));
                }
            }
        }
        if schema.metric_indices().is_empty() {
            return Err(invalid("a schema needs at least one `metric` field".into()));
        }
        if let Some(l) = &schema.labels {
            if schema.indices_of(Role::Label).is_empty() {
                return Err(invalid("`[labels]` needs a field with role `label`".into()));
            }
            if l.normal.iter().all(|n| n.trim().is_empty()) {
                return Err(invalid("`[labels] normal` must name the label value(s) of normal traffic".into()));
            }
            if let Some((raw, c)) = l.classes.iter().find(|(_, c)| c.trim().is_empty() || c.as_str() == NORMAL_CLASS) {
                return Err(invalid(format!("`[labels.classes]` maps {raw:?} to {c:?}: a class name must be non-empty and not `{NORMAL_CLASS}` (list normal values in `normal`)")));
            }
        }
        Ok(schema)
    }

    /// A built-in schema by `name/vN`, or a schema file by path.
    pub fn named_or_file(name: &str) -> Result<Self, SchemaError> {
        match Self::builtin(name) {
            Ok(s) => Ok(s),
            Err(e) if !std::path::Path::new(name).is_file() => Err(e),
            Err(_) => Self::from_file(std::path::Path::new(name)),
        }
    }

    /// Whether this is a built-in schema (its definition ships with twinguard).
    pub fn is_builtin(&self) -> bool {
        Self::builtin(&self.id()).is_ok_and(|b| b.definition == self.definition)
    }

    /// `name/vN`, the identifier used in config, changelog and DLQ headers.
    pub fn id(&self) -> String {
        format!("{}/v{}", self.name, self.version)
    }

    /// Indices (into `fields`) of the metric fields, in declaration order.
    pub fn metric_indices(&self) -> Vec<usize> {
        self.indices_of(Role::Metric)
    }

    /// Indices (into `fields`) of the fields with the given role.
    pub fn indices_of(&self, role: Role) -> Vec<usize> {
        self.fields.iter().enumerate().filter(|(_, f)| f.role == role).map(|(i, _)| i).collect()
    }

    /// Arrow schema of a decoded event batch: `device_id`, `event_time` (ms, UTC),
    /// source coordinates, then the declared fields in order (column `4 + i` is
    /// `fields[i]`).
    pub fn arrow_schema(&self) -> SchemaRef {
        let mut cols = vec![
            Field::new(fields::DEVICE_ID, DataType::Utf8, false),
            Field::new(
                fields::EVENT_TIME,
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new(fields::SRC_PARTITION, DataType::Int32, false),
            Field::new(fields::SRC_OFFSET, DataType::Int64, false),
        ];
        for f in &self.fields {
            let dt = match f.kind {
                FieldKind::F64 => DataType::Float64,
                FieldKind::I64 => DataType::Int64,
                FieldKind::String => DataType::Utf8,
            };
            cols.push(Field::new(&f.name, dt, !f.required));
        }
        let mut md = std::collections::HashMap::new();
        md.insert("twinguard.schema".to_string(), self.id());
        Arc::new(Schema::new_with_metadata(cols, md))
    }

    /// Column index of `fields[i]` in [`arrow_schema`](Self::arrow_schema).
    pub const FIRST_FIELD_COLUMN: usize = 4;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_have_metrics() {
        for id in EventSchema::builtin_names() {
            let s = EventSchema::builtin(id).unwrap();
            assert_eq!(s.id(), id);
            assert!(s.metric_indices().len() >= 20, "{id}");
            assert_eq!(s.arrow_schema().fields().len(), 4 + s.fields.len());
        }
        assert_eq!(EventSchema::builtin("wustl-flow-vitals").unwrap().version, 1);
    }

    #[test]
    fn unknown_builtin_lists_known_ones() {
        let e = EventSchema::builtin("nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("wustl-flow-vitals/v1"), "{e}");
    }

    #[test]
    fn invalid_definitions_name_the_field() {
        let bad = r#"
            name = "x"
            version = 1
            [[fields]]
            name = "a"
            type = "string"
            role = "metric"
        "#;
        let e = EventSchema::parse(bad, "t").unwrap_err().to_string();
        assert!(e.contains("fields[0] `a`") && e.contains("f64"), "{e}");
        let unknown_key = "name = \"x\"\nversion = 1\nfields = []\nbogus = 1\n";
        let e = EventSchema::parse(unknown_key, "t").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
