//! A constraint file (what an attacker controlling its own traffic may change,
//! per attack family) and the shaping of an event by a candidate's factors, with
//! the repair that keeps derived fields consistent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use twinguard_schemas::EventSchema;

use crate::TrainError;

/// One field an attacker may change: its new value is the original times a factor
/// in `[min_factor, max_factor]`, clamped to `[min, max]`. A derived field is
/// recomputed from other knobs' final values instead: with `follows`, the original
/// times the lead's ratio (new / original; a window's byte sum when every packet
/// is padded), divided by `divided_by`'s ratio (a load = bytes / duration); with
/// `adds`, the original plus the lead's change (a total = source + destination).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knob {
    pub field: String,
    #[serde(default = "one")]
    pub min_factor: f64,
    #[serde(default = "one")]
    pub max_factor: f64,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub follows: Option<String>,
    #[serde(default)]
    pub divided_by: Option<String>,
    #[serde(default)]
    pub adds: Option<String>,
}

impl Knob {
    /// Recomputed from other knobs, never drawn.
    pub fn derived(&self) -> bool {
        self.follows.is_some() || self.adds.is_some()
    }
}

fn one() -> f64 {
    1.0
}

/// A family's knobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilyKnobs {
    pub knobs: Vec<Knob>,
}

/// Fields kept in ascending order after a change (e.g. min ≤ avg ≤ max).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ordered {
    pub fields: Vec<String>,
}

/// A constraint file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// What the threat model is, in words (reported).
    pub threat: String,
    /// Per family (`default` for families not listed); an empty list: nothing can change.
    pub family: BTreeMap<String, FamilyKnobs>,
    #[serde(default)]
    pub ordered: Vec<Ordered>,
    /// Threat T2: the attacker also copies the device's identity (every
    /// identity-role field set to the first value the device's twin learned: its
    /// MAC and address, sniffed from its traffic).
    #[serde(default)]
    pub clone_identity: bool,
}

impl Constraints {
    /// Read and check a constraint file against the schema's metric fields.
    pub fn load(path: &Path, schema: &EventSchema) -> Result<Constraints, TrainError> {
        let err = |reason: String| TrainError::Config { key: format!("--constraints {}", path.display()), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let c: Constraints = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let metrics: BTreeSet<String> = schema.metric_indices().into_iter().map(|i| schema.fields[i].name.clone()).collect();
        for (fam, k) in &c.family {
            let own: BTreeSet<&str> = k.knobs.iter().map(|k| k.field.as_str()).collect();
            for knob in &k.knobs {
                if !metrics.contains(&knob.field) {
                    return Err(err(format!("family `{fam}`: `{}` is not a metric of schema {}", knob.field, schema.id())));
                }
                if !(knob.min_factor > 0.0 && knob.min_factor <= knob.max_factor) {
                    return Err(err(format!("family `{fam}`, `{}`: need 0 < min_factor <= max_factor", knob.field)));
                }
                for (rel, lead) in [("follows", &knob.follows), ("divided_by", &knob.divided_by), ("adds", &knob.adds)] {
                    if let Some(f) = lead.as_deref().filter(|f| !own.contains(f)) {
                        return Err(err(format!("family `{fam}`, `{}` {rel} `{f}`, which is not one of the family's knobs", knob.field)));
                    }
                }
                if knob.divided_by.is_some() && knob.follows.is_none() {
                    return Err(err(format!("family `{fam}`, `{}`: divided_by needs follows", knob.field)));
                }
                if knob.follows.is_some() && knob.adds.is_some() {
                    return Err(err(format!("family `{fam}`, `{}`: follows and adds exclude each other", knob.field)));
                }
            }
        }
        for o in &c.ordered {
            if let Some(f) = o.fields.iter().find(|f| !metrics.contains(*f)) {
                return Err(err(format!("ordered: `{f}` is not a metric of schema {}", schema.id())));
            }
        }
        if !c.family.contains_key("default") {
            return Err(err("no `[family.default]` (the knobs of families not listed)".into()));
        }
        Ok(c)
    }

    pub(crate) fn knobs(&self, family: &str) -> &[Knob] {
        &self.family.get(family).or_else(|| self.family.get("default")).expect("checked at load").knobs
    }
}

/// The event with `knobs` set by factors `f` of the original values `x0`, repaired:
/// each clamped to its bounds, then `ordered` groups raised so each field is at
/// least the one before it (within every field's bounds when the original was
/// ordered and the group's factors and caps agree), then each `follows` field
/// scaled by its lead's final ratio (over its divisor's), or moved by its lead's
/// change, in file order (a derived field recomputed; a later one may use an
/// earlier one's result).
pub(crate) fn shaped(knobs: &[Knob], x0: &[f64], f: &[f64], ordered: &[Ordered], event: &Map<String, Value>) -> Map<String, Value> {
    let mut e = event.clone();
    let clamp = |knob: &Knob, x: f64, v: f64| {
        let v = knob.min.map_or(v, |lo| v.max(lo.min(x)));
        knob.max.map_or(v, |hi| v.min(hi.max(x)))
    };
    for (k, knob) in knobs.iter().enumerate() {
        if !knob.derived() && !x0[k].is_nan() {
            e.insert(knob.field.clone(), Value::from(clamp(knob, x0[k], x0[k] * f[k])));
        }
    }
    for o in ordered {
        let mut floor = f64::NEG_INFINITY;
        for field in &o.fields {
            if let Some(v) = e.get(field).and_then(Value::as_f64) {
                floor = floor.max(v);
                e.insert(field.clone(), Value::from(floor));
            }
        }
    }
    let now = |e: &Map<String, Value>, lead: &str| -> Option<(f64, f64)> {
        let j = knobs.iter().position(|l| l.field == lead)?;
        Some((x0[j], e.get(lead).and_then(Value::as_f64)?)).filter(|(x, _)| x.is_finite())
    };
    let ratio = |e: &Map<String, Value>, lead: &str| now(e, lead).filter(|(x, _)| *x != 0.0).map_or(1.0, |(x, v)| v / x);
    for (k, knob) in knobs.iter().enumerate() {
        if x0[k].is_nan() || !knob.derived() {
            continue;
        }
        let v = match (&knob.follows, &knob.adds) {
            (Some(lead), _) => x0[k] * ratio(&e, lead) / knob.divided_by.as_deref().map_or(1.0, |d| ratio(&e, d)),
            (None, Some(lead)) => x0[k] + now(&e, lead).map_or(0.0, |(x, v)| v - x),
            (None, None) => continue,
        };
        e.insert(knob.field.clone(), Value::from(clamp(knob, x0[k], v)));
    }
    e
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::tests::knob;

    /// Repair: ordered fields raised to at least the one before, a follower scaled
    /// by its lead's final ratio, caps held.
    #[test]
    fn shaping_keeps_fields_ordered_derived_fields_consistent_and_caps() {
        let mut cap = knob("max", 1.0, 2.0);
        cap.max = Some(1514.0);
        let knobs = vec![knob("min", 1.0, 2.0), knob("avg", 1.0, 2.0), cap, Knob { follows: Some("avg".into()), ..knob("tot_sum", 1.0, 1.0) }];
        let event: Map<String, Value> = serde_json::from_str(r#"{"min": 60.0, "avg": 100.0, "max": 1000.0, "tot_sum": 1000.0}"#).unwrap();
        let x0 = [60.0, 100.0, 1000.0, 1000.0];
        let ordered = [Ordered { fields: vec!["min".into(), "avg".into(), "max".into()] }];
        let e = shaped(&knobs, &x0, &[2.0, 1.0, 2.0, 1.0], &ordered, &event);
        let v = |f: &str| e[f].as_f64().unwrap();
        assert_eq!((v("min"), v("avg"), v("max")), (120.0, 120.0, 1514.0), "min padded past avg lifts avg; max capped");
        assert_eq!(v("tot_sum"), 1200.0, "the byte sum follows avg's final ratio (1.2), not its drawn factor (1.0)");
        // A load recomputed from bytes over duration; a total from its part's change.
        let knobs = vec![knob("bytes", 1.0, 2.0), knob("dur", 1.0, 2.0), Knob { follows: Some("bytes".into()), divided_by: Some("dur".into()), ..knob("load", 1.0, 1.0) }, Knob { adds: Some("bytes".into()), ..knob("tot", 1.0, 1.0) }];
        let event: Map<String, Value> = serde_json::from_str(r#"{"bytes": 100.0, "dur": 2.0, "load": 400.0, "tot": 150.0}"#).unwrap();
        let e = shaped(&knobs, &[100.0, 2.0, 400.0, 150.0], &[2.0, 2.0, 1.0, 1.0], &[], &event);
        let v = |f: &str| e[f].as_f64().unwrap();
        assert_eq!((v("bytes"), v("dur"), v("load"), v("tot")), (200.0, 4.0, 400.0, 250.0), "load = 400 x 2 / 2; tot = 150 + 100");
    }
}
